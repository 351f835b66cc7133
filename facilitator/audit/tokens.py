"""Bearer tokens with roles for the `/v1/` API.

Configuration: `FACILITATOR_API_TOKENS` = comma-separated `role:sha256hex`, where `sha256hex` is
the SHA-256 of the token's UTF-8 bytes (64 hex digits), e.g. `printf %s "$TOKEN" | sha256sum`.
Roles: `auditor` (read endpoints) and `operator` (read endpoints and operator actions).

Guarantees:
- The server never stores a raw token, and no error message echoes any part of an entry (an
  operator who pastes a raw token by mistake does not find it in a log): entries are named by
  position only.
- A presented token is hashed and compared with *every* configured hash with
  `hmac.compare_digest` (no early exit, no comparison of secret-dependent prefixes).
- Tokens are read from the `Authorization: Bearer` header only. A request that carries a token
  in the query string (`access_token=`) is refused with 401 even if it also has a valid header:
  URLs end up in proxy and access logs, so such a token must be considered leaked.
- No configured token (empty variable) means every guarded request gets 401: fail closed.
- 401 `{"error": "unauthorized", "message"}` with `WWW-Authenticate: Bearer realm="facilitator"`
  (plus `error="invalid_token"` when a token was presented); 403 `{"error": "forbidden",
  "message"}` when the token is valid but its role may not call the endpoint.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

ROLES = ("auditor", "operator")
READ_ROLES = ("auditor", "operator")
MAX_TOKEN_CHARS = 512  # longer "tokens" are refused before hashing
QUERY_TOKEN_PARAMS = ("access_token", "token", "api_key", "apikey")
_HASH = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*) *", re.ASCII | re.IGNORECASE)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ApiToken:
    role: str
    digest: bytes = field(repr=False)  # SHA-256 of the token


API_TOKENS_KEY: web.AppKey[tuple[ApiToken, ...]] = web.AppKey("api_tokens", tuple)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_api_tokens(value: str) -> tuple[ApiToken, ...]:
    """Parse `FACILITATOR_API_TOKENS`; raises ValueError naming the bad entry by position."""
    if not value.strip():
        return ()
    tokens: list[ApiToken] = []
    for position, entry in enumerate(value.split(","), start=1):
        token = _parse_entry(entry.strip(), position)
        if any(t.digest == token.digest for t in tokens):
            raise ValueError(f"FACILITATOR_API_TOKENS entry #{position} repeats the hash of an "
                             "earlier entry")
        tokens.append(token)
    return tuple(tokens)


def _parse_entry(entry: str, position: int) -> ApiToken:
    where = f"FACILITATOR_API_TOKENS entry #{position}"
    role, sep, digest = entry.partition(":")
    if not sep:
        raise ValueError(f"{where} must be role:sha256hex")
    if role.strip() not in ROLES:
        raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}")
    if not _HASH.fullmatch(digest.strip()):
        raise ValueError(f"{where}: expected the SHA-256 of the token as 64 hex digits "
                         "(not the token itself)")
    return ApiToken(role.strip(), bytes.fromhex(digest.strip()))


def install_api_tokens(app: web.Application, tokens: tuple[ApiToken, ...]) -> None:
    """Make `tokens` the ones `require_role` checks for this app (and its sub-apps)."""
    app[API_TOKENS_KEY] = tokens


def authenticate(request: web.Request, tokens: tuple[ApiToken, ...]) -> ApiToken | None:
    """The configured token the request presents in its Authorization header, or None."""
    match = _BEARER.fullmatch(request.headers.get("Authorization", ""))
    if match is None or len(match.group(1)) > MAX_TOKEN_CHARS:
        return None
    presented = token_digest(match.group(1))
    found: ApiToken | None = None
    for token in tokens:  # all of them, always: timing does not reveal which entry matched
        if hmac.compare_digest(presented, token.digest):
            found = token
    return found


def require_role(*roles: str) -> Callable[[Handler], Handler]:
    """Decorator for aiohttp handlers: 401 without a valid token, 403 for another role.

    The tokens are looked up in `request.config_dict[API_TOKENS_KEY]` (see `install_api_tokens`;
    `add_audit_routes` installs them); when none are installed every request gets 401."""
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise ValueError(f"require_role needs roles from {ROLES}, got {roles}")

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            denial = check_role(request, roles)
            return denial if denial is not None else await handler(request)
        return guarded
    return decorate


def check_role(request: web.Request, roles: tuple[str, ...]) -> web.Response | None:
    """None when the request may proceed, else the 401/403 response to send."""
    if any(name in request.query for name in QUERY_TOKEN_PARAMS):
        return _unauthorized("tokens are accepted only in the Authorization header; a token "
                             "sent in a URL must be revoked", invalid=True)
    if not request.headers.get("Authorization"):
        return _unauthorized("a bearer token is required", invalid=False)
    token = authenticate(request, request.config_dict.get(API_TOKENS_KEY, ()))
    if token is None:
        return _unauthorized("the bearer token is not valid", invalid=True)
    if token.role not in roles:
        return _error(403, "forbidden", f"this endpoint requires the role {' or '.join(roles)}",
                      'Bearer realm="facilitator", error="insufficient_scope"')
    return None


def _unauthorized(message: str, *, invalid: bool) -> web.Response:
    challenge = 'Bearer realm="facilitator"' + (', error="invalid_token"' if invalid else "")
    return _error(401, "unauthorized", message, challenge)


def _error(status: int, error: str, message: str, challenge: str) -> web.Response:
    return web.Response(body=orjson.dumps({"error": error, "message": message}), status=status,
                        content_type="application/json",
                        headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"})

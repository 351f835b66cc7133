"""A TEE gateway emulator: an OpenGradient-style LLM inference provider (Base Sepolia era) that
takes x402 `upto` payments through our facilitator and attests every response like a TEE.

Devnet and test tooling only (`facilitator serve` never imports it; nothing here imports the
x402 SDK). It behaves as OpenGradient's tee-gateway + og-x402 middleware do (notes
`opengradient.md` §2–§3, §5), with a deterministic "model" instead of an LLM:

- `GET /signing-key` → `{public_key (PEM), tee_id, timestamp}`; `GET /health`.
- `POST /v1/chat/completions` (OpenAI-style), paid with x402 `upto` over Permit2:
  - no payment → 402, header `PAYMENT-REQUIRED` = base64 JSON of a v2 PaymentRequired whose one
    `accepts` entry asks for a session CAP (default 0.1 OPG) of OPG on eip155:84532 with
    `extra {name "OPG", version "2", assetTransferMethod "permit2", facilitatorAddress}` (the
    address comes from the facilitator's `/supported`);
  - `PAYMENT-SIGNATURE` → the facilitator's `/verify` is called ONCE per payment (concurrent
    first requests with the same header share that one call), a session is opened and the 200
    carries `X-Upto-Session: <uuid>`; later requests send that header and spend from the session;
  - a request whose cost would take the session over its cap, or that names a settled, failed,
    settling or expired session → 402 `{"error": "Session expired or exhausted"}` WITHOUT a
    `PAYMENT-REQUIRED` header (as og-x402 answers; its clients re-challenge without headers).
    Deviation, on purpose: og-x402 learns the cost after serving and may overrun the cap (the
    overrun is then served for free); here the cost is known first, so the cap always holds.
- Every 200 carries the TEE fields `tee_signature` (base64 RSA-PSS), `tee_request_hash`,
  `tee_output_hash` (hex, no 0x), `tee_timestamp`, `tee_id` (0x…) at the top level of the JSON
  and as `X-TEE-*` headers, computed with `facilitator/core/attestation.py` exactly as
  OpenGradient's gateway does; plus `usage` and (as newer gateway builds do) an unsigned
  `opengradient {cost_opg, cost_usd, opg_price_usd}` block.
- Cost per request = ceil((prompt·in_usd + completion·out_usd) / OPG_USD · 10^18) OPG wei, with
  fixed prices (`MODEL_PRICES`) and OPG_USD = 1 (the Base Sepolia era's mock price feed).
- After each response, `POST /settle_data` (empty body; headers `x-settlement-type`,
  `x-settlement-data` = base64 JSON as og-x402 builds it, plus our `session` and `cost_opg`
  extensions). Mode from the client's `X-SETTLEMENT-TYPE` (normalised like og-x402; default
  `batch`). `individual` is posted before the response returns and the facilitator's job is
  echoed as `X-Settlement-*` headers (as og-x402 does); `batch` and `private` are posted in the
  background (deviation: og-x402 never posts `private`). Retries are bounded; a failure is
  logged and recorded in `settle_data_posts`, never raised.
- The reaper settles a session when it is idle for `idle_timeout_s`, exhausted, or close to its
  permit deadline: `POST /settle` with the settle-time requirements (`amount` = the accumulated
  cost) and `usageMetadata`; synchronously, or with `settle_mode="async"` through
  `X-Settle-Mode: async` and a bounded poll of `GET /settle/{jobId}`. The outcome is recorded on
  the session. A session that cost nothing is closed without a settlement (as og-x402 does).

Fault knobs for the cross-check tests (`GatewayFaults`, all off by default; each one makes the
gateway misbehave in exactly one way):
- `forge_signatures`: sign responses with a second RSA key that is not the registered one, while
  still advertising the registered key and its tee id (signatures fail verification).
- `settle_adjust_opg`: added to every session's settled amount (>0 overcharges, <0 undercharges;
  clamped at 0). `usageMetadata.costOpg` reports the adjusted amount, the per-request
  `cost_opg` posted to `/settle_data` stays truthful.
- `skip_settle_data`: never post `/settle_data`.
- `serve_unpaid`: serve (and attest, and post `/settle_data` for) requests that carry no payment
  and no session: those posts have no `session` extension.
- `double_bill`: charge every paid request to a second open session too (the oldest other one
  with room), and post its settlement data once per session: the same inference reported in two
  sessions.

Guarantees: binds 127.0.0.1 only; request bodies are bounded; a malformed chat body is a 400
`{"error"}` (never a 500: not JSON, a number too long to read, a text part or tool function of the
wrong type); nothing blocking runs on the event loop (key generation runs in a worker thread);
every retry, poll and wait is bounded; `stop()` cancels the reaper and waits for background posts
(optionally settling every open session first).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Self

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from eth_utils import to_checksum_address

from facilitator.core import attestation as att
from facilitator.devnet import contracts

log = logging.getLogger("facilitator.devnet.gateway")

CHAT_PATH = "/v1/chat/completions"
NETWORK = "eip155:84532"
DEFAULT_SESSION_CAP = 10**17  # 0.1 OPG: tee-gateway CHAT_COMPLETIONS_OPG_SESSION_MAX_SPEND
DEFAULT_MAX_TIMEOUT_S = 300
DEFAULT_IDLE_TIMEOUT_S = 100.0  # tee-gateway session_idle_timeout
DEADLINE_MARGIN_S = 30.0  # a session is settled this long before its permit deadline
SETTLE_POLL_TIMEOUT_S = 60.0  # async settle: how long a job is polled
SETTLE_ATTEMPTS = 3  # /settle of a session (retried on settlement_pending or unavailable)
SETTLE_DATA_ATTEMPTS = 3  # /settle_data (retried on transport errors and 5xx)
SERVICE = "chat"  # usageMetadata.service
OPG_USD = Fraction(1)  # Base Sepolia era: `_fetch_token_a_price_usd_mock`
WEI_PER_OPG = 10**18
MAX_BODY_BYTES = 1024 * 1024

SESSION_HEADER = "X-Upto-Session"
PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
SETTLEMENT_TYPE_HEADER = "X-SETTLEMENT-TYPE"
SESSION_EXHAUSTED = {"error": "Session expired or exhausted"}
SETTLEMENT_TYPES = ("private", "batch", "individual")

# og-x402 `_create_settlement_data_headers`: the facilitator's settlementJob as response headers.
_SETTLEMENT_JOB_HEADERS = {
    "jobId": "X-Settlement-Job-ID", "queue": "X-Settlement-Queue",
    "status": "X-Settlement-Status", "settlementType": "X-Settlement-Type",
    "queueNonce": "X-Settlement-Queue-Nonce", "signerAddress": "X-Settlement-Signer-Address",
    "txHash": "X-Settlement-Tx-Hash", "walrusBlobId": "X-Settlement-Walrus-Blob-ID",
}
_NOT_KEY_CHARS = re.compile(r"[\s_\-]")


@dataclass(frozen=True)
class ModelPrice:
    """USD per token (tee-gateway `model_registry.py`)."""

    input_usd: Fraction
    output_usd: Fraction


def _price(input_usd: str, output_usd: str) -> ModelPrice:
    return ModelPrice(Fraction(input_usd), Fraction(output_usd))


MODEL_PRICES: dict[str, ModelPrice] = {
    "gpt-4.1": _price("0.000002", "0.000008"),
    "gpt-4.1-mini": _price("0.0000004", "0.0000016"),
    "claude-haiku-4-5": _price("0.000001", "0.000005"),
    "gemini-2.5-flash": _price("0.0000003", "0.0000025"),
}


def request_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int,
                 opg_usd: Fraction = OPG_USD) -> tuple[int, Fraction]:
    """(OPG wei, USD) of one request: ceil((p·in + c·out) / OPG_USD · 10^18)."""
    usd = prompt_tokens * price.input_usd + completion_tokens * price.output_usd
    return math.ceil(usd / opg_usd * WEI_PER_OPG), usd


def usd_text(value: Fraction) -> str:
    """A USD amount as a plain decimal string (prices are decimals, so it is exact)."""
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def count_tokens(text: str) -> int:
    """The emulator's deterministic tokenizer: one token per 4 characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def normalize_settlement_type(raw: str | None) -> str | None:
    """og-x402 `_normalize_settlement_type`: case, whitespace, `-` and `_` ignored; two known
    misspellings accepted; anything else is None (the caller's default)."""
    if not raw:
        return None
    key = _NOT_KEY_CHARS.sub("", raw).lower()
    if key in ("private", "pivate"):
        return "private"
    if key == "batch":
        return "batch"
    if key in ("individual", "inidvidual"):
        return "individual"
    return None


def b64json(value: Any) -> str:
    """Compact JSON, base64 (standard alphabet, padded): x402 headers and settlement data."""
    raw = json.dumps(value, separators=(",", ":"), default=str).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def decode_b64json(value: str) -> Any:
    """Inverse of `b64json`; raises ValueError."""
    try:
        return json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not base64 JSON: {exc}") from None


@dataclass(frozen=True)
class _Refusal:
    """A non-200 answer, kept as data: concurrent first requests with one payment share it, and
    each of them needs its own aiohttp response object."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


_EXHAUSTED = _Refusal(402, SESSION_EXHAUSTED)


class GatewayError(RuntimeError):
    """The gateway could not start (e.g. the facilitator's /supported has no upto kind)."""


@dataclass
class GatewayFaults:
    """Explicit misbehaviour for cross-check tests; see the module docstring."""

    forge_signatures: bool = False
    settle_adjust_opg: int = 0
    skip_settle_data: bool = False
    serve_unpaid: bool = False
    double_bill: bool = False


@dataclass
class ServedRequest:
    """One attested response, as the gateway recorded it."""

    request_id: str
    session_ids: list[str]  # empty for an unpaid request; two with `double_bill`
    settlement_type: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_opg: int
    cost_usd: Fraction
    response: dict[str, Any]


@dataclass
class SettleDataPost:
    """One `/settle_data` submission and how it ended."""

    settlement_type: str
    payload: dict[str, Any]
    header: str  # the x-settlement-data value sent
    status: int | None = None
    answer: Any = None
    error: str | None = None
    attempts: int = 0

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class SessionOutcome:
    """How a session's settlement ended. `transaction` is the Base tx hash ("" when nothing
    moved); `job_id` is the facilitator's `payment-<uuid>` in async mode."""

    success: bool
    amount: int
    transaction: str = ""
    job_id: str | None = None
    error: str | None = None
    answer: dict[str, Any] | None = None


@dataclass
class UptoSession:
    """A paid session: one verified Permit2 permit covering many requests up to `cap`."""

    id: str
    payer: str
    nonce: int
    cap: int
    deadline: int
    payload: dict[str, Any]
    requirements: dict[str, Any]
    created_at: float
    last_activity: float
    state: str = "open"  # open | settling | settled | failed | closed (nothing to settle)
    exhausted: bool = False
    accumulated: int = 0
    request_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Fraction = Fraction(0)
    models: list[str] = field(default_factory=list)
    settlement_types: list[str] = field(default_factory=list)
    request_costs: list[int] = field(default_factory=list)
    outcome: SessionOutcome | None = None

    def usable(self, now: float) -> bool:
        return self.state == "open" and not self.exhausted and now < self.deadline

    def charge(self, cost: int, usd: Fraction, prompt: int, completion: int, model: str,
               settlement_type: str, now: float) -> None:
        self.accumulated += cost
        self.cost_usd += usd
        self.request_count += 1
        self.input_tokens += prompt
        self.output_tokens += completion
        self.models.append(model)
        self.settlement_types.append(settlement_type)
        self.request_costs.append(cost)
        self.last_activity = now


@dataclass
class _Completion:
    """One answer, computed once per request: what it costs and what is signed."""

    body: dict[str, Any]
    input_hash: bytes  # of the canonical request
    model: str
    settlement_type: str
    message: dict[str, Any]
    finish_reason: str
    output_text: str  # what the TEE signs (og `response_content_for_hash`)
    prompt_tokens: int
    completion_tokens: int
    cost_opg: int
    cost_usd: Fraction


class TeeGateway:
    """The emulator: `await TeeGateway(facilitator_url, pay_to=...).start()`, then `url`."""

    def __init__(self, facilitator_url: str, *, pay_to: str, port: int = 0,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, settle_mode: str = "sync",
                 settle_data_url: str | None = None, faults: GatewayFaults | None = None
                 ) -> None:
        if settle_mode not in ("sync", "async"):
            raise ValueError("settle_mode must be 'sync' or 'async'")
        self.facilitator_url = facilitator_url.rstrip("/")
        self.settle_data_url = (settle_data_url or facilitator_url).rstrip("/")
        self.pay_to = to_checksum_address(pay_to)
        self.port = port
        self.session_cap = DEFAULT_SESSION_CAP  # tests lower it after construction
        self.network = NETWORK
        self.asset = to_checksum_address(contracts.CANONICAL_OPG)
        self.idle_timeout_s = idle_timeout_s
        self.reap_interval_s = max(0.05, min(idle_timeout_s / 4, 5.0))
        self.settle_mode = settle_mode
        self.facilitator_address: str | None = None  # from the facilitator's /supported
        self.faults = faults or GatewayFaults()
        self._signing_key: rsa.RSAPrivateKey | None = None
        self._forged_key: rsa.RSAPrivateKey | None = None
        self.public_key_der = b""
        self.tee_id = b""
        self.url = ""
        self.sessions: dict[str, UptoSession] = {}
        self.served: list[ServedRequest] = []
        self.settle_data_posts: list[SettleDataPost] = []
        self._by_payment: dict[str, str] = {}  # sha256(PAYMENT-SIGNATURE) -> session id
        self._opening: dict[str, asyncio.Future[UptoSession | _Refusal]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._settling: dict[str, asyncio.Task[SessionOutcome]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # ---- identity ------------------------------------------------------------------------------

    @property
    def tee_id_hex(self) -> str:
        return "0x" + self.tee_id.hex()

    @property
    def public_key_pem(self) -> str:
        assert self._signing_key is not None, "start() first"
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def chat_url(self) -> str:
        return self.url + CHAT_PATH

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> Self:
        self._signing_key = await asyncio.to_thread(att.generate_private_key)
        if self.faults.forge_signatures:
            self._forged_key = await asyncio.to_thread(att.generate_private_key)
        self.public_key_der = att.public_key_der(self._signing_key)
        self.tee_id = att.tee_id_of(self.public_key_der)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            self.facilitator_address = await self._fetch_facilitator_address()
            app = web.Application(client_max_size=MAX_BODY_BYTES)
            app.router.add_get("/health", self._health)
            app.router.add_get("/signing-key", self._signing_key_route)
            app.router.add_post(CHAT_PATH, self._chat)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            try:
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
        except BaseException:
            await self._http.close()
            self._http = None
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{host}:{port}"
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(),
                                                             name="gateway-reaper")
        log.info("TEE gateway %s on %s (tee %s, payee %s)", self.tee_id_hex[:10], self.url,
                 self.tee_id_hex, self.pay_to)
        return self

    async def stop(self, *, settle: bool = False) -> None:
        """Stop serving; with `settle`, settle every open session first (shutdown flush)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if settle and self._http is not None:
            await self.settle_all()
        await self.drain()
        for task in list(self._settling.values()):
            task.cancel()
        await asyncio.gather(*self._settling.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for every background `/settle_data` post started so far."""
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    async def _fetch_facilitator_address(self) -> str:
        assert self._http is not None
        try:
            async with self._http.get(self.facilitator_url + "/supported") as resp:
                supported = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise GatewayError(f"facilitator /supported unavailable: {exc!r}") from exc
        for kind in supported.get("kinds", []) if isinstance(supported, dict) else []:
            extra = kind.get("extra") or {}
            if kind.get("scheme") == "upto" and kind.get("network") == self.network \
                    and extra.get("facilitatorAddress"):
                return to_checksum_address(extra["facilitatorAddress"])
        raise GatewayError(f"facilitator /supported has no upto kind for {self.network} "
                           "with extra.facilitatorAddress")

    async def register(self, og_rpc_url: str, operator_key: str, registry: str) -> str:
        """Register this TEE's signing key on a TEERegistry (the operator needs TEE_OPERATOR),
        with paymentAddress = our payee and endpoint = our URL; returns the tee id."""
        return await contracts.register_tee(og_rpc_url, operator_key, registry,
                                            self.public_key_der, endpoint=self.url,
                                            payment_address=self.pay_to)

    # ---- x402 requirements ---------------------------------------------------------------------

    def requirements(self) -> dict[str, Any]:
        """The upto requirement of a new session (the cap, not a price)."""
        assert self.facilitator_address is not None
        return {"scheme": "upto", "network": self.network, "asset": self.asset,
                "amount": str(self.session_cap), "payTo": self.pay_to,
                "maxTimeoutSeconds": DEFAULT_MAX_TIMEOUT_S,
                "extra": {"name": contracts.OPG_NAME, "version": contracts.OPG_VERSION,
                          "assetTransferMethod": "permit2",
                          "facilitatorAddress": self.facilitator_address}}

    def payment_required(self, error: str = "Payment required") -> dict[str, Any]:
        return {"x402Version": 2, "error": error,
                "resource": {"url": self.chat_url, "description": "Chat completion",
                             "mimeType": "application/json"},
                "accepts": [self.requirements()]}

    def _402(self, error: str = "Payment required") -> _Refusal:
        body = self.payment_required(error)
        return _Refusal(402, body, {PAYMENT_REQUIRED_HEADER: b64json(body)})

    # ---- routes --------------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "tee_id": self.tee_id_hex})

    async def _signing_key_route(self, _request: web.Request) -> web.Response:
        return web.json_response({"public_key": self.public_key_pem, "tee_id": self.tee_id_hex,
                                  "timestamp": int(time.time())})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "request body too large"}, status=413)
        try:
            body = json.loads(raw)
        except RecursionError:
            return web.json_response({"error": "request body nested too deeply"}, status=400)
        except ValueError:  # not JSON, not UTF-8, or an integer too long for int()
            return web.json_response({"error": "request body is not JSON (or holds a number "
                                      "too long to read)"}, status=400)
        mode = normalize_settlement_type(request.headers.get(SETTLEMENT_TYPE_HEADER)) or "batch"
        try:
            completion = self._complete(body, mode)
        except att.UnsupportedRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        session = await self._resolve_session(request)
        if isinstance(session, _Refusal):
            return session.response()
        sessions = self._charge(session, completion) if session is not None else []
        if sessions is None:
            return _EXHAUSTED.response()
        response = self._attested_response(completion)
        self.served.append(ServedRequest(
            request_id=response["id"], session_ids=[s.id for s in sessions],
            settlement_type=mode, model=completion.model,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens, cost_opg=completion.cost_opg,
            cost_usd=completion.cost_usd, response=response))
        headers = _tee_headers(response)
        if session is not None:
            headers[SESSION_HEADER] = session.id
        headers.update(await self._post_settlement_data(completion, response, sessions))
        return web.json_response(response, headers=headers)

    def _charge(self, session: UptoSession, completion: _Completion
                ) -> list[UptoSession] | None:
        """Charge the request to `session` (and, with `double_bill`, a second one); None when
        it would take the session over its cap (the session is then exhausted)."""
        now = time.time()
        if session.accumulated + completion.cost_opg > session.cap:
            session.exhausted = True
            self._wake.set()
            return None
        sessions = [session]
        if self.faults.double_bill:
            other = self._other_session(session, completion.cost_opg, now)
            if other is not None:
                sessions.append(other)
        for s in sessions:
            s.charge(completion.cost_opg, completion.cost_usd, completion.prompt_tokens,
                     completion.completion_tokens, completion.model, completion.settlement_type,
                     now)
            if s.accumulated >= s.cap:
                s.exhausted = True
                self._wake.set()
        return sessions

    async def _post_settlement_data(self, completion: _Completion, response: dict[str, Any],
                                    sessions: list[UptoSession]) -> dict[str, str]:
        """Post the request's settlement data; the `X-Settlement-*` headers to answer with."""
        posts = self._settlement_posts(completion, response, sessions)
        headers: dict[str, str] = {}
        if completion.settlement_type == "individual" and posts:
            # og-x402 buffers individual responses and settles their data before answering.
            first, *posts = posts
            await self._post_settle_data(first)
            headers = _settlement_job_headers(first.answer)
        for post in posts:
            self._spawn(self._post_settle_data(post))
        return headers

    # ---- sessions ------------------------------------------------------------------------------

    async def _resolve_session(self, request: web.Request) -> UptoSession | _Refusal | None:
        """The session paying for this request (None: unpaid, allowed by `serve_unpaid`)."""
        now = time.time()
        session_id = request.headers.get(SESSION_HEADER)
        if session_id:
            session = self.sessions.get(session_id)
            if session is None or not session.usable(now):
                return _EXHAUSTED
            return session
        header = request.headers.get(PAYMENT_SIGNATURE_HEADER)
        if not header:
            return None if self.faults.serve_unpaid else self._402()
        key = hashlib.sha256(header.encode()).hexdigest()
        known = self._by_payment.get(key)
        if known is not None:
            session = self.sessions[known]
            return session if session.usable(now) else _EXHAUSTED
        opening = self._opening.get(key)
        if opening is None:  # the first request with this payment: verify once
            opening = asyncio.get_running_loop().create_future()
            self._opening[key] = opening
            try:
                result = await self._open_session(header)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    opening.cancel()
                else:
                    opening.set_exception(exc)
                    opening.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                self._opening.pop(key, None)
            if isinstance(result, UptoSession):
                self._by_payment[key] = result.id
            opening.set_result(result)
            return result
        return await asyncio.shield(opening)

    async def _open_session(self, header: str) -> UptoSession | _Refusal:
        try:
            payload = decode_b64json(header)
        except ValueError:
            return self._402("Invalid payment header")
        if not isinstance(payload, dict) or payload.get("x402Version") != 2:
            return self._402("Invalid payment header: expected an x402 v2 PaymentPayload")
        requirements = self.requirements()
        if not _same_requirement(payload.get("accepted"), requirements):
            return self._402("No matching payment requirements")
        verdict = await self._verify(payload, requirements)
        if isinstance(verdict, _Refusal):
            return verdict
        try:
            auth = payload["payload"]["permit2Authorization"]
            payer = to_checksum_address(auth["from"])
            nonce, deadline = int(auth["nonce"]), int(auth["deadline"])
            cap = int(auth["permitted"]["amount"])
        except (KeyError, TypeError, ValueError):
            return self._402("Invalid payment payload")
        now = time.time()
        session = UptoSession(id=str(uuid.uuid4()), payer=payer, nonce=nonce,
                              cap=min(cap, self.session_cap), deadline=deadline, payload=payload,
                              requirements=requirements, created_at=now, last_activity=now)
        self.sessions[session.id] = session
        log.info("UPTO_SESSION_CREATED id=%s payer=%s cap=%d", session.id, payer, session.cap)
        return session

    async def _verify(self, payload: dict[str, Any], requirements: dict[str, Any]
                      ) -> dict[str, Any] | _Refusal:
        assert self._http is not None
        body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements}
        try:
            async with self._http.post(self.facilitator_url + "/verify", json=body) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning("facilitator /verify failed: %r", exc)
            return _Refusal(502, {"error": "facilitator unavailable"})
        if status != 200 or not isinstance(answer, dict):
            message = answer.get("message") if isinstance(answer, dict) else None
            return self._402(f"Invalid payment: {message or status}")
        if answer.get("isValid") is not True:
            return self._402(str(answer.get("invalidReason") or "Invalid payment"))
        return answer

    def _other_session(self, session: UptoSession, cost: int, now: float) -> UptoSession | None:
        """`double_bill`: the oldest other open session that can take this cost too."""
        for other in sorted(self.sessions.values(), key=lambda s: s.created_at):
            if other is not session and other.usable(now) and other.accumulated + cost <= other.cap:
                return other
        return None

    # ---- the deterministic "model" and the attestation -----------------------------------------

    def _complete(self, body: Any, mode: str) -> _Completion:
        """The answer to `body`; raises UnsupportedRequest (a 400) for what cannot be served."""
        try:
            canonical = att.canonical_chat_request(body)
        except OverflowError:  # e.g. a temperature too large for a float
            raise att.UnsupportedRequest("a number in the request is out of range") from None
        model = body["model"]
        price = MODEL_PRICES.get(model) or MODEL_PRICES.get(model.rsplit("/", 1)[-1])
        if price is None:
            raise att.UnsupportedRequest(f"Unsupported model: {model}")
        if body.get("stream"):
            raise att.UnsupportedRequest("stream is not supported by the gateway emulator")
        message, finish_reason = _reply(body)
        output_text = att.chat_output_text({"choices": [{"message": message,
                                                         "finish_reason": finish_reason}]})
        prompt_tokens = count_tokens(att.canonical_request_bytes(canonical).decode("utf-8"))
        completion_tokens = count_tokens(output_text)
        cost_opg, cost_usd = request_cost(price, prompt_tokens, completion_tokens)
        return _Completion(body=body, input_hash=att.input_hash(canonical), model=model,
                           settlement_type=mode, message=message, finish_reason=finish_reason,
                           output_text=output_text, prompt_tokens=prompt_tokens,
                           completion_tokens=completion_tokens, cost_opg=cost_opg,
                           cost_usd=cost_usd)

    def quote(self, body: dict[str, Any]) -> int:
        """What `body` would cost in OPG wei (raises UnsupportedRequest like the route's 400)."""
        return self._complete(body, "batch").cost_opg

    def _attested_response(self, c: _Completion) -> dict[str, Any]:
        timestamp = int(time.time())
        response: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": timestamp, "model": c.model,
            "choices": [{"index": 0, "message": c.message, "finish_reason": c.finish_reason}],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                      "total_tokens": c.prompt_tokens + c.completion_tokens},
            "opengradient": {"cost_opg": str(c.cost_opg), "cost_usd": usd_text(c.cost_usd),
                             "opg_price_usd": usd_text(OPG_USD)},
        }
        # The response carries exactly the message the output text was taken from.
        response.update(self._attest(c.input_hash, att.output_hash(c.output_text), timestamp))
        return response

    def _attest(self, in_hash: bytes, out_hash: bytes, timestamp: int) -> dict[str, Any]:
        """The TEE fields for a request and output hash (signed with the forged key when
        `faults.forge_signatures`)."""
        assert self._signing_key is not None, "start() first"
        key = self._forged_key if self._forged_key is not None else self._signing_key
        signature = att.sign_attestation(key, att.message_hash(in_hash, out_hash, timestamp))
        return {"tee_signature": base64.b64encode(signature).decode("ascii"),
                "tee_request_hash": in_hash.hex(), "tee_output_hash": out_hash.hex(),
                "tee_timestamp": timestamp, "tee_id": self.tee_id_hex}

    # ---- /settle_data --------------------------------------------------------------------------

    def _settlement_posts(self, c: _Completion, response: dict[str, Any],
                          sessions: list[UptoSession]) -> list[SettleDataPost]:
        """What og-x402 `_build_settlement_metadata` would send, once per charged session (one
        post without `session` for an unpaid request), plus our `session`/`cost_opg`."""
        if self.faults.skip_settle_data:
            return []
        mode = c.settlement_type
        batch = {"tee_id": response["tee_id"], "input_hash": response["tee_request_hash"],
                 "output_hash": response["tee_output_hash"],
                 "tee_signature": response["tee_signature"],
                 "tee_timestamp": response["tee_timestamp"],
                 "timestamp": response["tee_timestamp"]}
        posts = []
        for session in sessions or [None]:
            payload = dict(batch)
            post_mode = mode
            if mode == "individual":
                # og-x402's `_extract_eth_address_from_payment_payload` gives the Permit2
                # *spender* (the upto proxy) for upto payments, not the payer (notes §3.7);
                # without a payment there is none, and og-x402 falls back to batch.
                spender = _spender(session.payload) if session is not None else None
                if spender:
                    payload.update({"input": c.body, "output": response,
                                    "timestamp": str(response["tee_timestamp"]),
                                    "eth_address": spender})
                else:
                    post_mode = "batch"
            if session is not None:
                payload["session"] = {"id": session.id, "payer": session.payer,
                                      "nonce": str(session.nonce)}
            payload["cost_opg"] = str(c.cost_opg)
            posts.append(SettleDataPost(settlement_type=post_mode, payload=payload,
                                        header=b64json(payload)))
        return posts

    async def _post_settle_data(self, post: SettleDataPost) -> SettleDataPost:
        """POST /settle_data with bounded retries (transport errors and 5xx); never raises."""
        self.settle_data_posts.append(post)
        headers = {"x-settlement-type": post.settlement_type, "x-settlement-data": post.header}
        for attempt in range(1, SETTLE_DATA_ATTEMPTS + 1):
            post.attempts = attempt
            if self._http is None:
                post.error = "gateway stopped"
                break
            try:
                async with self._http.post(self.settle_data_url + "/settle_data",
                                           headers=headers) as resp:
                    post.status = resp.status
                    text = await resp.text()
                try:
                    post.answer = json.loads(text) if text else None
                except json.JSONDecodeError:
                    post.answer = text
                post.error = None if post.accepted else f"HTTP {resp.status}: {text[:200]}"
                if post.status < 500:
                    break
            except (TimeoutError, aiohttp.ClientError) as exc:
                post.status, post.error = None, repr(exc)
            if attempt < SETTLE_DATA_ATTEMPTS:
                await asyncio.sleep(0.1 * 2 ** (attempt - 1))
        if not post.accepted:
            log.warning("settle_data (%s) not accepted after %d attempt(s): %s",
                        post.settlement_type, post.attempts, post.error)
        return post

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- session settlement (the reaper) -------------------------------------------------------

    def due_sessions(self, now: float | None = None) -> list[UptoSession]:
        """Open sessions to settle now: exhausted, idle for `idle_timeout_s`, or within
        `DEADLINE_MARGIN_S` of their permit deadline."""
        now = time.time() if now is None else now
        return [s for s in self.sessions.values() if s.state == "open" and (
            s.exhausted or now - s.last_activity >= self.idle_timeout_s
            or now >= s.deadline - DEADLINE_MARGIN_S)]

    async def _reap_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.reap_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            for session in self.due_sessions():
                self._settle_in_background(session)

    def _settle_in_background(self, session: UptoSession) -> asyncio.Task[SessionOutcome]:
        task = self._settling.get(session.id)
        if task is None:
            session.state = "settling"  # no more requests from here on
            task = asyncio.get_running_loop().create_task(self._settle(session))
            self._settling[session.id] = task
            task.add_done_callback(lambda _t, sid=session.id: self._settling.pop(sid, None))
        return task

    async def settle_all(self) -> list[SessionOutcome]:
        """Settle every open session now (tests, shutdown); returns the outcomes."""
        tasks = [self._settle_in_background(s) for s in list(self.sessions.values())
                 if s.state in ("open", "settling")]
        return list(await asyncio.gather(*tasks))

    def settle_amount(self, session: UptoSession) -> int:
        return max(0, session.accumulated + self.faults.settle_adjust_opg)

    def usage_metadata(self, session: UptoSession, amount: int) -> dict[str, Any]:
        model = max(set(session.models), key=session.models.count) if session.models else None
        return {"sessionId": session.id, "requestCount": session.request_count,
                "costOpg": str(amount), "costUsd": usd_text(session.cost_usd),
                "inputTokens": session.input_tokens, "outputTokens": session.output_tokens,
                "totalTokens": session.input_tokens + session.output_tokens,
                "service": SERVICE, "method": "POST", "path": CHAT_PATH, "model": model,
                "settlementType": session.settlement_types[-1] if session.settlement_types
                else None,
                "network": self.network, "asset": self.asset, "isStreaming": False}

    async def _settle(self, session: UptoSession) -> SessionOutcome:
        amount = self.settle_amount(session)
        if amount == 0:
            session.state = "closed"  # og-x402 never settles a session that cost nothing
            session.outcome = SessionOutcome(success=True, amount=0)
            return session.outcome
        requirements = {**session.requirements, "amount": str(amount)}
        body = {"x402Version": 2, "paymentPayload": session.payload,
                "paymentRequirements": requirements,
                "usageMetadata": self.usage_metadata(session, amount)}
        outcome = SessionOutcome(success=False, amount=amount, error="not attempted")
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            outcome = await self._settle_once(body, amount)
            if outcome.success or outcome.error not in ("settlement_pending", "unavailable"):
                break
            if attempt < SETTLE_ATTEMPTS:
                await asyncio.sleep(min(0.5 * attempt, 2.0))
        session.outcome = outcome
        session.state = "settled" if outcome.success else "failed"
        log.log(logging.INFO if outcome.success else logging.ERROR,
                "session %s settled=%s amount=%d tx=%s job=%s error=%s", session.id,
                outcome.success, amount, outcome.transaction, outcome.job_id, outcome.error)
        return outcome

    async def _settle_once(self, body: dict[str, Any], amount: int) -> SessionOutcome:
        assert self._http is not None
        headers = {"X-Settle-Mode": "async"} if self.settle_mode == "async" else {}
        try:
            async with self._http.post(self.facilitator_url + "/settle", json=body,
                                       headers=headers) as resp:
                status, answer = resp.status, await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning("facilitator /settle failed: %r", exc)
            return SessionOutcome(success=False, amount=amount, error="unavailable")
        job_id = None
        if status == 202 and isinstance(answer, dict) and isinstance(answer.get("paymentJob"),
                                                                     dict):
            job_id = answer["paymentJob"].get("jobId")
            answer = await self._poll_job(job_id)
            if answer is None:
                return SessionOutcome(success=False, amount=amount, job_id=job_id,
                                      error="settlement_pending")
        elif status != 200 or not isinstance(answer, dict):
            return SessionOutcome(success=False, amount=amount, error=f"HTTP {status}",
                                  answer=answer if isinstance(answer, dict) else None)
        success = answer.get("success") is True
        return SessionOutcome(success=success, amount=amount,
                              transaction=str(answer.get("transaction") or ""), job_id=job_id,
                              error=None if success else str(answer.get("errorReason")),
                              answer=answer)

    async def _poll_job(self, job_id: Any) -> dict[str, Any] | None:
        """A finished job's SettleResponse, or None when it did not finish within the bound."""
        assert self._http is not None
        deadline = time.monotonic() + SETTLE_POLL_TIMEOUT_S
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                async with self._http.get(f"{self.facilitator_url}/settle/{job_id}") as resp:
                    job = await resp.json(content_type=None) if resp.status == 200 else None
            except (TimeoutError, aiohttp.ClientError, ValueError):
                job = None
            if isinstance(job, dict) and job.get("status") in ("succeeded", "failed"):
                result = job.get("result")
                if isinstance(result, dict):
                    return result
                return {"success": False, "errorReason": job.get("error") or "job failed",
                        "transaction": ""}
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return None


# ---- helpers ------------------------------------------------------------------------------------


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(_text_part(p) for p in content
                                if isinstance(p, dict) and p.get("type") == "text")
            return "" if content is None else str(content)
    return ""


def _text_part(part: dict[str, Any]) -> str:
    text = part.get("text")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise att.UnsupportedRequest("a text content part's 'text' must be a string")
    return text


def _function_name(holder: Any, where: str) -> str | None:
    """`holder.function.name` of a tool or tool_choice object (None when absent)."""
    if not isinstance(holder, dict):
        return None
    function = holder.get("function")
    if function is None:
        return None
    if not isinstance(function, dict):
        raise att.UnsupportedRequest(f"{where}.function must be an object")
    name = function.get("name")
    if name is not None and not isinstance(name, str):
        raise att.UnsupportedRequest(f"{where}.function.name must be a string")
    return name or None


def _reply(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The deterministic completion: a tool call when tools are offered (tool_choice not "none")
    and the user spoke last; otherwise text echoing the last user message (or the tool result),
    cut to `max_tokens` tokens (finish_reason "length")."""
    messages = body["messages"]
    last = messages[-1]
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    choice = body.get("tool_choice")
    if tools and choice != "none" and last.get("role") == "user":
        name = _function_name(choice, "tool_choice") or _function_name(tools[0], "tools[0]") \
            or "tool"
        arguments = json.dumps({"query": _last_user_text(messages)})
        call_id = "call_" + hashlib.sha256(
            json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]
        calls = [{"id": call_id, "type": "function",
                  "function": {"name": name, "arguments": arguments}}]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    if last.get("role") == "tool":
        text = f"Tool result: {last.get('content')}"
    else:
        text = f"You said: {_last_user_text(messages)}"
    finish = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 \
            and len(text) > 4 * max_tokens:
        text, finish = text[:4 * max_tokens], "length"
    return {"role": "assistant", "content": text}, finish


def _same_requirement(accepted: Any, requirement: dict[str, Any]) -> bool:
    """x402 `find_matching_requirements`: scheme, network, amount, asset and payTo agree."""
    if not isinstance(accepted, dict):
        return False
    for key in ("scheme", "network", "amount"):
        if str(accepted.get(key)) != str(requirement[key]):
            return False
    return all(isinstance(accepted.get(key), str)
               and accepted[key].lower() == requirement[key].lower()
               for key in ("asset", "payTo"))


def _spender(payload: dict[str, Any]) -> str | None:
    auth = (payload.get("payload") or {}).get("permit2Authorization") or {}
    spender = auth.get("spender") if isinstance(auth, dict) else None
    return spender if isinstance(spender, str) and spender else None


def _tee_headers(response: dict[str, Any]) -> dict[str, str]:
    """og-x402 middleware `_append_tee_response_headers`."""
    return {"X-TEE-Signature": response["tee_signature"], "X-TEE-ID": response["tee_id"],
            "X-TEE-Timestamp": str(response["tee_timestamp"]),
            "X-TEE-Request-Hash": response["tee_request_hash"],
            "X-TEE-Output-Hash": response["tee_output_hash"]}


def _settlement_job_headers(answer: Any) -> dict[str, str]:
    job = answer.get("settlementJob") if isinstance(answer, dict) else None
    if not isinstance(job, dict):
        return {}
    return {header: str(job[key]) for key, header in _SETTLEMENT_JOB_HEADERS.items()
            if job.get(key) is not None}

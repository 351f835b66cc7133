"""Read-only audit endpoints under `/v1/` (bearer token, role `auditor` or `operator`).

Endpoints (parameters as documented in `facilitator.audit.queries`):
- `GET /v1/settlements?<filters>&limit&cursor&order`
    -> `{"settlements": [Settlement, ...], "nextCursor": str | null}`
- `GET /v1/settlements/{id}` (uuid)
    -> `Settlement + {"confirmations": int | null, "watcher": {"network", "headNumber",
       "chainHead", "haltedReason", "haltedAt"} | null, "transfers": [Transfer, ...],
       "timeline": [{"at", "from", "to", "reason", "transaction", "blockNumber"}, ...]}`;
       404 `{"error": "not_found", "message"}` when there is no such settlement.
       `confirmations` = watcher head - blockNumber + 1 (>= 0) for included/confirmed rows,
       null when the row is not on chain or no chain watcher has a head for its chain.
- `GET /v1/settlements/export?format=csv|jsonl&<filters>&order`
    -> a chunked stream: CSV (header row) or JSON Lines of Settlement.
- `GET /v1/settlements/totals?group_by=pay_to|payer|day&<filters>&limit&cursor`
    -> `{"groupBy", "states": [...], "groups": [{"key", "chainId", "asset", "count",
       "amount"}], "nextCursor"}`; states default to included + confirmed; `day` is the UTC
       day of `createdAt`, as `YYYY-MM-DD`.
- `GET /v1/transfers/unmatched?payer&payTo&asset&tx&from&to&min_amount&max_amount&limit&cursor
   &order` -> `{"transfers": [Transfer, ...], "nextCursor"}` (Transfer logs to watched payees
   that match no settlement; `payer`/`payTo` filter the log's from/to).

Settlement = `{"id", "createdAt", "state", "scheme", "x402Version", "network", "chainId",
"asset", "payer", "payTo", "amount", "nonce", "validAfter", "validBefore", "signature",
"transaction", "blockNumber", "blockHash", "logIndex", "settledBy", "signer", "attempts",
"reason", "message", "signedAt", "broadcastAt", "includedAt", "confirmedAt", "failedAt",
"updatedAt"}`; Transfer = `{"chainId", "blockNumber", "blockHash", "transaction", "logIndex",
"asset", "from", "to", "amount", "observedAt"}`.

Guarantees:
- Authentication and role are checked before anything else (401/403, see `tokens`).
- Bad input gets 400 `{"error": "invalid_request", "field", "message"}` naming the parameter,
  before any database work; no input reaches SQL except as a `$n` parameter.
- An export streams in constant memory (a server-side cursor, one batch in flight, and
  `write` waits for the socket to drain). It reads one consistent snapshot. Its end of stream
  is sent only after the last row: if anything fails midway the connection is aborted, so a
  client sees a truncated transfer (a payload error), never a short file that looks complete.
- At most `max_concurrent_exports` exports run at once (each holds a database connection for
  its whole duration); more get 429 `{"error": "too_many_requests", "message"}`.
- Responses carry `Cache-Control: no-store`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from facilitator.adapters.logging import request_id_var
from facilitator.audit import queries
from facilitator.audit.formats import CONTENT_TYPES, Encoder, encoder
from facilitator.audit.tokens import READ_ROLES, ApiToken, install_api_tokens, require_role
from facilitator.http.app import bad_request, json_response
from facilitator.protocol.fields import BadRequest

log = logging.getLogger("facilitator.audit")

DEFAULT_MAX_CONCURRENT_EXPORTS = 2


@dataclass
class AuditContext:
    pool: asyncpg.Pool
    max_concurrent_exports: int
    exports_running: int = 0


AUDIT_KEY: web.AppKey[AuditContext] = web.AppKey("audit", AuditContext)


def add_audit_routes(app: web.Application, pool: asyncpg.Pool, tokens: tuple[ApiToken, ...],
                     *, max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS) -> None:
    """Register the read-only `/v1/` audit endpoints on `app` and install `tokens` for
    `require_role`. Fixed paths are added before `/v1/settlements/{id}`."""
    install_api_tokens(app, tokens)
    app[AUDIT_KEY] = AuditContext(pool, max_concurrent_exports)
    app.router.add_get("/v1/settlements", list_settlements)
    app.router.add_get("/v1/settlements/export", export_settlements, allow_head=False)
    app.router.add_get("/v1/settlements/totals", settlement_totals)
    app.router.add_get("/v1/settlements/{id}", settlement_detail)
    app.router.add_get("/v1/transfers/unmatched", unmatched_transfers)


def _ok(body: object) -> web.Response:
    response = json_response(body)
    response.headers["Cache-Control"] = "no-store"
    return response


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.config_dict[AUDIT_KEY].pool


@require_role(*READ_ROLES)
async def list_settlements(request: web.Request) -> web.Response:
    try:
        filters, page = queries.parse_settlement_list(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return _ok(await queries.list_settlements(_pool(request), filters, page))


@require_role(*READ_ROLES)
async def settlement_detail(request: web.Request) -> web.Response:
    try:
        if request.query:
            raise BadRequest(next(iter(request.query)), "is not a parameter of this endpoint")
        public_id = queries.parse_public_id(request.match_info["id"])
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    found = await queries.get_settlement(_pool(request), public_id)
    if found is None:
        return json_response({"error": "not_found", "message": f"no settlement {public_id}"},
                             404)
    return _ok(found)


@require_role(*READ_ROLES)
async def settlement_totals(request: web.Request) -> web.Response:
    try:
        totals_request = queries.parse_totals(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return _ok(await queries.totals(_pool(request), totals_request))


@require_role(*READ_ROLES)
async def unmatched_transfers(request: web.Request) -> web.Response:
    try:
        filters, page = queries.parse_unmatched(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return _ok(await queries.list_unmatched(_pool(request), filters, page))


@require_role(*READ_ROLES)
async def export_settlements(request: web.Request) -> web.StreamResponse:
    try:
        export = queries.parse_export(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return await stream_export(
        request, request.config_dict[AUDIT_KEY], queries.open_export(_pool(request), export),
        encoder(export.format), export.format, "settlements")


async def stream_export(request: web.Request, context: AuditContext,
                        batches: AbstractAsyncContextManager[AsyncIterator[Sequence[Any]]],
                        encode: Encoder, fmt: str, name: str) -> web.StreamResponse:
    """Stream `batches` (an open-export context: one snapshot, read page by page) as a chunked
    download named `{name}-{stamp}.{fmt}`, within the concurrent-export limit."""
    if context.exports_running >= context.max_concurrent_exports:
        return json_response({"error": "too_many_requests", "message":
                              f"at most {context.max_concurrent_exports} exports at a time"}, 429)
    context.exports_running += 1
    response: web.StreamResponse | None = None
    try:
        async with batches as pages:
            response = _export_response(fmt, name)
            await response.prepare(request)
            await response.write(encode.header())
            async for rows in pages:
                await response.write(encode.encode(rows))  # waits while the client lags
        await response.write_eof()  # only after the snapshot ended cleanly
    except Exception as exc:  # noqa: BLE001 - after the first byte, only an abort is honest
        if response is None or not response.prepared:
            raise  # nothing sent yet: the normal 500 path answers
        _abort(request, exc)
    finally:
        context.exports_running -= 1
    return response


def _export_response(fmt: str, name: str) -> web.StreamResponse:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(headers={
        "Content-Type": CONTENT_TYPES[fmt], "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{name}-{stamp}.{fmt}"',
        # Set here: a middleware cannot add headers once the stream has started.
        "X-Request-Id": request_id_var.get()})
    response.enable_chunked_encoding()
    return response


def _abort(request: web.Request, exc: Exception) -> None:
    """Drop the connection without the final chunk: the client must not take a truncated
    export for a complete one (and no error body may be appended to a started stream)."""
    if isinstance(exc, ConnectionError):
        log.info("export client went away: %s", type(exc).__name__)
    else:
        log.error("export failed midway; aborting the response", exc_info=exc)
    if request.transport is not None:
        request.transport.abort()

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
- A client that stops reading cannot hold an export forever: each write that waits longer than
  `EXPORT_WRITE_TIMEOUT_S` for the socket aborts the connection, which releases the database
  connection, its snapshot and the export slot.
- At most `max_concurrent_exports` exports run at once (each holds a database connection for
  its whole duration); more get 429 `{"error": "too_many_requests", "message"}`.
- Responses carry `Cache-Control: no-store`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
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
from facilitator.http.app import json_response

log = logging.getLogger("facilitator.audit")

DEFAULT_MAX_CONCURRENT_EXPORTS = 2
# A write that waits this long for the client to take bytes ends the export (the connection is
# aborted): generous for a slow reader, but a client that stopped reading cannot keep a database
# connection, its snapshot and an export slot forever.
EXPORT_WRITE_TIMEOUT_S = 60.0


class ClientStalled(Exception):
    """An export's client took no bytes for a whole write timeout."""


@dataclass
class AuditContext:
    pool: asyncpg.Pool
    max_concurrent_exports: int
    export_write_timeout_s: float = EXPORT_WRITE_TIMEOUT_S
    exports_running: int = 0


AUDIT_KEY: web.AppKey[AuditContext] = web.AppKey("audit", AuditContext)


def add_audit_routes(app: web.Application, pool: asyncpg.Pool, tokens: tuple[ApiToken, ...],
                     *, max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS,
                     export_write_timeout_s: float = EXPORT_WRITE_TIMEOUT_S) -> None:
    """Register the read-only `/v1/` audit endpoints on `app` and install `tokens` for
    `require_role`. Fixed paths are added before `/v1/settlements/{id}`."""
    install_api_tokens(app, tokens)
    app[AUDIT_KEY] = AuditContext(pool, max_concurrent_exports, export_write_timeout_s)
    app.router.add_get("/v1/settlements", list_settlements)
    app.router.add_get("/v1/settlements/export", export_settlements, allow_head=False)
    app.router.add_get("/v1/settlements/totals", settlement_totals)
    app.router.add_get("/v1/settlements/{id}", settlement_detail)
    app.router.add_get("/v1/transfers/unmatched", unmatched_transfers)


def no_store_json(body: object) -> web.Response:
    response = json_response(body)
    response.headers["Cache-Control"] = "no-store"
    return response


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.config_dict[AUDIT_KEY].pool


@require_role(*READ_ROLES)
async def list_settlements(request: web.Request) -> web.Response:
    filters, page = queries.parse_settlement_list(request.query)
    return no_store_json(await queries.list_settlements(_pool(request), filters, page))


@require_role(*READ_ROLES)
async def settlement_detail(request: web.Request) -> web.Response:
    queries.no_query(request.query)
    public_id = queries.parse_public_id(request.match_info["id"])
    found = await queries.get_settlement(_pool(request), public_id)
    if found is None:
        return json_response({"error": "not_found", "message": f"no settlement {public_id}"},
                             404)
    return no_store_json(found)


@require_role(*READ_ROLES)
async def settlement_totals(request: web.Request) -> web.Response:
    totals_request = queries.parse_totals(request.query)
    return no_store_json(await queries.totals(_pool(request), totals_request))


@require_role(*READ_ROLES)
async def unmatched_transfers(request: web.Request) -> web.Response:
    filters, page = queries.parse_unmatched(request.query)
    return no_store_json(await queries.list_unmatched(_pool(request), filters, page))


@require_role(*READ_ROLES)
async def export_settlements(request: web.Request) -> web.StreamResponse:
    export = queries.parse_export(request.query)
    return await stream_export(
        request, request.config_dict[AUDIT_KEY], queries.open_export(_pool(request), export),
        encoder(export.format), export.format, "settlements")


async def stream_export(request: web.Request, context: AuditContext,
                        batches: AbstractAsyncContextManager[AsyncIterator[Sequence[Any]]],
                        encode: Encoder, fmt: str, name: str) -> web.StreamResponse:
    """Stream `batches` (an open-export context: one snapshot, read page by page) as a chunked
    download named `{name}-{stamp}.{fmt}`, within the concurrent-export limit.

    Once the stream has started this handler answers its own failures (a second response
    inside a chunked body would corrupt it): the connection is aborted."""
    if context.exports_running >= context.max_concurrent_exports:
        return json_response({"error": "too_many_requests", "message":
                              f"at most {context.max_concurrent_exports} exports at a time"}, 429)
    context.exports_running += 1
    response: web.StreamResponse | None = None

    async def bounded(write: Awaitable[None]) -> None:
        # Waits while the client lags, but not forever (see EXPORT_WRITE_TIMEOUT_S).
        try:
            await asyncio.wait_for(write, context.export_write_timeout_s)
        except TimeoutError:
            raise ClientStalled(f"no bytes taken for {context.export_write_timeout_s} s") \
                from None

    try:
        async with batches as pages:
            response = _export_response(fmt, name)
            await response.prepare(request)
            await bounded(response.write(encode.header()))
            async for rows in pages:
                await bounded(response.write(encode.encode(rows)))
        await bounded(response.write_eof())  # only after the snapshot ended cleanly
    except Exception as exc:  # after the first byte, only an abort is honest
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
    elif isinstance(exc, ClientStalled):
        log.warning("export client stopped reading (%s); aborting the response", exc)
    else:
        log.error("export failed midway; aborting the response", exc_info=exc)
    if request.transport is not None:
        request.transport.abort()

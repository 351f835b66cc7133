"""HTTP handlers (aiohttp): the x402 facilitator API plus health, readiness and metrics.

Guarantees:
- A well-formed payment request always gets HTTP 200 with a VerifyResponse/SettleResponse, even
  when the payment is invalid (the official clients treat any other status as an exception).
- A malformed request gets HTTP 400 `{"error": "invalid_request", "field", "message"}`: not
  JSON, missing or mistyped fields, non-canonical numbers, bad addresses, a body over 64 KiB.
  Handlers (here, in `http.og` and in `audit`) just raise `BadRequest`; the `request_context`
  middleware answers it, once for every route.
- No response ever contains a stack trace: an unexpected exception becomes a 500 with an opaque
  error and the request id, and the details go to the log only. A streaming handler (the audit
  exports) answers its own failures once it has started the stream: it aborts the connection.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web

from facilitator.adapters.jobs import JOB_PREFIX
from facilitator.adapters.logging import request_id_var
from facilitator.adapters.metrics import Metrics
from facilitator.audit.queries import confirmations
from facilitator.protocol.fields import BadRequest
from facilitator.services.facilitator import FacilitatorService

log = logging.getLogger("facilitator.http")

MAX_BODY_BYTES = 64 * 1024
MAX_USAGE_DAYS = 366
SETTLE_MODE_HEADER = "X-Settle-Mode"
SERVICE_KEY: web.AppKey[FacilitatorService] = web.AppKey("service", FacilitatorService)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
READINESS_KEY: web.AppKey[Callable[[], Awaitable[dict[str, Any]]]] = web.AppKey("readiness")
STATUS_KEY: web.AppKey[Callable[[str], Awaitable[dict[str, Any] | None]]] = web.AppKey("status")
JOBS_KEY: web.AppKey[AsyncSettlement] = web.AppKey("jobs")


class AsyncSettlement(Protocol):
    """Asynchronous /settle (OpenGradient's facilitator API): 202 with a job, polled later;
    implemented by `facilitator.http.og.AsyncSettlement`."""

    def wanted(self, mode: str | None, body: Any) -> bool: ...

    async def enqueue(self, body: Any) -> dict[str, Any]: ...

    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def usage(self, days: int) -> dict[str, Any]: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def bad_request(field: str, message: str) -> web.Response:
    return json_response({"error": "invalid_request", "field": field, "message": message}, 400)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id on every log line, one latency metric per route, and no stack traces out."""
    request_id = request.headers.get("X-Request-Id", "")[:64] or os.urandom(8).hex()
    token = request_id_var.set(request_id)
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BadRequest as exc:
        response = bad_request(exc.field, exc.message)
        status = response.status
    except Exception:  # the last line of defence: log it, answer opaquely
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_response({"error": "internal_error", "requestId": request_id}, 500)
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[METRICS_KEY].http_seconds.labels(name, request.method, str(status)).observe(
            time.monotonic() - started)
        request_id_var.reset(token)
    response.headers["X-Request-Id"] = request_id
    return response


async def _read_json(request: web.Request) -> Any:
    """The body as JSON; raises BadRequest (never reads more than MAX_BODY_BYTES)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest("body", f"must be at most {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest("body", f"must be at most {MAX_BODY_BYTES} bytes") from None
    if not raw:
        raise BadRequest("body", "is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body", "is not valid JSON") from None


async def verify(request: web.Request) -> web.Response:
    body = await _read_json(request)
    answer = await request.app[SERVICE_KEY].verify(body, request_id_var.get())
    return json_response(answer.to_json())


async def settle(request: web.Request) -> web.Response:
    jobs = request.app[JOBS_KEY]
    body = await _read_json(request)
    if jobs.wanted(request.headers.get(SETTLE_MODE_HEADER), body):
        request.app[SERVICE_KEY].validate_settle(body)
        return json_response({"paymentJob": await jobs.enqueue(body)}, 202)
    answer = await request.app[SERVICE_KEY].settle(body, request_id_var.get())
    return json_response(answer.to_json())


async def settlement_status(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if key.startswith(JOB_PREFIX):
        return await _job_status(request, key)
    if not _is_settlement_key(key):
        return bad_request(
            "id", "must be a settlement id (uuid) or a transaction hash (0x + 64 hex)")
    found = await request.app[STATUS_KEY](key)
    if found is None:
        return json_response({"error": "not_found", "message": f"no settlement {key}"}, 404)
    return json_response(found)


async def _job_status(request: web.Request, key: str) -> web.Response:
    if not _is_uuid(key.removeprefix(JOB_PREFIX)):
        return bad_request("jobId", "must be payment-<uuid>")
    found = await request.app[JOBS_KEY].job(key)
    if found is None:
        return json_response({"error": "not_found", "message": f"no job {key}"}, 404)
    return json_response(found)


async def usage(request: web.Request) -> web.Response:
    raw = request.query.get("days", "7")
    # Length first: int() of a 5000-digit string raises ValueError (Python's digit limit).
    if not _DAYS.fullmatch(raw) or not 1 <= int(raw) <= MAX_USAGE_DAYS:
        raise BadRequest("days", f"must be an integer from 1 to {MAX_USAGE_DAYS}")
    return json_response(await request.app[JOBS_KEY].usage(int(raw)))


_DAYS = re.compile(r"[1-9][0-9]{0,2}", re.ASCII)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                   re.ASCII)


def _is_uuid(text: str) -> bool:
    """Strictly 8-4-4-4-12 hex (uuid.UUID also takes braces and urn: prefixes the database
    refuses)."""
    return _UUID.fullmatch(text) is not None


def _is_settlement_key(key: str) -> bool:
    if key.startswith("0x"):
        return len(key) == 66 and all(c in "0123456789abcdefABCDEF" for c in key[2:])
    return _is_uuid(key)


def status_body(row: Any, timeline: list[dict[str, Any]], head: int | None) -> dict[str, Any]:
    """`GET /settle/{id}`: a settlement record and its timeline. `head` is the chain watcher's
    processed block (`audit.queries.watcher_head`), so `confirmations` is the audit API's."""
    return {
        "id": row.public_id, "state": str(row.state), "scheme": row.scheme,
        "network": row.network, "chainId": row.chain_id, "asset": row.asset, "payer": row.payer,
        "payTo": row.pay_to, "amount": str(row.amount), "transaction": row.tx_hash_hex or None,
        "blockNumber": row.block_number,
        "confirmations": confirmations(str(row.state), row.block_number, head),
        "settledBy": row.settled_by, "reason": row.reason, "message": row.message,
        "timeline": [{"at": e["at"].isoformat(), "from": e["from_state"], "to": e["to_state"],
                      "reason": e["reason"],
                      "transaction": "0x" + e["tx_hash"].hex() if e["tx_hash"] else None}
                     for e in timeline],
    }


async def supported(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE_KEY].supported())


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    report = await request.app[READINESS_KEY]()
    return json_response(report, 200 if report["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def build_http_app(service: FacilitatorService, metrics_: Metrics,
                   readiness: Callable[[], Awaitable[dict[str, Any]]],
                   status: Callable[[str], Awaitable[dict[str, Any] | None]],
                   jobs: AsyncSettlement) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[request_context])
    app[SERVICE_KEY] = service
    app[METRICS_KEY] = metrics_
    app[READINESS_KEY] = readiness
    app[STATUS_KEY] = status
    app[JOBS_KEY] = jobs
    app.router.add_post("/verify", verify)
    app.router.add_post("/settle", settle)
    app.router.add_get("/settle/{key}", settlement_status)
    app.router.add_get("/supported", supported)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/usage", usage)
    return app


def build_metrics_app(metrics_: Metrics) -> web.Application:
    """`facilitator watch`'s HTTP endpoints: `/health` and `/metrics` only."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[request_context])
    app[METRICS_KEY] = metrics_
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app

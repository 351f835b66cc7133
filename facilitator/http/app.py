"""HTTP handlers (aiohttp): the x402 facilitator API plus health, readiness and metrics.

Guarantees:
- A well-formed payment request always gets HTTP 200 with a VerifyResponse/SettleResponse, even
  when the payment is invalid (the official clients treat any other status as an exception).
- A malformed request gets HTTP 400 `{"error": "invalid_request", "field", "message"}`: not
  JSON, missing or mistyped fields, non-canonical numbers, bad addresses, a body over 64 KiB.
- No response ever contains a stack trace: an unexpected exception becomes a 500 with an opaque
  error and the request id, and the details go to the log only.
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

from facilitator.adapters.logging import request_id_var
from facilitator.adapters.jobs import JOB_PREFIX
from facilitator.adapters.metrics import Metrics
from facilitator.protocol.fields import BadRequest
from facilitator.services.facilitator import FacilitatorService

log = logging.getLogger("facilitator.http")

MAX_BODY_BYTES = 64 * 1024
SERVICE_KEY: web.AppKey[FacilitatorService] = web.AppKey("service", FacilitatorService)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
READINESS_KEY: web.AppKey[Callable[[], Awaitable[dict[str, Any]]]] = web.AppKey("readiness")
STATUS_KEY: web.AppKey[Callable[[str], Awaitable[dict[str, Any] | None]]] = web.AppKey("status")
JOBS_KEY: web.AppKey[AsyncSettlement] = web.AppKey("jobs")


class AsyncSettlement(Protocol):
    """Asynchronous /settle (OpenGradient's facilitator API): 202 with a job, polled later."""

    def wanted(self, request: web.Request, body: Any) -> bool: ...

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
    except Exception:  # noqa: BLE001 - the last line of defence: log it, answer opaquely
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _started_streaming(request):
            raise  # a second response inside a chunked body would corrupt it; abort instead
        response = json_response({"error": "internal_error", "requestId": request_id}, 500)
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[METRICS_KEY].http_seconds.labels(name, request.method, str(status)).observe(
            time.monotonic() - started)
        request_id_var.reset(token)
    response.headers["X-Request-Id"] = request_id
    return response


def _started_streaming(request: web.Request) -> bool:
    """Has a (streamed) response already put bytes on the wire for this request?"""
    writer = getattr(request, "_payload_writer", None)
    return getattr(writer, "output_size", 0) > 0


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
    try:
        body = await _read_json(request)
        answer = await request.app[SERVICE_KEY].verify(body, request_id_var.get())
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return json_response(answer.to_json())


async def settle(request: web.Request) -> web.Response:
    jobs = request.app[JOBS_KEY]
    try:
        body = await _read_json(request)
        if jobs.wanted(request, body):
            request.app[SERVICE_KEY].validate_settle(body)
            return json_response({"paymentJob": await jobs.enqueue(body)}, 202)
        answer = await request.app[SERVICE_KEY].settle(body, request_id_var.get())
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
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
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 366:
        return bad_request("days", "must be an integer from 1 to 366")
    return json_response(await request.app[JOBS_KEY].usage(int(raw)))


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

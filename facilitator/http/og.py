"""HTTP handlers of OpenGradient's facilitator API beyond x402, and the operators' resume.

- Asynchronous `/settle` (`X-Settle-Mode: async`, or a payTo / resource URL prefix listed in
  `FACILITATOR_ASYNC_SETTLE_FOR`): `AsyncSettlement` decides, enqueues, and shapes the job
  (`GET /settle/{jobId}`) and usage (`GET /usage?days=N`) views that `http.app` serves.
- `POST /settle_data`: one TEE attestation (headers `x-settlement-type`, `x-settlement-data`)
  -> 202 `{"settlementJob": ...}`; 503 `{"error": "not_configured"}` without the OpenGradient
  settings.
- `POST /v1/ops/chains/{network}/resume` (role `operator`): resume a watcher halted by a deep
  reorg -> `{"network", "resumed"}`; 404 for an unknown network.

Bad input raises `BadRequest`, answered 400 by `http.app.request_context`; bodies use the shared
`json_response` shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from facilitator.adapters.jobs import JobStore
from facilitator.adapters.sessions import SessionStore
from facilitator.audit.tokens import require_role
from facilitator.http.app import json_response
from facilitator.protocol.fields import to_checksum
from facilitator.services.attestations import AttestationService
from facilitator.services.jobs import SettleJobWorker

log = logging.getLogger("facilitator.http")


class AsyncSettlement:
    """Which /settle calls run as jobs, and the job and usage views."""

    def __init__(self, jobs: JobStore, worker: SettleJobWorker, sessions: SessionStore,
                 targets: tuple[str, ...]) -> None:
        self._jobs = jobs
        self._worker = worker
        self._sessions = sessions
        # Split once: lower-case payTo addresses, and http(s) resource URL prefixes.
        self._payees = frozenset(t for t in targets if not t.startswith("http"))
        self._prefixes = tuple(t for t in targets if t.startswith("http"))

    def wanted(self, mode: str | None, body: Any) -> bool:
        """`mode` is the X-Settle-Mode header: async or sync decide; otherwise the targets."""
        mode = (mode or "").strip().lower()
        if mode in ("async", "sync"):
            return mode == "async"
        return bool(self._payees or self._prefixes) and self._targets_match(body)

    def _targets_match(self, body: Any) -> bool:
        if not isinstance(body, dict):
            return False
        requirements = body.get("paymentRequirements")
        pay_to = requirements.get("payTo") if isinstance(requirements, dict) else None
        if isinstance(pay_to, str) and pay_to.lower() in self._payees:
            return True
        payment = body.get("paymentPayload")
        resource = payment.get("resource") if isinstance(payment, dict) else None
        url = resource.get("url") if isinstance(resource, dict) else None
        return isinstance(url, str) and url.startswith(self._prefixes)

    async def enqueue(self, body: Any) -> dict[str, Any]:
        job = await self._jobs.enqueue(body)
        self._worker.wake()
        return {"jobId": job.job_id, "queue": job.queue, "status": job.status}

    async def job(self, job_id: str) -> dict[str, Any] | None:
        job = await self._jobs.get(job_id)
        if job is None:
            return None
        return {"jobId": job.job_id, "queue": job.queue, "status": job.status,
                "result": job.result, "error": job.error, "attempts": job.attempts,
                "createdAt": job.created_at.isoformat(),
                "finishedAt": job.finished_at.isoformat() if job.finished_at else None}

    async def usage(self, days: int) -> dict[str, Any]:
        rows = await self._sessions.usage_by_day(days)
        return {"days": days, "usage": [_usage_row(r) for r in rows]}


def _usage_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"day": row["day"].isoformat(), "service": row["service"],
            "payTo": to_checksum("0x" + bytes(row["pay_to"]).hex()),
            "settlements": row["settlements"], "requests": int(row["requests"]),
            "costOpg": str(int(row["cost_opg"])), "costUsd": format(row["cost_usd"], "f"),
            "inputTokens": int(row["input_tokens"]), "outputTokens": int(row["output_tokens"]),
            "totalTokens": int(row["total_tokens"])}


class Resumable(Protocol):
    async def resume(self) -> bool: ...


ATTESTATIONS_KEY: web.AppKey[AttestationService | None] = web.AppKey("attestations")
WATCHERS_KEY: web.AppKey[Mapping[str, Resumable]] = web.AppKey("watchers")


def add_og_routes(app: web.Application, attestations: AttestationService | None,
                  watchers: Mapping[str, Resumable]) -> None:
    """Register `/settle_data` (answering 503 when `attestations` is None) and the operators'
    resume of the `watchers` (by network key)."""
    app[ATTESTATIONS_KEY] = attestations
    app[WATCHERS_KEY] = watchers
    app.router.add_post("/settle_data", settle_data)
    app.router.add_post("/v1/ops/chains/{network}/resume", resume_chain)


async def settle_data(request: web.Request) -> web.Response:
    """`POST /settle_data` (OpenGradient's facilitator API): one attestation per call."""
    attestations = request.app[ATTESTATIONS_KEY]
    if attestations is None:
        return json_response({"error": "not_configured", "message": "attestation cross-check "
                              "is not configured (FACILITATOR_OG_RPC_URLS)"}, 503)
    body = await attestations.ingest(request.headers.get("x-settlement-type"),
                                     request.headers.get("x-settlement-data"))
    return json_response(body, 202)


@require_role("operator")
async def resume_chain(request: web.Request) -> web.Response:
    """Operator action after a deep reorg halted a chain's watcher: accept the chain as it is
    now (the watcher then reverts to the common ancestor and confirms again)."""
    key = request.match_info["network"]
    watcher = request.app[WATCHERS_KEY].get(key)
    if watcher is None:
        return json_response({"error": "not_found", "message": "no such network"}, 404)
    resumed = await watcher.resume()
    log.warning("operator resumed the watcher of %s (was halted: %s)", key, resumed)
    return json_response({"network": key, "resumed": resumed})

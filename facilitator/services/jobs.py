"""Runs asynchronous settle jobs: each job is a stored /settle request, settled through the same
path as a synchronous /settle, until its answer is final.

Guarantees: a job is processed by one worker at a time (database lease); a `settlement_pending`
answer is not final — the job is retried later, and it only ends `succeeded` or `failed` with a
final answer (Unknown is never reported as failed); concurrency, retries and waits are bounded.
A job re-run after a crash re-enters the idempotent settlement path, so it settles exactly once.
"""

from __future__ import annotations

import asyncio
import logging

from facilitator.adapters.jobs import Job, JobStore
from facilitator.protocol.reasons import Reason
from facilitator.services.facilitator import FacilitatorService

log = logging.getLogger("facilitator.jobs")

MAX_ATTEMPTS_ON_ERROR = 30  # with the capped backoff below, about 15 minutes of trying
MAX_BACKOFF_S = 30.0


class SettleJobWorker:
    def __init__(self, *, jobs: JobStore, service: FacilitatorService, concurrency: int = 16,
                 poll_interval_s: float = 0.5, lease_s: float = 120.0,
                 pending_retry_s: float = 2.0) -> None:
        self._jobs = jobs
        self._service = service
        self._slots = asyncio.Semaphore(concurrency)
        self._poll_interval_s = poll_interval_s
        self._lease_s = lease_s
        self._pending_retry_s = pending_retry_s
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        released = await self._jobs.release_all()
        if released:
            log.warning("resuming %d settle job(s) left processing by a previous run", released)
        try:
            while True:
                await self._slots.acquire()
                job = await self._claim()
                if job is None:
                    self._slots.release()
                    await self._sleep()
                    continue
                task = asyncio.get_running_loop().create_task(self._process(job))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()

    async def _claim(self) -> Job | None:
        try:
            return await self._jobs.claim_next(self._lease_s)
        except Exception:  # noqa: BLE001 - the database may be briefly away; try again later
            log.exception("could not claim a settle job")
            return None

    async def _sleep(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _process(self, job: Job) -> None:
        try:
            answer = await self._service.settle(job.body, request_id=job.job_id)
            if answer.error_reason is Reason.SETTLEMENT_PENDING:
                await self._jobs.requeue(job.id, self._pending_retry_s)
            else:
                await self._jobs.finish(job.id, succeeded=answer.success,
                                        result=answer.to_json(),
                                        error=None if answer.success else answer.error_message)
        except Exception as exc:  # noqa: BLE001 - retried with a bound; the row is the truth
            await self._retry_or_give_up(job, exc)
        finally:
            self._slots.release()

    async def _retry_or_give_up(self, job: Job, exc: Exception) -> None:
        log.exception("settle job %s attempt %d failed", job.job_id, job.attempts)
        if job.attempts < MAX_ATTEMPTS_ON_ERROR:
            await self._jobs.requeue(job.id, min(self._pending_retry_s * job.attempts,
                                                 MAX_BACKOFF_S))
            return
        await self._jobs.finish(job.id, succeeded=False, error=f"gave up: {type(exc).__name__}",
                                result={"success": False,
                                        "errorReason": str(Reason.UNEXPECTED_SETTLE_ERROR),
                                        "transaction": "", "network": ""})

"""Runs asynchronous settle jobs: each job is a stored /settle request, settled through the same
path as a synchronous /settle, until its answer is final.

Guarantees: a job is processed by one worker at a time (database lease; a worker whose lease
ran out can no longer requeue or finish it); a `settlement_pending` answer is not final — the
job is polled again, and that does not count as an attempt. It ends `succeeded` or `failed` with
the settlement's final answer, or `failed` with `unexpected_settle_error` after
`MAX_ATTEMPTS_ON_ERROR` errors — but only when its settlement is not under way: while the
settlement row is in flight or settled (the outcome is unknown to the job, or known and not yet
answered), the job stays queued and is retried at the longest backoff (Unknown is never
reported as failed; `GET /settle/{id}` stays authoritative). Concurrency and waits are bounded.
A job re-run after a crash re-enters the idempotent settlement path, so it settles exactly once.
"""

from __future__ import annotations

import asyncio
import logging

from facilitator.adapters.jobs import Job, JobStore
from facilitator.core.settlement import IN_FLIGHT, SETTLED
from facilitator.protocol.fields import BadRequest
from facilitator.protocol.reasons import Reason
from facilitator.services.facilitator import FacilitatorService

log = logging.getLogger("facilitator.jobs")

MAX_ATTEMPTS_ON_ERROR = 30  # errors (not pending polls); with the capped backoff, ~15 minutes
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
                held = await self._jobs.requeue(job, self._pending_retry_s, pending=True)
            else:
                held = await self._jobs.finish(job, succeeded=answer.success,
                                               result=answer.to_json(),
                                               error=None if answer.success
                                               else answer.error_message)
            if not held:
                log.warning("settle job %s: lease lost to another worker; its answer stands",
                            job.job_id)
        except Exception as exc:  # noqa: BLE001 - retried with a bound; the row is the truth
            await self._retry_or_give_up(job, exc)
        finally:
            self._slots.release()

    async def _retry_or_give_up(self, job: Job, exc: Exception) -> None:
        log.error("settle job %s attempt %d failed: %s", job.job_id, job.attempts, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        error = f"retrying after {type(exc).__name__}"
        try:
            if job.attempts < MAX_ATTEMPTS_ON_ERROR:
                await self._jobs.requeue(job, min(self._pending_retry_s * job.attempts,
                                                  MAX_BACKOFF_S), pending=False, error=error)
                return
            if await self._may_be_settled(job):
                # In flight, settled, or not known: keep trying, never report it failed.
                log.warning("settle job %s: %d errors while its settlement may be under way; "
                            "kept queued", job.job_id, job.attempts)
                await self._jobs.requeue(job, MAX_BACKOFF_S, pending=False, error=error)
                return
            await self._jobs.finish(job, succeeded=False, error=f"gave up: {type(exc).__name__}",
                                    result={"success": False,
                                            "errorReason": str(Reason.UNEXPECTED_SETTLE_ERROR),
                                            "transaction": "", "network": ""})
        except Exception:  # noqa: BLE001 - the lease ends and the job runs again
            log.exception("settle job %s: could not record the failed attempt", job.job_id)

    async def _may_be_settled(self, job: Job) -> bool:
        """Is the job's settlement row in flight or settled, or can that not be told? False
        only when no row exists for it or its row ended without moving money."""
        try:
            intent = self._service.settlement_intent(job.body)
        except BadRequest:
            return False  # a body that cannot claim a settlement
        except Exception:  # noqa: BLE001 - unknown
            log.exception("settle job %s: its settlement cannot be looked up", job.job_id)
            return True
        if intent is None:
            return False  # answered before any claim (routing)
        try:
            state = await self._jobs.settlement_state(intent)
        except Exception:  # noqa: BLE001 - unknown
            log.exception("settle job %s: settlement state unknown", job.job_id)
            return True
        return state is not None and (state in IN_FLIGHT or state in SETTLED)

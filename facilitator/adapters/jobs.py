"""Asynchronous settle jobs in PostgreSQL (OpenGradient's facilitator API: `POST /settle`
answers 202 with a job, `GET /settle/{jobId}` reports it).

Guarantees: a job survives restarts; `claim_next` hands a runnable job to exactly one worker
(`FOR UPDATE SKIP LOCKED`) under a lease, so a worker that died gives its job back when the
lease ends; a job finishes (succeeded | failed) once and keeps its result. Only the holder of
the job's current lease can requeue or finish it: the lease's end (`not_before`, set anew by
every claim) is the fencing token, so a worker whose lease expired and whose job another
worker claimed changes nothing. Settling twice is impossible anyway — the job re-enters the
same idempotent settlement path, whose database row is unique per authorization.

`attempts` counts the runs that did not end in a normal `settlement_pending` re-poll (errors,
and runs whose worker died): a claim counts one, a pending requeue gives it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from facilitator.adapters.store import find_claimed
from facilitator.core.settlement import SettlementIntent

JOB_PREFIX = "payment-"


@dataclass(frozen=True, slots=True)
class Job:
    id: str  # uuid
    status: str
    queue: str
    body: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None
    not_before: datetime  # while processing: the end of the current lease (its fencing token)

    @property
    def job_id(self) -> str:
        return JOB_PREFIX + self.id

    @classmethod
    def from_record(cls, rec: asyncpg.Record) -> Job:
        return cls(id=str(rec["id"]), status=rec["status"], queue=rec["queue"],
                   body=json.loads(rec["body"]),
                   result=json.loads(rec["result"]) if rec["result"] else None,
                   error=rec["error"], attempts=rec["attempts"], created_at=rec["created_at"],
                   finished_at=rec["finished_at"], not_before=rec["not_before"])


_COLUMNS = "id, status, queue, body, result, error, attempts, created_at, finished_at, not_before"
# The holder of the current lease: the job is still processing under the lease it was given.
_LEASED = "id = $1::uuid AND status = 'processing' AND not_before = $2"


class JobStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def enqueue(self, body: dict[str, Any]) -> Job:
        rec = await self.pool.fetchrow(
            "INSERT INTO settle_jobs (status, body) VALUES ('queued', $1::jsonb) RETURNING "
            + _COLUMNS, json.dumps(body))
        return Job.from_record(rec)

    async def get(self, job_id: str) -> Job | None:
        uuid_text = job_id.removeprefix(JOB_PREFIX)
        rec = await self.pool.fetchrow(
            "SELECT " + _COLUMNS + " FROM settle_jobs WHERE id = $1::uuid", uuid_text)
        return None if rec is None else Job.from_record(rec)

    async def claim_next(self, lease_s: float) -> Job | None:
        rec = await self.pool.fetchrow("""
            UPDATE settle_jobs SET status = 'processing', attempts = attempts + 1,
                started_at = COALESCE(started_at, clock_timestamp()),
                not_before = clock_timestamp() + make_interval(secs => $1),
                updated_at = clock_timestamp()
            WHERE id = (SELECT id FROM settle_jobs
                        WHERE status IN ('queued', 'processing') AND not_before <= clock_timestamp()
                        ORDER BY not_before, created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING """ + _COLUMNS, lease_s)
        return None if rec is None else Job.from_record(rec)

    async def requeue(self, job: Job, delay_s: float, *, pending: bool,
                      error: str | None = None) -> bool:
        """Not final yet: run it again after `delay_s`. `pending` (the settlement is in flight:
        a normal re-poll) gives the claim's attempt back; otherwise `error` is kept for
        `GET /settle/{jobId}`. False when `job`'s lease is no longer the current one."""
        done = await self.pool.execute("""
            UPDATE settle_jobs SET status = 'queued',
                attempts = attempts - CASE WHEN $4 THEN 1 ELSE 0 END,
                error = COALESCE($5, error),
                not_before = clock_timestamp() + make_interval(secs => $3),
                updated_at = clock_timestamp()
            WHERE """ + _LEASED, job.id, job.not_before, delay_s, pending, error)
        return done.endswith(" 1")

    async def finish(self, job: Job, *, succeeded: bool, result: dict[str, Any],
                     error: str | None) -> bool:
        """Final: False when `job`'s lease is no longer the current one (nothing changed)."""
        status = "succeeded" if succeeded else "failed"
        done = await self.pool.execute("""
            UPDATE settle_jobs SET status = $3, result = $4::jsonb, error = $5,
                finished_at = clock_timestamp(), updated_at = clock_timestamp()
            WHERE """ + _LEASED, job.id, job.not_before, status, json.dumps(result), error)
        return done.endswith(" 1")

    async def settlement_state(self, intent: SettlementIntent) -> str | None:
        """The state of the settlement row holding the job's authorization, if any."""
        row = await find_claimed(self.pool, intent)
        return None if row is None else row.state

    async def release_all(self) -> int:
        """At start-up (one instance per database): jobs a dead process held run again now."""
        done = await self.pool.execute("""
            UPDATE settle_jobs SET status = 'queued', not_before = clock_timestamp(),
                updated_at = clock_timestamp() WHERE status = 'processing'""")
        return int(done.split()[-1])

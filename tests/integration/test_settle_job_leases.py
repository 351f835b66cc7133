"""Settle jobs (services/jobs.py, adapters/jobs.py) on a real PostgreSQL and anvil: only the
holder of a job's current lease can requeue or finish it, pending polls do not count as
attempts, and giving up never reports `failed` while the job's settlement is under way."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
from eth_account import Account
from harness import pay, wait_until

from facilitator.adapters.jobs import Job, JobStore
from facilitator.services.jobs import MAX_ATTEMPTS_ON_ERROR, SettleJobWorker

ASYNC = {"X-Settle-Mode": "async"}


async def job_until_final(http: httpx.AsyncClient, job_id: str, timeout_s: float = 20) -> dict:
    final: dict = {}

    async def done() -> bool:
        nonlocal final
        final = (await http.get(f"/settle/{job_id}")).json()
        return final["status"] in ("succeeded", "failed")
    await wait_until(done, timeout_s=timeout_s, what=f"job {job_id} to finish")
    return final


async def test_only_the_current_lease_can_requeue_or_finish(database_url):
    """adapters.md 15. Before: `finish`/`requeue` checked only `status = 'processing'`, so a
    worker whose lease had expired finished the job another worker held."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        jobs = JobStore(pool)
        queued = await jobs.enqueue({"paymentPayload": {}, "paymentRequirements": {}})
        stale = await jobs.claim_next(lease_s=0.05)
        assert stale is not None and stale.id == queued.id and stale.attempts == 1
        current: Job | None = None

        async def reclaimed() -> bool:  # the lease ran out: another worker takes the job
            nonlocal current
            current = await jobs.claim_next(lease_s=60)
            return current is not None
        await wait_until(reclaimed, what="the expired lease to be claimed again")
        assert current is not None and current.id == stale.id and current.attempts == 2

        assert not await jobs.requeue(stale, 0, pending=True)
        assert not await jobs.finish(stale, succeeded=False, result={"stale": True}, error="x")
        held = await jobs.get(stale.job_id)
        assert (held.status, held.attempts, held.result) == ("processing", 2, None)

        assert await jobs.finish(current, succeeded=True, result={"success": True}, error=None)
        done = await jobs.get(stale.job_id)
        assert (done.status, done.result, done.error) == ("succeeded", {"success": True}, None)
        assert not await jobs.finish(current, succeeded=False, result={}, error="again")
    finally:
        await pool.close()


async def settle_runs(database_url: str, job_id: str) -> int:
    """How many times the job went through /settle (each run records its verdict)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM verifications WHERE endpoint = 'settle' "
                                   "AND request_id = $1", job_id)
    finally:
        await conn.close()


async def test_pending_polls_do_not_count_as_attempts(chain, facilitator_factory, database_url):
    """services.md 4. Before: every claim counted, so a long-pending payment reached the error
    limit (and a long error backoff) without a single error."""
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    payer, pay_to = await chain.new_payer(), Account.create().address
    await chain.set_automine(False)
    try:
        response = await facilitator.http.post("/settle", json=pay(payer, pay_to),
                                               headers=ASYNC)
        job_id = response.json()["paymentJob"]["jobId"]

        async def polled_three_times() -> bool:
            return await settle_runs(database_url, job_id) >= 3
        await wait_until(polled_three_times, timeout_s=30, what="three pending polls")
        job = (await facilitator.http.get(f"/settle/{job_id}")).json()
        assert job["status"] in ("queued", "processing") and job["attempts"] <= 1, job
        await chain.mine()
        final = await job_until_final(facilitator.http, job_id)
    finally:
        await chain.set_automine(True)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 1 and final["error"] is None, final
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def held_job(jobs: JobStore, body: dict[str, Any], attempts: int) -> Job:
    """A job as a worker holds it after `attempts` runs (a lease of one hour: the running
    worker leaves it alone)."""
    job_id = await jobs.pool.fetchval("""
        INSERT INTO settle_jobs (status, body, attempts, not_before)
        VALUES ('processing', $1::jsonb, $2, clock_timestamp() + interval '1 hour')
        RETURNING id""", json.dumps(body), attempts)
    job = await jobs.get(str(job_id))
    assert job is not None
    return job


async def test_giving_up_never_fails_a_job_whose_settlement_is_in_flight(chain,
                                                                         facilitator_factory):
    """services.md 4 / docs.md 10. The give-up decision after the last allowed error, for a
    payment whose transaction is broadcast and not mined, and for one with no settlement.
    Before: both jobs ended `failed` with `unexpected_settle_error`."""
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    jobs, service = facilitator.service.jobs, facilitator.service.service
    payer, pay_to = await chain.new_payer(), Account.create().address
    body, other_body = pay(payer, pay_to), pay(await chain.new_payer(), pay_to)
    await chain.set_automine(False)
    try:
        answer = await facilitator.settle(body)
        assert answer["errorReason"] == "settlement_pending", answer
        in_flight = await held_job(jobs, body, MAX_ATTEMPTS_ON_ERROR)
        never_claimed = await held_job(jobs, other_body, MAX_ATTEMPTS_ON_ERROR)
        worker = SettleJobWorker(jobs=jobs, service=service)
        await worker._retry_or_give_up(in_flight, RuntimeError("after the broadcast"))
        await worker._retry_or_give_up(never_claimed, RuntimeError("before any claim"))

        kept = await jobs.get(in_flight.job_id)
        assert (kept.status, kept.result) == ("queued", None), kept
        assert kept.error == "retrying after RuntimeError"
        given_up = await jobs.get(never_claimed.job_id)
        assert given_up.status == "failed" and given_up.error == "gave up: RuntimeError"
        assert given_up.result["errorReason"] == "unexpected_settle_error"
        await chain.mine()
    finally:
        await chain.set_automine(True)
    # The kept job runs again (now, not after its backoff) and answers the settlement.
    await jobs.pool.execute("UPDATE settle_jobs SET not_before = clock_timestamp() "
                            "WHERE id = $1::uuid", in_flight.id)
    final = await job_until_final(facilitator.http, in_flight.job_id)
    assert final["status"] == "succeeded", final
    assert final["result"]["transaction"] == answer["transaction"]

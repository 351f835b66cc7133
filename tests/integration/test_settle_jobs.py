"""Asynchronous settle jobs (OpenGradient's facilitator API): 202 with a job, polled until final,
surviving a killed process, settling exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
from eth_account import Account
from harness import DevChain, pay, sign_upto, upto_body, upto_requirements, wait_until

from facilitator.devnet.anvil import free_port

ASYNC = {"X-Settle-Mode": "async"}


async def job_until_final(http: httpx.AsyncClient, job_id: str, timeout_s: float = 15) -> dict:
    final: dict = {}

    async def done() -> bool:
        nonlocal final
        final = (await http.get(f"/settle/{job_id}")).json()
        return final["status"] in ("succeeded", "failed")
    await wait_until(done, timeout_s=timeout_s, what=f"job {job_id} to finish")
    return final


async def test_async_settle_by_header_answers_202_and_settles(chain, facilitator):
    payer, pay_to = await chain.new_payer(), Account.create().address
    response = await facilitator.http.post("/settle", json=pay(payer, pay_to), headers=ASYNC)
    assert response.status_code == 202
    job = response.json()["paymentJob"]
    assert job["jobId"].startswith("payment-") and job["queue"] == "payments"
    assert job["status"] == "queued"
    final = await job_until_final(facilitator.http, job["jobId"])
    assert final["status"] == "succeeded" and final["error"] is None
    assert final["result"]["success"] is True
    assert final["result"]["transaction"].startswith("0x")
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_async_settle_for_a_configured_payee(chain, facilitator_factory):
    pay_to = Account.create().address
    facilitator = await facilitator_factory(FACILITATOR_ASYNC_SETTLE_FOR=pay_to)
    payer = await chain.new_upto_payer()
    requirements = upto_requirements(pay_to, 10**17, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=10**17, facilitator=facilitator.signer)
    response = await facilitator.http.post("/settle", json=upto_body(payload, requirements, 4242))
    assert response.status_code == 202
    final = await job_until_final(facilitator.http, response.json()["paymentJob"]["jobId"])
    assert final["result"]["success"] is True and final["result"]["amount"] == "4242"
    other = await facilitator.http.post("/settle", json=pay(await chain.new_payer(),
                                                             Account.create().address))
    assert other.status_code == 200, "other payees settle synchronously"


async def test_invalid_payment_job_fails_with_the_reason(chain, facilitator):
    pay_to = Account.create().address
    broke = Account.create()
    response = await facilitator.http.post("/settle", json=pay(broke, pay_to), headers=ASYNC)
    final = await job_until_final(facilitator.http, response.json()["paymentJob"]["jobId"])
    assert final["status"] == "failed"
    assert final["result"]["errorReason"] == "invalid_exact_evm_insufficient_balance"


async def test_malformed_async_settle_is_400_and_no_job(chain, facilitator, database_url):
    body = pay(await chain.new_payer(), Account.create().address)
    body["paymentRequirements"]["amount"] = "1e3"
    response = await facilitator.http.post("/settle", json=body, headers=ASYNC)
    assert response.status_code == 400
    assert response.json()["field"] == "paymentRequirements.amount"
    import asyncpg
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM settle_jobs") == 0
    finally:
        await conn.close()


async def test_unknown_and_malformed_job_ids(facilitator):
    missing = await facilitator.http.get("/settle/payment-00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert (await facilitator.http.get("/settle/payment-not-a-uuid")).status_code == 400


async def test_job_survives_a_killed_facilitator_and_settles_exactly_once(chain, database_url):
    signer_key = await chain.new_funded_key()
    payer, pay_to = await chain.new_payer(), Account.create().address
    env = {**os.environ, "DATABASE_URL": database_url, "FACILITATOR_SIGNER_KEY": signer_key,
           "FACILITATOR_RPC_URLS": chain.url, "FACILITATOR_RECEIPT_TIMEOUT_S": "0.5",
           "FACILITATOR_LOG_LEVEL": "WARNING", "FACILITATOR_WATCHER": "off"}
    async with chain.manual_mining():
        first = await _serve(env)
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            job = (await http.post("/settle", json=pay(payer, pay_to), headers=ASYNC)).json()
            job_id = job["paymentJob"]["jobId"]
            await wait_until(_pending_tx_from(chain, signer_key), what="the job's broadcast")
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()

        second = await _serve(env)
        await chain.mine()
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            final = await job_until_final(http, job_id)
        second.process.terminate()
        await second.process.wait()
    assert final["status"] == "succeeded", final
    # Nothing was mined before the kill, so only the second process can have finished the job.
    # `attempts` counts runs that did not end in a pending re-poll: the killed run, unless the
    # kill came after its pending requeue.
    assert final["attempts"] in (1, 2), final
    sent = await chain.tx_count(Account.from_key(signer_key).address, "latest")
    assert sent == 1 and len(await chain.transfer_logs_to(pay_to)) == 1


class _Served:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url


async def _serve(env: dict[str, str]) -> _Served:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "facilitator", "serve", env={**env, "FACILITATOR_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                return (await http.get(url + "/health")).status_code == 200
        except httpx.HTTPError:
            return False
    await wait_until(healthy, timeout_s=30, what="the facilitator process to start")
    return _Served(process, url)


def _pending_tx_from(chain: DevChain, key: str):
    address = Account.from_key(key).address

    async def check() -> bool:
        return await chain.tx_count(address) == 1
    return check

"""The TEE gateway emulator (`facilitator/devnet/gateway.py`) as OpenGradient's inference
provider in front of our running facilitator, paid per session with x402 `upto` over Permit2
(OPG on a real anvil at its Base Sepolia address).

The payer is the official x402 SDK's upto client in one test and our own demo client in the
others. In every test: the gateway verifies a payment once, serves many requests from the
session, settles the summed cost with its usage report, and the one OPG transfer on chain equals
exactly the sum of the per-request costs; `GET /usage` shows the requests, cost and tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp
import httpx
from gateway_fixtures import (
    MODEL,
    SdkChatClient,
    chat_body,
    metric_total,
    opg_transfers_to,
    sdk_upto_client,
    settled,
)
from harness import OG_ADMIN_KEY, OPG, db_fetch, wait_until

from facilitator.devnet import contracts
from facilitator.devnet.anvil import free_port
from facilitator.devnet.demo import UptoPayer, demo_request, run_demo
from facilitator.devnet.gateway import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SESSION_EXHAUSTED,
    SESSION_HEADER,
    GatewayFaults,
    b64json,
    decode_b64json,
)
from facilitator.devnet.run import Devnet


REQUESTS = 7  # the demo's seventh request offers a tool

# OPG wei per (prompt, completion) token: tee-gateway's model_registry.py USD prices at
# OPG_USD = 1, written out here so that the emulator's own price table is not its own oracle.
WEI_PER_TOKEN = {
    "gpt-4.1": (2_000_000_000_000, 8_000_000_000_000),  # $0.000002 / $0.000008
}
# One fixed body and its literal cost: 29 prompt and 10 completion tokens (the emulator's
# one-token-per-4-characters tokenizer) = 29 * 2e12 + 10 * 8e12 wei.
SAME_QUESTION = "the same question every time"
SAME_QUESTION_COST = 138_000_000_000_000


def cost_of(response_body: dict) -> int:
    """The response's cost, checked against the pinned price list and the reported usage."""
    usage = response_body["usage"]
    prompt_wei, completion_wei = WEI_PER_TOKEN[response_body["model"]]
    expected = usage["prompt_tokens"] * prompt_wei + usage["completion_tokens"] * completion_wei
    assert int(response_body["opengradient"]["cost_opg"]) == expected
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return expected


async def assert_session_settled_exactly(chain, facilitator, database_url, gateway, session_id,
                                         payer: str, bodies: list[dict]) -> None:
    """One OPG transfer payer -> payee of exactly the summed per-request costs; the facilitator
    saw one verification, recorded the session and the usage report."""
    costs = [cost_of(b) for b in bodies]
    session = gateway.sessions[session_id]
    assert session.state == "settled", session.outcome
    assert session.request_costs == costs and session.accumulated == sum(costs)
    [(sender, amount, tx)] = await opg_transfers_to(chain, gateway.pay_to)
    assert int(sender, 16) == int(payer, 16)
    assert amount == sum(costs) == session.outcome.amount
    assert tx.lower() == session.outcome.transaction.lower()
    [row] = await db_fetch(database_url, "SELECT * FROM upto_sessions WHERE pay_to = $1",
                          bytes.fromhex(gateway.pay_to[2:]))
    assert row["verifications"] == 1 and int(row["settled_amount"]) == sum(costs)
    assert row["gateway_session_id"] == session_id
    usage = (await facilitator.http.get("/usage?days=1")).json()["usage"]
    [mine] = [u for u in usage if u["payTo"] == gateway.pay_to]
    assert mine["requests"] == len(bodies) and mine["costOpg"] == str(sum(costs))
    assert mine["inputTokens"] == sum(b["usage"]["prompt_tokens"] for b in bodies)
    assert mine["outputTokens"] == sum(b["usage"]["completion_tokens"] for b in bodies)
    assert mine["totalTokens"] == mine["inputTokens"] + mine["outputTokens"]
    assert mine["service"] == "chat" and mine["settlements"] == 1


async def test_sdk_upto_client_pays_one_session_for_many_requests(
        chain, og_chain, facilitator_factory, gateway_factory, database_url):
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og_chain.env())
    gateway = await gateway_factory(facilitator)
    await gateway.register(og_chain.url, OG_ADMIN_KEY, og_chain.registry)
    payer = await chain.new_upto_payer()
    async with httpx.AsyncClient(timeout=60) as http:
        unpaid = await http.post(gateway.chat_url, json=chat_body())
        assert unpaid.status_code == 402
        required = decode_b64json(unpaid.headers[PAYMENT_REQUIRED_HEADER])
        assert required["accepts"] == [{
            "scheme": "upto", "network": "eip155:84532", "asset": OPG,
            "amount": str(10**17), "payTo": gateway.pay_to, "maxTimeoutSeconds": 300,
            "extra": {"name": "OPG", "version": "2", "assetTransferMethod": "permit2",
                      "facilitatorAddress": facilitator.signer}}]
        client = SdkChatClient(sdk_upto_client(payer), http)
        responses = [await client.chat(gateway.chat_url, chat_body(f"question {i}"))
                     for i in range(REQUESTS)]
    assert [r.status_code for r in responses] == [200] * REQUESTS, responses[-1].text
    sessions = {r.headers[SESSION_HEADER] for r in responses}
    assert len(sessions) == 1 and client.payments == 1
    [session_id] = sessions
    assert await metric_total(facilitator, "facilitator_verify_requests_total",
                              scheme="upto") == 1
    await settled(gateway, session_id)  # the reaper: idle for 0.3 s
    await assert_session_settled_exactly(chain, facilitator, database_url, gateway, session_id,
                                         payer.address, [r.json() for r in responses])
    answer = gateway.sessions[session_id].outcome.answer
    assert answer["success"] is True
    assert answer["amount"] == str(gateway.sessions[session_id].accumulated)

    # Our facilitator links every attested inference to the paid session and verifies it.
    async def linked() -> bool:
        rows = await db_fetch(database_url, "SELECT session_id, verification FROM attestations")
        return len(rows) == REQUESTS and all(
            r["session_id"] is not None and r["verification"] != "pending" for r in rows)
    await wait_until(linked, timeout_s=30, what="attestations linked to the session")
    [session_row] = await db_fetch(database_url, "SELECT id FROM upto_sessions")
    rows = await db_fetch(database_url, "SELECT session_id, verification, cost_opg "
                                       "FROM attestations")
    assert {(r["session_id"], r["verification"]) for r in rows} == {(session_row["id"], "valid")}
    assert sum(int(r["cost_opg"]) for r in rows) == gateway.sessions[session_id].accumulated


async def test_demo_client_pays_and_the_async_settlement_job_moves_the_summed_cost(
        chain, facilitator_factory, gateway_factory, database_url):
    facilitator = await facilitator_factory()
    gateway = await gateway_factory(facilitator, settle_mode="async", idle_timeout_s=60)
    payer = await chain.new_upto_payer()
    async with aiohttp.ClientSession() as http:
        client = UptoPayer(payer.key.hex(), http)
        results = [await client.chat(gateway.chat_url, demo_request(i)) for i in range(REQUESTS)]
    assert [r.status for r in results] == [200] * REQUESTS
    assert [r.new_permit for r in results] == [True] + [False] * (REQUESTS - 1)
    [session_id] = {r.session_id for r in results}
    assert any(r.body["choices"][0]["finish_reason"] == "tool_calls" for r in results)
    [outcome] = await gateway.settle_all()
    assert outcome.success and outcome.job_id.startswith("payment-")
    job = (await facilitator.http.get(f"/settle/{outcome.job_id}")).json()
    assert job["status"] == "succeeded"
    assert job["result"]["transaction"] == outcome.transaction
    await assert_session_settled_exactly(chain, facilitator, database_url, gateway, session_id,
                                         payer.address, [r.body for r in results])
    [row] = await db_fetch(database_url, "SELECT usage FROM upto_sessions WHERE pay_to = $1",
                          bytes.fromhex(gateway.pay_to[2:]))
    reported = json.loads(row["usage"])
    assert reported["sessionId"] == session_id and reported["requestCount"] == REQUESTS
    assert reported["path"] == "/v1/chat/completions" and reported["model"] == MODEL
    assert reported["network"] == "eip155:84532" and reported["asset"] == OPG
    assert reported["settlementType"] == "batch" and reported["isStreaming"] is False


async def test_an_exhausted_session_answers_402_and_a_new_permit_opens_the_next(
        chain, facilitator_factory, gateway_factory):
    facilitator = await facilitator_factory()
    gateway = await gateway_factory(facilitator, idle_timeout_s=60)
    body, cost = chat_body(SAME_QUESTION), SAME_QUESTION_COST
    assert gateway.quote(body) == cost
    gateway.session_cap = 2 * cost + cost // 2  # room for two requests, not three
    payer = await chain.new_upto_payer()
    async with aiohttp.ClientSession() as http:
        client = UptoPayer(payer.key.hex(), http)
        first, second = [await client.chat(gateway.chat_url, body) for _ in range(2)]
        assert first.status == second.status == 200 and first.session_id == second.session_id
        assert cost_of(first.body) == cost_of(second.body) == cost
        # The third would exceed the cap: refused as og-x402 refuses it, without requirements.
        async with http.post(gateway.chat_url, json=body,
                             headers={SESSION_HEADER: first.session_id}) as refused:
            assert refused.status == 402 and await refused.json() == SESSION_EXHAUSTED
            assert PAYMENT_REQUIRED_HEADER not in refused.headers
        await settled(gateway, first.session_id)  # exhausted: settled without waiting for idle
        async with http.post(gateway.chat_url, json=body,
                             headers={SESSION_HEADER: first.session_id}) as after:
            assert after.status == 402 and await after.json() == SESSION_EXHAUSTED
        # The demo client re-challenges, signs a new permit and goes on in a new session.
        rest = [await client.chat(gateway.chat_url, body) for _ in range(3)]
    assert [r.status for r in rest] == [200] * 3
    assert [r.new_permit for r in rest] == [True, False, True]
    assert len({first.session_id, rest[0].session_id, rest[2].session_id}) == 3
    await gateway.settle_all()
    transfers = await opg_transfers_to(chain, gateway.pay_to)
    assert sorted(amount for _, amount, _ in transfers) == [cost, 2 * cost, 2 * cost]
    assert await metric_total(facilitator, "facilitator_verify_requests_total",
                              scheme="upto") == 3


async def test_a_session_that_cost_nothing_is_closed_without_a_transfer(chain, gateway_factory):
    gateway = await gateway_factory(idle_timeout_s=60)
    payer = await chain.new_upto_payer()
    async with aiohttp.ClientSession() as http:
        client = UptoPayer(payer.key.hex(), http)
        bad = await client.chat(gateway.chat_url, {"model": "no-such-model",
                                                   "messages": [{"role": "user", "content": "x"}]})
    assert bad.status == 400 and not bad.new_permit  # refused before any payment
    assert await gateway.settle_all() == []
    assert await opg_transfers_to(chain, gateway.pay_to) == []


async def test_the_gateway_settles_what_its_fault_knob_says_not_what_was_served(
        chain, facilitator_factory, gateway_factory):
    """Over- and undercharging knobs (for the cross-check): the transfer is the summed cost
    plus the adjustment, and the usage report repeats the adjusted figure."""
    facilitator = await facilitator_factory()
    for adjust in (+1_000, -1_000):
        gateway = await gateway_factory(facilitator, idle_timeout_s=60,
                                        faults=GatewayFaults(settle_adjust_opg=adjust))
        payer = await chain.new_upto_payer()
        async with aiohttp.ClientSession() as http:
            client = UptoPayer(payer.key.hex(), http)
            results = [await client.chat(gateway.chat_url, demo_request(i)) for i in range(3)]
        served = sum(cost_of(r.body) for r in results)
        [outcome] = await gateway.settle_all()
        assert outcome.success and outcome.amount == served + adjust
        [(_, amount, _)] = await opg_transfers_to(chain, gateway.pay_to)
        assert amount == served + adjust
        usage = (await facilitator.http.get("/usage?days=1")).json()["usage"]
        [mine] = [u for u in usage if u["payTo"] == gateway.pay_to]
        assert mine["costOpg"] == str(served + adjust)


async def test_the_devnet_runs_with_the_gateway_and_the_demo_command(database_url, tmp_path):
    """`Devnet` (what `make run` starts) on free ports, then `facilitator demo` against it."""
    devnet = Devnet(port=free_port(), rpc_port=free_port(), og_rpc_port=free_port(),
                    blobstore_port=free_port(), gateway_port=free_port(), directory=tmp_path,
                    database_url=database_url, gateway_idle_timeout_s=0.5)
    try:
        manifest = await devnet.start()
        assert manifest["ogChain"]["chainId"] == 10740
        assert manifest["gateway"]["payTo"] == devnet.gateway.pay_to
        assert manifest["contracts"]["opg"]["address"] == OPG
        async with contracts.connect(manifest["ogChain"]["rpcUrl"]) as w3:
            registry = contracts.contract_at(w3, contracts.load_artifact("TEERegistry"),
                                             manifest["ogChain"]["teeRegistry"])
            tee_id = bytes.fromhex(manifest["gateway"]["teeId"][2:])
            assert await registry.functions.isTEEEnabled(tee_id).call() is True
        summary = await run_demo(manifest=manifest, requests=4, payer_index=1, out=None)
        assert summary.served == summary.verified == 4 and summary.sessions == 1
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "facilitator", "demo", "--manifest",
            str(tmp_path / "manifest.json"), "--requests", "3", "--payer-index", "2",
            "--settlement-type", "individual", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "FACILITATOR_EVENT_LOOP": "asyncio"})
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, (out.decode(), err.decode())
        assert "3/3 requests served" in out.decode()
        assert "attestations verified locally: 3/3" in out.decode()
        for payer in (manifest["payers"][1], manifest["payers"][2]):
            session_ids = [s.id for s in devnet.gateway.sessions.values()
                           if s.payer == payer["address"]]
            for session_id in session_ids:
                await settled(devnet.gateway, session_id)
        async with aiohttp.ClientSession() as http, http.post(manifest["rpcUrl"], json={
                "jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [{
                    "address": OPG, "fromBlock": "0x0", "toBlock": "latest", "topics": [
                        "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef",
                        None, "0x" + "00" * 12 + devnet.gateway.pay_to[2:].lower()]}]}
                ) as resp:
            logs = (await resp.json())["result"]
        spent = sum(s.accumulated for s in devnet.gateway.sessions.values())
        assert len(logs) == 2 and sum(int(log["data"], 16) for log in logs) == spent
    finally:
        await devnet.stop()
    assert devnet.gateway is None and devnet.facilitator is None and devnet.anvil is None


async def test_concurrent_requests_share_one_verification_and_never_overrun_the_cap(
        chain, facilitator_factory, gateway_factory):
    """Ten requests at once carrying one new payment: one /verify, one session, and only as
    many served as the cap holds (the rest get the exhausted 402)."""
    facilitator = await facilitator_factory()
    gateway = await gateway_factory(facilitator, idle_timeout_s=60)
    body, cost = chat_body(SAME_QUESTION), SAME_QUESTION_COST
    assert gateway.quote(body) == cost
    gateway.session_cap = 3 * cost + cost // 2
    payer = await chain.new_upto_payer()
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.chat_url, json=body) as challenge:
            required = decode_b64json(challenge.headers[PAYMENT_REQUIRED_HEADER])
        header = b64json(UptoPayer(payer.key.hex(), http).sign(required))

        async def once() -> tuple[int, str | None]:
            async with http.post(gateway.chat_url, json=body,
                                 headers={PAYMENT_SIGNATURE_HEADER: header}) as resp:
                await resp.read()
                return resp.status, resp.headers.get(SESSION_HEADER)
        answers = await asyncio.gather(*(once() for _ in range(10)))
    assert sorted(status for status, _ in answers) == [200] * 3 + [402] * 7
    assert len({sid for status, sid in answers if status == 200}) == 1
    assert await metric_total(facilitator, "facilitator_verify_requests_total",
                              scheme="upto") == 1
    [outcome] = await gateway.settle_all()
    assert outcome.success and outcome.amount == 3 * cost
    [(_, amount, _)] = await opg_transfers_to(chain, gateway.pay_to)
    assert amount == 3 * cost

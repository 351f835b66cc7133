"""The gateway emulator's TEE attestations: every response verifies against the key registered in
the TEERegistry, with our `facilitator/core/attestation.py` and with OpenGradient's own verifier
(`opengradient==1.1.4` `tee_verify.verify_response`, through the oracle in tests/compat/); the
`/settle_data` posts carry exactly the response's attestation plus the session and cost
extensions, and our facilitator accepts and verifies them. The fault knobs misbehave as
documented (forged signatures, no settlement data, unpaid inferences, double billing).
"""

from __future__ import annotations

import base64

import aiohttp
import pytest
from compat.oracles import OgOracle
from gateway_fixtures import chat_body, opg_transfers_to
from harness import OG_ADMIN_KEY, db_fetch, wait_until

from facilitator.core import attestation as att
from facilitator.devnet import contracts
from facilitator.devnet.demo import UptoPayer, fetch_signing_key, verify_response
from facilitator.devnet.gateway import SESSION_HEADER, GatewayFaults


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo ☀",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

BODIES = [
    chat_body("Héllo, what is 2 + 2? 画像 😀"),
    {"model": "claude-haiku-4-5", "temperature": 0.7, "max_tokens": 3, "top_p": 0.9,
     "messages": [{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [
                      {"type": "text", "text": "What is in this file?"},
                      {"type": "file", "file": {"filename": "r.pdf", "file_data": "JVBERi0="}}]}]},
    chat_body("Weather in Zürich?", tools=TOOLS, tool_choice="auto"),
    {"model": "gpt-4.1", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "content": "{\"t\": 21.5}", "tool_call_id": "call_1"}]},
    chat_body("stop here", stop=["\n\n"], response_format={"type": "text"}, max_tokens=0),
]


@pytest.fixture(scope="module")
def og_sdk():
    """OpenGradient's SDK verifier, one process for the module."""
    oracle = OgOracle()
    yield oracle
    oracle.close()


async def og_gateway(og_chain, facilitator_factory, gateway_factory, facilitator=None,
                     **options):
    """A facilitator that cross-checks attestations on `og_chain` (one per test: its watchers
    own the test's database), and a gateway in front of it whose key is registered there."""
    facilitator = facilitator or await facilitator_factory(
        FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1", **og_chain.env())
    gateway = await gateway_factory(facilitator, **options)
    tee_id = await gateway.register(og_chain.url, OG_ADMIN_KEY, og_chain.registry)
    assert tee_id == gateway.tee_id_hex
    return facilitator, gateway


async def registered_key(og_chain, tee_id: bytes) -> att.TeePublicKey:
    async with contracts.connect(og_chain.url) as w3:
        registry = contracts.contract_at(w3, contracts.load_artifact("TEERegistry"),
                                         og_chain.registry)
        der = await registry.functions.getTEEPublicKey(tee_id).call()
    return att.load_public_key(bytes(der))


async def paid_requests(chain, gateway, bodies, settlement_type=None):
    payer = await chain.new_upto_payer()
    async with aiohttp.ClientSession() as http:
        client = UptoPayer(payer.key.hex(), http, settlement_type)
        results = [await client.chat(gateway.chat_url, body) for body in bodies]
    assert [r.status for r in results] == [200] * len(bodies), results[-1].body
    await gateway.drain()
    return payer, client, results


async def test_responses_verify_against_the_registered_key(chain, og_chain, facilitator_factory,
                                                          gateway_factory):
    _, gateway = await og_gateway(og_chain, facilitator_factory, gateway_factory)
    _, _, results = await paid_requests(chain, gateway, BODIES)
    key = await registered_key(og_chain, gateway.tee_id)
    assert key.tee_id == gateway.tee_id == att.tee_id_of(gateway.public_key_der)
    async with aiohttp.ClientSession() as http:
        served_key = await fetch_signing_key(http, gateway.url)
    assert served_key.der == key.der
    for result in results:
        body = result.body
        assert verify_response(result.request, body, key) is None, body
        assert body["tee_id"] == gateway.tee_id_hex
        assert body["tee_request_hash"] == att.input_hash(
            att.canonical_chat_request(result.request)).hex()
        headers = result.headers
        assert headers["X-TEE-Signature"] == body["tee_signature"]
        assert headers["X-TEE-ID"] == body["tee_id"]
        assert headers["X-TEE-Timestamp"] == str(body["tee_timestamp"])
        assert headers["X-TEE-Request-Hash"] == body["tee_request_hash"]
        assert headers["X-TEE-Output-Hash"] == body["tee_output_hash"]
    finishes = [r.body["choices"][0]["finish_reason"] for r in results]
    assert finishes == ["stop", "length", "tool_calls", "stop", "stop"]


async def test_opengradient_sdk_verifier_accepts_them_and_rejects_forgeries(
        chain, og_chain, facilitator_factory, gateway_factory, og_sdk):
    facilitator, honest = await og_gateway(og_chain, facilitator_factory, gateway_factory)
    _, forger = await og_gateway(og_chain, facilitator_factory, gateway_factory, facilitator,
                                 faults=GatewayFaults(forge_signatures=True))
    for gateway, expect_ok in ((honest, True), (forger, False)):
        _, _, results = await paid_requests(chain, gateway, BODIES)
        prepared = og_sdk([job for r in results for job in (
            {"op": "canonical", "body": r.request}, {"op": "output", "response": r.body})])
        jobs = []
        for result, canonical, output in zip(results, prepared[::2], prepared[1::2],
                                             strict=True):
            assert canonical["ok"] and output["ok"], (canonical, output)
            assert canonical["input_hash"] == result.body["tee_request_hash"]
            assert output["output_hash"] == result.body["tee_output_hash"]
            jobs.append({"op": "verify", "canonical": canonical["canonical"],
                         "response": result.body, "content": output["text"],
                         "pem": gateway.public_key_pem, "expected_tee_id": gateway.tee_id_hex})
        verdicts = og_sdk(jobs)
        assert [v["ok"] for v in verdicts] == [expect_ok] * len(jobs), verdicts
        if expect_ok:
            assert [v["request_hash"] for v in verdicts] == [
                r.body["tee_request_hash"] for r in results]
        else:  # the forger still claims the registered key's tee id
            key = await registered_key(og_chain, forger.tee_id)
            assert all(verify_response(r.request, r.body, key) ==
                       "RSA-PSS signature does not verify" for r in results)
            assert all(r.body["tee_id"] == forger.tee_id_hex for r in results)


async def test_settle_data_posts_carry_the_attestation_session_and_cost(
        chain, og_chain, facilitator_factory, gateway_factory, sink_factory, database_url):
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og_chain.env())
    sink = await sink_factory(forward_to=facilitator.url)  # records, then asks our facilitator
    gateway = await gateway_factory(facilitator, settle_data_url=sink.url, idle_timeout_s=60)
    await gateway.register(og_chain.url, OG_ADMIN_KEY, og_chain.registry)
    payer = await chain.new_upto_payer()
    modes = [None, "batch", "individual", "private", " In-Dividual "]
    expected_modes = ["batch", "batch", "individual", "private", "individual"]
    async with aiohttp.ClientSession() as http:
        results = []
        for i, mode in enumerate(modes):
            client = UptoPayer(payer.key.hex(), http, mode)
            if results:
                client.sessions[gateway.chat_url] = results[0].session_id
            results.append(await client.chat(gateway.chat_url, chat_body(f"question {i}")))
            if i == 0:
                nonce = client.permits[0]["payload"]["permit2Authorization"]["nonce"]
    assert [r.status for r in results] == [200] * len(modes)
    [session_id] = {r.session_id for r in results}
    await gateway.drain()
    assert [p["type"] for p in sink.posts] == expected_modes
    for post, result, mode in zip(sink.posts, results, expected_modes, strict=True):
        response, payload = result.body, post["payload"]
        assert post["body"] == b""
        parsed = att.parse_settlement_data(post["header"], individual=mode == "individual")
        assert parsed.record.tee_id == gateway.tee_id
        assert parsed.record.input_hash.hex() == payload["input_hash"] == \
            response["tee_request_hash"]
        assert payload["output_hash"] == response["tee_output_hash"]
        assert payload["tee_signature"] == response["tee_signature"]
        assert payload["tee_id"] == response["tee_id"] == gateway.tee_id_hex
        assert payload["tee_timestamp"] == response["tee_timestamp"]
        assert payload["session"] == {"id": session_id, "payer": payer.address, "nonce": nonce}
        assert payload["cost_opg"] == response["opengradient"]["cost_opg"]
        status, answer = post["forwarded"]
        assert status == 202, answer
        if mode == "private":
            assert answer == {"settlementJob": None}
            assert payload["timestamp"] == response["tee_timestamp"]
        else:
            job = answer["settlementJob"]
            assert job["jobId"].startswith("data-") and job["settlementType"] == mode
        if mode == "individual":
            # og-x402 sends the Permit2 spender (the upto proxy) as eth_address (notes §3.7).
            assert payload["input"] == result.request and payload["output"] == response
            assert payload["timestamp"] == str(response["tee_timestamp"])
            assert payload["eth_address"] == contracts.UPTO_PROXY_ADDRESS
            # posted before answering: the facilitator's job comes back as headers
            assert result.headers["X-Settlement-Job-ID"] == answer["settlementJob"]["jobId"]
            assert result.headers["X-Settlement-Type"] == "individual"
        else:
            assert "input" not in payload and "X-Settlement-Job-ID" not in result.headers

    async def verified() -> bool:
        rows = await db_fetch(database_url, "SELECT verification FROM attestations")
        return len(rows) == len(modes) and all(r["verification"] != "pending" for r in rows)
    await wait_until(verified, timeout_s=30, what="our facilitator to verify the attestations")
    rows = await db_fetch(database_url,
                         "SELECT verification, session_ref, cost_opg, mode FROM attestations")
    assert {r["verification"] for r in rows} == {"valid"}
    assert {r["session_ref"] for r in rows} == {session_id}
    assert sorted(r["mode"] for r in rows) == sorted(expected_modes)
    assert sum(int(r["cost_opg"]) for r in rows) == gateway.sessions[session_id].accumulated


async def test_our_facilitator_flags_a_forging_gateway(chain, og_chain, facilitator_factory,
                                                      gateway_factory, database_url):
    _, gateway = await og_gateway(og_chain, facilitator_factory, gateway_factory,
                                  faults=GatewayFaults(forge_signatures=True))
    await paid_requests(chain, gateway, BODIES[:2])
    assert all(p.accepted for p in gateway.settle_data_posts)

    async def decided() -> bool:
        rows = await db_fetch(database_url, "SELECT verification FROM attestations")
        return len(rows) == 2 and all(r["verification"] != "pending" for r in rows)
    await wait_until(decided, timeout_s=30, what="verdicts on the forged attestations")
    rows = await db_fetch(database_url, "SELECT verification FROM attestations")
    assert {r["verification"] for r in rows} == {"invalid_signature"}


async def test_fault_knobs_skip_data_serve_unpaid_and_double_bill(chain, gateway_factory,
                                                                 sink_factory):
    sink = await sink_factory()
    # skip_settle_data: attested responses, nothing posted.
    silent = await gateway_factory(settle_data_url=sink.url,
                                   faults=GatewayFaults(skip_settle_data=True))
    await paid_requests(chain, silent, BODIES[:2])
    assert sink.posts == [] and silent.settle_data_posts == []

    # serve_unpaid: no payment, no session, still attested and reported (without `session`).
    free = await gateway_factory(settle_data_url=sink.url,
                                 faults=GatewayFaults(serve_unpaid=True))
    async with aiohttp.ClientSession() as http, \
            http.post(free.chat_url, json=chat_body("free lunch")) as resp:
        assert resp.status == 200 and SESSION_HEADER not in resp.headers
        body = await resp.json()
    await free.drain()
    [post] = sink.posts
    assert "session" not in post["payload"] and post["payload"]["cost_opg"] == \
        body["opengradient"]["cost_opg"]
    assert post["payload"]["input_hash"] == body["tee_request_hash"] and free.sessions == {}
    sink.posts.clear()

    # double_bill: one inference charged to, and reported in, two payers' sessions.
    billing = await gateway_factory(settle_data_url=sink.url, idle_timeout_s=60,
                                    faults=GatewayFaults(double_bill=True))
    payer_a, _, [first] = await paid_requests(chain, billing, [chat_body("a")])
    payer_b, _, [second] = await paid_requests(chain, billing, [chat_body("b")])
    cost_a, cost_b = (int(r.body["opengradient"]["cost_opg"]) for r in (first, second))
    posts = [p["payload"] for p in sink.posts]
    assert [p["session"]["id"] for p in posts] == [
        first.session_id, second.session_id, first.session_id]
    assert posts[1]["input_hash"] == posts[2]["input_hash"] == second.body["tee_request_hash"]
    assert posts[1]["tee_signature"] == posts[2]["tee_signature"]
    await billing.settle_all()
    paid = {sender.lower(): amount for sender, amount, _ in
            await opg_transfers_to(chain, billing.pay_to)}
    assert paid == {payer_a.address.lower(): cost_a + cost_b, payer_b.address.lower(): cost_b}


def test_forged_signature_is_a_real_rsa_signature_by_another_key():
    """Sanity of the forging knob's premise: a forged signature is well-formed (256 bytes,
    canonical base64), so only verification against the registered key can catch it."""
    key, other = att.generate_private_key(), att.generate_private_key()
    msg = att.message_hash(b"\x01" * 32, b"\x02" * 32, 1_747_000_000)
    forged = att.sign_attestation(other, msg)
    assert len(forged) == 256
    assert att.parse_signature(base64.b64encode(forged).decode()) == forged
    assert not att.verify_attestation(att.load_public_key(att.public_key_der(key)), msg, forged)

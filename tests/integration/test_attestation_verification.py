"""Attestation verification on real chains and a real database: records ahead of the
OpenGradient chain cannot freeze verification for everyone, absurd timestamps are refused at
ingestion, and genuine `/v1/completions` records verify as valid."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from eth_account import Account
from harness import OgChain, attestation_header, wait_until

from facilitator.core import attestation as att
from facilitator.services.attestations import MAX_FUTURE_S, VERIFY_BATCH


@pytest.fixture(scope="module")
async def og(tmp_path_factory) -> AsyncIterator[OgChain]:
    chain = await OgChain.start(tmp_path_factory.mktemp("blobs"))
    yield chain
    await chain.stop()


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def chat(i: int) -> dict[str, Any]:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": f"question {i}"}]}


async def post(facilitator, header: str, mode: str = "private"):
    return await facilitator.http.post("/settle_data", headers={
        "x-settlement-type": mode, "x-settlement-data": header})


async def mine(og: OgChain) -> None:
    """A block at the current time: the watcher's synced point moves past `now`."""
    await og.anvil.rpc("evm_mine", [])


async def test_records_ahead_of_the_chain_do_not_hold_back_a_decidable_one(og,
                                                                          facilitator_factory,
                                                                          database_url):
    key = generate_key()
    tee_id = await og.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og.env(FACILITATOR_DATA_RELAY="off"))
    ahead = int(time.time()) + 1800  # accepted (within the bound), but not covered for 30 min
    headers = [attestation_header(key, tee_id, chat(i), f"later {i}", timestamp=ahead)
               for i in range(VERIFY_BATCH + 100)]
    slots = asyncio.Semaphore(16)

    async def post_one(header: str) -> int:
        async with slots:
            return (await post(facilitator, header)).status_code
    assert set(await asyncio.gather(*(post_one(h) for h in headers))) == {202}

    now = int((await og.anvil.rpc("eth_getBlockByNumber", ["latest", False]))["timestamp"], 16)
    answer = await post(facilitator, attestation_header(key, tee_id, chat(-1), "now",
                                                        timestamp=now))
    assert answer.status_code == 202
    await mine(og)

    async def decided() -> bool:
        found = await fetch(database_url, "SELECT verification FROM attestations "
                                          "WHERE tee_timestamp = $1", now)
        return bool(found) and found[0]["verification"] != "pending"
    await wait_until(decided, timeout_s=30, what="the record behind 600 future ones")
    [record] = await fetch(database_url, "SELECT verification FROM attestations "
                                         "WHERE tee_timestamp = $1", now)
    assert record["verification"] == "valid"
    waiting = await fetch(database_url, "SELECT count(*) AS n FROM attestations "
                                        "WHERE verification = 'pending' AND tee_timestamp = $1",
                          ahead)
    assert waiting[0]["n"] == VERIFY_BATCH + 100  # still waiting for the chain, not decided


@pytest.mark.parametrize("offset", [MAX_FUTURE_S + 120, 10**9])
async def test_timestamps_far_ahead_of_our_clock_are_refused(og, facilitator_factory, offset):
    key = generate_key()
    facilitator = await facilitator_factory(**og.env(FACILITATOR_DATA_RELAY="off"))
    header = attestation_header(key, b"\x01" * 32, chat(1), "x",
                                timestamp=int(time.time()) + offset)
    answer = await post(facilitator, header, "batch")
    assert answer.status_code == 400
    assert answer.json()["field"] == "tee_timestamp"


@pytest.mark.parametrize("timestamp", [2**63, 2**63 + 5, 2**200])
async def test_timestamps_beyond_64_bits_are_refused_not_a_500(og, facilitator_factory,
                                                               timestamp, database_url):
    key = generate_key()
    facilitator = await facilitator_factory(**og.env(FACILITATOR_DATA_RELAY="off"))
    answer = await post(facilitator, attestation_header(key, b"\x01" * 32, chat(2), "x",
                                                        timestamp=timestamp), "batch")
    assert answer.status_code == 400
    assert answer.json()["field"] == "tee_timestamp"
    assert not await fetch(database_url, "SELECT id FROM attestations")


def completion_header(private_key: Any, tee_id: bytes, request: dict[str, Any], text: str,
                      timestamp: int) -> str:
    """An individual `x-settlement-data` value for a really signed `/v1/completions` answer,
    hashed as the gateway's completions controller does."""
    in_hash = att.input_hash(att.canonical_completion_request(request))
    out_hash = att.output_hash(text)
    signature = att.sign_attestation(private_key, att.message_hash(in_hash, out_hash, timestamp))
    response = {"id": "cmpl-1", "object": "text_completion", "model": request["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    data = {"tee_id": "0x" + tee_id.hex(), "input_hash": in_hash.hex(),
            "output_hash": out_hash.hex(), "tee_signature": base64.b64encode(signature).decode(),
            "tee_timestamp": timestamp, "timestamp": str(timestamp), "input": request,
            "output": response, "eth_address": Account.create().address}
    return base64.b64encode(json.dumps(data).encode()).decode()


@pytest.mark.parametrize("posted_prompt, verdict", [
    ("Once upon a time", "valid"),            # the body the TEE signed
    ("Once upon a crime", "hash_mismatch"),   # the same signed record with another body
])
async def test_completion_records_are_checked_as_completions(og, facilitator_factory,
                                                             database_url, posted_prompt,
                                                             verdict):
    key = generate_key()
    tee_id = await og.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og.env(FACILITATOR_DATA_RELAY="off"))
    now = int((await og.anvil.rpc("eth_getBlockByNumber", ["latest", False]))["timestamp"], 16)
    request = {"model": "gpt-4.1", "prompt": "Once upon a time", "max_tokens": 16,
               "temperature": 0.7, "stop": ["\n"], "top_p": 0.9}
    data = json.loads(base64.b64decode(
        completion_header(key, tee_id, request, " there was a TEE.", now)))
    data["input"] = {**request, "prompt": posted_prompt}
    answer = await post(facilitator, base64.b64encode(json.dumps(data).encode()).decode(),
                        "individual")
    assert answer.status_code == 202
    assert answer.json()["settlementJob"]["settlementType"] == "individual"
    await mine(og)

    async def decided() -> bool:
        found = await fetch(database_url, "SELECT verification FROM attestations")
        return bool(found) and found[0]["verification"] != "pending"
    await wait_until(decided, timeout_s=30, what="the completion record's verdict")
    [record] = await fetch(database_url, "SELECT mode, verification FROM attestations")
    assert (record["mode"], record["verification"]) == ("individual", verdict)


def generate_key() -> Any:
    return att.generate_private_key()

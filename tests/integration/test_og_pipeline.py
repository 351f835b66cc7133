"""The OpenGradient side end to end on real chains: attestations posted to /settle_data are
verified against the TEE registry, relayed in batches (Merkle dump in the blob store,
batchSettle on the OpenGradient chain) or individually, and the watcher indexes the chain's
records — only from the configured relay and relayer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from eth_account import Account
from harness import OgChain, attestation_header, wait_until

from facilitator.core.attestation import generate_private_key
from facilitator.devnet import contracts


@pytest.fixture(scope="module")
async def og(tmp_path_factory) -> AsyncIterator[OgChain]:
    chain = await OgChain.start(tmp_path_factory.mktemp("blobs"))
    yield chain
    await chain.stop()


async def rows(database_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def chat(i: int) -> dict:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": f"question {i}"}]}


async def post(facilitator, header: str, mode: str = "batch"):
    return await facilitator.http.post("/settle_data", headers={
        "x-settlement-type": mode, "x-settlement-data": header})


async def test_batch_attestations_are_verified_relayed_and_indexed(og, facilitator_factory,
                                                                    database_url):
    key = generate_private_key()
    tee_id = await og.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og.env())
    for i in range(3):
        answer = await post(facilitator, attestation_header(key, tee_id, chat(i), f"answer {i}"))
        assert answer.status_code == 202
        assert answer.json()["settlementJob"]["settlementType"] == "batch"

    async def indexed() -> bool:
        leaves = await rows(database_url, "SELECT * FROM og_batch_leaves")
        return len(leaves) == 3
    await wait_until(indexed, timeout_s=20, what="the relayed batch to be indexed")
    [batch] = await rows(database_url, "SELECT * FROM og_batches")
    assert batch["dump_status"] == "valid" and int(batch["batch_size"]) == 3
    verdicts = await rows(database_url, "SELECT verification FROM attestations")
    assert {v["verification"] for v in verdicts} == {"valid"}


async def test_forged_and_disabled_tee_attestations_are_flagged(og, facilitator_factory,
                                                                 database_url):
    key, forger = generate_private_key(), generate_private_key()
    tee_id = await og.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og.env())
    await post(facilitator, attestation_header(forger, tee_id, chat(1), "forged"), "private")
    await contracts.set_tee_enabled(og.url, _admin(), og.registry, tee_id, False)
    await og.anvil.rpc("evm_increaseTime", [5])
    await og.anvil.rpc("evm_mine", [])
    late = int((await og.anvil.rpc("eth_getBlockByNumber", ["latest", False]))["timestamp"], 16)
    await post(facilitator, attestation_header(key, tee_id, chat(2), "late", timestamp=late),
               "private")
    unknown = generate_private_key()
    await post(facilitator, attestation_header(unknown, b"\x11" * 32, chat(3), "who"), "private")

    async def verified() -> bool:
        found = await rows(database_url, "SELECT verification FROM attestations")
        return len(found) == 3 and all(r["verification"] != "pending" for r in found)
    await wait_until(verified, timeout_s=20, what="the three verdicts")
    found = {r["verification"] for r in await rows(
        database_url, "SELECT verification FROM attestations")}
    assert found == {"invalid_signature", "tee_disabled", "unknown_tee"}


async def test_settlement_events_from_strangers_are_ignored(og, facilitator_factory,
                                                             database_url):
    await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                              **og.env(FACILITATOR_DATA_RELAY="off"))
    stranger_key = "0x" + "5a" * 32
    stranger = Account.from_key(stranger_key).address
    await og.anvil.rpc("anvil_setBalance", [stranger, hex(10**20)])
    await contracts.add_relayer(og.url, _admin(), og.relay, stranger)  # an admin's mistake
    lookalike = await contracts.deploy_settlement_relay(og.url, stranger_key)
    from facilitator.core.og_events import batch_settle_call
    for target in (og.relay, lookalike):
        await contracts.transact(og.url, stranger_key, target,
                                 batch_settle_call(b"\x22" * 32, 1, "blob"))
    await contracts.transact(og.url, contracts_relayer_key(), og.relay,
                             batch_settle_call(b"\x33" * 32, 1, "blob-ok"))

    async def roots() -> set[bytes]:
        return {bytes(b["merkle_root"]) for b in await rows(
            database_url, "SELECT merkle_root FROM og_batches")}

    async def seen() -> bool:
        return b"\x33" * 32 in await roots()
    await wait_until(seen, timeout_s=20, what="the relayer's batch to be indexed")
    assert b"\x22" * 32 not in await roots(), "a stranger's batches never count"


def _admin() -> str:
    from facilitator.devnet.anvil import DEV_KEYS
    return DEV_KEYS[0]


def contracts_relayer_key() -> str:
    from harness import OG_RELAYER_KEY
    return OG_RELAYER_KEY


async def test_individual_attestation_is_settled_with_its_record(og, facilitator_factory,
                                                                  database_url):
    key = generate_private_key()
    tee_id = await og.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og.env())
    answer = await post(facilitator, attestation_header(key, tee_id, chat(7), "answer 7",
                                                        individual=True), "individual")
    assert answer.json()["settlementJob"]["settlementType"] == "individual"

    async def on_chain() -> bool:
        return len(await rows(database_url, "SELECT * FROM og_individual_settlements")) == 1
    await wait_until(on_chain, timeout_s=20, what="the individual settlement on chain")
    [record] = await rows(database_url, "SELECT * FROM og_individual_settlements")
    [attestation] = await rows(database_url, "SELECT * FROM attestations")
    assert bytes(record["input_hash"]) == bytes(attestation["input_hash"])
    blob = await facilitator.http.get(f"{og.blob_url}/v1/blobs/{record['blob_id']}")
    assert blob.json()["teeId"] == "0x" + tee_id.hex()

    async def valid() -> bool:
        [a] = await rows(database_url, "SELECT verification FROM attestations")
        return a["verification"] == "valid"
    await wait_until(valid, what="the individual record's hashes to be recomputed")


WRONG_ROOT_BATCH = ("SELECT dump_status FROM og_batches WHERE merkle_root = '\\x"
                    + "44" * 32 + "'")


async def test_a_dump_that_does_not_match_its_root_is_recorded(og, facilitator_factory,
                                                               database_url):
    from facilitator.adapters.blobstore import BlobStoreClient
    from facilitator.core.attestation import LEAF_ENCODING
    from facilitator.core.merkle import StandardMerkleTree
    from facilitator.core.og_events import batch_settle_call

    await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                              **og.env(FACILITATOR_DATA_RELAY="off"))
    leaf = ("0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32, "0x" + "04" * 256, "1")
    tree = StandardMerkleTree.of([leaf], LEAF_ENCODING)
    client = BlobStoreClient(og.blob_url)
    await client.start()
    blob_id = await client.put(tree.dump_json())
    await client.close()
    await contracts.transact(og.url, contracts_relayer_key(), og.relay,
                             batch_settle_call(b"\x44" * 32, 1, blob_id))  # wrong root

    async def checked() -> bool:
        found = await rows(database_url, WRONG_ROOT_BATCH)
        return bool(found) and found[0]["dump_status"] != "pending"
    await wait_until(checked, timeout_s=20, what="the dump check")
    [batch] = await rows(database_url, WRONG_ROOT_BATCH)
    assert batch["dump_status"] == "root_mismatch"
    assert not await rows(database_url, "SELECT * FROM og_batch_leaves l JOIN og_batches b "
                          "ON b.id = l.batch_id WHERE b.dump_status <> 'valid'")

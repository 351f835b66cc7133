"""The OpenGradient side end to end on real chains: attestations posted to /settle_data are
verified against the TEE registry, relayed in batches (Merkle dump in the blob store,
batchSettle on the OpenGradient chain) or individually, and the watcher indexes the chain's
records — only from the configured relay and relayer."""

from __future__ import annotations

from eth_account import Account
from harness import attestation_header, db_fetch, wait_until

from facilitator.core.attestation import generate_private_key
from facilitator.devnet import contracts


rows = db_fetch  # one-shot reads in assertions


def chat(i: int) -> dict:
    return {"model": "gpt-4.1", "messages": [{"role": "user", "content": f"question {i}"}]}


async def post(facilitator, header: str, mode: str = "batch"):
    return await facilitator.http.post("/settle_data", headers={
        "x-settlement-type": mode, "x-settlement-data": header})


async def test_batch_attestations_are_verified_relayed_and_indexed(og_chain, facilitator_factory,
                                                                   database_url):
    key = generate_private_key()
    tee_id = await og_chain.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og_chain.env())
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

    async def verified() -> bool:  # the verifier runs on its own schedule, not the relay's
        verdicts = await rows(database_url, "SELECT verification FROM attestations")
        return len(verdicts) == 3 and all(v["verification"] != "pending" for v in verdicts)
    await wait_until(verified, timeout_s=20, what="the three verdicts")
    verdicts = await rows(database_url, "SELECT verification FROM attestations")
    assert {v["verification"] for v in verdicts} == {"valid"}


async def test_forged_and_disabled_tee_attestations_are_flagged(og_chain, facilitator_factory,
                                                                database_url):
    key, forger = generate_private_key(), generate_private_key()
    tee_id = await og_chain.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og_chain.env())
    await post(facilitator, attestation_header(forger, tee_id, chat(1), "forged"), "private")
    await contracts.set_tee_enabled(og_chain.url, _admin(), og_chain.registry, tee_id, False)
    await og_chain.anvil.rpc("evm_increaseTime", [5])
    await og_chain.anvil.rpc("evm_mine", [])
    latest = await og_chain.anvil.rpc("eth_getBlockByNumber", ["latest", False])
    late = int(latest["timestamp"], 16)
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


async def test_settlement_events_from_strangers_are_ignored(og_chain, facilitator_factory,
                                                            database_url):
    await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                              **og_chain.env(FACILITATOR_DATA_RELAY="off"))
    stranger_key = "0x" + "5a" * 32
    stranger = Account.from_key(stranger_key).address
    await og_chain.anvil.rpc("anvil_setBalance", [stranger, hex(10**20)])
    # an admin's mistake
    await contracts.add_relayer(og_chain.url, _admin(), og_chain.relay, stranger)
    lookalike = await contracts.deploy_settlement_relay(og_chain.url, stranger_key)
    from facilitator.core.og_events import batch_settle_call
    for target in (og_chain.relay, lookalike):
        await contracts.transact(og_chain.url, stranger_key, target,
                                 batch_settle_call(b"\x22" * 32, 1, "blob"))
    await contracts.transact(og_chain.url, contracts_relayer_key(), og_chain.relay,
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


async def test_individual_attestation_is_settled_with_its_record(og_chain, facilitator_factory,
                                                                 database_url):
    key = generate_private_key()
    tee_id = await og_chain.register_tee(key, Account.create().address)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                                            **og_chain.env())
    answer = await post(facilitator, attestation_header(key, tee_id, chat(7), "answer 7",
                                                        individual=True), "individual")
    assert answer.json()["settlementJob"]["settlementType"] == "individual"

    async def on_chain() -> bool:
        return len(await rows(database_url, "SELECT * FROM og_individual_settlements")) == 1
    await wait_until(on_chain, timeout_s=20, what="the individual settlement on chain")
    [record] = await rows(database_url, "SELECT * FROM og_individual_settlements")
    [attestation] = await rows(database_url, "SELECT * FROM attestations")
    assert bytes(record["input_hash"]) == bytes(attestation["input_hash"])
    blob = await facilitator.http.get(f"{og_chain.blob_url}/v1/blobs/{record['blob_id']}")
    assert blob.json()["teeId"] == "0x" + tee_id.hex()

    async def valid() -> bool:
        [a] = await rows(database_url, "SELECT verification FROM attestations")
        return a["verification"] == "valid"
    await wait_until(valid, what="the individual record's hashes to be recomputed")


WRONG_ROOT_BATCH = ("SELECT dump_status, dump_root, dump_leaf_count FROM og_batches "
                    "WHERE merkle_root = '\\x" + "44" * 32 + "'")


async def test_a_dump_that_does_not_match_its_root_is_recorded(og_chain, facilitator_factory,
                                                               database_url):
    from facilitator.adapters.blobstore import BlobStoreClient
    from facilitator.core.attestation import LEAF_ENCODING
    from facilitator.core.merkle import StandardMerkleTree
    from facilitator.core.og_events import batch_settle_call

    await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                              **og_chain.env(FACILITATOR_DATA_RELAY="off"))
    leaf = ("0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32, "0x" + "04" * 256, "1")
    tree = StandardMerkleTree.of([leaf], LEAF_ENCODING)
    client = BlobStoreClient(og_chain.blob_url)
    await client.start()
    blob_id = await client.put(tree.dump_json())
    await client.close()
    await contracts.transact(og_chain.url, contracts_relayer_key(), og_chain.relay,
                             batch_settle_call(b"\x44" * 32, 1, blob_id))  # wrong root

    async def checked() -> bool:
        found = await rows(database_url, WRONG_ROOT_BATCH)
        return bool(found) and found[0]["dump_status"] != "pending"
    await wait_until(checked, timeout_s=20, what="the dump check")
    [batch] = await rows(database_url, WRONG_ROOT_BATCH)
    assert batch["dump_status"] == "root_mismatch"
    assert (bytes(batch["dump_root"]), batch["dump_leaf_count"]) == (tree.root, 1)
    assert not await rows(database_url, "SELECT * FROM og_batch_leaves l JOIN og_batches b "
                          "ON b.id = l.batch_id WHERE b.dump_status <> 'valid'")


async def test_a_large_dump_is_checked_off_the_event_loop(og_chain, facilitator_factory,
                                                         database_url, monkeypatch):
    """A 16,384-leaf dump takes seconds of CPU to verify and index: the facilitator (in this
    process, on this loop) must keep serving meanwhile, so the check runs in a worker thread.

    Shown without timing anything: the dump's loading (`og_logs._load_dump`, wrapped) schedules a
    coroutine on the loop and does not return before that coroutine has run. The loop can run it
    only if it is free while the dump is loaded; on the loop thread the wrapper does not wait
    (that would deadlock) and records the failure instead."""
    import asyncio
    import contextlib
    import threading

    from facilitator.adapters.blobstore import BlobStoreClient
    from facilitator.core.attestation import LEAF_ENCODING
    from facilitator.core.merkle import StandardMerkleTree
    from facilitator.core.og_events import batch_settle_call
    from facilitator.services import og_logs

    size = 16_384
    leaves = [("0x" + i.to_bytes(32, "big").hex(), "0x" + (i + 1).to_bytes(32, "big").hex(),
               "0x" + (i + 2).to_bytes(32, "big").hex(), "0x" + bytes([i % 256]).hex() * 256,
               str(1_700_000_000 + i)) for i in range(size)]
    tree = await asyncio.to_thread(StandardMerkleTree.of, leaves, LEAF_ENCODING)
    dump = tree.dump_json()
    client = BlobStoreClient(og_chain.blob_url)
    await client.start()
    blob_id = await client.put(dump)
    await client.close()

    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    served = asyncio.Event()  # set by a coroutine scheduled on the loop while our dump loads
    loads: list[dict[str, bool]] = []  # every dump the facilitator loads (this module's too)
    real_load = og_logs._load_dump

    async def on_the_loop() -> bool:
        served.set()
        return threading.get_ident() == loop_thread

    def load_while_the_loop_serves(raw: bytes):
        load = {"ours": raw == dump, "off_loop": threading.get_ident() != loop_thread,
                "loop_served": False}
        loads.append(load)
        if not load["off_loop"]:
            return real_load(raw)
        meanwhile = asyncio.run_coroutine_threadsafe(on_the_loop(), loop)
        try:
            return real_load(raw)
        finally:  # the check cannot complete before the loop ran the coroutine: a free loop
            # runs it at once; the bound only turns a blocked loop into a failure, not a hang
            with contextlib.suppress(TimeoutError):
                load["loop_served"] = meanwhile.result(timeout=60)

    monkeypatch.setattr(og_logs, "_load_dump", load_while_the_loop_serves)
    await facilitator_factory(FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1",
                              **og_chain.env(FACILITATOR_DATA_RELAY="off"))
    await contracts.transact(og_chain.url, contracts_relayer_key(), og_chain.relay,
                             batch_settle_call(tree.root, size, blob_id))
    root = "\\x" + tree.root.hex()

    async def checked() -> bool:
        found = await rows(database_url, "SELECT dump_status FROM og_batches WHERE merkle_root = "
                           f"'{root}'")
        return bool(found) and found[0]["dump_status"] != "pending"
    await wait_until(checked, timeout_s=120, what="the large dump's check")
    assert served.is_set(), "the loop ran nothing while the dump was checked"
    assert any(load["ours"] for load in loads), loads
    assert all(load["off_loop"] and load["loop_served"] for load in loads), loads
    [batch] = await rows(database_url, "SELECT id, dump_status, dump_leaf_count FROM og_batches "
                         f"WHERE merkle_root = '{root}'")
    assert batch["dump_status"] == "valid" and batch["dump_leaf_count"] == size
    [count] = await rows(database_url, "SELECT count(*) AS n FROM og_batch_leaves "
                         f"WHERE batch_id = {batch['id']}")
    assert count["n"] == size

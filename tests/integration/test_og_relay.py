"""Our data relay against a real OpenGradient anvil, blob store and PostgreSQL, driven step by
step: a batch is never sent twice (a "nonce too low" caused by our own mined transaction is
recognised as inclusion), a nonce taken by someone else leads to exactly one new signature, a
transaction that is never mined is given up after a bounded number of re-sends (the relay then
moves on), the fee is capped, and the database refuses illegal state changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from harness import OG_CHAIN_ID, OG_RELAYER_KEY, OgChain

from facilitator.adapters.attestations import AttestationStore, NewAttestation
from facilitator.adapters.blobstore import BlobStoreClient
from facilitator.adapters.jsonrpc import JsonRpcClient
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.og_relay import RelayStore, Submission
from facilitator.adapters.signer import SignerKey, TxFields, sign_eip1559
from facilitator.core.attestation import AttestationRecord
from facilitator.services.datarelay import DataRelay

RELAYER = SignerKey.from_hex(OG_RELAYER_KEY)


@pytest.fixture(scope="module")
async def og(tmp_path_factory) -> AsyncIterator[OgChain]:
    chain = await OgChain.start(tmp_path_factory.mktemp("blobs"))
    yield chain
    await chain.stop()


@dataclass
class Rig:
    pool: asyncpg.Pool
    store: RelayStore
    attestations: AttestationStore
    chain: JsonRpcClient
    blobs: BlobStoreClient
    metrics: Metrics
    og: OgChain

    def relay(self, **options: Any) -> DataRelay:
        return DataRelay(store=self.store, chain=self.chain, key=RELAYER, blobs=self.blobs,
                         relay_contract=self.og.relay, chain_id=OG_CHAIN_ID,
                         metrics=self.metrics, batch_size=1, batch_age_s=0, **options)

    async def attestation(self, n: int) -> int:
        record = AttestationRecord(bytes([n]) * 32, bytes([n, 1]) * 16, bytes([n, 2]) * 16,
                                   bytes([n]) * 256, 1_700_000_000 + n)
        attestation_id, _ = await self.attestations.insert(NewAttestation(
            mode="batch", record=record, session_ref="", payer=None, permit_nonce=None,
            cost_opg=None, eth_address=None, request_body=None, response_body=None))
        return attestation_id

    async def submission(self) -> Submission:
        [row] = await self.store.unfinished(1)
        return row

    async def row(self, submission_id: int) -> asyncpg.Record:
        return await self.pool.fetchrow("SELECT * FROM og_relay_submissions WHERE id = $1",
                                        submission_id)

    async def relayer_nonce(self, block: str = "latest") -> int:
        return int(await self.og.anvil.rpc("eth_getTransactionCount",
                                           [RELAYER.address, block]), 16)

    def failed_count(self) -> float:
        return self.metrics.registry.get_sample_value(
            "facilitator_relay_submissions_total", {"kind": "batch", "result": "failed"}) or 0.0


@pytest.fixture
async def rig(og: OgChain, database_url: str) -> AsyncIterator[Rig]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    metrics = Metrics()
    chain = JsonRpcClient([og.url], chain="opengradient", metrics=metrics)
    await chain.start()
    blobs = BlobStoreClient(og.blob_url)
    await blobs.start()
    try:
        yield Rig(pool, RelayStore(pool), AttestationStore(pool, 84532, OG_CHAIN_ID), chain,
                  blobs, metrics, og)
    finally:
        await og.anvil.rpc("evm_setAutomine", [True])
        await og.anvil.rpc("evm_mine", [])  # whatever a test left in the pool
        await blobs.close()
        await chain.close()
        await pool.close()


async def test_our_own_mined_transaction_is_inclusion_not_a_reason_to_sign_again(rig):
    base_fee = int((await rig.og.anvil.rpc("eth_getBlockByNumber", ["latest", False]))
                   ["baseFeePerGas"], 16)
    cap = base_fee + 10**8  # below 2 x base fee + tip: the cap decides
    relay = rig.relay(max_fee_per_gas_cap_wei=cap)
    await rig.attestation(1)
    nonce_before = await rig.relayer_nonce()
    await relay.step()  # open and publish
    await relay.step()  # sign, store, send (automine: mined at once)
    sent = await rig.submission()
    assert sent.state == "broadcast" and sent.attempts == 1
    tx = await rig.og.anvil.rpc("eth_getTransactionByHash", ["0x" + sent.tx_hash.hex()])
    assert int(tx["maxFeePerGas"], 16) == cap

    # A re-send of the mined bytes: the node answers "nonce too low". The relay must find its
    # own receipt instead of signing the batch again.
    await relay._resend(sent)  # noqa: SLF001 - the re-send path, on a mined transaction
    row = await rig.row(sent.id)
    assert row["state"] == "included" and row["attempts"] == 1 and row["resends"] == 1
    assert await rig.relayer_nonce() == nonce_before + 1, "exactly one transaction was sent"


async def test_a_nonce_taken_by_another_transaction_gets_one_new_signature(rig):
    relay = rig.relay(resend_after_s=0)
    await rig.attestation(2)
    await relay.step()  # publish
    await rig.og.anvil.rpc("evm_setAutomine", [False])
    await relay.step()  # signed and in the pool
    ours = await rig.submission()
    assert ours.state == "broadcast"
    nonce = await rig.relayer_nonce()
    # Someone else with the relayer key replaces our transaction at the same nonce.
    other = sign_eip1559(RELAYER, TxFields(
        chain_id=OG_CHAIN_ID, nonce=nonce, max_priority_fee_per_gas=50 * 10**9,
        max_fee_per_gas=100 * 10**9, gas_limit=21_000, to=RELAYER.address, value=0, data=b""))
    await rig.og.anvil.rpc("eth_sendRawTransaction", ["0x" + other.raw.hex()])
    await rig.og.anvil.rpc("evm_mine", [])
    assert await rig.og.anvil.rpc("eth_getTransactionReceipt",
                                  ["0x" + ours.tx_hash.hex()]) is None
    await rig.og.anvil.rpc("evm_setAutomine", [True])

    await relay.step()  # re-send: nonce too low, ours unknown -> signed again and sent
    resigned = await rig.row(ours.id)
    assert resigned["attempts"] == 2 and bytes(resigned["tx_hash"]) != ours.tx_hash
    assert resigned["signer_nonce"] == nonce + 1
    await relay.step()  # its receipt
    row = await rig.row(ours.id)
    assert row["state"] == "included" and row["attempts"] == 2


async def test_a_transaction_never_mined_is_given_up_after_bounded_resends(rig):
    relay = rig.relay(resend_after_s=0, max_resends=3)
    failed_before = rig.failed_count()
    await rig.attestation(3)
    await relay.step()  # publish
    await rig.og.anvil.rpc("evm_setAutomine", [False])
    await relay.step()  # sent, never mined
    stuck = await rig.submission()
    for _ in range(3):
        await relay.step()  # re-sent ("already imported"), counted
    assert (await rig.row(stuck.id))["resends"] == 3
    await relay.step()  # bound reached
    row = await rig.row(stuck.id)
    assert row["state"] == "failed" and "3 re-sends" in row["error"]
    assert rig.failed_count() == failed_before + 1

    # The relay is not blocked: the next batch gets its own submission and moves on.
    await rig.attestation(4)
    await relay.step()
    following = await rig.submission()
    assert following.id != stuck.id and following.state == "published"


async def test_the_database_refuses_illegal_relay_transitions(rig):
    async with rig.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO og_relay_submissions (kind, state, blob_id, raw_tx, "
                               "tx_hash) VALUES ('batch', 'broadcast', 'b', '\\x01', '\\x02')")
        submission_id = await conn.fetchval(
            "INSERT INTO og_relay_submissions (kind, state) VALUES ('batch', 'pending') "
            "RETURNING id")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE og_relay_submissions SET state = 'included', "
                               "blob_id = 'b', raw_tx = '\\x01', tx_hash = '\\x02' WHERE id = $1",
                               submission_id)
        assert await rig.store.published(submission_id, None, b"{}", "blob", b"\x01")
        assert not await rig.store.published(submission_id, None, b"{}", "blob", b"\x01")
        assert not await rig.store.broadcast(submission_id, b"\x02" * 32)  # not signed yet
        assert await rig.store.signed(submission_id, 7, b"raw", b"\x03" * 32)
        assert not await rig.store.signed(submission_id, 8, b"raw2", b"\x04" * 32)  # no guard
        assert not await rig.store.signed(submission_id, 8, b"raw2", b"\x04" * 32,
                                          replacing=b"\x09" * 32)  # not the stored one
        assert await rig.store.broadcast(submission_id, b"\x03" * 32)
        assert await rig.store.finished(submission_id, b"\x03" * 32, included=True,
                                        block_number=5)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE og_relay_submissions SET state = 'signed' WHERE id = $1",
                               submission_id)
        assert not await rig.store.failed(submission_id, "broadcast", "late")
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            attestation_id = await rig.attestation(9)
            await conn.execute("UPDATE attestations SET relay_batch_id = 987654 WHERE id = $1",
                               attestation_id)

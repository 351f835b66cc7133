"""PostgreSQL side of the OpenGradient chain watcher: registry facts (TEE keys and their
enable/disable history), the relay's batch and individual settlement events, and the checked
contents of batch dumps.

Guarantees: everything is keyed by (chain, block hash, log index) or its batch, so processing
a block twice changes nothing, and `undo` removes exactly what blocks above the ancestor
produced (leaves go with their batch); all SQL is parameterised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from facilitator.core.crosscheck import from_unix
from facilitator.core.og_events import BatchEvent, IndividualEvent, LogPlace, TeeInfo


@dataclass(frozen=True, slots=True)
class TeeEvent:
    tee_id: bytes
    kind: str  # registered | enabled | disabled
    place: LogPlace
    block_time: int
    info: TeeInfo | None = None  # for registered


@dataclass(frozen=True, slots=True)
class PendingBatch:
    id: int
    merkle_root: bytes
    batch_size: int
    blob_id: str


@dataclass(frozen=True, slots=True)
class Leaf:
    index: int
    tee_id: bytes
    input_hash: bytes
    output_hash: bytes
    tee_signature: bytes
    tee_timestamp: int
    proof_json: str  # JSON array of the 0x-hex sibling hashes, leaf to root


# How far the OpenGradient chain's records reach: the timestamp of the newest block the watcher
# processed ($1: the chain id). The one statement for it (attestation verification embeds it).
OG_SYNCED_TO = """
    SELECT b.timestamp FROM chain_cursors c JOIN chain_blocks b
      ON b.chain_id = c.chain_id AND b.number = c.head_number WHERE c.chain_id = $1"""


_INSERT_LEAVES = """
    INSERT INTO og_batch_leaves (batch_id, leaf_index, tee_id, input_hash, output_hash,
        tee_signature, tee_timestamp, proof)
    SELECT $1, u.leaf_index, u.tee_id, u.input_hash, u.output_hash, u.tee_signature,
           u.tee_timestamp, u.proof::jsonb
    FROM unnest($2::integer[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bytea[],
                $7::numeric[], $8::text[])
         AS u(leaf_index, tee_id, input_hash, output_hash, tee_signature, tee_timestamp, proof)"""


def optional_bytes(value: Any) -> bytes | None:
    """A nullable bytea column as bytes."""
    return None if value is None else bytes(value)


class OgChainState:
    def __init__(self, pool: asyncpg.Pool, chain_id: int) -> None:
        self.pool = pool
        self.chain_id = chain_id

    async def derive(self, conn: asyncpg.Connection, tees: Sequence[TeeEvent],
                     batches: Sequence[tuple[BatchEvent, int]],
                     individuals: Sequence[tuple[IndividualEvent, int]]) -> None:
        """Store a range's facts (inside the watcher's range transaction)."""
        for event in tees:
            await self._tee_event(conn, event)
        for batch, block_time in batches:
            p = batch.place
            await conn.execute("""
                INSERT INTO og_batches (chain_id, tx_hash, block_number, block_hash, block_time,
                    log_index, merkle_root, batch_size, blob_id)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                ON CONFLICT (chain_id, block_hash, log_index) DO NOTHING""",
                self.chain_id, p.tx_hash, p.block_number, p.block_hash, from_unix(block_time),
                p.log_index, batch.merkle_root, batch.batch_size, batch.blob_id)
        for item, block_time in individuals:
            p = item.place
            await conn.execute("""
                INSERT INTO og_individual_settlements (chain_id, tx_hash, block_number,
                    block_hash, block_time, log_index, tee_id, eth_address, input_hash,
                    output_hash, tee_timestamp, blob_id, tee_signature)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                ON CONFLICT (chain_id, block_hash, log_index) DO NOTHING""",
                self.chain_id, p.tx_hash, p.block_number, p.block_hash, from_unix(block_time),
                p.log_index, item.tee_id, item.eth_address, item.input_hash, item.output_hash,
                item.timestamp, item.blob_id, item.signature)

    async def _tee_event(self, conn: asyncpg.Connection, event: TeeEvent) -> None:
        p = event.place
        if event.info is not None:
            i = event.info
            await conn.execute("""
                INSERT INTO tee_keys (chain_id, tee_id, public_key, owner, payment_address,
                    endpoint, registered_block)
                VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (chain_id, tee_id) DO NOTHING""",
                self.chain_id, event.tee_id, i.public_key, i.owner, i.payment_address,
                i.endpoint[:1000], p.block_number)
        await conn.execute("""
            INSERT INTO tee_events (chain_id, tee_id, kind, block_number, block_hash, block_time,
                tx_hash, log_index)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (chain_id, block_hash, log_index) DO NOTHING""",
            self.chain_id, event.tee_id, event.kind, p.block_number, p.block_hash,
            from_unix(event.block_time), p.tx_hash, p.log_index)

    async def undo(self, conn: asyncpg.Connection, ancestor: int) -> None:
        await conn.execute("DELETE FROM tee_events WHERE chain_id = $1 AND block_number > $2",
                           self.chain_id, ancestor)
        await conn.execute("DELETE FROM og_batches WHERE chain_id = $1 AND block_number > $2",
                           self.chain_id, ancestor)
        await conn.execute(
            "DELETE FROM og_individual_settlements WHERE chain_id = $1 AND block_number > $2",
            self.chain_id, ancestor)
        await conn.execute(
            "DELETE FROM tee_keys WHERE chain_id = $1 AND registered_block > $2",
            self.chain_id, ancestor)

    async def pending_batches(self, limit: int) -> list[PendingBatch]:
        rows = await self.pool.fetch("""
            SELECT id, merkle_root, batch_size, blob_id FROM og_batches
            WHERE chain_id = $1 AND dump_status = 'pending' ORDER BY id LIMIT $2""",
            self.chain_id, limit)
        return [PendingBatch(r["id"], bytes(r["merkle_root"]), int(r["batch_size"]), r["blob_id"])
                for r in rows]

    async def record_dump(self, batch_id: int, status: str, leaves: Sequence[Leaf], *,
                          dump_root: bytes | None = None, leaf_count: int | None = None,
                          error: str | None = None) -> None:
        """The check's verdict, what the dump itself said (root, size) and, when valid, its
        leaves with their proofs."""
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.execute("""
                UPDATE og_batches SET dump_status = $2, dump_checked_at = clock_timestamp(),
                    dump_root = $3, dump_leaf_count = $4, dump_error = $5
                WHERE id = $1 AND dump_status = 'pending'""", batch_id, status, dump_root,
                leaf_count, error)
            if not done.endswith(" 1"):
                return  # checked concurrently, or reorged away
            if leaves:  # one statement, whatever the number of leaves
                await conn.execute(_INSERT_LEAVES, batch_id, [leaf.index for leaf in leaves],
                                   [leaf.tee_id for leaf in leaves],
                                   [leaf.input_hash for leaf in leaves],
                                   [leaf.output_hash for leaf in leaves],
                                   [leaf.tee_signature for leaf in leaves],
                                   [leaf.tee_timestamp for leaf in leaves],
                                   [leaf.proof_json for leaf in leaves])

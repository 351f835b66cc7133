"""PostgreSQL side of the chain watcher: processed blocks, the checkpoint, observed transfers, and
the settlement transitions the watcher makes (inclusion seen in logs, confirmation, reorg).

Guarantees:
- `commit_blocks` stores a range of blocks, everything derived from their logs, and the new
  checkpoint in ONE transaction: after a crash either all of a range was processed or none, so
  a restarted watcher resumes exactly after its checkpoint (no block missed, none twice).
- `revert_to` deletes every block above the common ancestor and everything derived from them,
  and moves the affected settlements back to `broadcast`, in ONE transaction.
- Every statement is parameterised; settlement updates are guarded by the expected state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from facilitator.invariant import invariant

T = TypeVar("T")



def _b(hex_value: str) -> bytes:
    return bytes.fromhex(hex_value[2:])


@dataclass(frozen=True, slots=True)
class Block:
    number: int
    hash: bytes
    parent_hash: bytes
    timestamp: int


@dataclass(frozen=True, slots=True)
class Cursor:
    number: int
    hash: bytes
    halted_reason: str | None
    accept_deep_reorg: bool = False


@dataclass(frozen=True, slots=True)
class TransferLog:
    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int
    asset: str
    sender: str
    recipient: str
    amount: int


@dataclass(frozen=True, slots=True)
class AuthorizationUse:
    """An EIP-3009 AuthorizationUsed(payer, nonce) log of an asset."""

    block_number: int
    block_hash: bytes
    tx_hash: bytes
    asset: str
    payer: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Confirmed:
    settlement_id: int
    settled_by: str
    created_at: datetime
    included_at: datetime
    confirmed_at: datetime


@dataclass(frozen=True, slots=True)
class RangeResult:
    included: list[int]  # settlements whose inclusion the logs showed
    external: list[int]  # ... of which by someone else's transaction (front-running)
    unmatched_transfers: int


class ChainState:
    def __init__(self, pool: asyncpg.Pool, chain_id: int, network: str) -> None:
        self.pool = pool
        self.chain_id = chain_id
        self.network = network

    async def cursor(self) -> Cursor | None:
        rec = await self.pool.fetchrow("""
            SELECT head_number, head_hash, halted_reason, accept_deep_reorg FROM chain_cursors
            WHERE chain_id = $1""", self.chain_id)
        return None if rec is None else Cursor(rec["head_number"], bytes(rec["head_hash"]),
                                               rec["halted_reason"], rec["accept_deep_reorg"])

    async def stored_hash(self, number: int) -> bytes | None:
        value = await self.pool.fetchval(
            "SELECT hash FROM chain_blocks WHERE chain_id = $1 AND number = $2",
            self.chain_id, number)
        return None if value is None else bytes(value)

    async def record_chain_head(self, head: int) -> None:
        await self.pool.execute(
            "UPDATE chain_cursors SET chain_head = $2 WHERE chain_id = $1", self.chain_id, head)

    async def halt(self, reason: str) -> None:
        await self.pool.execute("""
            UPDATE chain_cursors SET halted_reason = $2, halted_at = clock_timestamp(),
                updated_at = clock_timestamp() WHERE chain_id = $1""", self.chain_id, reason[:500])

    async def resume_accepting_reorg(self) -> bool:
        """Operator action after a deep reorg: the next reorg handling may undo confirmed
        settlements, and confirmations continue afterwards."""
        result = await self.pool.execute("""
            UPDATE chain_cursors SET halted_reason = NULL, halted_at = NULL,
                accept_deep_reorg = true, updated_at = clock_timestamp()
            WHERE chain_id = $1 AND halted_reason IS NOT NULL""", self.chain_id)
        return result.endswith(" 1")

    async def commit_blocks(self, blocks: Sequence[Block],
                            derive: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Store a range of blocks, what `derive` makes of their logs, and the new checkpoint,
        in one transaction."""
        invariant(bool(blocks), "a range has at least one block")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany("""
                INSERT INTO chain_blocks (chain_id, number, hash, parent_hash, timestamp)
                VALUES ($1, $2, $3, $4, $5)""",
                [(self.chain_id, b.number, b.hash, b.parent_hash,
                  datetime.fromtimestamp(b.timestamp, UTC)) for b in blocks])
            derived = await derive(conn)
            last = blocks[-1]
            await conn.execute("""
                INSERT INTO chain_cursors (chain_id, network, head_number, head_hash)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (chain_id) DO UPDATE SET head_number = $3, head_hash = $4,
                    updated_at = clock_timestamp()""", self.chain_id, self.network, last.number,
                last.hash)
        return derived

    async def revert_to(self, ancestor: int,
                        undo: Callable[[asyncpg.Connection, int], Awaitable[list[int]]]
                        ) -> list[int]:
        """Undo everything above block `ancestor` in one transaction: `undo` removes what was
        derived from those blocks (and returns the ids it moved); the blocks and checkpoint
        follow."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await undo(conn, ancestor)
            await conn.execute(
                "DELETE FROM chain_blocks WHERE chain_id = $1 AND number > $2", self.chain_id,
                ancestor)
            ancestor_hash = await conn.fetchval(
                "SELECT hash FROM chain_blocks WHERE chain_id = $1 AND number = $2",
                self.chain_id, ancestor)
            await conn.execute("""
                UPDATE chain_cursors SET head_number = $2, head_hash = $3,
                    accept_deep_reorg = false, updated_at = clock_timestamp()
                WHERE chain_id = $1""", self.chain_id, ancestor, ancestor_hash)
        return moved

    async def prune(self, keep_from: int) -> None:
        await self.pool.execute(
            "DELETE FROM chain_blocks WHERE chain_id = $1 AND number < $2", self.chain_id,
            keep_from)


class PaymentChainState(ChainState):
    """The payment chain's derived facts: settlement inclusions seen in logs, confirmations,
    watched transfers."""

    async def watched_payees(self, candidates: Sequence[str], configured: frozenset[str]
                             ) -> set[str]:
        """Which of these recipients we watch: configured payees and every settlement's payTo."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT pay_to FROM settlements WHERE chain_id = $1 AND pay_to = ANY($2)",
            self.chain_id, [_b(c) for c in candidates])
        return {"0x" + bytes(r["pay_to"]).hex() for r in rows} | (set(candidates) & configured)

    async def confirm(self, depth: int) -> list[Confirmed]:
        """included -> confirmed for settlements buried `depth` blocks deep in OUR canonical
        chain (their block hash must equal the processed block's hash at that height)."""
        rows = await self.pool.fetch("""
            UPDATE settlements s SET state = 'confirmed', confirmed_at = clock_timestamp()
            FROM chain_cursors c, chain_blocks b
            WHERE s.chain_id = $1 AND s.state = 'included' AND c.chain_id = $1
              AND c.halted_reason IS NULL AND s.block_number <= c.head_number - $2 + 1
              AND b.chain_id = $1 AND b.number = s.block_number AND b.hash = s.block_hash
            RETURNING s.id, s.settled_by, s.created_at, s.included_at, s.confirmed_at""",
            self.chain_id, depth)
        return [Confirmed(r["id"], r["settled_by"], r["created_at"], r["included_at"],
                          r["confirmed_at"]) for r in rows]

    async def unwind_orphaned_inclusions(self) -> list[int]:
        """included -> broadcast for settlements whose recorded block is not the processed
        block at that height (their inclusion was reorged out before the watcher saw it)."""
        rows = await self.pool.fetch("""
            UPDATE settlements s SET state = 'broadcast', block_number = NULL, block_hash = NULL,
                log_index = NULL, included_at = NULL, settled_by = NULL
            FROM chain_blocks b
            WHERE s.chain_id = $1 AND s.state = 'included' AND s.raw_tx IS NOT NULL
              AND b.chain_id = $1 AND b.number = s.block_number AND b.hash <> s.block_hash
            RETURNING s.id""", self.chain_id)
        return [r["id"] for r in rows]

    async def confirmed_above(self, ancestor: int) -> int:
        return int(await self.pool.fetchval("""
            SELECT count(*) FROM settlements WHERE chain_id = $1 AND state = 'confirmed'
              AND block_number > $2""", self.chain_id, ancestor))

    async def unfinished_by_age(self) -> list[tuple[str, float]]:
        rows = await self.pool.fetch("""
            SELECT state, extract(epoch FROM clock_timestamp() - created_at) AS age
            FROM settlements WHERE chain_id = $1
              AND state IN ('pending', 'signed', 'broadcast', 'included')""", self.chain_id)
        return [(r["state"], float(r["age"])) for r in rows]

    async def revert_settlements(self, conn: asyncpg.Connection, ancestor: int,
                                 allow_confirmed: bool) -> list[int]:
        """Settlements included above `ancestor` go back to `broadcast` (confirmed ones only
        when an operator accepted a deep reorg); their observed transfers are forgotten."""
        states = ["included", "confirmed"] if allow_confirmed else ["included"]
        moved = await conn.fetch("""
            UPDATE settlements SET state = 'broadcast', block_number = NULL,
                block_hash = NULL, log_index = NULL, included_at = NULL, confirmed_at = NULL,
                broadcast_at = COALESCE(broadcast_at, clock_timestamp()), settled_by = NULL
            WHERE chain_id = $1 AND state = ANY($2::text[]) AND block_number > $3
              AND raw_tx IS NOT NULL
            RETURNING id""", self.chain_id, states, ancestor)
        await conn.execute(
            "DELETE FROM chain_transfers WHERE chain_id = $1 AND block_number > $2",
            self.chain_id, ancestor)
        return [r["id"] for r in moved]

    async def derive_payments(self, conn: asyncpg.Connection, transfers: Sequence[TransferLog],
                              uses: Sequence[AuthorizationUse]) -> RangeResult:
        included, external = await _record_inclusions(conn, self.chain_id, transfers, uses)
        unmatched = await _record_transfers(conn, self.chain_id, transfers)
        return RangeResult(included, external, unmatched)


async def _record_inclusions(conn: asyncpg.Connection, chain_id: int,
                             transfers: Sequence[TransferLog], uses: Sequence[AuthorizationUse]
                             ) -> tuple[list[int], list[int]]:
    """A settlement is included when an AuthorizationUsed(payer, nonce) of its asset appears in a
    transaction that also carries its Transfer(payer, payTo, amount): by our transaction, or by
    someone else's (front-running, settled_by = external)."""
    included: list[int] = []
    external: list[int] = []
    for use in uses:
        row = await conn.fetchrow("""
            SELECT id, tx_hash, pay_to, amount FROM settlements
            WHERE chain_id = $1 AND asset = $2 AND payer = $3 AND nonce = $4
              AND state IN ('pending', 'signed', 'broadcast')""",
            chain_id, _b(use.asset), _b(use.payer), use.nonce)
        if row is None:
            continue
        transfer = _matching_transfer(transfers, use, "0x" + bytes(row["pay_to"]).hex(),
                                      int(row["amount"]))
        if transfer is None:
            continue  # consumed without paying what was promised (e.g. cancelled): not ours
        by = "facilitator" if row["tx_hash"] is not None and bytes(row["tx_hash"]) == use.tx_hash \
            else "external"
        moved = await conn.fetchval("""
            UPDATE settlements SET state = 'included', tx_hash = $2, block_number = $3,
                block_hash = $4, log_index = $5, settled_by = $6, included_at = clock_timestamp()
            WHERE id = $1 AND state IN ('pending', 'signed', 'broadcast') RETURNING id""",
            row["id"], use.tx_hash, use.block_number, use.block_hash, transfer.log_index, by)
        if moved is not None:
            included.append(moved)
            if by == "external":
                external.append(moved)
    return included, external


def _matching_transfer(transfers: Sequence[TransferLog], use: AuthorizationUse, pay_to: str,
                       amount: int) -> TransferLog | None:
    return next((t for t in transfers if t.tx_hash == use.tx_hash and t.asset == use.asset
                 and t.sender == use.payer and t.recipient == pay_to and t.amount == amount), None)


async def _record_transfers(conn: asyncpg.Connection, chain_id: int,
                            transfers: Sequence[TransferLog]) -> int:
    """Store each watched transfer, linked to the settlement it pays when there is one."""
    unmatched = 0
    for t in transfers:
        settlement_id = await conn.fetchval("""
            SELECT id FROM settlements WHERE chain_id = $1 AND tx_hash = $2 AND asset = $3
              AND payer = $4 AND pay_to = $5 AND amount = $6
              AND state IN ('included', 'confirmed') LIMIT 1""",
            chain_id, t.tx_hash, _b(t.asset), _b(t.sender), _b(t.recipient), t.amount)
        inserted = await conn.fetchval("""
            INSERT INTO chain_transfers (chain_id, block_number, block_hash, tx_hash, log_index,
                asset, from_address, to_address, amount, settlement_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (chain_id, block_hash, log_index) DO NOTHING RETURNING 1""",
            chain_id, t.block_number, t.block_hash, t.tx_hash, t.log_index, _b(t.asset),
            _b(t.sender), _b(t.recipient), t.amount, settlement_id)
        if inserted is not None and settlement_id is None:
            unmatched += 1
    return unmatched

"""PostgreSQL side of the chain watcher: processed blocks, the checkpoint, observed transfers, and
the settlement transitions the watcher makes (inclusion seen in logs, confirmation, reorg).

Guarantees:
- `commit_blocks` stores a range of blocks, everything derived from their logs, and the new
  checkpoint in ONE transaction: after a crash either all of a range was processed or none, so
  a restarted watcher resumes exactly after its checkpoint (no block missed, none twice).
- `revert_to` deletes every block above the common ancestor and everything derived from them,
  and anchors the checkpoint on the ancestor block (never a NULL hash), in ONE transaction.
- A reorged inclusion goes back to `broadcast` with OUR transaction (its hash restored) when we
  signed one, else to `pending`: it is settled again, never left `included` in an orphaned block.
- Every statement is parameterised; settlement updates are guarded by the expected state; a
  range's inclusions and transfers are one statement each, not one per log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from facilitator.adapters.store import (
    SETTLEMENT_COLUMNS_S,
    Inclusion,
    SettlementRow,
    mark_included_on,
)
from facilitator.core.settlement import SettledBy
from facilitator.invariant import invariant
from facilitator.protocol.fields import address_bytes, prefixed_hex

T = TypeVar("T")
M = TypeVar("M")

_STORED_HASH = "SELECT hash FROM chain_blocks WHERE chain_id = $1 AND number = $2"
# One statement per watcher step: record the node's head, read the checkpoint.
_CURSOR = """
    UPDATE chain_cursors SET chain_head = $2 WHERE chain_id = $1
    RETURNING head_number, head_hash, halted_reason, accept_deep_reorg"""
_INSERT_BLOCK = """
    INSERT INTO chain_blocks (chain_id, number, hash, parent_hash, timestamp)
    VALUES ($1, $2, $3, $4, $5)"""
# The ancestor of a revert is the node's block at that height: equal to the stored one when we
# kept it, else (pruned, or below the first processed block) stored now as the new anchor.
_ANCHOR_BLOCK = _INSERT_BLOCK + """
    ON CONFLICT (chain_id, number) DO UPDATE SET hash = EXCLUDED.hash,
        parent_hash = EXCLUDED.parent_hash, timestamp = EXCLUDED.timestamp"""

# A reorged inclusion: back to `broadcast` with our own transaction when we signed one (the
# tracker re-sends its stored bytes), else to `pending` (someone else's transaction had settled
# it: it is signed and sent again). Settled-by, block and inclusion facts are forgotten.
_UNDO_INCLUSION = """
    state = CASE WHEN s.signed_tx_hash IS NULL THEN 'pending' ELSE 'broadcast' END,
    tx_hash = s.signed_tx_hash,
    raw_tx = CASE WHEN s.signed_tx_hash IS NULL THEN NULL ELSE s.raw_tx END,
    signer_nonce = CASE WHEN s.signed_tx_hash IS NULL THEN NULL ELSE s.signer_nonce END,
    signed_at = CASE WHEN s.signed_tx_hash IS NULL THEN NULL ELSE s.signed_at END,
    broadcast_at = CASE WHEN s.signed_tx_hash IS NULL THEN NULL
                        ELSE COALESCE(s.broadcast_at, clock_timestamp()) END,
    block_number = NULL, block_hash = NULL, log_index = NULL, included_at = NULL,
    confirmed_at = NULL, settled_by = NULL"""
_UNWIND_ORPHANED = """
    UPDATE settlements s SET """ + _UNDO_INCLUSION + """
    FROM chain_blocks b
    WHERE s.chain_id = $1 AND s.state = 'included'
      AND b.chain_id = $1 AND b.number = s.block_number AND b.hash <> s.block_hash
    RETURNING """ + SETTLEMENT_COLUMNS_S
_REVERT_SETTLEMENTS = """
    UPDATE settlements s SET """ + _UNDO_INCLUSION + """
    WHERE s.chain_id = $1 AND s.state = ANY($2::text[]) AND s.block_number > $3
    RETURNING """ + SETTLEMENT_COLUMNS_S
_WATCHED_PAYEES = """
    SELECT p FROM unnest($2::bytea[]) AS p
    WHERE EXISTS (SELECT 1 FROM settlements s WHERE s.pay_to = p AND s.chain_id = $1)"""
# Unfinished settlements counted per state and age bucket (`width_bucket` over the bounds `$2`).
_UNFINISHED_BY_AGE = """
    SELECT state, width_bucket(extract(epoch FROM clock_timestamp() - created_at)::float8,
                               $2::float8[]) AS bucket, count(*) AS n
    FROM settlements
    WHERE chain_id = $1 AND state IN ('pending', 'signed', 'broadcast', 'included')
    GROUP BY 1, 2"""
# Settlements a range's logs may include, and the transaction to look in for their Transfer:
# - an EIP-3009 authorization of theirs was used (AuthorizationUsed) in that transaction: ours
#   or someone else's (front-running);
# - our own signed transaction is in the range (every method: Permit2 has no such event).
_INCLUSION_CANDIDATES = """
    SELECT s.id, s.signed_tx_hash, s.asset, s.payer, s.pay_to, s.amount, u.tx_hash AS in_tx
    FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[])
             AS u(asset, payer, nonce, tx_hash)
    JOIN settlements s ON s.chain_id = $1 AND s.transfer_method = 'eip3009'
         AND s.asset = u.asset AND s.payer = u.payer AND s.nonce = u.nonce
    WHERE s.state IN ('pending', 'signed', 'broadcast')
    UNION ALL
    SELECT s.id, s.signed_tx_hash, s.asset, s.payer, s.pay_to, s.amount, s.tx_hash
    FROM settlements s
    WHERE s.chain_id = $1 AND s.tx_hash = ANY($6::bytea[])
      AND s.state IN ('signed', 'broadcast')"""
_LINK_LATE_INCLUSIONS = """
    UPDATE chain_transfers t SET settlement_id = s.id
    FROM settlements s
    WHERE t.chain_id = $1 AND t.settlement_id IS NULL
      AND t.observed_at > clock_timestamp() - make_interval(secs => $2)
      AND s.tx_hash = t.tx_hash AND s.chain_id = t.chain_id AND s.block_hash = t.block_hash
      AND s.log_index = t.log_index AND s.state IN ('included', 'confirmed')"""
_RECORD_TRANSFERS = """
    INSERT INTO chain_transfers (chain_id, block_number, block_hash, tx_hash, log_index, asset,
        from_address, to_address, amount, settlement_id)
    SELECT $1, u.block_number, u.block_hash, u.tx_hash, u.log_index, u.asset, u.sender,
        u.recipient, u.amount,
        (SELECT s.id FROM settlements s WHERE s.chain_id = $1 AND s.tx_hash = u.tx_hash
           AND s.asset = u.asset AND s.payer = u.sender AND s.pay_to = u.recipient
           AND s.amount = u.amount AND s.state IN ('included', 'confirmed') LIMIT 1)
    FROM unnest($2::bigint[], $3::bytea[], $4::bytea[], $5::int[], $6::bytea[], $7::bytea[],
                $8::bytea[], $9::numeric[])
             AS u(block_number, block_hash, tx_hash, log_index, asset, sender, recipient, amount)
    ON CONFLICT (chain_id, block_hash, log_index) DO NOTHING
    RETURNING settlement_id IS NULL AS unmatched"""


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

    async def cursor(self, chain_head: int) -> Cursor | None:
        """Record the node's head and read the checkpoint (None before the first block)."""
        rec = await self.pool.fetchrow(_CURSOR, self.chain_id, chain_head)
        return None if rec is None else Cursor(rec["head_number"], bytes(rec["head_hash"]),
                                               rec["halted_reason"], rec["accept_deep_reorg"])

    async def stored_hash(self, number: int) -> bytes | None:
        value = await self.pool.fetchval(_STORED_HASH, self.chain_id, number)
        return None if value is None else bytes(value)

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
            await conn.executemany(_INSERT_BLOCK, [_block_values(self.chain_id, b)
                                                   for b in blocks])
            derived = await derive(conn)
            last = blocks[-1]
            await conn.execute("""
                INSERT INTO chain_cursors (chain_id, network, head_number, head_hash)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (chain_id) DO UPDATE SET head_number = $3, head_hash = $4,
                    updated_at = clock_timestamp()""", self.chain_id, self.network, last.number,
                last.hash)
        return derived

    async def revert_to(self, ancestor: Block,
                        undo: Callable[[asyncpg.Connection, int], Awaitable[list[M]]]
                        ) -> list[M]:
        """Undo everything above block `ancestor` (the node's block at the common height) in one
        transaction: `undo` removes what was derived from those blocks (and returns what it
        moved); the blocks follow, and the checkpoint is anchored on `ancestor`, stored too
        when we no longer kept it (pruned, or older than the first processed block)."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await undo(conn, ancestor.number)
            await conn.execute(
                "DELETE FROM chain_blocks WHERE chain_id = $1 AND number > $2", self.chain_id,
                ancestor.number)
            await conn.execute(_ANCHOR_BLOCK, *_block_values(self.chain_id, ancestor))
            await conn.execute("""
                UPDATE chain_cursors SET head_number = $2, head_hash = $3,
                    accept_deep_reorg = false, updated_at = clock_timestamp()
                WHERE chain_id = $1""", self.chain_id, ancestor.number, ancestor.hash)
        return moved

    async def prune(self, keep_from: int) -> None:
        await self.pool.execute(
            "DELETE FROM chain_blocks WHERE chain_id = $1 AND number < $2", self.chain_id,
            keep_from)


def _block_values(chain_id: int, b: Block) -> tuple[object, ...]:
    return (chain_id, b.number, b.hash, b.parent_hash, datetime.fromtimestamp(b.timestamp, UTC))


class PaymentChainState(ChainState):
    """The payment chain's derived facts: settlement inclusions seen in logs, confirmations,
    watched transfers."""

    async def link_late_inclusions(self, within_s: float) -> int:
        """Link recent unmatched transfers to the settlement they turned out to pay (an
        inclusion recorded after the transfer was stored, e.g. a front-run the tracker found
        while the watcher's transaction was storing it). Returns how many were linked."""
        done = await self.pool.execute(_LINK_LATE_INCLUSIONS, self.chain_id, within_s)
        return int(done.split()[-1])

    async def watched_payees(self, candidates: Sequence[str], configured: frozenset[str]
                             ) -> set[str]:
        """Which of these recipients we watch: configured payees and every settlement's payTo
        (one index probe per candidate, not a read of every settlement a payee had)."""
        found: set[str] = set()
        if candidates:
            rows = await self.pool.fetch(_WATCHED_PAYEES, self.chain_id,
                                         [address_bytes(c) for c in candidates])
            found = {prefixed_hex(r["p"]) or "" for r in rows}
        return found | (set(candidates) & configured)

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

    async def unwind_orphaned_inclusions(self) -> list[SettlementRow]:
        """Settlements whose recorded block is not the processed block at that height (their
        inclusion was reorged out before the watcher saw it) go back to `broadcast`, or to
        `pending` when the including transaction was not ours."""
        rows = await self.pool.fetch(_UNWIND_ORPHANED, self.chain_id)
        return [SettlementRow.from_record(r) for r in rows]

    async def confirmed_above(self, ancestor: int) -> int:
        return int(await self.pool.fetchval("""
            SELECT count(*) FROM settlements WHERE chain_id = $1 AND state = 'confirmed'
              AND block_number > $2""", self.chain_id, ancestor))

    async def unfinished_by_age(self, bounds_s: Sequence[float]) -> list[tuple[str, int, int]]:
        """(state, age bucket, count) of unfinished settlements, counted in SQL: bucket i is
        `bounds_s[i-1] <= age < bounds_s[i]` (0: below the first bound)."""
        rows = await self.pool.fetch(_UNFINISHED_BY_AGE, self.chain_id, list(bounds_s))
        return [(r["state"], r["bucket"], r["n"]) for r in rows]

    async def revert_settlements(self, conn: asyncpg.Connection, ancestor: int,
                                 allow_confirmed: bool) -> list[SettlementRow]:
        """Settlements included above `ancestor` go back to `broadcast` or `pending` (confirmed
        ones only when an operator accepted a deep reorg); their observed transfers are
        forgotten. Returns the moved rows as they are now."""
        states = ["included", "confirmed"] if allow_confirmed else ["included"]
        moved = await conn.fetch(_REVERT_SETTLEMENTS, self.chain_id, states, ancestor)
        await conn.execute(
            "DELETE FROM chain_transfers WHERE chain_id = $1 AND block_number > $2",
            self.chain_id, ancestor)
        return [SettlementRow.from_record(r) for r in moved]

    async def derive_payments(self, conn: asyncpg.Connection, transfers: Sequence[TransferLog],
                              uses: Sequence[AuthorizationUse]) -> RangeResult:
        included, external = await _record_inclusions(conn, self.chain_id, transfers, uses)
        unmatched = await _record_transfers(conn, self.chain_id, transfers)
        return RangeResult(included, external, unmatched)


async def _record_inclusions(conn: asyncpg.Connection, chain_id: int,
                             transfers: Sequence[TransferLog], uses: Sequence[AuthorizationUse]
                             ) -> tuple[list[int], list[int]]:
    """A settlement is included when a transaction of the range carries its Transfer(payer,
    payTo, amount) and either used its EIP-3009 authorization (by us, or by someone else:
    front-running, settled_by = external) or is our own signed transaction (any method).
    One read for the candidates, one update for the inclusions."""
    if not uses and not transfers:
        return [], []
    candidates = await conn.fetch(
        _INCLUSION_CANDIDATES, chain_id, [address_bytes(u.asset) for u in uses],
        [address_bytes(u.payer) for u in uses], [u.nonce for u in uses],
        [u.tx_hash for u in uses], list({t.tx_hash for t in transfers}))
    found: dict[int, Inclusion] = {}
    for row in candidates:
        if row["id"] in found:
            continue
        in_tx = bytes(row["in_tx"])
        transfer = _matching_transfer(transfers, in_tx, prefixed_hex(row["asset"]),
                                      prefixed_hex(row["payer"]), prefixed_hex(row["pay_to"]),
                                      int(row["amount"]))
        if transfer is None:
            continue  # consumed without paying what was promised (e.g. cancelled): not ours
        ours = row["signed_tx_hash"] is not None and bytes(row["signed_tx_hash"]) == in_tx
        found[row["id"]] = Inclusion(
            settlement_id=row["id"], tx_hash=in_tx, block_number=transfer.block_number,
            block_hash=transfer.block_hash, log_index=transfer.log_index,
            settled_by=SettledBy.FACILITATOR if ours else SettledBy.EXTERNAL)
    moved = await mark_included_on(conn, list(found.values()))
    included = sorted(moved)
    external = [i for i in included if found[i].settled_by is SettledBy.EXTERNAL]
    return included, external


def _matching_transfer(transfers: Sequence[TransferLog], tx_hash: bytes, asset: str | None,
                       payer: str | None, pay_to: str | None, amount: int) -> TransferLog | None:
    return next((t for t in transfers if t.tx_hash == tx_hash and t.asset == asset
                 and t.sender == payer and t.recipient == pay_to and t.amount == amount), None)


async def _record_transfers(conn: asyncpg.Connection, chain_id: int,
                            transfers: Sequence[TransferLog]) -> int:
    """Store each watched transfer, linked to the settlement it pays when there is one; returns
    how many newly stored ones pay no settlement."""
    if not transfers:
        return 0
    rows = await conn.fetch(
        _RECORD_TRANSFERS, chain_id, [t.block_number for t in transfers],
        [t.block_hash for t in transfers], [t.tx_hash for t in transfers],
        [t.log_index for t in transfers], [address_bytes(t.asset) for t in transfers],
        [address_bytes(t.sender) for t in transfers],
        [address_bytes(t.recipient) for t in transfers], [t.amount for t in transfers])
    return sum(1 for r in rows if r["unmatched"])

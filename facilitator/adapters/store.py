"""PostgreSQL access (asyncpg) for settlement records, their timeline, and verification logs.

Guarantees:
- All SQL is parameterised (`$n`); no value is ever formatted into a statement.
- `claim` is the only way a settlement row comes to exist, and a unique index per transfer
  method (EIP-3009: chain_id, asset, payer, nonce; Permit2: chain_id, payer, nonce) makes it
  at-most-once across processes and restarts.
- `tx_hash` is the transaction that settled the row (in flight: the one we sent);
  `signed_tx_hash` is our own signed transaction's (kept by a database trigger: copied while
  signed/broadcast, cleared with `raw_tx`), so a reorg can restore it.
- Every state change goes through a guarded UPDATE (`WHERE state = <expected>`), so a stale
  writer changes nothing; the database trigger independently rejects illegal transitions.
- Migrations apply in order, each in its own transaction, under an advisory lock, so concurrent
  starters cannot apply one twice.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from facilitator.core.settlement import SettlementIntent, SettledBy, State
from facilitator.invariant import invariant
from facilitator.protocol.fields import address_bytes, prefixed_hex

MIGRATION_LOCK_KEY = 0x7834_3032  # "x402": serialises concurrent migrators
SETTLEMENT_COLUMNS = """id, public_id, scheme, x402_version, network, chain_id, asset, payer,
    pay_to, amount, nonce, valid_after, valid_before, signature, fingerprint, call_to, calldata,
    state, reason, message, settled_by, signer, signer_nonce, gas_limit, max_fee_per_gas, tx_hash,
    raw_tx, block_number, block_hash, log_index, attempts, created_at, signed_at, broadcast_at,
    included_at, confirmed_at, failed_at, updated_at, success_answers, success_answered_at,
    transfer_method, cap_amount, signed_tx_hash"""
# The same columns of `settlements s`, for statements that join another table.
SETTLEMENT_COLUMNS_S = ", ".join("s." + c.strip() for c in SETTLEMENT_COLUMNS.split(","))

# Statements are constant text: SETTLEMENT_COLUMNS is joined in here, once; values are `$n`.
_SELECT = "SELECT " + SETTLEMENT_COLUMNS + " FROM settlements "
_RETURNING = " RETURNING " + SETTLEMENT_COLUMNS
_INSERT = """
    INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer, pay_to,
        amount, nonce, valid_after, valid_before, signature, fingerprint, call_to,
        calldata, transfer_method, cap_amount, state)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            'pending')"""
# Each method's key is its own partial unique index, named as the conflict target, so a row of
# the other method never stops a claim (the payer chooses both nonces).
# EIP-3009 nonces are per token and payer; Permit2 nonces per owner, whatever the token.
_CLAIM_EIP3009 = _INSERT + """
    ON CONFLICT (chain_id, asset, payer, nonce) WHERE transfer_method = 'eip3009'
    DO NOTHING""" + _RETURNING
_CLAIM_PERMIT2 = _INSERT + """
    ON CONFLICT (chain_id, payer, nonce) WHERE transfer_method = 'permit2'
    DO NOTHING""" + _RETURNING
_CLAIMED_PERMIT2 = _SELECT + """
    WHERE chain_id = $1 AND payer = $2 AND nonce = $3 AND transfer_method = 'permit2'"""
_CLAIMED_EIP3009 = _SELECT + """
    WHERE chain_id = $1 AND asset = $2 AND payer = $3 AND nonce = $4
      AND transfer_method = 'eip3009'"""
_RECLAIM_FAILED = """
    UPDATE settlements SET state = 'pending', x402_version = $2, network = $3,
        pay_to = $4, amount = $5, valid_after = $6, valid_before = $7, signature = $8,
        fingerprint = $9, call_to = $10, calldata = $11, cap_amount = $12,
        reason = NULL, message = NULL,
        failed_at = NULL, tx_hash = NULL, raw_tx = NULL, signer = NULL,
        signer_nonce = NULL, gas_limit = NULL, max_fee_per_gas = NULL,
        signed_at = NULL, broadcast_at = NULL, attempts = attempts + 1
    WHERE id = $1 AND state = 'failed' AND scheme = $13 AND asset = $14""" + _RETURNING
# An inclusion (seen in a receipt or in the chain watcher's logs) of in-flight rows. `tx_hash`
# becomes the including transaction; `signed_tx_hash` keeps ours, if we signed one.
# The watcher may have stored the paying Transfer before the inclusion was known (a front-run
# found by the tracker, not by an event of the watched range): it is linked here, so an
# auditor never sees a settlement's own transfer as unmatched.
_MARK_INCLUDED = """
    WITH moved AS (
        UPDATE settlements s SET state = 'included', tx_hash = u.tx_hash,
            block_number = u.block_number, block_hash = u.block_hash,
            log_index = u.log_index, settled_by = u.settled_by, included_at = clock_timestamp()
        FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bytea[], $5::int[], $6::text[])
                 AS u(id, tx_hash, block_number, block_hash, log_index, settled_by)
        WHERE s.id = u.id AND s.state IN ('pending', 'signed', 'broadcast')
        RETURNING s.id, s.chain_id, s.block_hash, s.log_index),
    linked AS (
        UPDATE chain_transfers t SET settlement_id = m.id FROM moved m
        WHERE t.chain_id = m.chain_id AND t.block_hash = m.block_hash
          AND t.log_index = m.log_index AND t.settlement_id IS NULL)
    SELECT id FROM moved"""
_MARK_NEEDS_RESIGN = """
    UPDATE settlements SET state = 'pending', raw_tx = NULL, signer_nonce = NULL,
        signed_at = NULL, broadcast_at = NULL
    WHERE id = $1 AND state IN ('signed', 'broadcast')""" + _RETURNING
# In-flight rows of a chain that no task of this process holds (`$2`), unchanged for `$3`
# seconds, signed by us (`$4`) or by nobody yet; served by the settlements_unfinished index.
_UNHELD = _SELECT + """
    WHERE chain_id = $1 AND state IN ('pending', 'signed', 'broadcast')
      AND id <> ALL($2::bigint[])
      AND updated_at < clock_timestamp() - make_interval(secs => $3)
      AND (signer IS NULL OR $4::bytea IS NULL OR signer = $4)
    ORDER BY id LIMIT $5"""
_COUNT_SUCCESS_ANSWER = """
    UPDATE settlements SET success_answers = success_answers + 1,
        success_answered_at = COALESCE(success_answered_at, clock_timestamp())
    WHERE id = $1""" + _RETURNING


@dataclass(frozen=True, slots=True)
class SettlementRow:
    id: int
    public_id: str
    scheme: str
    x402_version: int
    network: str
    chain_id: int
    asset: str
    payer: str
    pay_to: str
    amount: int
    nonce: bytes
    valid_after: int
    valid_before: int
    signature: bytes
    fingerprint: bytes
    call_to: str
    calldata: bytes
    state: State
    reason: str | None
    message: str | None
    settled_by: str | None
    signer: str | None
    signer_nonce: int | None
    gas_limit: int | None
    max_fee_per_gas: int | None
    tx_hash: bytes | None
    raw_tx: bytes | None
    block_number: int | None
    block_hash: bytes | None
    log_index: int | None
    attempts: int
    created_at: datetime
    signed_at: datetime | None
    broadcast_at: datetime | None
    included_at: datetime | None
    confirmed_at: datetime | None
    failed_at: datetime | None
    updated_at: datetime
    success_answers: int
    success_answered_at: datetime | None
    transfer_method: str
    cap_amount: int | None
    signed_tx_hash: bytes | None  # our own signed transaction's hash (tx_hash: the settling one)

    @classmethod
    def from_record(cls, rec: asyncpg.Record) -> SettlementRow:
        values = dict(rec)
        for key in ("asset", "payer", "pay_to", "call_to", "signer"):
            values[key] = prefixed_hex(values[key])
        for key in ("amount", "valid_after", "valid_before", "max_fee_per_gas", "cap_amount"):
            if values[key] is not None:
                values[key] = int(values[key])
        values["public_id"] = str(values["public_id"])
        values["state"] = State(values["state"])
        return cls(**values)

    @property
    def tx_hash_hex(self) -> str:
        return prefixed_hex(self.tx_hash) or ""


@dataclass(frozen=True, slots=True)
class Claim:
    row: SettlementRow
    created: bool  # True when this call inserted the row


@dataclass(frozen=True, slots=True)
class Signed:
    settlement_id: int
    signer: str
    signer_nonce: int
    tx_hash: bytes
    raw_tx: bytes
    gas_limit: int
    max_fee_per_gas: int


@dataclass(frozen=True, slots=True)
class Inclusion:
    settlement_id: int
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    log_index: int
    settled_by: SettledBy


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 20,
                      command_timeout_s: float = 10.0) -> Store:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                         command_timeout=command_timeout_s,
                                         max_inactive_connection_lifetime=300.0)
        invariant(pool is not None, "asyncpg returned a pool")
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # -- migrations ---------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations in name order; returns the names applied."""
        applied: list[str] = []
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                await conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                    name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())""")
                done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
                for name, sql in _migration_files():
                    if name in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                    applied.append(name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        return applied

    # -- settlement claims --------------------------------------------------------------------

    async def claim(self, intent: SettlementIntent) -> Claim:
        """Insert the write-ahead row for this authorization, or return the one that exists."""
        values = _intent_values(intent)
        permit2 = intent.transfer_method == "permit2"
        rec = await self.pool.fetchrow(_CLAIM_PERMIT2 if permit2 else _CLAIM_EIP3009, *values)
        if rec is not None:
            return Claim(SettlementRow.from_record(rec), created=True)
        existing = await find_claimed(self.pool, intent)
        invariant(existing is not None, "a conflicting row must exist")
        return Claim(existing, created=False)

    async def reclaim_failed(self, settlement_id: int, intent: SettlementIntent
                             ) -> SettlementRow | None:
        """failed -> pending for a new attempt (possibly with a new payload for the same
        authorization nonce). Only one concurrent caller wins; the others get None. The row
        keeps its scheme and asset, so a payment of another scheme or token (exact and upto
        share an owner's Permit2 nonces) never takes it over: None."""
        rec = await self.pool.fetchrow(
            _RECLAIM_FAILED, settlement_id, intent.x402_version, intent.network,
            address_bytes(intent.pay_to), intent.amount, intent.valid_after, intent.valid_before,
            intent.signature, intent.fingerprint, address_bytes(intent.call_to), intent.calldata,
            intent.cap_amount, intent.scheme, address_bytes(intent.asset))
        return None if rec is None else SettlementRow.from_record(rec)

    # -- state transitions --------------------------------------------------------------------

    async def mark_signed(self, batch: Sequence[Signed]) -> set[int]:
        """pending -> signed for a batch, in one statement; returns the ids that moved."""
        rows = await self.pool.fetch("""
            UPDATE settlements s SET state = 'signed', signer = u.signer,
                signer_nonce = u.signer_nonce, tx_hash = u.tx_hash, raw_tx = u.raw_tx,
                gas_limit = u.gas_limit, max_fee_per_gas = u.max_fee, signed_at = clock_timestamp()
            FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bytea[], $5::bytea[],
                        $6::bigint[], $7::numeric[])
                 AS u(id, signer, signer_nonce, tx_hash, raw_tx, gas_limit, max_fee)
            WHERE s.id = u.id AND s.state = 'pending'
            RETURNING s.id""",
            [b.settlement_id for b in batch], [address_bytes(b.signer) for b in batch],
            [b.signer_nonce for b in batch], [b.tx_hash for b in batch],
            [b.raw_tx for b in batch], [b.gas_limit for b in batch],
            [b.max_fee_per_gas for b in batch])
        return {r["id"] for r in rows}

    async def mark_broadcast(self, settlement_ids: Sequence[int]) -> set[int]:
        rows = await self.pool.fetch("""
            UPDATE settlements SET state = 'broadcast', broadcast_at = clock_timestamp()
            WHERE id = ANY($1::bigint[]) AND state = 'signed' RETURNING id""", list(settlement_ids))
        return {r["id"] for r in rows}

    async def mark_included(self, batch: Sequence[Inclusion]) -> set[int]:
        """pending|signed|broadcast -> included for a batch; returns the ids that moved."""
        return await mark_included_on(self.pool, batch)

    async def mark_failed(self, settlement_id: int, reason: str, message: str,
                          *, tx_hash: bytes | None = None, block_number: int | None = None,
                          expired: bool = False) -> bool:
        """`block_number` is set when a mined transaction failed (it reverted), so the stored
        answer can name that transaction."""
        state = "expired" if expired else "failed"
        result = await self.pool.execute("""
            UPDATE settlements SET state = $2, reason = $3, message = $4,
                tx_hash = COALESCE($5, tx_hash), block_number = $6, failed_at = clock_timestamp()
            WHERE id = $1 AND state IN ('pending', 'signed', 'broadcast')""",
            settlement_id, state, reason, message[:1000], tx_hash, block_number)
        return result.endswith(" 1")

    async def count_success_answer(self, settlement_id: int) -> SettlementRow:
        """Record one more `success: true` answer for this settled row and return it
        (`success_answers` 1 = the first). The row lock serialises concurrent answers, so
        exactly one sees 1."""
        rec = await self.pool.fetchrow(_COUNT_SUCCESS_ANSWER, settlement_id)
        invariant(rec is not None, "a claimed row never disappears")
        return SettlementRow.from_record(rec)

    async def mark_needs_resign(self, settlement_id: int) -> SettlementRow | None:
        """signed|broadcast -> pending: these bytes can never be mined (their signer nonce was
        taken by another transaction); the authorization needs a new transaction. Returns the
        moved row, None when it was not in those states."""
        rec = await self.pool.fetchrow(_MARK_NEEDS_RESIGN, settlement_id)
        return None if rec is None else SettlementRow.from_record(rec)

    # -- reads --------------------------------------------------------------------------------

    async def get(self, settlement_id: int) -> SettlementRow | None:
        rec = await self.pool.fetchrow(_SELECT + "WHERE id = $1", settlement_id)
        return None if rec is None else SettlementRow.from_record(rec)

    async def find(self, key: str) -> SettlementRow | None:
        """By public id (uuid) or by transaction hash (0x + 64 hex)."""
        if key.startswith("0x") and len(key) == 66:
            # The settling transaction, or ours when another one settled the payment.
            rec = await self.pool.fetchrow(_SELECT + """
                WHERE tx_hash = $1 OR (signed_tx_hash = $1 AND signed_tx_hash <> tx_hash)
                ORDER BY id DESC LIMIT 1""", bytes.fromhex(key[2:]))
        else:
            rec = await self.pool.fetchrow(_SELECT + "WHERE public_id = $1::uuid", key)
        return None if rec is None else SettlementRow.from_record(rec)

    async def unfinished(self, chain_id: int) -> list[SettlementRow]:
        """Rows a restarted process must finish: pending, signed and broadcast."""
        recs = await self.pool.fetch(_SELECT + """
            WHERE chain_id = $1 AND state IN ('pending', 'signed', 'broadcast') ORDER BY id""",
            chain_id)
        return [SettlementRow.from_record(r) for r in recs]

    async def unheld(self, chain_id: int, held: Sequence[int], *, unchanged_for_s: float,
                     signer: str | None, limit: int) -> list[SettlementRow]:
        """In-flight rows of this chain that are not in `held` and have not changed for
        `unchanged_for_s`: signed or broadcast by `signer` (None: any), or pending with no
        signer. What the serving process must adopt (e.g. moved back by a separate watcher)."""
        recs = await self.pool.fetch(_UNHELD, chain_id, list(held), unchanged_for_s,
                                     None if signer is None else address_bytes(signer), limit)
        return [SettlementRow.from_record(r) for r in recs]

    async def max_signer_nonce(self, chain_id: int, signer: str) -> int | None:
        return await self.pool.fetchval("""
            SELECT max(signer_nonce) FROM settlements
            WHERE chain_id = $1 AND signer = $2 AND state IN ('signed', 'broadcast')""",
            chain_id, address_bytes(signer))

    async def timeline(self, settlement_id: int) -> list[dict[str, Any]]:
        recs = await self.pool.fetch("""
            SELECT at, from_state, to_state, reason, tx_hash, block_number FROM settlement_events
            WHERE settlement_id = $1 ORDER BY id""", settlement_id)
        return [dict(r) for r in recs]

    # -- verification log ---------------------------------------------------------------------

    async def record_verifications(self, records: Sequence[tuple[Any, ...]]) -> None:
        await self.pool.copy_records_to_table(
            "verifications", records=list(records), columns=VERIFICATION_COLUMNS)


VERIFICATION_COLUMNS = ("at", "endpoint", "request_id", "scheme", "x402_version", "network",
                        "payer", "pay_to", "asset", "amount", "nonce", "valid_before",
                        "fingerprint", "is_valid", "reason")


async def find_claimed(pool: asyncpg.Pool, intent: SettlementIntent) -> SettlementRow | None:
    """The row holding this authorization's claim key (per transfer method: a Permit2 nonce
    is the owner's whatever the token), if any."""
    if intent.transfer_method == "permit2":
        rec = await pool.fetchrow(_CLAIMED_PERMIT2, intent.chain_id,
                                  address_bytes(intent.payer), intent.nonce)
    else:
        rec = await pool.fetchrow(_CLAIMED_EIP3009, intent.chain_id,
                                  address_bytes(intent.asset), address_bytes(intent.payer),
                                  intent.nonce)
    return None if rec is None else SettlementRow.from_record(rec)


async def mark_included_on(conn: asyncpg.Pool | asyncpg.Connection,
                           batch: Sequence[Inclusion]) -> set[int]:
    """_MARK_INCLUDED on a pool or on a connection in a transaction (the chain watcher's)."""
    if not batch:
        return set()
    rows = await conn.fetch(
        _MARK_INCLUDED, [b.settlement_id for b in batch], [b.tx_hash for b in batch],
        [b.block_number for b in batch], [b.block_hash for b in batch],
        [b.log_index for b in batch], [str(b.settled_by) for b in batch])
    return {r["id"] for r in rows}


def _intent_values(intent: SettlementIntent) -> tuple[Any, ...]:
    return (intent.scheme, intent.x402_version, intent.network, intent.chain_id,
            address_bytes(intent.asset), address_bytes(intent.payer),
            address_bytes(intent.pay_to), intent.amount, intent.nonce, intent.valid_after,
            intent.valid_before, intent.signature, intent.fingerprint,
            address_bytes(intent.call_to), intent.calldata, intent.transfer_method,
            intent.cap_amount)


def _migration_files() -> list[tuple[str, str]]:
    folder = importlib.resources.files("facilitator.adapters") / "migrations"
    files = sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql"))
    return files

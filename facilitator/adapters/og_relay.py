"""PostgreSQL side of our data-settlement relay: submissions to the OpenGradient chain.

Guarantees: attestations are assigned to a batch submission in the same transaction that
creates it (an attestation is in at most one batch); an individual attestation has at most one
submission (unique index); the signed raw transaction and its hash are stored before anything
is sent (write-ahead), and a retry re-sends those bytes; states only move forward
(pending -> published -> signed -> broadcast -> included | failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class Submission:
    id: int
    kind: str
    state: str
    batch_size: int | None
    attestation_id: int | None
    blob_id: str | None
    calldata: bytes | None
    raw_tx: bytes | None
    tx_hash: bytes | None
    attempts: int

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Submission:
        return cls(id=r["id"], kind=r["kind"], state=r["state"], batch_size=r["batch_size"],
                   attestation_id=r["attestation_id"], blob_id=r["blob_id"],
                   calldata=_opt(r["calldata"]), raw_tx=_opt(r["raw_tx"]),
                   tx_hash=_opt(r["tx_hash"]), attempts=r["attempts"])


@dataclass(frozen=True, slots=True)
class RelayItem:
    """An attestation as the relay publishes it."""

    id: int
    tee_id: bytes
    input_hash: bytes
    output_hash: bytes
    tee_signature: bytes
    tee_timestamp: int
    eth_address: bytes | None
    request_body: Any
    response_body: Any


def _opt(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


_COLUMNS = ("id, kind, state, batch_size, attestation_id, blob_id, calldata, raw_tx, tx_hash, "
            "attempts")


class RelayStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def open_batch(self, max_size: int, max_age_s: float) -> Submission | None:
        """A new batch submission holding up to `max_size` queued batch attestations — only
        when there are `max_size` of them, or the oldest has waited `max_age_s`."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("""
                SELECT id, received_at < clock_timestamp() - make_interval(secs => $2) AS old
                FROM attestations WHERE mode = 'batch' AND relay_state = 'queued'
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""", max_size, max_age_s)
            if not rows or (len(rows) < max_size and not rows[0]["old"]):
                return None
            rec = await conn.fetchrow("""
                INSERT INTO og_relay_submissions (kind, state, batch_size)
                VALUES ('batch', 'pending', $1) RETURNING """ + _COLUMNS, len(rows))
            await conn.execute("""
                UPDATE attestations SET relay_state = 'batched', relay_batch_id = $1
                WHERE id = ANY($2::bigint[])""", rec["id"], [r["id"] for r in rows])
        return Submission.from_record(rec)

    async def open_individuals(self, limit: int) -> int:
        """One submission per queued individual attestation."""
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch("""
                SELECT id FROM attestations WHERE mode = 'individual' AND relay_state = 'queued'
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""", limit)]
            if not ids:
                return 0
            await conn.execute("""
                INSERT INTO og_relay_submissions (kind, state, attestation_id)
                SELECT 'individual', 'pending', unnest($1::bigint[])
                ON CONFLICT DO NOTHING""", ids)
            await conn.execute("""
                UPDATE attestations SET relay_state = 'submitted' WHERE id = ANY($1::bigint[])""",
                ids)
        return len(ids)

    async def unfinished(self) -> list[Submission]:
        rows = await self.pool.fetch("SELECT " + _COLUMNS + """ FROM og_relay_submissions
            WHERE state IN ('pending', 'published', 'signed', 'broadcast') ORDER BY id""")
        return [Submission.from_record(r) for r in rows]

    async def items(self, submission: Submission) -> list[RelayItem]:
        rows = await self.pool.fetch("""
            SELECT id, tee_id, input_hash, output_hash, tee_signature, tee_timestamp,
                   eth_address, request_body, response_body FROM attestations
            WHERE relay_batch_id = $1 OR id = $2 ORDER BY id""",
            submission.id if submission.kind == "batch" else None, submission.attestation_id)
        return [RelayItem(id=r["id"], tee_id=bytes(r["tee_id"]), input_hash=bytes(r["input_hash"]),
                          output_hash=bytes(r["output_hash"]),
                          tee_signature=bytes(r["tee_signature"]),
                          tee_timestamp=int(r["tee_timestamp"]),
                          eth_address=_opt(r["eth_address"]),
                          request_body=json.loads(r["request_body"]) if r["request_body"] else None,
                          response_body=json.loads(r["response_body"]) if r["response_body"]
                          else None) for r in rows]

    async def published(self, submission_id: int, merkle_root: bytes | None, dump: bytes,
                        blob_id: str, calldata: bytes) -> None:
        await self.pool.execute("""
            UPDATE og_relay_submissions SET state = 'published', merkle_root = $2, dump = $3,
                blob_id = $4, calldata = $5, updated_at = clock_timestamp()
            WHERE id = $1 AND state = 'pending'""", submission_id, merkle_root, dump, blob_id,
            calldata)

    async def signed(self, submission_id: int, nonce: int, raw_tx: bytes, tx_hash: bytes) -> None:
        await self.pool.execute("""
            UPDATE og_relay_submissions SET state = 'signed', signer_nonce = $2, raw_tx = $3,
                tx_hash = $4, attempts = attempts + 1, updated_at = clock_timestamp()
            WHERE id = $1 AND state IN ('published', 'signed', 'broadcast')""",
            submission_id, nonce, raw_tx, tx_hash)

    async def advance(self, submission_id: int, state: str, *, block_number: int | None = None,
                      error: str | None = None) -> None:
        await self.pool.execute("""
            UPDATE og_relay_submissions SET state = $2, block_number = COALESCE($3, block_number),
                error = $4, updated_at = clock_timestamp() WHERE id = $1""",
            submission_id, state, block_number, error)

"""PostgreSQL side of our data-settlement relay: submissions to the OpenGradient chain.

Guarantees:
- Attestations are assigned to a batch submission in the same transaction that creates it (an
  attestation is in at most one batch); an individual attestation has at most one submission
  (unique index).
- Write-ahead: the signed raw transaction and its hash are stored before anything is sent, and a
  retry re-sends those bytes.
- States only move forward: pending -> published -> signed -> broadcast -> included | failed
  (and broadcast -> signed when a transaction whose nonce was taken is replaced). Every update
  names the state (and, once signed, the transaction hash) it expects and reports whether it
  moved the row; the `og_relay_guard` trigger (migration 009) refuses any other transition.
- Re-sends and re-signs are counted in the row (`resends`, `attempts`), so their bounds survive
  restarts.
- All SQL is constant text with `$n` parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from facilitator.adapters.og_chain import optional_bytes

IN_FLIGHT = ("signed", "broadcast")


@dataclass(frozen=True, slots=True)
class Submission:
    """A submission as the relay works on it. `calldata` is loaded once published, `raw_tx`
    once signed; `idle_s` is the time since the row last changed (a send or re-send)."""

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
    resends: int
    idle_s: float

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Submission:
        return cls(id=r["id"], kind=r["kind"], state=r["state"], batch_size=r["batch_size"],
                   attestation_id=r["attestation_id"], blob_id=r["blob_id"],
                   calldata=optional_bytes(r["calldata"]), raw_tx=optional_bytes(r["raw_tx"]),
                   tx_hash=optional_bytes(r["tx_hash"]), attempts=r["attempts"],
                   resends=r["resends"], idle_s=float(r["idle_s"]))


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


# What the relay reads of a submission: the bytes only in the states that use them (the dump and
# Merkle root are written for auditors and never read back here).
_COLUMNS = """id, kind, state, batch_size, attestation_id, blob_id,
    CASE WHEN state IN ('published', 'signed', 'broadcast') THEN calldata END AS calldata,
    CASE WHEN state IN ('signed', 'broadcast') THEN raw_tx END AS raw_tx,
    tx_hash, attempts, resends,
    extract(epoch FROM clock_timestamp() - updated_at)::float8 AS idle_s"""

_OPEN_BATCH_CANDIDATES = """
    SELECT id, received_at < clock_timestamp() - make_interval(secs => $2) AS old
    FROM attestations WHERE mode = 'batch' AND relay_state = 'queued'
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"""
_INSERT_BATCH = """
    INSERT INTO og_relay_submissions (kind, state, batch_size)
    VALUES ('batch', 'pending', $1) RETURNING """ + _COLUMNS
_ASSIGN_BATCH = """
    UPDATE attestations SET relay_state = 'batched', relay_batch_id = $1
    WHERE id = ANY($2::bigint[])"""
_OPEN_INDIVIDUAL_CANDIDATES = """
    SELECT id FROM attestations WHERE mode = 'individual' AND relay_state = 'queued'
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"""
_INSERT_INDIVIDUALS = """
    INSERT INTO og_relay_submissions (kind, state, attestation_id)
    SELECT 'individual', 'pending', unnest($1::bigint[])
    ON CONFLICT DO NOTHING"""
_MARK_SUBMITTED = """
    UPDATE attestations SET relay_state = 'submitted' WHERE id = ANY($1::bigint[])"""
_UNFINISHED = "SELECT " + _COLUMNS + """ FROM og_relay_submissions
    WHERE state IN ('pending', 'published', 'signed', 'broadcast') ORDER BY id LIMIT $1"""
_ITEM_COLUMNS = """SELECT id, tee_id, input_hash, output_hash, tee_signature, tee_timestamp,
    eth_address, request_body, response_body FROM attestations"""
_BATCH_ITEMS = _ITEM_COLUMNS + " WHERE relay_batch_id = $1 ORDER BY id"
_INDIVIDUAL_ITEM = _ITEM_COLUMNS + " WHERE id = $1"
_PUBLISHED = """
    UPDATE og_relay_submissions SET state = 'published', merkle_root = $2, dump = $3,
        blob_id = $4, calldata = $5
    WHERE id = $1 AND state = 'pending'"""
# A first signature (published -> signed), or the replacement of the stored transaction
# ($5, whose nonce was taken by another one) by a new one.
_SIGNED = """
    UPDATE og_relay_submissions SET state = 'signed', signer_nonce = $2, raw_tx = $3,
        tx_hash = $4, attempts = attempts + 1
    WHERE id = $1 AND ((state = 'published' AND $5::bytea IS NULL)
                       OR (state IN ('signed', 'broadcast') AND tx_hash = $5))"""
_BROADCAST = """
    UPDATE og_relay_submissions SET state = 'broadcast'
    WHERE id = $1 AND state = 'signed' AND tx_hash = $2"""
_RESENT = """
    UPDATE og_relay_submissions SET resends = resends + 1
    WHERE id = $1 AND state IN ('signed', 'broadcast') AND tx_hash = $2"""
_FINISHED = """
    UPDATE og_relay_submissions SET state = $3, block_number = $4, error = $5
    WHERE id = $1 AND state IN ('signed', 'broadcast') AND tx_hash = $2"""
_FAILED = """
    UPDATE og_relay_submissions SET state = 'failed', error = $3
    WHERE id = $1 AND state = $2"""


def _moved(status: str) -> bool:
    return status.split()[-1] != "0"


class RelayStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def open_batch(self, max_size: int, max_age_s: float) -> Submission | None:
        """A new batch submission holding up to `max_size` queued batch attestations — only
        when there are `max_size` of them, or the oldest has waited `max_age_s`."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_OPEN_BATCH_CANDIDATES, max_size, max_age_s)
            if not rows or (len(rows) < max_size and not rows[0]["old"]):
                return None
            rec = await conn.fetchrow(_INSERT_BATCH, len(rows))
            await conn.execute(_ASSIGN_BATCH, rec["id"], [r["id"] for r in rows])
        return Submission.from_record(rec)

    async def open_individuals(self, limit: int) -> int:
        """One submission per queued individual attestation."""
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(_OPEN_INDIVIDUAL_CANDIDATES, limit)]
            if not ids:
                return 0
            await conn.execute(_INSERT_INDIVIDUALS, ids)
            await conn.execute(_MARK_SUBMITTED, ids)
        return len(ids)

    async def unfinished(self, limit: int) -> list[Submission]:
        """The oldest `limit` submissions not yet included or failed, in order."""
        return [Submission.from_record(r) for r in await self.pool.fetch(_UNFINISHED, limit)]

    async def items(self, submission: Submission) -> list[RelayItem]:
        if submission.kind == "batch":
            rows = await self.pool.fetch(_BATCH_ITEMS, submission.id)
        else:
            rows = await self.pool.fetch(_INDIVIDUAL_ITEM, submission.attestation_id)
        return [RelayItem(id=r["id"], tee_id=bytes(r["tee_id"]), input_hash=bytes(r["input_hash"]),
                          output_hash=bytes(r["output_hash"]),
                          tee_signature=bytes(r["tee_signature"]),
                          tee_timestamp=int(r["tee_timestamp"]),
                          eth_address=optional_bytes(r["eth_address"]),
                          request_body=json.loads(r["request_body"]) if r["request_body"] else None,
                          response_body=json.loads(r["response_body"]) if r["response_body"]
                          else None) for r in rows]

    async def published(self, submission_id: int, merkle_root: bytes | None, dump: bytes,
                        blob_id: str, calldata: bytes) -> bool:
        """pending -> published."""
        return _moved(await self.pool.execute(_PUBLISHED, submission_id, merkle_root, dump,
                                              blob_id, calldata))

    async def signed(self, submission_id: int, nonce: int, raw_tx: bytes, tx_hash: bytes, *,
                     replacing: bytes | None = None) -> bool:
        """published -> signed (`replacing` None), or the stored transaction `replacing` (signed
        or broadcast) replaced by a new one. False: the row was not in that state, so the new
        bytes must not be sent."""
        return _moved(await self.pool.execute(_SIGNED, submission_id, nonce, raw_tx, tx_hash,
                                              replacing))

    async def broadcast(self, submission_id: int, tx_hash: bytes) -> bool:
        """signed -> broadcast: a node accepted the stored transaction `tx_hash`."""
        return _moved(await self.pool.execute(_BROADCAST, submission_id, tx_hash))

    async def resent(self, submission_id: int, tx_hash: bytes) -> bool:
        """Count one re-send of the stored transaction `tx_hash` (before sending it)."""
        return _moved(await self.pool.execute(_RESENT, submission_id, tx_hash))

    async def finished(self, submission_id: int, tx_hash: bytes, *, included: bool,
                       block_number: int, error: str | None = None) -> bool:
        """signed|broadcast -> included (or failed: reverted), by the receipt of `tx_hash`."""
        return _moved(await self.pool.execute(
            _FINISHED, submission_id, tx_hash, "included" if included else "failed",
            block_number, error))

    async def failed(self, submission_id: int, expected_state: str, error: str) -> bool:
        """`expected_state` -> failed: the relay gave up on this submission."""
        return _moved(await self.pool.execute(_FAILED, submission_id, expected_state, error))

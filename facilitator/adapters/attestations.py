"""PostgreSQL records of posted attestations, TEE registry facts and the OpenGradient chain's
settlement events.

Guarantees: an attestation posted twice is stored once (the table's unique key); insertion and
the session link are one statement, so a record is never half-stored; `pending` returns only
records whose registry history has been read (the filter is in SQL, before the LIMIT, so records
waiting for the chain never crowd out decidable ones); the registry facts of a verification
pass are read in two statements, whatever its size; verification results are written with a
guard on the pending state; all SQL is constant text with `$n` parameters.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from facilitator.adapters.og_chain import OG_SYNCED_TO, optional_bytes
from facilitator.core.attestation import AttestationRecord
from facilitator.core.crosscheck import from_unix

# A TEE registered up to this long after an attestation's timestamp still counts as registered
# at that time (OpenGradient's on-chain verifier accepts timestamps 5 minutes ahead).
REGISTRATION_SKEW_S = 300


@dataclass(frozen=True, slots=True)
class NewAttestation:
    mode: str
    record: AttestationRecord
    session_ref: str
    payer: bytes | None
    permit_nonce: bytes | None
    cost_opg: int | None
    eth_address: bytes | None
    request_body: Any
    response_body: Any


@dataclass(frozen=True, slots=True)
class PendingAttestation:
    id: int
    mode: str
    record: AttestationRecord
    request_body: Any
    response_body: Any
    received_at: datetime


@dataclass(frozen=True, slots=True)
class TeeHistory:
    """What the registry (as read from the chain so far) says about one TEE: its key (None when
    the caller already holds it parsed) and its registered/enabled/disabled events as
    `(unix block time, kind)` in chain order."""

    tee_id: bytes
    public_key: bytes | None
    payment_address: bytes | None
    events: tuple[tuple[float, str], ...]

    def enabled_at(self, at_unix: int, registration_skew_s: int = REGISTRATION_SKEW_S
                   ) -> bool | None:
        """Was the TEE enabled at `at_unix`? None: not registered then. A registration up to
        `registration_skew_s` after `at_unix` still counts (TEE clocks and block timestamps
        drift apart by seconds; OpenGradient's on-chain verifier allows 5 minutes ahead)."""
        last = None
        for block_time, kind in self.events:
            if block_time <= at_unix:
                last = kind
        if last is None and any(kind == "registered" and block_time <= at_unix + registration_skew_s
                                for block_time, kind in self.events):
            last = "registered"
        return None if last is None else last in ("registered", "enabled")


# Pending records whose registry history has been read from the chain ($1: the OpenGradient
# chain id; `OG_SYNCED_TO` takes it as $1 too), oldest first, at most $2. Without any
# OpenGradient block processed yet, a record is decided $3 seconds after it was received.
# Records still waiting for the chain are skipped here, in SQL, so they can never fill the batch
# and starve records that can be decided.
_PENDING = """
    WITH synced AS (""" + OG_SYNCED_TO + """)
    SELECT a.id, a.mode, a.tee_id, a.input_hash, a.output_hash, a.tee_signature,
           a.tee_timestamp, a.request_body, a.response_body, a.received_at
    FROM attestations a
    WHERE a.verification = 'pending' AND (
          a.tee_timestamp <= (SELECT floor(extract(epoch FROM s.timestamp)) FROM synced s)
       OR (NOT EXISTS (SELECT 1 FROM synced)
           AND a.received_at < clock_timestamp() - make_interval(secs => $3)))
    ORDER BY a.id LIMIT $2"""

# The registry facts of a set of TEEs in two statements: keys (the key bytes only for TEEs whose
# parsed key the caller does not hold), then their events up to a time.
_TEE_KEYS = """
    SELECT tee_id, payment_address,
           CASE WHEN tee_id = ANY($3::bytea[]) THEN NULL ELSE public_key END AS public_key
    FROM tee_keys WHERE chain_id = $1 AND tee_id = ANY($2::bytea[])"""
_TEE_EVENTS = """
    SELECT tee_id, kind, extract(epoch FROM block_time)::float8 AS block_time FROM tee_events
    WHERE chain_id = $1 AND tee_id = ANY($2::bytea[]) AND block_time <= $3
    ORDER BY tee_id, block_number, log_index"""


# Only attestations that name a session can ever link: the others (most of today's traffic) are
# never rescanned (partial index `attestations_linkable`, migration 009, has this predicate).
_LINK_SESSIONS = """
    UPDATE attestations a SET session_id = s.id FROM upto_sessions s
    WHERE a.session_id IS NULL AND (a.payer IS NOT NULL OR a.session_ref <> '')
      AND s.chain_id = $1 AND (
          (a.payer IS NOT NULL AND s.payer = a.payer AND s.nonce = a.permit_nonce)
       OR (a.session_ref <> '' AND s.gateway_session_id = a.session_ref))"""


class AttestationStore:
    def __init__(self, pool: asyncpg.Pool, payments_chain_id: int, og_chain_id: int) -> None:
        self.pool = pool
        self.payments_chain_id = payments_chain_id
        self.og_chain_id = og_chain_id

    async def insert(self, new: NewAttestation) -> tuple[int, bool]:
        """(attestation id, created?) — a repeat post returns the stored id."""
        r = new.record
        rec = await self.pool.fetchrow("""
            WITH linked AS (
                SELECT id FROM upto_sessions
                WHERE ($7::bytea IS NOT NULL AND chain_id = $13 AND payer = $7 AND nonce = $8)
                   OR ($6 <> '' AND gateway_session_id = $6)
                ORDER BY id LIMIT 1)
            INSERT INTO attestations (mode, tee_id, input_hash, output_hash, tee_signature,
                tee_timestamp, session_ref, payer, permit_nonce, cost_opg, eth_address,
                request_body, response_body, session_id,
                relay_state)
            VALUES ($1, $2, $3, $4, $5, $14, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb,
                    (SELECT id FROM linked),
                    CASE WHEN $1 = 'private' THEN 'none' ELSE 'queued' END)
            ON CONFLICT (tee_id, input_hash, output_hash, tee_timestamp, session_ref) DO NOTHING
            RETURNING id""",
            new.mode, r.tee_id, r.input_hash, r.output_hash, r.tee_signature, new.session_ref,
            new.payer, new.permit_nonce, new.cost_opg, new.eth_address,
            _json(new.request_body), _json(new.response_body), self.payments_chain_id,
            r.tee_timestamp)
        if rec is not None:
            return int(rec["id"]), True
        existing = await self.pool.fetchval("""
            SELECT id FROM attestations WHERE tee_id = $1 AND input_hash = $2 AND output_hash = $3
              AND tee_timestamp = $4 AND session_ref = $5""",
            r.tee_id, r.input_hash, r.output_hash, r.tee_timestamp, new.session_ref)
        return int(existing), False

    async def link_sessions(self) -> int:
        """Attach attestations to sessions that became known after they were posted (the
        gateway settles a session, with its id, after posting the session's attestations)."""
        done = await self.pool.execute(_LINK_SESSIONS, self.payments_chain_id)
        return int(done.split()[-1])

    async def pending(self, limit: int, unsynced_grace_s: float) -> list[PendingAttestation]:
        """Up to `limit` pending records that can be decided now (see `_PENDING`)."""
        rows = await self.pool.fetch(_PENDING, self.og_chain_id, limit, unsynced_grace_s)
        return [PendingAttestation(
            id=r["id"], mode=r["mode"],
            record=AttestationRecord(bytes(r["tee_id"]), bytes(r["input_hash"]),
                                     bytes(r["output_hash"]), bytes(r["tee_signature"]),
                                     int(r["tee_timestamp"])),
            request_body=json.loads(r["request_body"]) if r["request_body"] else None,
            response_body=json.loads(r["response_body"]) if r["response_body"] else None,
            received_at=r["received_at"]) for r in rows]

    async def registry(self, tee_ids: Collection[bytes], *, known_keys: Collection[bytes],
                       until_unix: int) -> dict[bytes, TeeHistory]:
        """The registry facts of `tee_ids` (absent: never registered) with their events up to
        `until_unix`; `public_key` is None for the ids in `known_keys`. Two statements, whatever
        the number of TEEs."""
        ids = sorted(set(tee_ids))
        if not ids:
            return {}
        async with self.pool.acquire() as conn:
            keys = await conn.fetch(_TEE_KEYS, self.og_chain_id, ids,
                                    sorted(set(known_keys) & set(ids)))
            events = await conn.fetch(_TEE_EVENTS, self.og_chain_id,
                                      [bytes(k["tee_id"]) for k in keys], from_unix(until_unix))
        by_tee: dict[bytes, list[tuple[float, str]]] = {}
        for e in events:
            by_tee.setdefault(bytes(e["tee_id"]), []).append((float(e["block_time"]), e["kind"]))
        return {bytes(k["tee_id"]): TeeHistory(
            tee_id=bytes(k["tee_id"]), public_key=optional_bytes(k["public_key"]),
            payment_address=optional_bytes(k["payment_address"]),
            events=tuple(by_tee.get(bytes(k["tee_id"]), ()))) for k in keys}

    async def set_verification(self, results: Sequence[tuple[int, str]]) -> None:
        await self.pool.execute("""
            UPDATE attestations a SET verification = u.result, verified_at = clock_timestamp()
            FROM unnest($1::bigint[], $2::text[]) AS u(id, result)
            WHERE a.id = u.id AND a.verification = 'pending'""",
            [i for i, _ in results], [r for _, r in results])


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)

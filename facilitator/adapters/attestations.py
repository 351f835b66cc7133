"""PostgreSQL records of posted attestations, TEE registry facts and the OpenGradient chain's
settlement events.

Guarantees: an attestation posted twice is stored once (the table's unique key); insertion and
the session link are one statement, so a record is never half-stored; verification results are
written with a guard on the pending state; all SQL is parameterised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from facilitator.core.attestation import AttestationRecord


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
class TeeState:
    public_key: bytes
    payment_address: bytes | None
    enabled_at_time: bool | None  # None: not registered at that time


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
        done = await self.pool.execute("""
            UPDATE attestations a SET session_id = s.id FROM upto_sessions s
            WHERE a.session_id IS NULL AND s.chain_id = $1 AND (
                  (a.payer IS NOT NULL AND s.payer = a.payer AND s.nonce = a.permit_nonce)
               OR (a.session_ref <> '' AND s.gateway_session_id = a.session_ref))""",
            self.payments_chain_id)
        return int(done.split()[-1])

    async def pending(self, limit: int) -> list[PendingAttestation]:
        rows = await self.pool.fetch("""
            SELECT id, mode, tee_id, input_hash, output_hash, tee_signature, tee_timestamp,
                   request_body, response_body, received_at
            FROM attestations WHERE verification = 'pending' ORDER BY id LIMIT $1""", limit)
        return [PendingAttestation(
            id=r["id"], mode=r["mode"],
            record=AttestationRecord(bytes(r["tee_id"]), bytes(r["input_hash"]),
                                     bytes(r["output_hash"]), bytes(r["tee_signature"]),
                                     int(r["tee_timestamp"])),
            request_body=json.loads(r["request_body"]) if r["request_body"] else None,
            response_body=json.loads(r["response_body"]) if r["response_body"] else None,
            received_at=r["received_at"]) for r in rows]

    async def tee_state(self, tee_id: bytes, at_unix: int, registration_skew_s: int = 300
                        ) -> TeeState | None:
        """The TEE's key and whether it was enabled at `at_unix` (from registry events up to
        that time); None when the registry has never heard of it. A registration up to
        `registration_skew_s` after `at_unix` still counts (TEE clocks and block timestamps
        drift apart by seconds; OpenGradient's on-chain verifier allows 5 minutes ahead)."""
        key = await self.pool.fetchrow("""
            SELECT public_key, payment_address FROM tee_keys WHERE chain_id = $1 AND tee_id = $2""",
            self.og_chain_id, tee_id)
        if key is None:
            return None
        last = await self.pool.fetchval("""
            SELECT kind FROM tee_events WHERE chain_id = $1 AND tee_id = $2 AND block_time <= $3
            ORDER BY block_number DESC, log_index DESC LIMIT 1""",
            self.og_chain_id, tee_id, datetime.fromtimestamp(at_unix, UTC))
        if last is None:
            last = await self.pool.fetchval("""
                SELECT kind FROM tee_events WHERE chain_id = $1 AND tee_id = $2
                  AND kind = 'registered' AND block_time <= $3 LIMIT 1""",
                self.og_chain_id, tee_id, datetime.fromtimestamp(at_unix + registration_skew_s,
                                                                  UTC))
        enabled = None if last is None else last in ("registered", "enabled")
        payment = key["payment_address"]
        return TeeState(bytes(key["public_key"]), bytes(payment) if payment else None, enabled)

    async def set_verification(self, results: Sequence[tuple[int, str]]) -> None:
        await self.pool.execute("""
            UPDATE attestations a SET verification = u.result, verified_at = clock_timestamp()
            FROM unnest($1::bigint[], $2::text[]) AS u(id, result)
            WHERE a.id = u.id AND a.verification = 'pending'""",
            [i for i, _ in results], [r for _, r in results])

    async def og_processed_time(self) -> datetime | None:
        """Timestamp of the newest OpenGradient block the watcher processed (how far the
        registry facts reach)."""
        return await self.pool.fetchval("""
            SELECT b.timestamp FROM chain_cursors c JOIN chain_blocks b
              ON b.chain_id = c.chain_id AND b.number = c.head_number WHERE c.chain_id = $1""",
            self.og_chain_id)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)

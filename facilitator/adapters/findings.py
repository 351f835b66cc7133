"""PostgreSQL side of the cross-check: the facts its rules read and the findings it stores (the
auditors' reads over them are `facilitator.audit.findings_queries`).

Guarantees:
- The facts of one pass are read in one REPEATABLE READ, read-only snapshot: a rule never sees
  a settlement from before and its attestations from after a concurrent change.
- A finding is inserted with `ON CONFLICT (fingerprint) DO NOTHING`: two passes, or two
  processes, store one row per discrepancy, and only the inserting call reports it as new.
- Only the configured OpenGradient chain's registry and settlement records count (`og_chain_id`;
  None: whatever the tables hold, for a database that serves a single chain).
- All SQL text is constant; every value is a `$n` parameter.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from facilitator.adapters.og_chain import OG_SYNCED_TO, optional_bytes
from facilitator.core import crosscheck as cc

SESSION_WINDOW = "COALESCE(u.settled_at, u.created_at)"  # a session belongs to its settle time
# A payee "links" when its gateway ever named a session in an attestation: only then does a
# session without attestations mean something is missing (otherwise: reconciliation).
_PAYEE_LINKS = """EXISTS (SELECT 1 FROM upto_sessions u2 JOIN attestations a2
                          ON a2.session_id = u2.id WHERE u2.pay_to = u.pay_to)"""


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- the cross-check's facts -----------------------------------------------------------------------

# The sessions a window concerns: settled (or, unsettled, created) in it, or named by an
# attestation received in it; then the other sessions of the same inferences (duplicates).
_SCOPE_SESSIONS = """
    SELECT u.id FROM upto_sessions u
    WHERE """ + SESSION_WINDOW + " >= $1 AND " + SESSION_WINDOW + """ < $2
    UNION
    SELECT session_id FROM attestations
    WHERE received_at >= $1 AND received_at < $2 AND session_id IS NOT NULL"""
_SAME_INFERENCE_SESSIONS = """
    SELECT DISTINCT b.session_id FROM attestations a
    JOIN attestations b ON b.tee_id = a.tee_id AND b.tee_timestamp = a.tee_timestamp
     AND b.input_hash = a.input_hash AND b.output_hash = a.output_hash
    WHERE a.session_id = ANY($1::bigint[]) AND b.session_id IS NOT NULL
      AND b.session_id <> a.session_id"""
ATTESTATION_SELECT = """
    SELECT a.id, a.mode, a.tee_id, a.input_hash, a.output_hash, a.tee_timestamp, a.session_ref,
           a.payer, a.permit_nonce, a.session_id, a.cost_opg, a.verification, a.received_at,
           a.verified_at
    FROM attestations a"""
# Every attestation of every loaded session, whenever received: the amount and attestation
# rules judge a session on all of its requests, never on the part inside the window.
_ATTESTATIONS = ATTESTATION_SELECT + """
    WHERE (a.received_at >= $1 AND a.received_at < $2) OR a.session_id = ANY($3::bigint[])
    ORDER BY a.id"""

_BATCH_RECORDS = """
    SELECT a.id AS attestation_id, g.id AS batch_id, g.chain_id, g.tx_hash, g.block_number,
           g.block_time, g.log_index, g.merkle_root, g.batch_size, g.blob_id, g.dump_status,
           g.dump_checked_at, g.dump_root, g.dump_leaf_count, g.dump_error,
           l.leaf_index, l.proof::text AS proof
    FROM attestations a
    JOIN og_batch_leaves l ON l.tee_id = a.tee_id AND l.input_hash = a.input_hash
     AND l.output_hash = a.output_hash AND l.tee_signature = a.tee_signature
     AND l.tee_timestamp = a.tee_timestamp
    JOIN og_batches g ON g.id = l.batch_id
    WHERE a.id = ANY($1::bigint[]) AND ($2::bigint IS NULL OR g.chain_id = $2)
    ORDER BY a.id, g.block_number, g.log_index, l.leaf_index"""

_INDIVIDUAL_RECORDS = """
    SELECT a.id AS attestation_id, r.id AS record_id, r.chain_id, r.tx_hash, r.block_number,
           r.block_time, r.log_index, r.blob_id
    FROM attestations a
    JOIN og_individual_settlements r ON r.tee_id = a.tee_id AND r.input_hash = a.input_hash
     AND r.output_hash = a.output_hash AND r.tee_timestamp = a.tee_timestamp
     AND r.tee_signature = a.tee_signature
    WHERE a.id = ANY($1::bigint[]) AND ($2::bigint IS NULL OR r.chain_id = $2)
    ORDER BY a.id, r.block_number, r.log_index"""

_SESSIONS = """
    SELECT u.id, u.chain_id, u.payer, u.nonce, u.pay_to, u.cap, u.deadline, u.created_at,
           u.settled_at, u.settled_amount, s.id AS settlement_pk,
           s.public_id::text AS settlement_id, s.state, s.amount, s.tx_hash, s.block_number,
           s.log_index, s.included_at, b.timestamp AS block_time,
           """ + _PAYEE_LINKS + """ AS payee_links
    FROM upto_sessions u
    LEFT JOIN settlements s ON s.id = u.settlement_id
    -- the block as the payment watcher stored it (same hash: not a reorged-away block)
    LEFT JOIN chain_blocks b ON b.chain_id = s.chain_id AND b.number = s.block_number
     AND b.hash = s.block_hash
    WHERE u.id = ANY($1::bigint[]) ORDER BY u.id"""

_TRANSFERS = """
    SELECT settlement_id, tx_hash, block_number, log_index, amount FROM chain_transfers
    WHERE settlement_id = ANY($1::bigint[]) ORDER BY block_number, log_index"""

_TEES = """
    SELECT tee_id, payment_address FROM tee_keys
    WHERE tee_id = ANY($1::bytea[]) AND ($2::bigint IS NULL OR chain_id = $2)"""

_INVALID_BATCHES = """
    SELECT g.id, g.chain_id, g.tx_hash, g.block_number, g.block_hash, g.block_time, g.log_index,
           g.merkle_root, g.batch_size, g.blob_id, g.dump_status, g.dump_checked_at,
           g.dump_root, g.dump_leaf_count, g.dump_error,
           (SELECT count(*) FROM og_batch_leaves l WHERE l.batch_id = g.id) AS leaves_stored
    FROM og_batches g
    WHERE g.block_time >= $1 AND g.block_time < $2 AND g.dump_status = ANY($3::text[])
      AND ($4::bigint IS NULL OR g.chain_id = $4)
    ORDER BY g.block_time, g.id"""

_UNCHECKED_BATCHES = """
    SELECT block_time FROM og_batches
    WHERE chain_id = $1 AND dump_status = 'pending' AND block_time >= $2 ORDER BY block_time"""

_PAYEES = """
    SELECT payment_address, array_agg(tee_id ORDER BY tee_id) AS tee_ids FROM tee_keys
    WHERE payment_address IS NOT NULL AND ($1::bigint IS NULL OR chain_id = $1)
    GROUP BY payment_address ORDER BY payment_address"""

_UNLINKED_ATTESTATIONS = """
    SELECT a.id, a.tee_id, a.tee_timestamp, a.cost_opg FROM attestations a
    WHERE a.tee_id = ANY($1::bytea[]) AND a.tee_timestamp >= $2 AND a.tee_timestamp < $3
      AND a.verification = 'valid' AND a.session_id IS NULL AND a.session_ref = ''
      AND a.payer IS NULL
    ORDER BY a.tee_timestamp, a.id"""

_UNLINKED_PAYMENTS = """
    SELECT u.id, u.chain_id, u.payer, u.pay_to, u.created_at, s.amount, s.tx_hash,
           s.block_number
    FROM upto_sessions u JOIN settlements s ON s.id = u.settlement_id
    WHERE u.pay_to = ANY($1::bytea[]) AND u.created_at >= $2 AND u.created_at < $3
      AND s.state = ANY($4::text[]) AND s.amount > 0 AND NOT """ + _PAYEE_LINKS + """
    ORDER BY u.created_at, u.id"""


class CrossCheckStore:
    def __init__(self, pool: asyncpg.Pool, *, og_chain_id: int | None = None) -> None:
        self.pool = pool
        self.og_chain_id = og_chain_id

    async def facts(self, window_from: datetime, window_to: datetime, now: datetime,
                    policy: cc.CrossCheckPolicy) -> cc.Facts:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            scope = [r["id"] for r in await conn.fetch(_SCOPE_SESSIONS, window_from, window_to)]
            ids = sorted({*scope, *(r["session_id"] for r in
                                    await conn.fetch(_SAME_INFERENCE_SESSIONS, scope))})
            attestations = await load_attestations(
                conn, await conn.fetch(_ATTESTATIONS, window_from, window_to, ids),
                self.og_chain_id)
            return cc.Facts(
                now=now, window_from=window_from, window_to=window_to,
                sessions=tuple(await load_sessions(conn, ids)),
                attestations=tuple(attestations),
                tees=await self._tees(conn, {a.tee_id for a in attestations}),
                batches=await self._invalid_batches(conn, window_from, window_to),
                og=await self._og_view(conn, attestations, policy),
                payees=await self._payees(conn, window_from, window_to, policy))

    async def _tees(self, conn: asyncpg.Connection, tee_ids: Iterable[bytes]
                    ) -> dict[bytes, cc.Tee]:
        rows = await conn.fetch(_TEES, sorted(tee_ids), self.og_chain_id)
        return {bytes(r["tee_id"]): cc.Tee(bytes(r["tee_id"]),
                                           optional_bytes(r["payment_address"]))
                for r in rows}

    async def _invalid_batches(self, conn: asyncpg.Connection, window_from: datetime,
                               window_to: datetime) -> tuple[cc.Batch, ...]:
        rows = await conn.fetch(_INVALID_BATCHES, window_from, window_to, list(cc.INVALID_DUMPS),
                                self.og_chain_id)
        return tuple(cc.Batch(
            id=r["id"], chain_id=r["chain_id"], tx_hash=bytes(r["tx_hash"]),
            block_number=r["block_number"], block_hash=bytes(r["block_hash"]),
            block_time=r["block_time"], log_index=r["log_index"],
            merkle_root=bytes(r["merkle_root"]), batch_size=int(r["batch_size"]),
            blob_id=r["blob_id"], dump_status=r["dump_status"],
            leaves_stored=r["leaves_stored"], dump=dump_check(r))
            for r in rows)

    async def _og_view(self, conn: asyncpg.Connection, attestations: Sequence[cc.Attestation],
                       policy: cc.CrossCheckPolicy) -> cc.OgView:
        # Without a configured chain nothing says how far the records were read: the
        # attestation_not_settled rule then stays silent rather than guess.
        if self.og_chain_id is None:
            return cc.OgView(None)
        synced_to = await conn.fetchval(OG_SYNCED_TO, self.og_chain_id)
        if not attestations:
            return cc.OgView(synced_to)
        earliest = min(a.tee_timestamp for a in attestations) - policy.clock_skew_s
        rows = await conn.fetch(_UNCHECKED_BATCHES, self.og_chain_id, cc.from_unix(earliest))
        return cc.OgView(synced_to, tuple(r["block_time"] for r in rows))

    async def _payees(self, conn: asyncpg.Connection, window_from: datetime,
                      window_to: datetime, policy: cc.CrossCheckPolicy) -> tuple[cc.Payee, ...]:
        buckets = cc.reconcile_buckets(window_from, window_to, policy)
        if not buckets:
            return ()
        margin = timedelta(seconds=policy.reconcile_margin_s)
        lo, hi = buckets[0][0] - margin, buckets[-1][1] + margin
        groups = {bytes(r["payment_address"]): tuple(bytes(t) for t in r["tee_ids"])
                  for r in await conn.fetch(_PAYEES, self.og_chain_id)}
        if not groups:
            return ()
        tee_payee = {tee: address for address, tees in groups.items() for tee in tees}
        attested: dict[bytes, list[cc.UnlinkedAttestation]] = defaultdict(list)
        for r in await conn.fetch(_UNLINKED_ATTESTATIONS, list(tee_payee), int(lo.timestamp()),
                                  int(hi.timestamp())):
            tee_id = bytes(r["tee_id"])
            attested[tee_payee[tee_id]].append(cc.UnlinkedAttestation(
                r["id"], tee_id, int(r["tee_timestamp"]), _int(r["cost_opg"])))
        paid: dict[bytes, list[cc.UnlinkedPayment]] = defaultdict(list)
        for r in await conn.fetch(_UNLINKED_PAYMENTS, list(groups), lo, hi,
                                  list(policy.settled_states)):
            paid[bytes(r["pay_to"])].append(cc.UnlinkedPayment(
                r["id"], r["chain_id"], bytes(r["payer"]), r["created_at"], int(r["amount"]),
                optional_bytes(r["tx_hash"]), r["block_number"]))
        return tuple(cc.Payee(address, tees, tuple(attested[address]), tuple(paid[address]))
                     for address, tees in groups.items() if attested[address] or paid[address])

    async def insert(self, findings: Sequence[cc.Finding]) -> set[bytes]:
        """Store the findings not stored yet; the fingerprints of those this call inserted."""
        if not findings:
            return set()
        rows = await self.pool.fetch("""
            INSERT INTO findings (kind, linked, session_id, attestation_id, tee_id, payer,
                                  evidence, fingerprint)
            SELECT u.kind, u.linked, u.session_id, u.attestation_id, u.tee_id, u.payer,
                   u.evidence::jsonb, u.fingerprint
            FROM unnest($1::text[], $2::boolean[], $3::bigint[], $4::bigint[], $5::bytea[],
                        $6::bytea[], $7::text[], $8::bytea[])
                 AS u(kind, linked, session_id, attestation_id, tee_id, payer, evidence,
                      fingerprint)
            ON CONFLICT (fingerprint) DO NOTHING
            RETURNING fingerprint""",
            [f.kind for f in findings], [f.linked for f in findings],
            [f.session_id for f in findings], [f.attestation_id for f in findings],
            [f.tee_id for f in findings], [f.payer for f in findings],
            [orjson.dumps(f.evidence).decode() for f in findings],
            [f.fingerprint for f in findings])
        return {bytes(r["fingerprint"]) for r in rows}


def dump_check(r: asyncpg.Record) -> cc.DumpCheck:
    return cc.DumpCheck(checked_at=r["dump_checked_at"], root=optional_bytes(r["dump_root"]),
                        leaf_count=r["dump_leaf_count"], error=r["dump_error"])


async def load_attestations(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record],
                            og_chain_id: int | None) -> list[cc.Attestation]:
    """Attestation rows (as selected by `_ATTESTATIONS`) with their OpenGradient records."""
    ids = [r["id"] for r in rows]
    batches: dict[int, list[cc.BatchRecord]] = defaultdict(list)
    for r in await conn.fetch(_BATCH_RECORDS, ids, og_chain_id):
        batches[r["attestation_id"]].append(cc.BatchRecord(
            batch_id=r["batch_id"], chain_id=r["chain_id"], tx_hash=bytes(r["tx_hash"]),
            block_number=r["block_number"], block_time=r["block_time"],
            log_index=r["log_index"], merkle_root=bytes(r["merkle_root"]),
            batch_size=int(r["batch_size"]), blob_id=r["blob_id"],
            dump_status=r["dump_status"], leaf_index=r["leaf_index"],
            proof=tuple(json.loads(r["proof"])), dump=dump_check(r)))
    individual: dict[int, list[cc.IndividualRecord]] = defaultdict(list)
    for r in await conn.fetch(_INDIVIDUAL_RECORDS, ids, og_chain_id):
        individual[r["attestation_id"]].append(cc.IndividualRecord(
            record_id=r["record_id"], chain_id=r["chain_id"], tx_hash=bytes(r["tx_hash"]),
            block_number=r["block_number"], block_time=r["block_time"],
            log_index=r["log_index"], blob_id=r["blob_id"]))
    return [cc.Attestation(
        id=r["id"], mode=r["mode"], tee_id=bytes(r["tee_id"]), input_hash=bytes(r["input_hash"]),
        output_hash=bytes(r["output_hash"]), tee_timestamp=int(r["tee_timestamp"]),
        session_ref=r["session_ref"], payer=optional_bytes(r["payer"]),
        permit_nonce=optional_bytes(r["permit_nonce"]), session_id=r["session_id"],
        cost_opg=_int(r["cost_opg"]), verification=r["verification"],
        received_at=r["received_at"], batch_records=tuple(batches[r["id"]]),
        individual_records=tuple(individual[r["id"]])) for r in rows]


async def load_sessions(conn: asyncpg.Connection, ids: Sequence[int]) -> list[cc.Session]:
    rows = await conn.fetch(_SESSIONS, list(ids))
    settlement_ids = [r["settlement_pk"] for r in rows if r["settlement_pk"] is not None]
    transfers: dict[int, list[cc.Transfer]] = defaultdict(list)
    for t in await conn.fetch(_TRANSFERS, settlement_ids):
        transfers[t["settlement_id"]].append(cc.Transfer(
            bytes(t["tx_hash"]), t["block_number"], t["log_index"], int(t["amount"])))
    return [_session(r, tuple(transfers[r["settlement_pk"]])) for r in rows]


def _session(r: asyncpg.Record, transfers: tuple[cc.Transfer, ...]) -> cc.Session:
    payment = None
    if r["settlement_pk"] is not None:
        payment = cc.Payment(
            settlement_id=r["settlement_id"], state=r["state"], amount=int(r["amount"]),
            tx_hash=optional_bytes(r["tx_hash"]), block_number=r["block_number"],
            log_index=r["log_index"], block_time=r["block_time"],
            included_at=r["included_at"], transfers=transfers)
    return cc.Session(
        id=r["id"], chain_id=r["chain_id"], payer=bytes(r["payer"]), nonce=bytes(r["nonce"]),
        pay_to=bytes(r["pay_to"]), cap=int(r["cap"]), deadline=int(r["deadline"]),
        created_at=r["created_at"], settled_at=r["settled_at"],
        settled_amount=_int(r["settled_amount"]), payment=payment,
        payee_links=r["payee_links"])

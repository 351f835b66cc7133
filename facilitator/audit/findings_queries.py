"""The auditors' reads over the cross-check: findings (list, export, by fingerprint), a session
with its payment, inferences and on-chain records, and the attestations of one inference.

Guarantees:
- All SQL text is constant (filters from fixed whitelists, the shared helpers of
  `facilitator.audit.queries`); every value is a `$n` parameter.
- Read shapes are JSON-ready as in `facilitator.audit.queries` (0x hex, decimal strings,
  ISO-8601 UTC); a finding's `evidence` is passed through as the stored JSON
  (`orjson.Fragment`), never re-parsed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from facilitator.adapters.findings import ATTESTATION_SELECT, load_attestations, load_sessions
from facilitator.audit import queries
from facilitator.audit.queries import Page, Query, hex_column, iso_column, select_list
from facilitator.core import crosscheck as cc

SESSION_ATTESTATIONS = ATTESTATION_SELECT + " WHERE a.session_id = $1 ORDER BY a.id"
ATTESTATIONS_BY_INPUT = (ATTESTATION_SELECT
                         + " WHERE a.tee_id = $1 AND a.input_hash = $2 ORDER BY a.id")

# (output name, SQL expression): the one shape of a finding in lists, exports and the CLI.
FINDING_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "f.id"), ("detectedAt", iso_column("f.detected_at")), ("kind", "f.kind"),
    ("linked", "f.linked"), ("sessionId", "f.session_id"),
    ("attestationId", "f.attestation_id"), ("teeId", hex_column("f.tee_id")),
    ("payer", hex_column("f.payer")), ("fingerprint", hex_column("f.fingerprint")),
    ("evidence", "f.evidence::text"))
FINDING_FIELD_NAMES = tuple(name for name, _ in FINDING_FIELDS)
FINDING_KEY = queries.TIME_ID_KEY  # cursor: (detected_at, id)


@dataclass(frozen=True, slots=True)
class FindingFilters:
    kinds: tuple[str, ...] = ()
    session_id: int | None = None
    tee_id: bytes | None = None
    since: datetime | None = None   # detected_at, inclusive
    until: datetime | None = None   # detected_at, exclusive
    linked: bool | None = None


def finding_body(record: Any) -> dict[str, Any]:
    """A finding row as the API returns it: evidence embedded as the stored JSON."""
    body = {name: record[name] for name in FINDING_FIELD_NAMES}
    body["evidence"] = orjson.Fragment(record["evidence"])
    return body


def findings_query(filters: FindingFilters, page: Page | None, order: str = "asc") -> Query:
    """A page of findings (with hidden key columns `_at`, `_id`), or, without a page, every
    matching finding for an export."""
    query = Query()
    if filters.kinds:
        query.where.append("f.kind = ANY(" + query.arg(list(filters.kinds)) + "::text[])")
    query.compare("f.session_id", "=", filters.session_id)
    query.compare("f.tee_id", "=", filters.tee_id)
    query.compare("f.detected_at", ">=", filters.since)
    query.compare("f.detected_at", "<", filters.until)
    query.compare("f.linked", "=", filters.linked)
    return queries.time_id_query(query, FINDING_FIELDS, "findings f", "f.detected_at", "f.id",
                                 page, order)


async def list_findings(pool: asyncpg.Pool, filters: FindingFilters, page: Page
                        ) -> dict[str, Any]:
    """`{"findings": [Finding, ...], "nextCursor": str | null}`."""
    rows, cursor = await queries.keyset_page(pool, findings_query(filters, page), page,
                                             "findings", queries.time_id_key)
    return {"findings": [finding_body(r) for r in rows], "nextCursor": cursor}


def open_findings_export(pool: asyncpg.Pool, filters: FindingFilters, order: str,
                         batch_size: int = queries.EXPORT_BATCH_ROWS
                         ) -> AbstractAsyncContextManager[AsyncIterator[list[asyncpg.Record]]]:
    """Row batches (records in `FINDING_FIELDS` order) of one snapshot, as `open_export`."""
    return queries.open_snapshot(pool, findings_query(filters, None, order), batch_size)


async def findings_by_fingerprint(pool: asyncpg.Pool, fingerprints: Sequence[bytes]
                                  ) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT " + select_list(FINDING_FIELDS) + " FROM findings f "
                            "WHERE f.fingerprint = ANY($1::bytea[]) ORDER BY f.detected_at, f.id",
                            list(fingerprints))
    return [finding_body(r) for r in rows]


_SESSION_DETAIL = """
    SELECT u.id, u.asset, u.facilitator, u.valid_after, u.gateway_session_id, u.verified_at,
           u.verifications, u.created_at, u.usage::text AS usage, s.block_hash, s.confirmed_at
    FROM upto_sessions u LEFT JOIN settlements s ON s.id = u.settlement_id WHERE u.id = $1"""
# A finding concerns a session through its column, or (duplicates) through its evidence.
_SESSION_FINDINGS = ("SELECT " + select_list(FINDING_FIELDS) + " FROM findings f "
                     "WHERE f.session_id = $1 "
                     "OR f.evidence -> 'sessionIds' @> to_jsonb($1::bigint) "
                     "ORDER BY f.detected_at, f.id")


async def session_detail(pool: asyncpg.Pool, session_id: int, og_chain_id: int | None = None
                         ) -> dict[str, Any] | None:
    """One upto session: permit facts, payment, inferences with their on-chain records, and
    findings — all from one snapshot."""
    async with queries.snapshot(pool) as conn:
        extra = await conn.fetchrow(_SESSION_DETAIL, session_id)
        if extra is None:
            return None
        [session] = await load_sessions(conn, [session_id])
        rows = await conn.fetch(SESSION_ATTESTATIONS, session_id)
        attestations = await load_attestations(conn, rows, og_chain_id)
        found = await conn.fetch(_SESSION_FINDINGS, session_id)
    body = cc.session_evidence(session)
    body.update({
        "asset": _hex_bytes(extra["asset"]), "facilitator": _hex_bytes(extra["facilitator"]),
        "validAfter": str(extra["valid_after"]), "gatewaySessionId": extra["gateway_session_id"],
        "verifiedAt": cc.iso(extra["verified_at"]),
        "verifications": extra["verifications"],
        "createdAt": cc.iso(extra["created_at"]),
        "usage": None if extra["usage"] is None else orjson.Fragment(extra["usage"])})
    if session.payment is not None and body["payment"] is not None:
        body["payment"].update({
            "blockHash": _hex_bytes(extra["block_hash"]),
            "confirmedAt": cc.iso(extra["confirmed_at"]),
            "transfers": [cc.transfer_evidence(t) for t in session.payment.transfers]})
    verified = {r["id"]: r["verified_at"] for r in rows}
    body["inferences"] = [inference_body(a, verified[a.id]) for a in attestations]
    body["findings"] = [finding_body(r) for r in found]
    return body


async def attestations_by_input(pool: asyncpg.Pool, tee_id: bytes, input_hash: bytes,
                                og_chain_id: int | None = None) -> list[dict[str, Any]]:
    """Every attestation of that TEE and input hash, with verification, session link and
    on-chain records."""
    async with queries.snapshot(pool) as conn:
        rows = await conn.fetch(ATTESTATIONS_BY_INPUT, tee_id, input_hash)
        attestations = await load_attestations(conn, rows, og_chain_id)
        sessions = {s.id: s for s in await load_sessions(
            conn, sorted({a.session_id for a in attestations if a.session_id is not None}))}
    verified = {r["id"]: r["verified_at"] for r in rows}
    bodies = []
    for a in attestations:
        body = inference_body(a, verified[a.id])
        session = sessions.get(a.session_id) if a.session_id is not None else None
        body["session"] = None if session is None else cc.session_evidence(session)
        bodies.append(body)
    return bodies


def inference_body(a: cc.Attestation, verified_at: datetime | None) -> dict[str, Any]:
    body = cc.attestation_evidence(a)
    body.update({"payer": _hex_bytes(a.payer), "permitNonce": _hex_bytes(a.permit_nonce),
                 "verifiedAt": cc.iso(verified_at),
                 "records": cc.records_evidence(a)})
    return body


def _hex_bytes(value: Any) -> str | None:
    return None if value is None else "0x" + bytes(value).hex()

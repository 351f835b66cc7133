"""Auditors' endpoints over the attestation cross-check (bearer token, role `auditor` or
`operator`; the tokens are the ones `add_audit_routes` installed on the app).

Endpoints:
- `GET /v1/findings?kind&session&tee&from&to&linked&limit&cursor&order`
    -> `{"findings": [Finding, ...], "nextCursor": str | null}`, oldest first by default.
- `GET /v1/findings/export?format=csv|jsonl&kind&session&tee&from&to&linked&order`
    -> a chunked stream: CSV (header row; `evidence` as a JSON text cell) or JSON Lines.
- `GET /v1/sessions/{id}` (`upto_sessions.id`) -> the session's permit facts (`chainId`,
  `payer`, `nonce`, `asset`, `payTo`, `facilitator`, `cap`, `deadline`, `validAfter`,
  `gatewaySessionId`, ...), its `payment` (`settlementId`, `state`, `amount`, `transaction`,
  `blockNumber`, `blockHash`, `logIndex`, `blockTime`, `includedAt`, `confirmedAt`,
  `transfers`) or null, its `inferences` (attestations with `verification`, `verifiedAt`,
  `costOpg` and `records`: `batches` [{`chainId`, `transaction`, `blockNumber`, `logIndex`,
  `blockTime`, `merkleRoot`, `batchSize`, `blobId`, `dumpStatus`, `dumpCheckedAt`, `dumpRoot`,
  `dumpLeafCount`, `dumpError`, `leafIndex`, `proof`}] and
  `individual` [{`chainId`, `transaction`, `blockNumber`, `logIndex`, `blockTime`,
  `blobId`}]) and its `findings` (those naming it, including duplicates that list it);
  404 `{"error": "not_found"}` when there is no such session.
- `GET /v1/attestations/{tee_id}/{input_hash}` (each 0x + 64 hex) -> `{"teeId", "inputHash",
  "attestations": [inference + {"session": session summary | null}, ...]}`; 404 when none.

Finding = `{"id", "detectedAt", "kind", "linked", "sessionId", "attestationId", "teeId",
"payer", "fingerprint", "evidence"}` (evidence: the rule's JSON object, see
`facilitator.core.crosscheck`).

Parameters: `kind` one kind or a comma-separated list (the closed set of
`facilitator.core.crosscheck.KINDS`); `session` a positive integer; `tee` 0x + 64 hex;
`from` (inclusive) and `to` (exclusive) ISO-8601 date-times with a timezone, on `detectedAt`;
`linked` `true` or `false`; `limit`, `cursor`, `order` as in `facilitator.audit.queries`.

Guarantees: the same as `facilitator.audit.routes` — authentication and role first (401/403);
a bad parameter is a 400 `{"error": "invalid_request", "field", "message"}` naming it, before
any database work; keyset pages never repeat or skip a row (key `(detectedAt, id)`); an export
reads one snapshot through a server-side cursor in constant memory, ends only after its last
row (a failure midway aborts the connection), and shares the settlements exports' concurrency
limit (429 beyond it); responses carry `Cache-Control: no-store`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from facilitator.audit import findings_queries as store
from facilitator.audit import queries
from facilitator.audit.findings_queries import FINDING_FIELD_NAMES, FINDING_KEY, FindingFilters
from facilitator.audit.formats import CsvEncoder, JsonLinesEncoder
from facilitator.audit.queries import Page
from facilitator.audit.routes import AUDIT_KEY, AuditContext, no_store_json, stream_export
from facilitator.audit.tokens import READ_ROLES, require_role
from facilitator.core.crosscheck import KINDS
from facilitator.http.app import json_response
from facilitator.protocol.fields import BadRequest

FINDING_FILTERS = ("kind", "session", "tee", "from", "to", "linked")
_POSITIVE = re.compile(r"[1-9][0-9]{0,18}", re.ASCII)


@dataclass
class FindingsContext:
    og_chain_id: int | None
    audit: AuditContext  # the settlements API's: its pool and its limit on held connections

    @property
    def pool(self) -> asyncpg.Pool:
        return self.audit.pool


FINDINGS_KEY: web.AppKey[FindingsContext] = web.AppKey("findings", FindingsContext)


def add_findings_routes(app: web.Application, pool: asyncpg.Pool, *,
                        og_chain_id: int | None = None) -> None:
    """Register the cross-check endpoints. Call after `add_audit_routes`, which installs the
    tokens and the export limit these endpoints share (and must be given the same `pool`);
    `og_chain_id` limits on-chain records to the configured OpenGradient chain."""
    audit = app[AUDIT_KEY]
    if audit.pool is not pool:
        raise ValueError("add_findings_routes: use the pool given to add_audit_routes")
    app[FINDINGS_KEY] = FindingsContext(og_chain_id, audit)
    app.router.add_get("/v1/findings", list_findings)
    app.router.add_get("/v1/findings/export", export_findings, allow_head=False)
    app.router.add_get("/v1/sessions/{id}", session_detail)
    app.router.add_get("/v1/attestations/{tee_id}/{input_hash}", attestation_detail)


# -- parsing -------------------------------------------------------------------------------------

def parse_finding_list(params: Mapping[str, str]) -> tuple[FindingFilters, Page]:
    values = queries.single_values(params, FINDING_FILTERS + queries.PAGE_PARAMS)
    return _filters(values), queries.parse_page(values, "findings", FINDING_KEY)


def parse_finding_export(params: Mapping[str, str]) -> tuple[FindingFilters, str, str]:
    """(filters, order, format)."""
    return queries.parse_export_params(params, FINDING_FILTERS, _filters)


def parse_session_id(value: str, name: str = "id") -> int:
    if not _POSITIVE.fullmatch(value) or int(value) >= 2**63:
        raise BadRequest(name, "must be a session id (a positive integer)")
    return int(value)


def _filters(values: Mapping[str, str]) -> FindingFilters:
    filters = FindingFilters(
        kinds=queries.one_of_list(values["kind"], "kind", KINDS) if "kind" in values else (),
        session_id=parse_session_id(values["session"], "session") if "session" in values
        else None,
        tee_id=queries.hash32(values["tee"], "tee") if "tee" in values else None,
        since=queries.parse_timestamp(values["from"], "from") if "from" in values else None,
        until=queries.parse_timestamp(values["to"], "to") if "to" in values else None,
        linked=_boolean(values["linked"], "linked") if "linked" in values else None)
    queries.check_window(filters.since, filters.until)
    return filters


def _boolean(value: str, name: str) -> bool:
    if value not in ("true", "false"):
        raise BadRequest(name, "must be true or false")
    return value == "true"


# -- handlers ------------------------------------------------------------------------------------

def _context(request: web.Request) -> FindingsContext:
    return request.config_dict[FINDINGS_KEY]


@require_role(*READ_ROLES)
async def list_findings(request: web.Request) -> web.Response:
    filters, page = parse_finding_list(request.query)
    return no_store_json(await store.list_findings(_context(request).pool, filters, page))


@require_role(*READ_ROLES)
async def session_detail(request: web.Request) -> web.Response:
    queries.no_query(request.query)
    session_id = parse_session_id(request.match_info["id"])
    context = _context(request)
    found = await store.session_detail(context.pool, session_id, context.og_chain_id)
    if found is None:
        return json_response({"error": "not_found", "message": f"no session {session_id}"}, 404)
    return no_store_json(found)


@require_role(*READ_ROLES)
async def attestation_detail(request: web.Request) -> web.Response:
    queries.no_query(request.query)
    tee_id = queries.hash32(request.match_info["tee_id"], "tee_id")
    input_hash = queries.hash32(request.match_info["input_hash"], "input_hash")
    context = _context(request)
    found = await store.attestations_by_input(context.pool, tee_id, input_hash,
                                              context.og_chain_id)
    if not found:
        return json_response({"error": "not_found", "message": "no attestation of that TEE "
                              "and input hash"}, 404)
    return no_store_json({"teeId": "0x" + tee_id.hex(), "inputHash": "0x" + input_hash.hex(),
                          "attestations": found})


@require_role(*READ_ROLES)
async def export_findings(request: web.Request) -> web.StreamResponse:
    filters, order, fmt = parse_finding_export(request.query)
    encode = FindingsCsv() if fmt == "csv" else FindingsJsonLines()
    context = _context(request)
    batches = store.open_findings_export(context.pool, filters, order)
    return await stream_export(request, context.audit, batches, encode, fmt, "findings")


class FindingsCsv(CsvEncoder):
    """Settlement CSV conventions (RFC 4180, formula guard) with the findings' columns."""

    def header(self) -> bytes:
        return self._lines([FINDING_FIELD_NAMES])

    def encode(self, rows: Sequence[Any]) -> bytes:
        # JSON spelling of booleans, as in the JSON Lines and API bodies.
        return super().encode([{k: _json_bool(v) for k, v in row.items()} for row in rows])


class FindingsJsonLines(JsonLinesEncoder):
    def encode(self, rows: Sequence[Any]) -> bytes:
        return super().encode([store.finding_body(row) for row in rows])


def _json_bool(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value



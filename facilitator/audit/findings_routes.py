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
  `blockTime`, `merkleRoot`, `batchSize`, `blobId`, `dumpStatus`, `leafIndex`, `proof`}] and
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
from facilitator.audit.findings_queries import FINDING_FIELD_NAMES, FINDING_KEY, FindingFilters
from facilitator.audit import queries
from facilitator.audit.formats import CsvEncoder, JsonLinesEncoder
from facilitator.audit.queries import Page
from facilitator.audit.routes import (
    AUDIT_KEY,
    DEFAULT_MAX_CONCURRENT_EXPORTS,
    AuditContext,
    _ok,
    stream_export,
)
from facilitator.audit.tokens import READ_ROLES, require_role
from facilitator.core.crosscheck import KINDS
from facilitator.http.app import bad_request, json_response
from facilitator.protocol.fields import BadRequest, hex_bytes

FINDING_FILTERS = ("kind", "session", "tee", "from", "to", "linked")
_POSITIVE = re.compile(r"[1-9][0-9]{0,18}", re.ASCII)


@dataclass
class FindingsContext:
    pool: asyncpg.Pool
    og_chain_id: int | None
    exports: AuditContext  # shared with the settlements export: one limit on held connections


FINDINGS_KEY: web.AppKey[FindingsContext] = web.AppKey("findings", FindingsContext)


def add_findings_routes(app: web.Application, pool: asyncpg.Pool, *,
                        og_chain_id: int | None = None) -> None:
    """Register the cross-check endpoints. Call after `add_audit_routes` (which installs the
    tokens); `og_chain_id` limits on-chain records to the configured OpenGradient chain."""
    exports = app.get(AUDIT_KEY) or AuditContext(pool, DEFAULT_MAX_CONCURRENT_EXPORTS)
    app[FINDINGS_KEY] = FindingsContext(pool, og_chain_id, exports)
    app.router.add_get("/v1/findings", list_findings)
    app.router.add_get("/v1/findings/export", export_findings, allow_head=False)
    app.router.add_get("/v1/sessions/{id}", session_detail)
    app.router.add_get("/v1/attestations/{tee_id}/{input_hash}", attestation_detail)


# -- parsing -------------------------------------------------------------------------------------

def parse_finding_list(params: Mapping[str, str]) -> tuple[FindingFilters, Page]:
    values = queries._single_values(params, FINDING_FILTERS + queries.PAGE_PARAMS)  # noqa: SLF001
    return _filters(values), queries._page(values, "findings", FINDING_KEY)  # noqa: SLF001


def parse_finding_export(params: Mapping[str, str]) -> tuple[FindingFilters, str, str]:
    """(filters, order, format)."""
    values = queries._single_values(params, FINDING_FILTERS + ("order", "format"))  # noqa: SLF001
    fmt = queries._choice(values, "format", queries.EXPORT_FORMATS, None)  # noqa: SLF001
    order = queries._choice(values, "order", queries.ORDERS, "asc")  # noqa: SLF001
    return _filters(values), order, fmt


def parse_session_id(value: str, name: str = "id") -> int:
    if not _POSITIVE.fullmatch(value) or int(value) >= 2**63:
        raise BadRequest(name, "must be a session id (a positive integer)")
    return int(value)


def parse_hash(value: str, name: str) -> bytes:
    if not re.fullmatch(r"0x[0-9a-fA-F]{64}", value, re.ASCII):
        raise BadRequest(name, "must be 0x followed by 64 hex digits")
    return hex_bytes(value, name, length=32)


def _filters(values: Mapping[str, str]) -> FindingFilters:
    filters = FindingFilters(
        kinds=_kinds(values["kind"]) if "kind" in values else (),
        session_id=parse_session_id(values["session"], "session") if "session" in values
        else None,
        tee_id=parse_hash(values["tee"], "tee") if "tee" in values else None,
        since=queries._timestamp(values["from"], "from") if "from" in values else None,  # noqa
        until=queries._timestamp(values["to"], "to") if "to" in values else None,  # noqa
        linked=_boolean(values["linked"], "linked") if "linked" in values else None)
    if filters.since and filters.until and filters.until <= filters.since:
        raise BadRequest("to", "must be later than from")
    return filters


def _kinds(value: str) -> tuple[str, ...]:
    kinds = value.split(",")
    if any(k not in KINDS for k in kinds):
        raise BadRequest("kind", f"must be one or more of {', '.join(KINDS)}, comma-separated")
    return tuple(sorted(set(kinds)))


def _boolean(value: str, name: str) -> bool:
    if value not in ("true", "false"):
        raise BadRequest(name, "must be true or false")
    return value == "true"


def _no_query(request: web.Request) -> None:
    if request.query:
        raise BadRequest(next(iter(request.query))[:64], "is not a parameter of this endpoint")


# -- handlers ------------------------------------------------------------------------------------

def _context(request: web.Request) -> FindingsContext:
    return request.config_dict[FINDINGS_KEY]


@require_role(*READ_ROLES)
async def list_findings(request: web.Request) -> web.Response:
    try:
        filters, page = parse_finding_list(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    return _ok(await store.list_findings(_context(request).pool, filters, page))


@require_role(*READ_ROLES)
async def session_detail(request: web.Request) -> web.Response:
    try:
        _no_query(request)
        session_id = parse_session_id(request.match_info["id"])
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    context = _context(request)
    found = await store.session_detail(context.pool, session_id, context.og_chain_id)
    if found is None:
        return json_response({"error": "not_found", "message": f"no session {session_id}"}, 404)
    return _ok(found)


@require_role(*READ_ROLES)
async def attestation_detail(request: web.Request) -> web.Response:
    try:
        _no_query(request)
        tee_id = parse_hash(request.match_info["tee_id"], "tee_id")
        input_hash = parse_hash(request.match_info["input_hash"], "input_hash")
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    context = _context(request)
    found = await store.attestations_by_input(context.pool, tee_id, input_hash,
                                              context.og_chain_id)
    if not found:
        return json_response({"error": "not_found", "message": "no attestation of that TEE "
                              "and input hash"}, 404)
    return _ok({"teeId": "0x" + tee_id.hex(), "inputHash": "0x" + input_hash.hex(),
                "attestations": found})


@require_role(*READ_ROLES)
async def export_findings(request: web.Request) -> web.StreamResponse:
    try:
        filters, order, fmt = parse_finding_export(request.query)
    except BadRequest as exc:
        return bad_request(exc.field, exc.message)
    encode = FindingsCsv() if fmt == "csv" else FindingsJsonLines()
    batches = store.open_findings_export(_context(request).pool, filters, order)
    return await stream_export(request, _context(request).exports, batches, encode, fmt,
                               "findings")


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



"""Audit queries: strict parsing of filters and the parameterised SQL behind them.

The HTTP routes and the `facilitator audit` CLI both go through this module: one parser, one
set of statements.

Parameters (names as in the query string; the CLI maps `--pay-to` to `payTo` and so on):
- `payer`, `payTo`, `asset`: 0x addresses (lower-case, upper-case or valid EIP-55);
- `network`: the network as stored (`eip155:84532`, or a v1 name like `base-sepolia`), 1..64
  printable characters;
- `state`: one state or a comma-separated list (`included,confirmed`);
- `from` (inclusive), `to` (exclusive): ISO-8601 date-times *with* a timezone, e.g.
  `2025-01-31T00:00:00Z` or `2025-01-31T02:00:00%2B02:00` (a bare `+` in a URL means a space).
  Unix seconds are not accepted. They bound `created_at` (settlements) or `observed_at`
  (transfers);
- `tx`: 0x + 64 hex (the settlement's current transaction hash);
- `min_amount`, `max_amount`: canonical decimal integers (atomic units), inclusive;
- `limit`: 1..1000, default 100; `cursor`: the `nextCursor` of the previous page;
  `order`: `asc` (default, oldest first) or `desc`.
Unknown or repeated parameters are refused: a misspelt filter must not silently widen a query.

Guarantees:
- Every invalid parameter raises `BadRequest(field=<parameter>, message)`, never a database
  error; values that PostgreSQL would reject (NUL characters, out-of-range timestamps) are
  refused here.
- All SQL text is assembled from constants of this module (column expressions from fixed
  whitelists); every value is a `$n` parameter.
- Pages are keyset-paginated on a unique key in a fixed order (settlements: `(created_at, id)`;
  transfers: `(observed_at, chain_id, block_number, block_hash, log_index)`; totals:
  `(group, chain_id, asset)`). Following `nextCursor` never repeats a row and never skips a
  row that existed when the first page was read, whatever is inserted in between. Rows
  inserted meanwhile appear only if they sort after the cursor (with `order=asc`, new
  settlements appear at the end).
- An export reads one consistent snapshot (REPEATABLE READ, read-only) through a server-side
  cursor, `EXPORT_BATCH_ROWS` rows at a time: memory does not grow with the result.
- Output values are JSON-ready: addresses and hashes as lower-case 0x hex, amounts and uint256
  values as decimal strings, timestamps as ISO-8601 UTC with microseconds
  (`2025-01-31T12:00:00.000000Z`), integers as numbers, absent values as null.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from facilitator.core.settlement import State
from facilitator.protocol.fields import BadRequest, address, hex_bytes, uint256_decimal

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
EXPORT_BATCH_ROWS = 500  # rows per server-side cursor fetch (and per written chunk)
STATES = tuple(s.value for s in State)
SETTLED_STATES = ("confirmed", "included")  # the default of totals
ORDERS = ("asc", "desc")
GROUPS = ("pay_to", "payer", "day")
EXPORT_FORMATS = ("csv", "jsonl")

SETTLEMENT_FILTERS = ("payer", "payTo", "asset", "network", "state", "from", "to", "tx",
                      "min_amount", "max_amount")
TRANSFER_FILTERS = ("payer", "payTo", "asset", "from", "to", "tx", "min_amount", "max_amount")
PAGE_PARAMS = ("limit", "cursor", "order")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})", re.ASCII)
_TIMESTAMP_HELP = ("must be an ISO-8601 date-time with a timezone, e.g. 2025-01-31T00:00:00Z "
                   "(send '+' as %2B)")
_LIMIT = re.compile(r"[1-9][0-9]{0,3}", re.ASCII)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                   re.ASCII)
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,512}", re.ASCII)
_CURSOR_VERSION = 1
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


# -- parsed requests ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Filters:
    payer: bytes | None = None
    pay_to: bytes | None = None
    asset: bytes | None = None
    network: str | None = None
    states: tuple[str, ...] = ()
    since: datetime | None = None   # inclusive
    until: datetime | None = None   # exclusive
    tx: bytes | None = None
    min_amount: int | None = None
    max_amount: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    limit: int = DEFAULT_LIMIT
    order: str = "asc"
    after: tuple[Any, ...] | None = None  # the decoded cursor: key of the last row seen


@dataclass(frozen=True, slots=True)
class ExportRequest:
    filters: Filters
    order: str
    format: str


@dataclass(frozen=True, slots=True)
class TotalsRequest:
    filters: Filters
    group_by: str
    page: Page


def parse_settlement_list(params: Mapping[str, str]) -> tuple[Filters, Page]:
    values = _single_values(params, SETTLEMENT_FILTERS + PAGE_PARAMS)
    return _filters(values), _page(values, "settlements", _SETTLEMENT_KEY)


def parse_export(params: Mapping[str, str]) -> ExportRequest:
    values = _single_values(params, SETTLEMENT_FILTERS + ("order", "format"))
    fmt = _choice(values, "format", EXPORT_FORMATS, None)
    return ExportRequest(_filters(values), _choice(values, "order", ORDERS, "asc"), fmt)


def parse_totals(params: Mapping[str, str]) -> TotalsRequest:
    values = _single_values(params, SETTLEMENT_FILTERS + ("group_by", "limit", "cursor"))
    group_by = _choice(values, "group_by", GROUPS, None)
    filters = _filters(values)
    if not filters.states:  # totals count money that moved unless told otherwise
        filters = dataclasses.replace(filters, states=SETTLED_STATES)
    return TotalsRequest(filters, group_by, _page(values, "totals:" + group_by,
                                                  _TOTALS_KEYS[group_by]))


def parse_unmatched(params: Mapping[str, str]) -> tuple[Filters, Page]:
    values = _single_values(params, TRANSFER_FILTERS + PAGE_PARAMS)
    return _filters(values), _page(values, "unmatched", _TRANSFER_KEY)


def parse_public_id(value: str) -> uuid.UUID:
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise BadRequest("id", "must be a settlement id (a uuid like "
                               "0b7c1f1e-4a39-4f43-9a49-2f1c5d2b6a10)")
    return uuid.UUID(value)


def _single_values(params: Mapping[str, str], allowed: Sequence[str]) -> dict[str, str]:
    """Each parameter at most once and only known ones (a multidict yields every occurrence)."""
    values: dict[str, str] = {}
    for name, value in params.items():
        if name not in allowed:
            raise BadRequest(name[:64], "is not a parameter of this endpoint (accepted: "
                                        f"{', '.join(allowed)})")
        if name in values:
            raise BadRequest(name, "must be given at most once")
        values[name] = value
    return values


def _filters(values: Mapping[str, str]) -> Filters:
    def addr(name: str) -> bytes | None:
        return bytes.fromhex(address(values[name], name)[2:]) if name in values else None

    filters = Filters(
        payer=addr("payer"), pay_to=addr("payTo"), asset=addr("asset"),
        network=_network(values["network"]) if "network" in values else None,
        states=_states(values["state"]) if "state" in values else (),
        since=_timestamp(values["from"], "from") if "from" in values else None,
        until=_timestamp(values["to"], "to") if "to" in values else None,
        tx=hex_bytes(values["tx"], "tx", length=32) if "tx" in values else None,
        min_amount=_amount(values, "min_amount"), max_amount=_amount(values, "max_amount"))
    if filters.since and filters.until and filters.until <= filters.since:
        raise BadRequest("to", "must be later than from")
    if (filters.min_amount is not None and filters.max_amount is not None
            and filters.max_amount < filters.min_amount):
        raise BadRequest("max_amount", "must not be less than min_amount")
    return filters


def _network(value: str) -> str:
    # NUL and unpaired surrogates would make PostgreSQL (or the encoder) fail: refuse them here.
    if not 1 <= len(value) <= 64 or not value.isprintable() or not _encodable(value):
        raise BadRequest("network", "must be 1 to 64 printable characters")
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _states(value: str) -> tuple[str, ...]:
    states = value.split(",")
    if any(s not in STATES for s in states):
        raise BadRequest("state", f"must be one or more of {', '.join(STATES)}, comma-separated")
    return tuple(sorted(set(states)))


def _timestamp(value: str, name: str) -> datetime:
    if not _TIMESTAMP.fullmatch(value):
        raise BadRequest(name, _TIMESTAMP_HELP)
    try:
        # Normalised to UTC here: asyncpg does the same when encoding, and an out-of-range
        # result (year 1 at +05:00) must be a 400, not an OverflowError inside the driver.
        return datetime.fromisoformat(value).astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(name, _TIMESTAMP_HELP) from None


def _amount(values: Mapping[str, str], name: str) -> int | None:
    return uint256_decimal(values[name], name) if name in values else None


def _choice(values: Mapping[str, str], name: str, options: Sequence[str],
            default: str | None) -> str:
    value = values.get(name, default)
    if value is None:
        raise BadRequest(name, f"is required: one of {', '.join(options)}")
    if value not in options:
        raise BadRequest(name, f"must be one of {', '.join(options)}")
    return value


def _page(values: Mapping[str, str], kind: str, key: Sequence[str]) -> Page:
    limit = values.get("limit", str(DEFAULT_LIMIT))
    if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIMIT:
        raise BadRequest("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    order = _choice(values, "order", ORDERS, "asc") if "order" in values else None
    if "cursor" not in values:
        return Page(int(limit), order or "asc", None)
    cursor_order, after = decode_cursor(values["cursor"], kind, key)
    if order is not None and order != cursor_order:
        raise BadRequest("cursor", f"was issued for order={cursor_order}, not order={order}")
    return Page(int(limit), cursor_order, after)


# -- cursors -----------------------------------------------------------------------------------
# Opaque to clients: base64url of a JSON array [version, kind, order, *key]. Nothing in a cursor
# is trusted: it is decoded into typed values and only ever used as `$n` parameters.

def encode_cursor(kind: str, order: str, key: Sequence[int | str]) -> str:
    raw = orjson.dumps([_CURSOR_VERSION, kind, order, *key])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(value: str, kind: str, key: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    bad = BadRequest("cursor", "is not a cursor issued for this query; use nextCursor as given")
    if not _CURSOR.fullmatch(value):
        raise bad
    try:
        data = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, binascii.Error):
        raise bad from None
    if (not isinstance(data, list) or len(data) != 3 + len(key) or data[0] != _CURSOR_VERSION
            or data[1] != kind or data[2] not in ORDERS):
        raise bad
    try:
        return data[2], tuple(_KEY_DECODERS[t](v) for t, v in zip(key, data[3:]))
    except (TypeError, ValueError, OverflowError):
        raise bad from None


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def _from_micros(value: Any) -> datetime:
    return _EPOCH + _int(value) * _MICROSECOND


def _int(value: Any) -> int:
    if type(value) is not int or not -2**63 <= value < 2**63:
        raise TypeError("not a 64-bit integer")
    return value


def _hex_key(length: int) -> Any:
    def decode(value: Any) -> bytes:
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * length}}}", value):
            raise ValueError("not hex")
        return bytes.fromhex(value)
    return decode


def _day(value: Any) -> date:
    if not isinstance(value, str) or not _DAY.fullmatch(value):
        raise ValueError("not a day")
    return date.fromisoformat(value)


_KEY_DECODERS = {"us": _from_micros, "int": _int, "h20": _hex_key(20), "h32": _hex_key(32),
                 "day": _day}
_SETTLEMENT_KEY = ("us", "int")
_TRANSFER_KEY = ("us", "int", "int", "h32", "int")
_TOTALS_KEYS = {"pay_to": ("h20", "int", "h20"), "payer": ("h20", "int", "h20"),
                "day": ("day", "int", "h20")}


# -- SQL ---------------------------------------------------------------------------------------

def _ts(column: str) -> str:
    return "to_char(" + column + " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def _hex(column: str) -> str:
    return "'0x' || encode(" + column + ", 'hex')"  # NULL stays NULL


# (output name, SQL expression): the one shape of a settlement in lists, exports and the CLI.
SETTLEMENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "s.public_id::text"), ("createdAt", _ts("s.created_at")), ("state", "s.state"),
    ("scheme", "s.scheme"), ("x402Version", "s.x402_version"), ("network", "s.network"),
    ("chainId", "s.chain_id"), ("asset", _hex("s.asset")), ("payer", _hex("s.payer")),
    ("payTo", _hex("s.pay_to")), ("amount", "s.amount::text"), ("nonce", _hex("s.nonce")),
    ("validAfter", "s.valid_after::text"), ("validBefore", "s.valid_before::text"),
    ("signature", _hex("s.signature")), ("transaction", _hex("s.tx_hash")),
    ("blockNumber", "s.block_number"), ("blockHash", _hex("s.block_hash")),
    ("logIndex", "s.log_index"), ("settledBy", "s.settled_by"), ("signer", _hex("s.signer")),
    ("attempts", "s.attempts"), ("reason", "s.reason"), ("message", "s.message"),
    ("signedAt", _ts("s.signed_at")), ("broadcastAt", _ts("s.broadcast_at")),
    ("includedAt", _ts("s.included_at")), ("confirmedAt", _ts("s.confirmed_at")),
    ("failedAt", _ts("s.failed_at")), ("updatedAt", _ts("s.updated_at")))
SETTLEMENT_FIELD_NAMES = tuple(name for name, _ in SETTLEMENT_FIELDS)

TRANSFER_FIELDS: tuple[tuple[str, str], ...] = (
    ("chainId", "t.chain_id"), ("blockNumber", "t.block_number"),
    ("blockHash", _hex("t.block_hash")), ("transaction", _hex("t.tx_hash")),
    ("logIndex", "t.log_index"), ("asset", _hex("t.asset")), ("from", _hex("t.from_address")),
    ("to", _hex("t.to_address")), ("amount", "t.amount::text"),
    ("observedAt", _ts("t.observed_at")))

EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("at", _ts("e.at")), ("from", "e.from_state"), ("to", "e.to_state"), ("reason", "e.reason"),
    ("transaction", _hex("e.tx_hash")), ("blockNumber", "e.block_number"))


def _select(fields: Sequence[tuple[str, str]]) -> str:
    return ", ".join(expr + ' AS "' + name + '"' for name, expr in fields)


@dataclass(frozen=True, slots=True)
class _Columns:
    """Which column each filter constrains, per table (a fixed whitelist)."""
    payer: str
    pay_to: str
    asset: str
    time: str
    tx: str
    amount: str
    network: str | None = None
    state: str | None = None


_ON_SETTLEMENTS = _Columns(payer="s.payer", pay_to="s.pay_to", asset="s.asset",
                           time="s.created_at", tx="s.tx_hash", amount="s.amount",
                           network="s.network", state="s.state")
_ON_TRANSFERS = _Columns(payer="t.from_address", pay_to="t.to_address", asset="t.asset",
                         time="t.observed_at", tx="t.tx_hash", amount="t.amount")
_DIRECTION = {"asc": ("ASC", ">"), "desc": ("DESC", "<")}
_GROUP_EXPR = {"pay_to": ("s.pay_to", _hex("s.pay_to")), "payer": ("s.payer", _hex("s.payer")),
               "day": ("(s.created_at AT TIME ZONE 'UTC')::date",
                       "to_char((s.created_at AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD')")}


@dataclass
class Query:
    """SQL text built from this module's constants, and its `$n` arguments."""
    text: str = ""
    args: list[Any] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return "$" + str(len(self.args))

    def compare(self, column: str, op: str, value: Any) -> None:
        if value is not None:
            self.where.append(column + " " + op + " " + self.arg(value))

    def where_clause(self) -> str:
        return " WHERE " + " AND ".join(self.where) if self.where else ""


def _apply_filters(query: Query, filters: Filters, on: _Columns) -> None:
    query.compare(on.payer, "=", filters.payer)
    query.compare(on.pay_to, "=", filters.pay_to)
    query.compare(on.asset, "=", filters.asset)
    query.compare(on.tx, "=", filters.tx)
    query.compare(on.time, ">=", filters.since)
    query.compare(on.time, "<", filters.until)
    query.compare(on.amount, ">=", filters.min_amount)
    query.compare(on.amount, "<=", filters.max_amount)
    if on.network is not None:
        query.compare(on.network, "=", filters.network)
    if on.state is not None and filters.states:
        query.where.append(on.state + " = ANY(" + query.arg(list(filters.states)) + "::text[])")


def _after(query: Query, columns: str, page: Page, key: Sequence[Any]) -> None:
    """Keyset condition `(columns) > (key)` (or `<` descending): rows after the cursor."""
    placeholders = ", ".join(query.arg(v) for v in key)
    query.where.append("(" + columns + ") " + _DIRECTION[page.order][1] + " (" + placeholders + ")")


def settlements_query(filters: Filters, page: Page | None, order: str = "asc") -> Query:
    """A page of settlements (with hidden key columns `_at`, `_id`), or, without a page, the
    whole filtered set for an export."""
    query = Query()
    _apply_filters(query, filters, _ON_SETTLEMENTS)
    if page is not None:
        order = page.order
        if page.after is not None:
            _after(query, "s.created_at, s.id", page, page.after)
    direction = _DIRECTION[order][0]
    query.text = ("SELECT " + _select(SETTLEMENT_FIELDS)
                  + (", s.created_at AS _at, s.id AS _id" if page is not None else "")
                  + " FROM settlements s" + query.where_clause()
                  + " ORDER BY s.created_at " + direction + ", s.id " + direction)
    if page is not None:
        query.text += " LIMIT " + query.arg(page.limit + 1)  # one more: is there a next page?
    return query


def unmatched_query(filters: Filters, page: Page) -> Query:
    query = Query(where=["t.settlement_id IS NULL"])
    _apply_filters(query, filters, _ON_TRANSFERS)
    if page.after is not None:
        _after(query, "t.observed_at, t.chain_id, t.block_number, t.block_hash, t.log_index",
               page, page.after)
    direction = _DIRECTION[page.order][0]
    query.text = ("SELECT " + _select(TRANSFER_FIELDS) + ", t.observed_at AS _at, "
                  "t.chain_id AS _chain, t.block_number AS _number, t.block_hash AS _block, "
                  "t.log_index AS _log "
                  "FROM chain_transfers t" + query.where_clause()
                  + " ORDER BY t.observed_at " + direction + ", t.chain_id " + direction
                  + ", t.block_number " + direction + ", t.block_hash " + direction
                  + ", t.log_index " + direction
                  + " LIMIT " + query.arg(page.limit + 1))
    return query


def totals_query(request: TotalsRequest) -> Query:
    """Count and sum per (group, chain, asset): amounts of different tokens are never added."""
    group, label = _GROUP_EXPR[request.group_by]
    query = Query()
    _apply_filters(query, request.filters, _ON_SETTLEMENTS)
    if request.page.after is not None:
        _after(query, group + ", s.chain_id, s.asset", request.page, request.page.after)
    query.text = ("SELECT " + label + ' AS "key", s.chain_id AS "chainId", '
                  + _hex("s.asset") + ' AS "asset", count(*) AS "count", '
                  'sum(s.amount)::text AS "amount" FROM settlements s' + query.where_clause()
                  + " GROUP BY " + group + ", s.chain_id, s.asset"
                  + " ORDER BY " + group + ", s.chain_id, s.asset"
                  + " LIMIT " + query.arg(request.page.limit + 1))
    return query


_DETAIL = ("SELECT " + _select(SETTLEMENT_FIELDS) + ", s.id AS _id, "
           # GREATEST ignores NULLs: without a watcher head, confirmations must stay NULL.
           "CASE WHEN s.state IN ('included', 'confirmed') AND s.block_number IS NOT NULL "
           "AND c.head_number IS NOT NULL "
           "THEN GREATEST(c.head_number - s.block_number + 1, 0) END AS confirmations, "
           "c.network AS _watcher_network, c.head_number AS _watcher_head, "
           "c.chain_head AS _chain_head, c.halted_reason AS _halted_reason, "
           + _ts("c.halted_at") + " AS _halted_at "
           "FROM settlements s LEFT JOIN chain_cursors c ON c.chain_id = s.chain_id "
           "WHERE s.public_id = $1")
_TIMELINE = ("SELECT " + _select(EVENT_FIELDS) + " FROM settlement_events e "
             "WHERE e.settlement_id = $1 ORDER BY e.id")
_MATCHED_TRANSFERS = ("SELECT " + _select(TRANSFER_FIELDS) + " FROM chain_transfers t "
                      "WHERE t.settlement_id = $1 ORDER BY t.block_number, t.log_index")


# -- execution ---------------------------------------------------------------------------------

def _public(record: asyncpg.Record) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


async def list_settlements(pool: asyncpg.Pool, filters: Filters, page: Page) -> dict[str, Any]:
    """`{"settlements": [settlement, ...], "nextCursor": str | null}`."""
    query = settlements_query(filters, page)
    rows = await pool.fetch(query.text, *query.args)
    more, rows = len(rows) > page.limit, rows[:page.limit]
    cursor = None
    if more:
        cursor = encode_cursor("settlements", page.order,
                               (_micros(rows[-1]["_at"]), rows[-1]["_id"]))
    return {"settlements": [_public(r) for r in rows], "nextCursor": cursor}


async def list_unmatched(pool: asyncpg.Pool, filters: Filters, page: Page) -> dict[str, Any]:
    """`{"transfers": [transfer, ...], "nextCursor": str | null}`."""
    query = unmatched_query(filters, page)
    rows = await pool.fetch(query.text, *query.args)
    more, rows = len(rows) > page.limit, rows[:page.limit]
    cursor = None
    if more:
        last = rows[-1]
        cursor = encode_cursor("unmatched", page.order, (
            _micros(last["_at"]), last["_chain"], last["_number"], last["_block"].hex(),
            last["_log"]))
    return {"transfers": [_public(r) for r in rows], "nextCursor": cursor}


async def totals(pool: asyncpg.Pool, request: TotalsRequest) -> dict[str, Any]:
    """`{"groupBy", "states": [...], "groups": [{"key", "chainId", "asset", "count",
    "amount"}], "nextCursor"}`."""
    query = totals_query(request)
    rows = await pool.fetch(query.text, *query.args)
    page = request.page
    more, rows = len(rows) > page.limit, rows[:page.limit]
    cursor = None
    if more:
        last = rows[-1]
        key = last["key"] if request.group_by == "day" else last["key"][2:]
        cursor = encode_cursor("totals:" + request.group_by, "asc",
                               (key, last["chainId"], last["asset"][2:]))
    return {"groupBy": request.group_by, "states": list(request.filters.states),
            "groups": [dict(r) for r in rows], "nextCursor": cursor}


async def get_settlement(pool: asyncpg.Pool, public_id: uuid.UUID) -> dict[str, Any] | None:
    """One settlement with `confirmations`, `watcher`, `transfers` and `timeline`; all read in
    one snapshot, so the timeline agrees with the row's state."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        row = await conn.fetchrow(_DETAIL, public_id)
        if row is None:
            return None
        timeline = await conn.fetch(_TIMELINE, row["_id"])
        transfers = await conn.fetch(_MATCHED_TRANSFERS, row["_id"])
    body = _public(row)
    body["watcher"] = None if row["_watcher_head"] is None else {
        "network": row["_watcher_network"], "headNumber": row["_watcher_head"],
        "chainHead": row["_chain_head"], "haltedReason": row["_halted_reason"],
        "haltedAt": row["_halted_at"]}
    body["transfers"] = [dict(t) for t in transfers]
    body["timeline"] = [dict(e) for e in timeline]
    return body


@asynccontextmanager
async def open_export(pool: asyncpg.Pool, request: ExportRequest,
                      batch_size: int = EXPORT_BATCH_ROWS
                      ) -> AsyncIterator[AsyncIterator[list[asyncpg.Record]]]:
    """Yield an async iterator of row batches (records in `SETTLEMENT_FIELDS` order).

    The statement is declared before this yields, so a database failure surfaces before the
    caller has written anything; the snapshot is released when the block exits."""
    query = settlements_query(request.filters, None, request.order)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        cursor = await conn.cursor(query.text, *query.args)
        yield _batches(cursor, batch_size)


async def _batches(cursor: Any, size: int) -> AsyncIterator[list[asyncpg.Record]]:
    while rows := await cursor.fetch(size):
        yield rows

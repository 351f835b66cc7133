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
  cursor, `EXPORT_BATCH_ROWS` rows at a time: memory does not grow with the result. Waiting for
  a pooled connection for a snapshot is bounded by `ACQUIRE_TIMEOUT_S`.
- The helpers other audit modules build on (parameter parsing, keyset pages, snapshots, SQL
  column expressions) are the public functions of this module; the findings endpoints use the
  same ones, so both APIs parse, page and export alike.
- Output values are JSON-ready: addresses and hashes as lower-case 0x hex, amounts and uint256
  values as decimal strings, timestamps as ISO-8601 UTC with microseconds
  (`2025-01-31T12:00:00.000000Z`), integers as numbers, absent values as null.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from facilitator.core.settlement import State
from facilitator.protocol.fields import BadRequest, address, uint256_decimal

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
EXPORT_BATCH_ROWS = 500  # rows per server-side cursor fetch (and per written chunk)
ACQUIRE_TIMEOUT_S = 10.0  # waiting for a pooled connection for a snapshot read
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
_HASH32 = re.compile(r"0x[0-9a-fA-F]{64}", re.ASCII)
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
    values = single_values(params, SETTLEMENT_FILTERS + PAGE_PARAMS)
    return _filters(values), parse_page(values, "settlements", TIME_ID_KEY)


def parse_export(params: Mapping[str, str]) -> ExportRequest:
    filters, order, fmt = parse_export_params(params, SETTLEMENT_FILTERS, _filters)
    return ExportRequest(filters, order, fmt)


def parse_export_params(params: Mapping[str, str], filter_names: Sequence[str],
                        parse_filters: Callable[[Mapping[str, str]], Any]) -> tuple[Any, str, str]:
    """(filters, order, format) of an export endpoint whose filters `parse_filters` reads."""
    values = single_values(params, tuple(filter_names) + ("order", "format"))
    fmt = choice(values, "format", EXPORT_FORMATS, None)
    return parse_filters(values), choice(values, "order", ORDERS, "asc"), fmt


def parse_totals(params: Mapping[str, str]) -> TotalsRequest:
    values = single_values(params, SETTLEMENT_FILTERS + ("group_by", "limit", "cursor"))
    group_by = choice(values, "group_by", GROUPS, None)
    filters = _filters(values)
    if not filters.states:  # totals count money that moved unless told otherwise
        filters = dataclasses.replace(filters, states=SETTLED_STATES)
    return TotalsRequest(filters, group_by, parse_page(values, "totals:" + group_by,
                                                       _TOTALS_KEYS[group_by]))


def parse_unmatched(params: Mapping[str, str]) -> tuple[Filters, Page]:
    values = single_values(params, TRANSFER_FILTERS + PAGE_PARAMS)
    return _filters(values), parse_page(values, "unmatched", _TRANSFER_KEY)


def parse_public_id(value: str) -> uuid.UUID:
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise BadRequest("id", "must be a settlement id (a uuid like "
                               "0b7c1f1e-4a39-4f43-9a49-2f1c5d2b6a10)")
    return uuid.UUID(value)


def no_query(params: Mapping[str, str]) -> None:
    """For endpoints that take no query parameters: any one given is refused (named)."""
    if params:
        raise BadRequest(next(iter(params))[:64], "is not a parameter of this endpoint")


def single_values(params: Mapping[str, str], allowed: Sequence[str]) -> dict[str, str]:
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
        states=one_of_list(values["state"], "state", STATES) if "state" in values else (),
        since=parse_timestamp(values["from"], "from") if "from" in values else None,
        until=parse_timestamp(values["to"], "to") if "to" in values else None,
        tx=hash32(values["tx"], "tx") if "tx" in values else None,
        min_amount=_amount(values, "min_amount"), max_amount=_amount(values, "max_amount"))
    check_window(filters.since, filters.until)
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


def one_of_list(value: str, name: str, options: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of `options` (sorted, without repeats)."""
    items = value.split(",")
    if any(item not in options for item in items):
        raise BadRequest(name, f"must be one or more of {', '.join(options)}, comma-separated")
    return tuple(sorted(set(items)))


def hash32(value: str, name: str) -> bytes:
    """0x + 64 hex digits (a transaction hash, a tee id, an input hash)."""
    if not isinstance(value, str) or not _HASH32.fullmatch(value):
        raise BadRequest(name, "must be 0x followed by 64 hex digits")
    return bytes.fromhex(value[2:])


def check_window(since: datetime | None, until: datetime | None) -> None:
    if since and until and until <= since:
        raise BadRequest("to", "must be later than from")


def parse_timestamp(value: str, name: str) -> datetime:
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


def choice(values: Mapping[str, str], name: str, options: Sequence[str],
           default: str | None) -> str:
    value = values.get(name, default)
    if value is None:
        raise BadRequest(name, f"is required: one of {', '.join(options)}")
    if value not in options:
        raise BadRequest(name, f"must be one of {', '.join(options)}")
    return value


def parse_page(values: Mapping[str, str], kind: str, key: Sequence[str]) -> Page:
    """`limit`, `cursor` and `order` of a keyset-paginated list; `kind` and the key types of
    `key` bind a cursor to the query that issued it."""
    limit = values.get("limit", str(DEFAULT_LIMIT))
    if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIMIT:
        raise BadRequest("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    order = choice(values, "order", ORDERS, "asc") if "order" in values else None
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


def micros(value: datetime) -> int:
    """A timestamp as integer microseconds since the epoch (its cursor form)."""
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
TIME_ID_KEY = ("us", "int")  # cursor of a (timestamp, id) keyset: settlements, findings
_TRANSFER_KEY = ("us", "int", "int", "h32", "int")
_TOTALS_KEYS = {"pay_to": ("h20", "int", "h20"), "payer": ("h20", "int", "h20"),
                "day": ("day", "int", "h20")}


# -- SQL ---------------------------------------------------------------------------------------

def iso_column(column: str) -> str:
    """SQL: a timestamptz column as ISO-8601 UTC text with microseconds."""
    return "to_char(" + column + " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def hex_column(column: str) -> str:
    """SQL: a bytea column as 0x hex text."""
    return "'0x' || encode(" + column + ", 'hex')"  # NULL stays NULL


# (output name, SQL expression): the one shape of a settlement in lists, exports and the CLI.
SETTLEMENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "s.public_id::text"), ("createdAt", iso_column("s.created_at")), ("state", "s.state"),
    ("scheme", "s.scheme"), ("x402Version", "s.x402_version"), ("network", "s.network"),
    ("chainId", "s.chain_id"), ("asset", hex_column("s.asset")), ("payer", hex_column("s.payer")),
    ("payTo", hex_column("s.pay_to")), ("amount", "s.amount::text"),
    ("nonce", hex_column("s.nonce")),
    ("validAfter", "s.valid_after::text"), ("validBefore", "s.valid_before::text"),
    ("signature", hex_column("s.signature")), ("transaction", hex_column("s.tx_hash")),
    ("blockNumber", "s.block_number"), ("blockHash", hex_column("s.block_hash")),
    ("logIndex", "s.log_index"), ("settledBy", "s.settled_by"), ("signer", hex_column("s.signer")),
    ("attempts", "s.attempts"), ("reason", "s.reason"), ("message", "s.message"),
    ("signedAt", iso_column("s.signed_at")), ("broadcastAt", iso_column("s.broadcast_at")),
    ("includedAt", iso_column("s.included_at")), ("confirmedAt", iso_column("s.confirmed_at")),
    ("failedAt", iso_column("s.failed_at")), ("updatedAt", iso_column("s.updated_at")))
SETTLEMENT_FIELD_NAMES = tuple(name for name, _ in SETTLEMENT_FIELDS)

TRANSFER_FIELDS: tuple[tuple[str, str], ...] = (
    ("chainId", "t.chain_id"), ("blockNumber", "t.block_number"),
    ("blockHash", hex_column("t.block_hash")), ("transaction", hex_column("t.tx_hash")),
    ("logIndex", "t.log_index"), ("asset", hex_column("t.asset")),
    ("from", hex_column("t.from_address")),
    ("to", hex_column("t.to_address")), ("amount", "t.amount::text"),
    ("observedAt", iso_column("t.observed_at")))

EVENT_FIELDS: tuple[tuple[str, str], ...] = (
    ("at", iso_column("e.at")), ("from", "e.from_state"), ("to", "e.to_state"),
    ("reason", "e.reason"),
    ("transaction", hex_column("e.tx_hash")), ("blockNumber", "e.block_number"))


def select_list(fields: Sequence[tuple[str, str]]) -> str:
    """SQL: `expression AS "name"` for each (name, expression)."""
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
_GROUP_EXPR = {"pay_to": ("s.pay_to", hex_column("s.pay_to")),
               "payer": ("s.payer", hex_column("s.payer")),
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


def keyset_after(query: Query, columns: str, page: Page, key: Sequence[Any]) -> None:
    """Keyset condition `(columns) > (key)` (or `<` descending): rows after the cursor."""
    placeholders = ", ".join(query.arg(v) for v in key)
    query.where.append("(" + columns + ") " + _DIRECTION[page.order][1] + " (" + placeholders + ")")


def time_id_query(query: Query, fields: Sequence[tuple[str, str]], source: str, time: str,
                  id_: str, page: Page | None, order: str = "asc") -> Query:
    """Finish `query` (its filters already in `where`) over `source` in (`time`, `id_`) order:
    a page, with hidden key columns `_at`, `_id` and one row more than the limit (is there a
    next page?); or, without a page, every matching row (an export)."""
    if page is not None:
        order = page.order
        if page.after is not None:
            keyset_after(query, time + ", " + id_, page, page.after)
    direction = _DIRECTION[order][0]
    query.text = ("SELECT " + select_list(fields)
                  + (", " + time + " AS _at, " + id_ + " AS _id" if page is not None else "")
                  + " FROM " + source + query.where_clause()
                  + " ORDER BY " + time + " " + direction + ", " + id_ + " " + direction)
    if page is not None:
        query.text += " LIMIT " + query.arg(page.limit + 1)
    return query


def time_id_key(row: asyncpg.Record) -> tuple[int, int]:
    """The cursor key of a row of `time_id_query`."""
    return micros(row["_at"]), row["_id"]


def settlements_query(filters: Filters, page: Page | None, order: str = "asc") -> Query:
    """A page of settlements (with hidden key columns `_at`, `_id`), or, without a page, the
    whole filtered set for an export."""
    query = Query()
    _apply_filters(query, filters, _ON_SETTLEMENTS)
    return time_id_query(query, SETTLEMENT_FIELDS, "settlements s", "s.created_at", "s.id", page,
                         order)


def unmatched_query(filters: Filters, page: Page) -> Query:
    query = Query(where=["t.settlement_id IS NULL"])
    _apply_filters(query, filters, _ON_TRANSFERS)
    if page.after is not None:
        keyset_after(query, "t.observed_at, t.chain_id, t.block_number, t.block_hash, t.log_index",
               page, page.after)
    direction = _DIRECTION[page.order][0]
    query.text = ("SELECT " + select_list(TRANSFER_FIELDS) + ", t.observed_at AS _at, "
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
        keyset_after(query, group + ", s.chain_id, s.asset", request.page, request.page.after)
    query.text = ("SELECT " + label + ' AS "key", s.chain_id AS "chainId", '
                  + hex_column("s.asset") + ' AS "asset", count(*) AS "count", '
                  'sum(s.amount)::text AS "amount" FROM settlements s' + query.where_clause()
                  + " GROUP BY " + group + ", s.chain_id, s.asset"
                  + " ORDER BY " + group + ", s.chain_id, s.asset"
                  + " LIMIT " + query.arg(request.page.limit + 1))
    return query


_DETAIL = ("SELECT " + select_list(SETTLEMENT_FIELDS) + ", s.id AS _id, "
           "c.network AS _watcher_network, c.head_number AS _watcher_head, "
           "c.chain_head AS _chain_head, c.halted_reason AS _halted_reason, "
           + iso_column("c.halted_at") + " AS _halted_at "
           "FROM settlements s LEFT JOIN chain_cursors c ON c.chain_id = s.chain_id "
           "WHERE s.public_id = $1")
_WATCHER_HEAD = "SELECT head_number FROM chain_cursors WHERE chain_id = $1"
_TIMELINE = ("SELECT " + select_list(EVENT_FIELDS) + " FROM settlement_events e "
             "WHERE e.settlement_id = $1 ORDER BY e.id")
_MATCHED_TRANSFERS = ("SELECT " + select_list(TRANSFER_FIELDS) + " FROM chain_transfers t "
                      "WHERE t.settlement_id = $1 ORDER BY t.block_number, t.log_index")


# -- execution ---------------------------------------------------------------------------------

def _public(record: asyncpg.Record) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


async def keyset_page(pool: asyncpg.Pool, query: Query, page: Page, kind: str,
                      key_of: Callable[[asyncpg.Record], Sequence[Any]]
                      ) -> tuple[list[asyncpg.Record], str | None]:
    """Run a page query (built with `page.limit + 1` rows): the page's rows, and the cursor of
    the next page (None on the last one), whose key `key_of` takes from the last row."""
    rows = await pool.fetch(query.text, *query.args)
    more, rows = len(rows) > page.limit, rows[:page.limit]
    return rows, encode_cursor(kind, page.order, key_of(rows[-1])) if more else None


async def list_settlements(pool: asyncpg.Pool, filters: Filters, page: Page) -> dict[str, Any]:
    """`{"settlements": [settlement, ...], "nextCursor": str | null}`."""
    rows, cursor = await keyset_page(pool, settlements_query(filters, page), page, "settlements",
                                     time_id_key)
    return {"settlements": [_public(r) for r in rows], "nextCursor": cursor}


def _transfer_key(row: asyncpg.Record) -> tuple[Any, ...]:
    return micros(row["_at"]), row["_chain"], row["_number"], row["_block"].hex(), row["_log"]


async def list_unmatched(pool: asyncpg.Pool, filters: Filters, page: Page) -> dict[str, Any]:
    """`{"transfers": [transfer, ...], "nextCursor": str | null}`."""
    rows, cursor = await keyset_page(pool, unmatched_query(filters, page), page, "unmatched",
                                     _transfer_key)
    return {"transfers": [_public(r) for r in rows], "nextCursor": cursor}


async def totals(pool: asyncpg.Pool, request: TotalsRequest) -> dict[str, Any]:
    """`{"groupBy", "states": [...], "groups": [{"key", "chainId", "asset", "count",
    "amount"}], "nextCursor"}`."""
    def key_of(last: asyncpg.Record) -> tuple[Any, ...]:
        key = last["key"] if request.group_by == "day" else last["key"][2:]
        return key, last["chainId"], last["asset"][2:]

    rows, cursor = await keyset_page(pool, totals_query(request), request.page,
                                     "totals:" + request.group_by, key_of)
    return {"groupBy": request.group_by, "states": list(request.filters.states),
            "groups": [dict(r) for r in rows], "nextCursor": cursor}


@asynccontextmanager
async def snapshot(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a read-only REPEATABLE READ transaction (one consistent view); waiting
    for the connection is bounded by `ACQUIRE_TIMEOUT_S`."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction(
            isolation="repeatable_read", readonly=True):
        yield conn


async def watcher_head(pool: asyncpg.Pool, chain_id: int) -> int | None:
    """The highest block the chain watcher has processed on `chain_id` (None before it ran):
    the head every `confirmations` of this API and of `GET /settle/{id}` counts from."""
    return await pool.fetchval(_WATCHER_HEAD, chain_id)


def confirmations(state: str, block_number: int | None, head: int | None) -> int | None:
    """head - block + 1 (>= 0) for an included or confirmed settlement, else None; the same
    rule as the `confirmations` column of `GET /v1/settlements/{id}`."""
    if head is None or block_number is None or state not in ("included", "confirmed"):
        return None
    return max(head - block_number + 1, 0)


async def get_settlement(pool: asyncpg.Pool, public_id: uuid.UUID) -> dict[str, Any] | None:
    """One settlement with `confirmations`, `watcher`, `transfers` and `timeline`; all read in
    one snapshot, so the timeline agrees with the row's state."""
    async with snapshot(pool) as conn:
        row = await conn.fetchrow(_DETAIL, public_id)
        if row is None:
            return None
        timeline = await conn.fetch(_TIMELINE, row["_id"])
        transfers = await conn.fetch(_MATCHED_TRANSFERS, row["_id"])
    body = _public(row)
    body["confirmations"] = confirmations(row["state"], row["blockNumber"], row["_watcher_head"])
    body["watcher"] = None if row["_watcher_head"] is None else {
        "network": row["_watcher_network"], "headNumber": row["_watcher_head"],
        "chainHead": row["_chain_head"], "haltedReason": row["_halted_reason"],
        "haltedAt": row["_halted_at"]}
    body["transfers"] = [dict(t) for t in transfers]
    body["timeline"] = [dict(e) for e in timeline]
    return body


def open_export(pool: asyncpg.Pool, request: ExportRequest, batch_size: int = EXPORT_BATCH_ROWS
                ) -> AbstractAsyncContextManager[AsyncIterator[list[asyncpg.Record]]]:
    """Row batches (records in `SETTLEMENT_FIELDS` order) of one snapshot (`open_snapshot`)."""
    return open_snapshot(pool, settlements_query(request.filters, None, request.order),
                         batch_size)


@asynccontextmanager
async def open_snapshot(pool: asyncpg.Pool, query: Query, batch_size: int = EXPORT_BATCH_ROWS
                        ) -> AsyncIterator[AsyncIterator[list[asyncpg.Record]]]:
    """Yield an async iterator of `query`'s rows in batches, read through a server-side cursor
    in one read-only snapshot.

    The statement is declared before this yields, so a database failure surfaces before the
    caller has written anything; the snapshot is released when the block exits."""
    async with snapshot(pool) as conn:
        cursor = await conn.cursor(query.text, *query.args)
        yield _batches(cursor, batch_size)


async def _batches(cursor: Any, size: int) -> AsyncIterator[list[asyncpg.Record]]:
    while rows := await cursor.fetch(size):
        yield rows

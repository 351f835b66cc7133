"""The read-only audit API (/v1/) on a real PostgreSQL database: bearer tokens and roles,
every filter, strict validation, keyset pagination under concurrent inserts, the detail
endpoint's timeline and confirmations, totals, unmatched transfers, and CSV / JSON Lines
exports of 100,000 rows streamed in bounded memory.

Rows are seeded with SQL through the schema's real constraints and transition trigger (insert
as pending, then legal UPDATEs), and one test reads a settlement made by a running facilitator
on anvil. The app under test carries the production middleware (`request_context`).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import secrets
import time
import tracemalloc
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from audit_http import AUDITOR, AUDITOR_TOKEN, OPERATOR, OPERATOR_TOKEN, get_json, sha256_hex
from bulk import bulk_settlements, stream_export
from eth_account import Account
from harness import pay

from facilitator.adapters.metrics import Metrics
from facilitator.audit.queries import SETTLEMENT_FIELD_NAMES, Filters, settlements_query
from facilitator.audit.routes import add_audit_routes
from facilitator.audit.tokens import ApiToken, parse_api_tokens, require_role
from facilitator.http.app import METRICS_KEY, request_context
from facilitator.protocol.fields import to_checksum

BASE = datetime(2025, 3, 1, 0, 0, tzinfo=UTC)
CHAIN_ID = 84532
PAYERS = ["0x" + f"{n:040x}" for n in (0xA1, 0xA2, 0xA3)]
PAY_TOS = ["0x" + "b1" * 20, "0x" + "b2" * 20]
ASSETS = ["0x" + "c1" * 20, "0x" + "c2" * 20]
NETWORKS = ["eip155:84532", "base-sepolia"]
STATE_CYCLE = ["pending", "signed", "broadcast", "included", "confirmed", "failed", "expired"]
PATHS = {"pending": [], "signed": ["signed"], "broadcast": ["signed", "broadcast"],
         "included": ["signed", "broadcast", "included"],
         "confirmed": ["signed", "broadcast", "included", "confirmed"],
         "failed": ["failed"], "expired": ["expired"]}


def token_config() -> tuple[ApiToken, ...]:
    return parse_api_tokens(f"auditor:{sha256_hex(AUDITOR_TOKEN)}, "
                            f"operator:{sha256_hex(OPERATOR_TOKEN).upper()}")


# -- seeding -----------------------------------------------------------------------------------

@dataclass
class Row:
    id: int
    public_id: str
    index: int
    payer: str
    pay_to: str
    asset: str
    network: str
    state: str
    amount: int
    created_at: datetime
    tx: str | None
    block_number: int | None


_INSERT = """
    INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer, pay_to,
        amount, nonce, valid_after, valid_before, signature, fingerprint, call_to, calldata,
        state, created_at)
    VALUES ('exact', 2, $1, $2, $3, $4, $5, $6, $7, 0, 4102444800, $8, $9, $3, '\\x'::bytea,
            'pending', COALESCE($10, clock_timestamp()))
    RETURNING id, public_id::text, created_at"""
_STEP = {
    "signed": """UPDATE settlements SET state = 'signed', raw_tx = '\\x02'::bytea, tx_hash = $2,
                 signer = $3, signer_nonce = $1, signed_at = clock_timestamp() WHERE id = $1""",
    "broadcast": """UPDATE settlements SET state = 'broadcast', broadcast_at = clock_timestamp()
                    WHERE id = $1""",
    "included": """UPDATE settlements SET state = 'included', block_number = $2, block_hash = $3,
                   log_index = $4, settled_by = 'facilitator', included_at = clock_timestamp()
                   WHERE id = $1""",
    "confirmed": """UPDATE settlements SET state = 'confirmed', confirmed_at = clock_timestamp()
                    WHERE id = $1""",
    "failed": """UPDATE settlements SET state = 'failed', reason = 'insufficient_funds',
                 message = $2, failed_at = clock_timestamp() WHERE id = $1""",
    "expired": """UPDATE settlements SET state = 'expired', reason = 'expired',
                  failed_at = clock_timestamp() WHERE id = $1""",
}


def tx_of(index: int) -> str:
    return "0x" + sha256_hex(f"tx-{index}")


async def insert_settlement(conn: asyncpg.Connection, *, index: int, payer: str, pay_to: str,
                            asset: str = ASSETS[0], network: str = NETWORKS[0],
                            state: str = "confirmed", amount: int = 1_000,
                            created_at: datetime | None = None, chain_id: int = CHAIN_ID,
                            block_number: int | None = None, message: str = "no funds",
                            log_index: int = 0) -> Row:
    """One settlement driven from pending to `state` through legal transitions."""
    nonce = hashlib.sha256(f"nonce-{index}-{secrets.token_hex(4)}".encode()).digest()
    rec = await conn.fetchrow(_INSERT, network, chain_id, bytes.fromhex(asset[2:]),
                              bytes.fromhex(payer[2:]), bytes.fromhex(pay_to[2:]), amount, nonce,
                              b"\x1b" * 65, hashlib.sha256(nonce).digest(), created_at)
    tx = tx_of(index) if "signed" in PATHS[state] else None
    block = block_number if block_number is not None else 1_000 + index
    for step in PATHS[state]:
        args: tuple[Any, ...] = {
            "signed": (bytes.fromhex(tx[2:]) if tx else b"", b"\x5e" * 20),
            "included": (block, hashlib.sha256(f"block-{block}".encode()).digest(), log_index),
            "failed": (message,)}.get(step, ())
        await conn.execute(_STEP[step], rec["id"], *args)
    return Row(rec["id"], rec["public_id"], index, payer, pay_to, asset, network, state, amount,
               rec["created_at"], tx, block if state in ("included", "confirmed") else None)


async def seed_dataset(pool: asyncpg.Pool) -> list[Row]:
    """28 settlements over two UTC days, every state, three payers, two payees, two assets and
    two network spellings, with distinct amounts; sorted by (created_at, id)."""
    rows = []
    async with pool.acquire() as conn:
        for i in range(28):
            rows.append(await insert_settlement(
                conn, index=i, payer=PAYERS[i % 3], pay_to=PAY_TOS[i % 2],
                asset=ASSETS[(i // 2) % 2], network=NETWORKS[(i // 4) % 2],
                state=STATE_CYCLE[i % 7], amount=1_000 * (i + 1) + 7,
                created_at=BASE + timedelta(hours=2 * i)))
    return rows


async def seed_bulk(pool: asyncpg.Pool, count: int, *, start: datetime = BASE,
                    step: timedelta = timedelta(milliseconds=1), ties: int = 1) -> None:
    await bulk_settlements(pool, count, asset=ASSETS[0], pay_to=PAY_TOS[0], start=start,
                           step=step, ties=ties)


# -- fixtures ----------------------------------------------------------------------------------

@require_role("operator")
async def operator_only(request: web.Request) -> web.Response:
    return web.json_response({"done": True})


@pytest.fixture
async def client(pool: asyncpg.Pool) -> AsyncIterator[TestClient]:
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    add_audit_routes(app, pool, token_config())
    app.router.add_post("/v1/ops/test", operator_only)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client_:
        yield client_


@pytest.fixture
async def dataset(pool: asyncpg.Pool) -> list[Row]:
    return await seed_dataset(pool)


async def all_pages(client: TestClient, path: str, key: str, params: dict[str, str],
                    between: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await get_json(client, path, {**params, **({"cursor": cursor} if cursor else {})})
        items += page[key]
        cursor = page["nextCursor"]
        if cursor is None:
            return items
        if between is not None:
            await between()


# -- tokens and roles ----------------------------------------------------------------------------

def test_token_configuration_is_parsed_strictly() -> None:
    tokens = token_config()
    assert [t.role for t in tokens] == ["auditor", "operator"]
    assert parse_api_tokens("") == () and parse_api_tokens("  ") == ()
    raw_token = "s3cr3t-" + secrets.token_hex(8)
    for value, fragment in [
            (f"auditor:{'ab' * 32},{raw_token}", "entry #2 must be role:sha256hex"),
            (f"admin:{'ab' * 32}", "entry #1: role must be one of auditor, operator"),
            (f"auditor:{raw_token}", "entry #1: expected the SHA-256"),
            (f"auditor:{'ab' * 32},,operator:{'cd' * 32}", "entry #2"),
            (f"auditor:{'ab' * 32},operator:{'AB' * 32}", "entry #2 repeats")]:
        with pytest.raises(ValueError) as caught:
            parse_api_tokens(value)
        assert fragment in str(caught.value)
        assert raw_token not in str(caught.value)  # a pasted raw token is never echoed
    assert "ab" * 32 not in repr(tokens[0]) and "digest" not in repr(tokens[0])
    with pytest.raises(ValueError):
        require_role("admin")


ENDPOINTS = ["/v1/settlements", "/v1/settlements/totals?group_by=payer",
             "/v1/settlements/export?format=csv", f"/v1/settlements/{uuid.uuid4()}",
             "/v1/transfers/unmatched"]


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_every_endpoint_needs_a_valid_bearer_token(client: TestClient, path: str) -> None:
    cases = [({}, 'Bearer realm="facilitator"'),
             ({"Authorization": "Bearer wrong-" + AUDITOR_TOKEN}, "invalid_token"),
             ({"Authorization": AUDITOR_TOKEN}, "invalid_token"),           # no scheme
             ({"Authorization": f"Basic {AUDITOR_TOKEN}"}, "invalid_token"),
             ({"Authorization": f"Bearer {AUDITOR_TOKEN} extra"}, "invalid_token"),
             ({"Authorization": "Bearer " + "x" * 600}, "invalid_token")]
    for headers, challenge in cases:
        response = await client.get(path, headers=headers)
        assert response.status == 401, (headers, await response.text())
        assert (await response.json())["error"] == "unauthorized"
        assert challenge in response.headers["WWW-Authenticate"]
    # A token in the URL is refused even when the header is valid too: it must be revoked.
    sep = "&" if "?" in path else "?"
    for url_token in (f"access_token={AUDITOR_TOKEN}", f"token={AUDITOR_TOKEN}"):
        for headers in ({}, AUDITOR):
            response = await client.get(path + sep + url_token, headers=headers)
            assert response.status == 401, await response.text()
            body = await response.text()
            assert AUDITOR_TOKEN not in body
    # The scheme name is case-insensitive (RFC 7235); both roles may read.
    for headers in ({"Authorization": f"bearer {AUDITOR_TOKEN}"}, OPERATOR):
        response = await client.get(path, headers=headers)
        assert response.status in (200, 404), await response.text()


async def test_operator_only_endpoints_refuse_auditors(client: TestClient) -> None:
    response = await client.post("/v1/ops/test", headers=AUDITOR)
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"
    assert "insufficient_scope" in response.headers["WWW-Authenticate"]
    assert (await client.post("/v1/ops/test")).status == 401
    response = await client.post("/v1/ops/test", headers=OPERATOR)
    assert response.status == 200 and await response.json() == {"done": True}


async def test_no_configured_tokens_means_closed(pool: asyncpg.Pool) -> None:
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    add_audit_routes(app, pool, ())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client_:
        assert (await client_.get("/v1/settlements", headers=AUDITOR)).status == 401


# -- filters -------------------------------------------------------------------------------------

def _at(hours: int) -> str:
    return (BASE + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


FILTER_CASES: list[tuple[str, dict[str, str], Callable[[Row], bool]]] = [
    ("payer (EIP-55)", {"payer": to_checksum(PAYERS[1])}, lambda r: r.payer == PAYERS[1]),
    ("payTo (upper-case)", {"payTo": "0x" + PAY_TOS[0][2:].upper()},
     lambda r: r.pay_to == PAY_TOS[0]),
    ("asset", {"asset": ASSETS[1]}, lambda r: r.asset == ASSETS[1]),
    ("network", {"network": "base-sepolia"}, lambda r: r.network == "base-sepolia"),
    ("state", {"state": "confirmed"}, lambda r: r.state == "confirmed"),
    ("states", {"state": "included,confirmed"}, lambda r: r.state in ("included", "confirmed")),
    ("from", {"from": _at(20)}, lambda r: r.created_at >= BASE + timedelta(hours=20)),
    ("to", {"to": _at(20)}, lambda r: r.created_at < BASE + timedelta(hours=20)),
    ("from+to with offset", {"from": (BASE + timedelta(hours=12)).astimezone(
        timezone(timedelta(hours=2))).isoformat(), "to": _at(30)},
     lambda r: BASE + timedelta(hours=12) <= r.created_at < BASE + timedelta(hours=30)),
    ("tx", {"tx": tx_of(10)}, lambda r: r.tx == tx_of(10)),
    ("min_amount", {"min_amount": "15007"}, lambda r: r.amount >= 15_007),
    ("max_amount", {"max_amount": "15007"}, lambda r: r.amount <= 15_007),
    ("amount range", {"min_amount": "5000", "max_amount": "9999"},
     lambda r: 5_000 <= r.amount <= 9_999),
    ("combined", {"payer": PAYERS[0], "state": "confirmed,included,failed",
                  "from": _at(4), "max_amount": "25000"},
     lambda r: (r.payer == PAYERS[0] and r.state in ("confirmed", "included", "failed")
                and r.created_at >= BASE + timedelta(hours=4) and r.amount <= 25_000)),
    ("combined, nothing matches", {"payTo": PAY_TOS[1], "tx": tx_of(10)}, lambda r: False),
]


@pytest.mark.parametrize(("name", "params", "keep"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
async def test_each_filter_alone_and_combined(client: TestClient, dataset: list[Row], name: str,
                                              params: dict[str, str],
                                              keep: Callable[[Row], bool]) -> None:
    expected = [r.public_id for r in dataset if keep(r)]
    assert name.startswith("combined, nothing") or expected  # the case exercises something
    page = await get_json(client, "/v1/settlements", {**params, "limit": "1000"})
    assert [s["id"] for s in page["settlements"]] == expected
    assert page["nextCursor"] is None
    descending = await get_json(client, "/v1/settlements", {**params, "order": "desc"})
    assert [s["id"] for s in descending["settlements"]] == expected[::-1]
    exported = await client.get("/v1/settlements/export",
                                params={**params, "format": "jsonl"}, headers=AUDITOR)
    lines = (await exported.read()).splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == expected


async def test_settlement_shape(client: TestClient, dataset: list[Row]) -> None:
    row = next(r for r in dataset if r.state == "confirmed")
    [item] = (await get_json(client, "/v1/settlements", {"tx": row.tx}))["settlements"]
    assert list(item) == list(SETTLEMENT_FIELD_NAMES)
    assert item["id"] == row.public_id and item["state"] == "confirmed"
    assert item["payer"] == row.payer and item["payTo"] == row.pay_to
    assert item["asset"] == row.asset and item["amount"] == str(row.amount)
    assert item["transaction"] == row.tx and item["blockNumber"] == row.block_number
    assert item["chainId"] == CHAIN_ID and item["x402Version"] == 2
    assert item["validBefore"] == "4102444800" and item["settledBy"] == "facilitator"
    assert item["createdAt"] == row.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert item["failedAt"] is None and item["confirmedAt"].endswith("Z")


BAD_PARAMS = [
    ("/v1/settlements", {"payer": "0x1234"}, "payer"),
    ("/v1/settlements", {"payer": "0x" + "Ab" * 20}, "payer"),       # bad EIP-55 checksum
    ("/v1/settlements", {"payTo": "alice"}, "payTo"),
    ("/v1/settlements", {"asset": ""}, "asset"),
    ("/v1/settlements", {"network": "n" * 65}, "network"),
    ("/v1/settlements", {"network": "base\x00sepolia"}, "network"),
    ("/v1/settlements", {"network": ""}, "network"),
    ("/v1/settlements", {"state": "settled"}, "state"),
    ("/v1/settlements", {"state": "confirmed,"}, "state"),
    ("/v1/settlements", {"from": "2025-03-01"}, "from"),
    ("/v1/settlements", {"from": "2025-03-01T00:00:00"}, "from"),        # no timezone
    ("/v1/settlements", {"from": "1740787200"}, "from"),                 # unix seconds
    ("/v1/settlements", {"to": "2025-13-01T00:00:00Z"}, "to"),
    ("/v1/settlements", {"to": "0001-01-01T00:00:00+05:00"}, "to"),      # before year 1 in UTC
    ("/v1/settlements", {"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T00:00:00Z"}, "to"),
    ("/v1/settlements", {"tx": "0x1234"}, "tx"),
    ("/v1/settlements", {"tx": "0x" + "g" * 64}, "tx"),
    ("/v1/settlements", {"min_amount": "01"}, "min_amount"),
    ("/v1/settlements", {"min_amount": "-1"}, "min_amount"),
    ("/v1/settlements", {"max_amount": "1.5"}, "max_amount"),
    ("/v1/settlements", {"max_amount": str(2**256)}, "max_amount"),
    ("/v1/settlements", {"min_amount": "10", "max_amount": "9"}, "max_amount"),
    ("/v1/settlements", {"limit": "0"}, "limit"),
    ("/v1/settlements", {"limit": "1001"}, "limit"),
    ("/v1/settlements", {"limit": "ten"}, "limit"),
    ("/v1/settlements", {"cursor": "not-a-cursor"}, "cursor"),
    ("/v1/settlements", {"cursor": "W10"}, "cursor"),                    # base64 of "[]"
    ("/v1/settlements", {"order": "sideways"}, "order"),
    ("/v1/settlements", {"payee": PAY_TOS[0]}, "payee"),                 # unknown parameter
    ("/v1/settlements/export", {}, "format"),
    ("/v1/settlements/export", {"format": "xml"}, "format"),
    ("/v1/settlements/export", {"format": "csv", "limit": "5"}, "limit"),
    ("/v1/settlements/export", {"format": "csv", "state": "nope"}, "state"),
    ("/v1/settlements/totals", {}, "group_by"),
    ("/v1/settlements/totals", {"group_by": "asset"}, "group_by"),
    ("/v1/settlements/totals", {"group_by": "day", "order": "desc"}, "order"),
    ("/v1/settlements/totals", {"group_by": "payer", "from": "yesterday"}, "from"),
    ("/v1/transfers/unmatched", {"state": "confirmed"}, "state"),
    ("/v1/transfers/unmatched", {"network": "eip155:84532"}, "network"),
    ("/v1/transfers/unmatched", {"payTo": "0xzz"}, "payTo"),
    ("/v1/settlements/not-a-uuid", {}, "id"),
    (f"/v1/settlements/{str(uuid.uuid4()).replace('-', '')}", {}, "id"),
    (f"/v1/settlements/{uuid.uuid4()}", {"verbose": "1"}, "verbose"),
]


@pytest.mark.parametrize(("path", "params", "field"), BAD_PARAMS,
                         ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD_PARAMS)])
async def test_invalid_parameters_get_400_naming_them(client: TestClient, path: str,
                                                      params: dict[str, str], field: str) -> None:
    body = await get_json(client, path, params, status=400)
    assert body["error"] == "invalid_request" and body["field"] == field, body
    assert body["message"]


async def test_repeated_parameter_is_refused(client: TestClient) -> None:
    response = await client.get(f"/v1/settlements?payer={PAYERS[0]}&payer={PAYERS[1]}",
                                headers=AUDITOR)
    assert response.status == 400
    assert (await response.json())["field"] == "payer"


async def test_cursor_from_another_query_is_refused(client: TestClient, pool: asyncpg.Pool
                                                    ) -> None:
    await seed_bulk(pool, 5)
    page = await get_json(client, "/v1/settlements", {"limit": "2"})
    cursor = page["nextCursor"]
    assert cursor is not None
    for path, params in [("/v1/settlements", {"cursor": cursor, "order": "desc"}),
                         ("/v1/transfers/unmatched", {"cursor": cursor}),
                         ("/v1/settlements/totals", {"group_by": "payer", "cursor": cursor}),
                         ("/v1/settlements", {"cursor": cursor[:-2]})]:
        body = await get_json(client, path, params, status=400)
        assert body["field"] == "cursor", (path, body)


SQL_METACHARACTERS = ["'; DROP TABLE settlements; --", "' OR '1'='1", "\\'; SELECT pg_sleep(5)",
                      "$1", "eip155:84532' --", "%' OR network LIKE '%", "\"); DELETE FROM x"]


async def test_sql_metacharacters_are_harmless(client: TestClient, pool: asyncpg.Pool,
                                               dataset: list[Row]) -> None:
    # A network name full of metacharacters is stored verbatim and matched exactly.
    async with pool.acquire() as conn:
        odd = await insert_settlement(conn, index=99, payer=PAYERS[0], pay_to=PAY_TOS[0],
                                      network=SQL_METACHARACTERS[0])
    for value in SQL_METACHARACTERS:
        page = await get_json(client, "/v1/settlements", {"network": value})
        expected = [odd.public_id] if value == odd.network else []
        assert [s["id"] for s in page["settlements"]] == expected, value
        totals = await get_json(client, "/v1/settlements/totals",
                                {"group_by": "pay_to", "network": value})
        assert sum(g["count"] for g in totals["groups"]) == len(expected)
    for name in ("payer", "payTo", "asset", "state", "tx", "from", "min_amount", "cursor",
                 "order", "limit"):
        body = await get_json(client, "/v1/settlements", {name: SQL_METACHARACTERS[0]},
                              status=400)
        assert body["field"] == name
    response = await client.get(f"/v1/settlements/{SQL_METACHARACTERS[1]}", headers=AUDITOR)
    assert response.status == 400
    async with pool.acquire() as conn:  # schema and data untouched
        assert await conn.fetchval("SELECT count(*) FROM settlements") == len(dataset) + 1
        assert await conn.fetchval("SELECT to_regclass('settlements') IS NOT NULL")


# -- pagination ----------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pagination_is_stable_while_rows_are_inserted(client: TestClient,
                                                            pool: asyncpg.Pool,
                                                            order: str) -> None:
    await seed_bulk(pool, 240, step=timedelta(seconds=1), ties=8)  # 8 rows share each created_at
    async with pool.acquire() as conn:
        originals = [r["public_id"] for r in await conn.fetch(
            "SELECT public_id::text FROM settlements ORDER BY created_at, id")]
    if order == "desc":
        originals.reverse()
    appended: list[str] = []  # rows created now: after every cursor (asc), before (desc)
    backdated: list[str] = []
    counter = iter(range(10_000, 20_000))
    stop = asyncio.Event()

    async def insert_new(conn: asyncpg.Connection) -> None:
        row = await insert_settlement(conn, index=next(counter), payer=PAYERS[2],
                                      pay_to=PAY_TOS[1])
        appended.append(row.public_id)

    async def between_pages() -> None:
        async with pool.acquire() as conn:
            await insert_new(conn)
            # Backdated, tying with existing timestamps (read or not, depending on the cursor).
            row = await insert_settlement(conn, index=next(counter), payer=PAYERS[2],
                                          pay_to=PAY_TOS[1], created_at=BASE + timedelta(seconds=3))
            backdated.append(row.public_id)

    async def background_writer() -> None:
        async with pool.acquire() as conn:
            while not stop.is_set():
                await insert_new(conn)
                await asyncio.sleep(0.002)

    writer = asyncio.create_task(background_writer())
    try:
        seen = await all_pages(client, "/v1/settlements", "settlements",
                               {"limit": "17", "order": order}, between_pages)
    finally:
        stop.set()
        await writer
    ids = [s["id"] for s in seen]
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert [i for i in ids if i in set(originals)] == originals, "an existing row was skipped"
    print(f"\n[{order}] {len(originals)} rows present at the start, {len(ids)} read, "
          f"{len(appended)} inserted during pagination")
    if order == "asc":  # rows created now sort after every original row, and are read
        read_new = [i for i in ids if i not in set(originals) | set(backdated)]
        assert ids.index(read_new[0]) > ids.index(originals[-1])
        assert set(read_new) <= set(appended) and len(read_new) >= 10
    else:  # descending, rows created now sort first: only the first page can show them
        first_original = ids.index(originals[0])
        assert all(ids.index(i) < first_original for i in set(ids) & set(appended))


# -- detail --------------------------------------------------------------------------------------

async def test_detail_has_timeline_confirmations_and_transfers(client: TestClient,
                                                               pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        row = await insert_settlement(conn, index=1, payer=PAYERS[0], pay_to=PAY_TOS[0],
                                      state="confirmed", block_number=100, log_index=3)
        pending = await insert_settlement(conn, index=2, payer=PAYERS[1], pay_to=PAY_TOS[0],
                                          state="pending")
        other_chain = await insert_settlement(conn, index=3, payer=PAYERS[1], pay_to=PAY_TOS[0],
                                              state="included", chain_id=1)
        await conn.execute("""INSERT INTO chain_cursors (chain_id, network, head_number,
                              head_hash, chain_head) VALUES ($1, 'eip155:84532', 104, $2, 106)""",
                           CHAIN_ID, b"\x77" * 32)
        await conn.execute("""INSERT INTO chain_transfers (chain_id, block_number, block_hash,
                              tx_hash, log_index, asset, from_address, to_address, amount,
                              settlement_id) VALUES ($1, 100, $2, $3, 3, $4, $5, $6, 1000, $7)""",
                           CHAIN_ID, hashlib.sha256(b"block-100").digest(),
                           bytes.fromhex(row.tx[2:]), bytes.fromhex(ASSETS[0][2:]),
                           bytes.fromhex(PAYERS[0][2:]), bytes.fromhex(PAY_TOS[0][2:]), row.id)

    body = await get_json(client, f"/v1/settlements/{row.public_id.upper()}")
    assert body["id"] == row.public_id and body["state"] == "confirmed"
    assert body["blockNumber"] == 100 and body["logIndex"] == 3
    assert body["blockHash"] == "0x" + hashlib.sha256(b"block-100").hexdigest()
    assert body["confirmations"] == 104 - 100 + 1
    assert body["watcher"] == {"network": "eip155:84532", "headNumber": 104, "chainHead": 106,
                               "haltedReason": None, "haltedAt": None}
    assert [(e["from"], e["to"]) for e in body["timeline"]] == [
        (None, "pending"), ("pending", "signed"), ("signed", "broadcast"),
        ("broadcast", "included"), ("included", "confirmed")]
    assert body["timeline"][1]["transaction"] == row.tx
    assert body["timeline"][3]["blockNumber"] == 100
    assert all(e["at"].endswith("Z") for e in body["timeline"])
    [transfer] = body["transfers"]
    assert transfer == {"chainId": CHAIN_ID, "blockNumber": 100,
                        "blockHash": body["blockHash"], "transaction": row.tx, "logIndex": 3,
                        "asset": ASSETS[0], "from": PAYERS[0], "to": PAY_TOS[0],
                        "amount": "1000", "observedAt": transfer["observedAt"]}
    assert transfer["observedAt"].endswith("Z"), transfer["observedAt"]
    assert datetime.fromisoformat(transfer["observedAt"]).utcoffset() == timedelta(0)

    body = await get_json(client, f"/v1/settlements/{pending.public_id}")
    assert body["confirmations"] is None and body["transfers"] == []
    assert [e["to"] for e in body["timeline"]] == ["pending"]
    body = await get_json(client, f"/v1/settlements/{other_chain.public_id}")
    assert body["confirmations"] is None and body["watcher"] is None  # no head for chain 1

    async with pool.acquire() as conn:  # the watcher lags behind the block: 0, never negative
        await conn.execute("UPDATE chain_cursors SET head_number = 90")
    assert (await get_json(client, f"/v1/settlements/{row.public_id}"))["confirmations"] == 0

    body = await get_json(client, f"/v1/settlements/{uuid.uuid4()}", status=404)
    assert body["error"] == "not_found"


# -- totals --------------------------------------------------------------------------------------

def expected_totals(rows: list[Row], key: Callable[[Row], str], states: set[str]
                    ) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    for r in rows:
        if r.state in states:
            groups[(key(r), CHAIN_ID, r.asset)].append(r.amount)
    return [{"key": k[0], "chainId": k[1], "asset": k[2], "count": len(v), "amount": str(sum(v))}
            for k, v in sorted(groups.items())]


@pytest.mark.parametrize(("group_by", "key"), [
    ("pay_to", lambda r: r.pay_to), ("payer", lambda r: r.payer),
    ("day", lambda r: r.created_at.astimezone(UTC).date().isoformat())])
async def test_totals_per_group(client: TestClient, dataset: list[Row], group_by: str,
                                key: Callable[[Row], str]) -> None:
    body = await get_json(client, "/v1/settlements/totals", {"group_by": group_by})
    assert body["groupBy"] == group_by and body["states"] == ["confirmed", "included"]
    assert body["groups"] == expected_totals(dataset, key, {"included", "confirmed"})
    assert body["nextCursor"] is None

    failed = await get_json(client, "/v1/settlements/totals",
                            {"group_by": group_by, "state": "failed,expired"})
    assert failed["groups"] == expected_totals(dataset, key, {"failed", "expired"})

    filtered = await get_json(client, "/v1/settlements/totals", {
        "group_by": group_by, "state": ",".join(STATE_CYCLE), "asset": ASSETS[1]})
    in_asset = [r for r in dataset if r.asset == ASSETS[1]]
    assert filtered["groups"] == expected_totals(in_asset, key, set(STATE_CYCLE))

    paged = await all_pages(client, "/v1/settlements/totals", "groups",
                            {"group_by": group_by, "limit": "1"})
    assert paged == body["groups"]


async def test_totals_never_add_amounts_of_different_assets(client: TestClient,
                                                            pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        for i, asset in enumerate((ASSETS[0], ASSETS[1], ASSETS[1])):
            await insert_settlement(conn, index=i, payer=PAYERS[0], pay_to=PAY_TOS[0],
                                    asset=asset, amount=10**18 if i else 10**6)
    body = await get_json(client, "/v1/settlements/totals", {"group_by": "pay_to"})
    assert [(g["asset"], g["count"], g["amount"]) for g in body["groups"]] == [
        (ASSETS[0], 1, str(10**6)), (ASSETS[1], 2, str(2 * 10**18))]


# -- unmatched transfers ---------------------------------------------------------------------------

async def test_unmatched_transfers(client: TestClient, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        matched = await insert_settlement(conn, index=1, payer=PAYERS[0], pay_to=PAY_TOS[0])
        for n in range(7):
            await conn.execute("""
                INSERT INTO chain_transfers (chain_id, block_number, block_hash, tx_hash,
                    log_index, asset, from_address, to_address, amount, settlement_id,
                    observed_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
                CHAIN_ID, 200 + n, hashlib.sha256(b"b%d" % n).digest(),
                hashlib.sha256(b"t%d" % n).digest(), n, bytes.fromhex(ASSETS[0][2:]),
                bytes.fromhex(PAYERS[n % 2][2:]), bytes.fromhex(PAY_TOS[n % 2][2:]),
                100 + n, matched.id if n == 0 else None,
                BASE + timedelta(minutes=n // 2))  # pairs share observed_at
    page = await get_json(client, "/v1/transfers/unmatched", {"limit": "1000"})
    assert [t["amount"] for t in page["transfers"]] == [str(100 + n) for n in range(1, 7)]
    assert set(page["transfers"][0]) == {"chainId", "blockNumber", "blockHash", "transaction",
                                         "logIndex", "asset", "from", "to", "amount",
                                         "observedAt"}
    paged = await all_pages(client, "/v1/transfers/unmatched", "transfers", {"limit": "2"})
    assert paged == page["transfers"]
    backwards = await all_pages(client, "/v1/transfers/unmatched", "transfers",
                                {"limit": "4", "order": "desc"})
    assert backwards == page["transfers"][::-1]
    to_second = await get_json(client, "/v1/transfers/unmatched", {"payTo": PAY_TOS[1]})
    assert [t["amount"] for t in to_second["transfers"]] == ["101", "103", "105"]
    ranged = await get_json(client, "/v1/transfers/unmatched", {
        "payer": PAYERS[0], "min_amount": "103", "from": "2025-03-01T00:01:00Z"})
    assert [t["amount"] for t in ranged["transfers"]] == ["104", "106"]


# -- exports -------------------------------------------------------------------------------------

async def test_small_exports_match_the_api(client: TestClient, pool: asyncpg.Pool,
                                           dataset: list[Row]) -> None:
    async with pool.acquire() as conn:
        formula = await insert_settlement(conn, index=50, payer=PAYERS[0], pay_to=PAY_TOS[0],
                                          state="failed", message='=HYPERLINK("http://x")')
    listed = (await get_json(client, "/v1/settlements", {"limit": "1000"}))["settlements"]

    response = await client.get("/v1/settlements/export", params={"format": "jsonl"},
                                headers=AUDITOR)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-Id"]
    assert [orjson.loads(line) for line in (await response.read()).splitlines()] == listed

    response = await client.get("/v1/settlements/export", params={"format": "csv"},
                                headers=OPERATOR)
    assert response.headers["Content-Type"].startswith("text/csv")
    assert 'filename="settlements-' in response.headers["Content-Disposition"]
    text = (await response.read()).decode()
    assert text.endswith("\r\n")
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert table[0] == list(SETTLEMENT_FIELD_NAMES)
    assert len(table) == len(listed) + 1
    for cells, item in zip(table[1:], listed):
        expected = ["" if v is None else str(v) for v in item.values()]
        if item["id"] == formula.public_id:  # neutralised for spreadsheets (CSV only)
            assert cells[SETTLEMENT_FIELD_NAMES.index("message")] == "'" + item["message"]
            continue
        assert cells == expected

    empty = await client.get("/v1/settlements/export",
                             params={"format": "csv", "payer": "0x" + "00" * 20}, headers=AUDITOR)
    assert (await empty.read()).decode().splitlines() == [",".join(SETTLEMENT_FIELD_NAMES)]


async def test_concurrent_exports_are_capped(pool: asyncpg.Pool) -> None:
    await seed_bulk(pool, 3_000)
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    add_audit_routes(app, pool, token_config(), max_concurrent_exports=1)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client_:
        first = await client_.get("/v1/settlements/export?format=jsonl", headers=AUDITOR)
        assert first.status == 200
        await first.content.readline()  # the first export is running (and not read further)
        second = await client_.get("/v1/settlements/export?format=jsonl", headers=AUDITOR)
        assert second.status == 429
        assert (await second.json())["error"] == "too_many_requests"
        assert len((await first.read()).splitlines()) == 3_000 - 1  # one line already read
        third = await client_.get("/v1/settlements/export?format=csv", headers=AUDITOR)
        assert third.status == 200 and len((await third.read()).splitlines()) == 3_001


async def test_export_failing_midway_is_visibly_truncated(client: TestClient,
                                                          pool: asyncpg.Pool) -> None:
    """The database connection dies after the stream started: the client must see a broken
    transfer, never a clean end of stream, and no error body appended to the CSV."""
    rows = 40_000  # far more than socket buffers hold: the server is still streaming
    await seed_bulk(pool, rows)
    async with client.get("/v1/settlements/export", params={"format": "csv"},
                          headers=AUDITOR) as response:
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"id,createdAt,")
        for _ in range(1_000):
            await response.content.readline()
        async with pool.acquire() as conn:  # the client is not reading: the export is blocked
            killed = await conn.fetchval("""
                SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND query LIKE 'SELECT s.public_id::text AS "id", %'""")
        assert killed == 1
        received = 1_000
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in response.content:
                assert not line.startswith((b"HTTP/", b"{")), line
                received += 1
        assert received < rows
        print(f"\nexport aborted after {received} of {rows} rows; the client saw "
              "ClientPayloadError")
    assert (await get_json(client, "/v1/settlements", {"limit": "1"}))["settlements"]


# -- the 100,000-row export, streamed in bounded memory ----------------------------------------

BULK_ROWS = 100_000
EXPORT = "/v1/settlements/export"


async def test_exports_of_100k_rows_stream_in_bounded_memory(client: TestClient,
                                                             pool: asyncpg.Pool) -> None:
    started = time.monotonic()
    await seed_bulk(pool, BULK_ROWS)
    print(f"\nseeded {BULK_ROWS} settlements in {time.monotonic() - started:.1f} s")
    samples = {1, 2, 97, 4_999, 50_000, 99_990, BULK_ROWS}
    expected = {}
    for amount in samples:
        [item] = (await get_json(client, "/v1/settlements", {
            "min_amount": str(amount), "max_amount": str(amount)}))["settlements"]
        assert item["payer"] == "0x" + f"{amount % 97:040x}"
        assert item["state"] == ("included" if amount % 10 == 0 else "confirmed")
        expected[amount] = item
    async with pool.acquire() as conn:
        total_amount = int(await conn.fetchval("SELECT sum(amount) FROM settlements"))
    amount_column = SETTLEMENT_FIELD_NAMES.index("amount")
    created_column = SETTLEMENT_FIELD_NAMES.index("createdAt")

    # CSV ---------------------------------------------------------------------------------------
    state: dict[str, Any] = {"rows": -1, "sum": 0, "last": "", "checked": 0}

    def on_csv_line(line: bytes) -> None:
        [cells] = csv.reader([line.decode()])
        state["rows"] += 1
        if state["rows"] == 0:
            assert cells == list(SETTLEMENT_FIELD_NAMES)
            return
        amount = int(cells[amount_column])
        state["sum"] += amount
        assert cells[created_column] > state["last"]  # in order, hence no row twice
        state["last"] = cells[created_column]
        if amount in expected:
            assert cells == ["" if v is None else str(v) for v in expected[amount].values()]
            state["checked"] += 1

    size, peak, seconds = await stream_export(client, EXPORT, "csv", b"\r\n", on_csv_line,
                                              AUDITOR)
    assert state["rows"] == BULK_ROWS and state["sum"] == total_amount
    assert state["checked"] == len(samples)
    print(f"CSV: {BULK_ROWS} rows, {size / 2**20:.1f} MiB streamed in {seconds:.1f} s; "
          f"peak Python heap during the download {peak / 2**20:.2f} MiB")
    csv_figures = (size, peak)

    # JSON Lines --------------------------------------------------------------------------------
    state = {"rows": 0, "sum": 0, "last": "", "checked": 0}

    def on_json_line(line: bytes) -> None:
        item = orjson.loads(line)
        state["rows"] += 1
        amount = int(item["amount"])
        state["sum"] += amount
        assert item["createdAt"] > state["last"]
        state["last"] = item["createdAt"]
        if amount in expected:
            assert item == expected[amount]
            state["checked"] += 1

    size, peak, seconds = await stream_export(client, EXPORT, "jsonl", b"\n", on_json_line,
                                              AUDITOR)
    assert state["rows"] == BULK_ROWS and state["sum"] == total_amount
    assert state["checked"] == len(samples)
    print(f"JSONL: {BULK_ROWS} rows, {size / 2**20:.1f} MiB streamed in {seconds:.1f} s; "
          f"peak Python heap during the download {peak / 2**20:.2f} MiB")

    # Control: the same measurement sees materialised rows (a tenth of them, fetched at once).
    query = settlements_query(Filters(), None)
    tracemalloc.start()
    try:
        async with pool.acquire() as conn:
            records = await conn.fetch(query.text + " LIMIT 10000", *query.args)
        control = tracemalloc.get_traced_memory()[1]
        del records
    finally:
        tracemalloc.stop()
    print(f"control: materialising 10,000 of the rows peaks at {control / 2**20:.1f} MiB "
          f"(about {10 * control / 2**20:.0f} MiB for all {BULK_ROWS})")

    # The stream stays far below the size of the output and below a tenth of the rows held
    # at once, whatever the row count.
    for body_size, heap_peak in (csv_figures, (size, peak)):
        assert body_size > 50 * 2**20
        assert heap_peak < 16 * 2**20, f"peak heap {heap_peak} bytes"
        assert heap_peak < body_size / 8
        assert heap_peak < control


# -- real settlements ----------------------------------------------------------------------------

async def test_reads_settlements_made_by_a_running_facilitator(chain, facilitator,
                                                               client: TestClient) -> None:
    payer = await chain.new_payer()
    pay_to = Account.create().address
    settled = await facilitator.settle(pay(payer, pay_to, 12_345))
    assert settled["success"] is True, settled
    page = await get_json(client, "/v1/settlements", {"payer": payer.address})
    [item] = page["settlements"]
    assert item["payTo"] == pay_to.lower() and item["amount"] == "12345"
    assert item["transaction"] == settled["transaction"]
    assert item["state"] in ("included", "confirmed")
    detail = await get_json(client, f"/v1/settlements/{item['id']}")
    assert detail["timeline"][0] == {**detail["timeline"][0], "from": None, "to": "pending"}
    assert detail["timeline"][-1]["to"] == item["state"]
    assert detail["blockNumber"] is not None
    by_tx = await get_json(client, "/v1/settlements", {"tx": settled["transaction"]})
    assert [s["id"] for s in by_tx["settlements"]] == [item["id"]]

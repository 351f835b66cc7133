"""A client that opens an export and stops reading cannot hold it forever: once a write has
waited `export_write_timeout_s` for the socket, the connection is aborted, and the database
connection, its snapshot and the export slot are released (real PostgreSQL, real sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bulk import bulk_settlements

from facilitator.adapters.metrics import Metrics
from facilitator.audit.findings_routes import add_findings_routes
from facilitator.audit.routes import AUDIT_KEY, EXPORT_WRITE_TIMEOUT_S, add_audit_routes
from facilitator.audit.tokens import parse_api_tokens
from facilitator.http.app import METRICS_KEY, request_context

TOKEN = "aud_" + secrets.token_urlsafe(32)
AUDITOR = {"Authorization": f"Bearer {TOKEN}"}
ROWS = 40_000  # far more than the socket buffers on both sides hold
WRITE_TIMEOUT_S = 0.5


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool_ = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool_
    await pool_.close()


async def open_snapshots(pool: asyncpg.Pool) -> int:
    """Other backends of this database inside a transaction (an export's snapshot)."""
    return await pool.fetchval("""
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND state IN ('active', 'idle in transaction')""")


def test_the_default_write_timeout_is_generous() -> None:
    assert 30 <= EXPORT_WRITE_TIMEOUT_S <= 300


@pytest.mark.parametrize("path", ["/v1/settlements/export?format=csv",
                                  "/v1/findings/export?format=jsonl"])
async def test_a_client_that_stops_reading_releases_its_export_slot(pool: asyncpg.Pool,
                                                                     path: str) -> None:
    if "settlements" in path:
        await bulk_settlements(pool, ROWS, asset="0x" + "c1" * 20, pay_to="0x" + "b1" * 20,
                               start=datetime(2025, 3, 1, tzinfo=UTC))
    else:
        await pool.execute("""
            INSERT INTO findings (kind, fingerprint, linked, evidence)
            SELECT 'unlinked_reconciliation', sha256(int8send(i)), false,
                   jsonb_build_object('padding', repeat('x', 400))
            FROM generate_series(1, $1::int) AS i""", ROWS)
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    add_audit_routes(app, pool, parse_api_tokens(
        f"auditor:{hashlib.sha256(TOKEN.encode()).hexdigest()}"), max_concurrent_exports=1,
        export_write_timeout_s=WRITE_TIMEOUT_S)
    add_findings_routes(app, pool)
    context = app[AUDIT_KEY]
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        stalled = await client.get(path, headers=AUDITOR)
        assert stalled.status == 200
        await stalled.content.readline()  # the export started; this client reads no further
        assert context.exports_running == 1
        assert (await client.get(path, headers=AUDITOR)).status == 429  # the one slot is held

        started = time.monotonic()
        while context.exports_running:
            assert time.monotonic() - started < 20, "the stalled export was never released"
            await asyncio.sleep(0.05)
        released_after = time.monotonic() - started
        print(f"\nstalled export released {released_after:.2f} s after the client stopped "
              f"reading (write timeout {WRITE_TIMEOUT_S} s)")
        assert await open_snapshots(pool) == 0  # its connection went back, snapshot closed

        with pytest.raises(aiohttp.ClientPayloadError):  # truncated, never a clean end
            while await stalled.content.read(1 << 16):
                pass
        stalled.release()

        fresh = await client.get(path, headers=AUDITOR)  # the slot is free again
        assert fresh.status == 200
        lines = (await fresh.read()).splitlines()
        assert len(lines) == ROWS + (1 if "csv" in path else 0)

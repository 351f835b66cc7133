"""`GET /usage?days=N` counts whole UTC days, whatever the database server's TimeZone: with the
server in UTC+14 or UTC-11, a usage recorded at 00:30 UTC today is in the last day and one at
23:30 UTC yesterday is not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from bulk import bulk_settlements

from facilitator.adapters.sessions import SessionStore


@pytest.mark.parametrize("server_zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"])
async def test_usage_days_are_utc_days(database_url: str, server_zone: str) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    seeding = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        await bulk_settlements(seeding, 2, asset="0x" + "c1" * 20, pay_to="0x" + "b1" * 20,
                               start=today)  # amounts 1 and 2, included or confirmed
        for amount, recorded_at in ((1, today + timedelta(minutes=30)),
                                    (2, today - timedelta(minutes=30))):
            await seeding.execute(
                "INSERT INTO settlement_usage (settlement_id, request_count, service, raw, "
                "recorded_at) SELECT id, $1::bigint, 'chat', '{}', $2 FROM settlements "
                "WHERE amount = $1::bigint",
                amount, recorded_at)
        await seeding.execute(await seeding.fetchval(
            "SELECT format('ALTER DATABASE %I SET timezone = %L', current_database(), $1::text)",
            server_zone))  # applies to new sessions
    finally:
        await seeding.close()

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SHOW timezone") == server_zone
        one_day = await SessionStore(pool).usage_by_day(1)
        two_days = await SessionStore(pool).usage_by_day(2)
    finally:
        await pool.close()
    assert [(r["day"], r["requests"]) for r in one_day] == [(today.date(), 1)], one_day
    assert sorted((r["day"], r["requests"]) for r in two_days) == [
        ((today - timedelta(days=1)).date(), 2), (today.date(), 1)], two_days


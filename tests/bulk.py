"""Many settlement rows at once, in set-based statements (audit tests and the export benchmark):
the rows pass through the legal state transitions, so the state machine's CHECK holds. And the
download side of the export tests: `stream_export`."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg


async def bulk_settlements(pool: asyncpg.Pool, count: int, *, asset: str, pay_to: str,
                           start: datetime, step: timedelta = timedelta(milliseconds=1),
                           ties: int = 1) -> None:
    """`count` settlements in set-based statements: inserted pending, then pending -> included
    -> confirmed for all but every 10th. `amount` = i (1..count), payer = i % 97, created_at =
    start + (i // ties) * step (so `ties` rows share each timestamp)."""
    async with pool.acquire() as conn:
        await conn.execute("""
            INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer,
                pay_to, amount, nonce, valid_after, valid_before, signature, fingerprint,
                call_to, calldata, state, created_at)
            SELECT 'exact', 2, 'eip155:84532', 84532, $1, decode(lpad(to_hex(i % 97), 40, '0'),
                   'hex'), $2, i, decode(lpad(to_hex(i), 64, '0'), 'hex'), 0, 4102444800,
                   decode(repeat('1b', 65), 'hex'), sha256(int8send(i)), $1, '\\x'::bytea,
                   'pending', $3::timestamptz + (i / $5::int) * $4::interval
            FROM generate_series(1, $6::int) AS i""",
            bytes.fromhex(asset[2:]), bytes.fromhex(pay_to[2:]), start, step, ties,
            count)
        await conn.execute("""
            UPDATE settlements SET state = 'included', tx_hash = sha256(int8send(id)),
                block_number = 5000 + id, block_hash = sha256(int8send(-id)), log_index = 0,
                settled_by = 'facilitator', included_at = clock_timestamp()
            WHERE state = 'pending'""")
        await conn.execute("""
            UPDATE settlements SET state = 'confirmed', confirmed_at = clock_timestamp()
            WHERE state = 'included' AND amount % 10 <> 0""")


async def stream_export(client: Any, path: str, fmt: str, separator: bytes,
                        on_line: Callable[[bytes], None], headers: dict[str, str]
                        ) -> tuple[int, int, float]:
    """Download the export at `path` (`?format=fmt`, through an aiohttp test client) chunk by
    chunk, never holding it whole, handing each `separator`-terminated line to `on_line`;
    returns (bytes, peak heap bytes, seconds), tracemalloc measuring server, driver and client
    together."""
    size = 0
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.monotonic()
    try:
        async with client.get(path, params={"format": fmt}, headers=headers) as response:
            assert response.status == 200
            pending = b""
            async for chunk in response.content.iter_chunked(64 * 1024):
                size += len(chunk)
                *lines, pending = (pending + chunk).split(separator)
                for line in lines:
                    on_line(line)
            assert pending == b""
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return size, peak, time.monotonic() - started

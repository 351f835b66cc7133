"""Audit export of a million settlements: rows per second and the facilitator's peak memory.

Method: a fresh devnet (anvil, private PostgreSQL) with the facilitator as its own process
pinned to CPU 0, as in the other benchmarks. `--rows` settlements are inserted in set-based
statements (the state machine's legal path, so the database CHECK holds), then
`GET /v1/settlements/export?format=csv|jsonl` is downloaded by an auditor and counted line by
line without keeping it. The facilitator's peak resident set (VmHWM, reset just before each
export through /proc/PID/clear_refs) against its resident set before the export shows whether the
export is streamed: a buffered export of a million rows would need hundreds of MiB.

    .venv/bin/python bench/export.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulk import bulk_settlements  # noqa: E402
from common import devnet, table  # noqa: E402

TOKEN = "bench_" + secrets.token_urlsafe(24)
ASSET = "0x" + "c1" * 20
PAY_TO = "0x" + "b1" * 20


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)


async def download(url: str, fmt: str) -> tuple[int, int, float]:
    """(lines, bytes, seconds) of one export, counted chunk by chunk."""
    lines = size = 0
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/v1/settlements/export", params={"format": fmt},
                               headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            if response.status != 200:
                raise RuntimeError(f"export answered {response.status}: {await response.text()}")
            async for chunk in response.content.iter_chunked(256 * 1024):
                lines += chunk.count(b"\n")
                size += len(chunk)
    return lines, size, time.monotonic() - started


async def run(rows: int) -> None:
    token_hash = hashlib.sha256(TOKEN.encode()).hexdigest()
    async with devnet(payers=0, env={"FACILITATOR_API_TOKENS": f"auditor:{token_hash}",
                                     "FACILITATOR_WATCHER": "off"}) as bench:
        pool = await asyncpg.create_pool(bench.dsn, min_size=1, max_size=2)
        try:
            started = time.monotonic()
            await bulk_settlements(pool, rows, asset=ASSET, pay_to=PAY_TO,
                                   start=datetime(2026, 1, 1, tzinfo=UTC))
            seeded_s = time.monotonic() - started
        finally:
            await pool.close()
        figures = [("benchmark", "GET /v1/settlements/export (auditor), streamed"),
                   ("rows", f"{rows:,} settlements (seeded in {seeded_s:.0f} s)")]
        for fmt, header_lines in (("csv", 1), ("jsonl", 0)):
            before = memory_kib(bench.pid, "VmRSS")
            reset_peak(bench.pid)
            lines, size, seconds = await download(bench.facilitator_url, fmt)
            peak = memory_kib(bench.pid, "VmHWM")
            if lines - header_lines != rows:
                raise RuntimeError(f"{fmt} export has {lines - header_lines} rows, want {rows}")
            figures += [
                (f"{fmt} throughput", f"{rows / seconds:,.0f} rows/s ({size / seconds / 2**20:.1f}"
                                      f" MiB/s, {size / 2**20:,.0f} MiB in {seconds:.1f} s)"),
                (f"{fmt} facilitator RSS", f"{before / 1024:.1f} MiB before, peak "
                                           f"{peak / 1024:.1f} MiB during the export "
                                           f"(+{(peak - before) / 1024:.1f} MiB)"),
            ]
    print(table(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()

"""Shared set-up for the benchmarks: a devnet (anvil + USDC + private PostgreSQL) and the
facilitator running as its own process (`facilitator serve`), as it would in production.

The facilitator process is pinned to CPU 0 and everything else (anvil, PostgreSQL, the load
generator) to CPU 1 when `taskset` is available, so figures compare like with like.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from eth_account import Account
from harness import metric_value, wait_until  # bench scripts put tests/ on sys.path first

from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, Anvil, free_port
from facilitator.devnet.postgres import PostgresCluster

CHAIN_ID = 84532
TASKSET = shutil.which("taskset")


def pin(cpu: int) -> list[str]:
    return [TASKSET, "-c", str(cpu)] if TASKSET and os.cpu_count() and os.cpu_count() > 1 else []


@dataclass
class Bench:
    anvil: Anvil
    usdc: str
    facilitator_url: str
    signer_key: str
    payers: list
    dsn: str
    pid: int  # the facilitator process


@asynccontextmanager
async def devnet(*, payers: int, block_time_s: float | None = None,
                 env: dict[str, str] | None = None) -> AsyncIterator[Bench]:
    workdir = Path(tempfile.mkdtemp(prefix="facilitator-bench-"))
    if pin(1):  # this process and its children (anvil, PostgreSQL) on CPU 1
        os.sched_setaffinity(0, {1})
    anvil = Anvil(chain_id=CHAIN_ID, block_time_s=block_time_s,
                  extra_args=("--gas-limit", "300000000"))
    postgres = PostgresCluster(workdir / "pg")
    process = None
    try:
        await anvil.start()
        usdc = await contracts.install_usdc(anvil.url, DEV_KEYS[0])
        accounts = [Account.create() for _ in range(payers)]
        for chunk in range(0, len(accounts), 50):
            await asyncio.gather(*(contracts.mint(anvil.url, DEV_KEYS[0], usdc, a.address, 10**15)
                                   for a in accounts[chunk:chunk + 50]))
        dsn = await postgres.start()
        port = free_port()
        signer_key = DEV_KEYS[9]
        proc_env = {**os.environ, "DATABASE_URL": dsn, "FACILITATOR_SIGNER_KEY": signer_key,
                    "FACILITATOR_RPC_URLS": anvil.url, "FACILITATOR_PORT": str(port),
                    "FACILITATOR_LOG_LEVEL": "WARNING", **(env or {})}
        process = await asyncio.create_subprocess_exec(
            *pin(0), sys.executable, "-m", "facilitator", "serve", env=proc_env,
            stdout=asyncio.subprocess.DEVNULL, stderr=open(workdir / "facilitator.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url, process, workdir / "facilitator.log")
        yield Bench(anvil, usdc, url, signer_key, accounts, dsn, process.pid)
    finally:
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()
        await anvil.stop()
        await postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_ready(url: str, process: asyncio.subprocess.Process, log: Path,
                      timeout_s: float = 30.0) -> None:
    last: list[str] = ["no answer yet"]
    async with aiohttp.ClientSession() as session:
        async def healthy() -> bool:
            if process.returncode is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"facilitator exited with {process.returncode}:\n{tail}")
            try:
                async with session.get(url + "/health") as resp:
                    last[0] = f"HTTP {resp.status}"
                    return resp.status == 200
            except aiohttp.ClientError as exc:
                last[0] = repr(exc)
                return False
        await wait_until(healthy, timeout_s=timeout_s, interval_s=0.1,
                         what="the facilitator to become healthy", detail=lambda: last[0])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def histogram_mean(after: str, metric: str, before: str | None = None, **labels: str) -> float:
    """Mean of a histogram's observations (sum / count) from Prometheus text expositions: the
    ones made between the `before` scrape and the `after` one when `before` is given (the
    counters are cumulative since the process started), all of them otherwise. NaN when none."""
    def delta(part: str) -> float:
        value = metric_value(after, metric + part, **labels)
        return value - metric_value(before, metric + part, **labels) if before else value
    count = delta("_count")
    return delta("_sum") / count if count else float("nan")


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    """The facilitator's /metrics text."""
    async with session.get(url + "/metrics") as resp:
        resp.raise_for_status()
        return await resp.text()

"""/verify throughput and latency against the devnet at a fixed concurrency.

Method: a fresh devnet (anvil automine, USDC at the canonical address, private PostgreSQL), the
facilitator as its own process pinned to CPU 0; this load generator, anvil and PostgreSQL on
CPU 1. Payloads are signed before the clock starts (signing is the client's cost, not ours).
A closed loop of `--concurrency` workers posts distinct valid payloads for `--seconds` after a
warm-up; every answer must be `isValid: true`. Prints one table.

    .venv/bin/python bench/verify.py [--concurrency 32] [--seconds 20] [--payloads 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import devnet, histogram_mean, percentile, table  # noqa: E402
from eth_account import Account  # noqa: E402
from harness import pay  # noqa: E402


async def run(concurrency: int, seconds: float, warmup_s: float, payloads: int) -> None:
    async with devnet(payers=20) as bench:
        pay_to = Account.create().address
        bodies = [orjson.dumps(pay(bench.payers[i % len(bench.payers)], pay_to, 10_000 + i))
                  for i in range(payloads)]
        source = itertools.cycle(bodies)
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker(stop_at: float, record: bool) -> None:
                nonlocal errors
                while time.monotonic() < stop_at:
                    body = next(source)
                    started = time.perf_counter()
                    async with session.post(bench.facilitator_url + "/verify", data=body,
                                            headers={"Content-Type": "application/json"}) as r:
                        answer = await r.read()
                    if record:
                        latencies.append(time.perf_counter() - started)
                        if r.status != 200 or b'"isValid":true' not in answer:
                            errors += 1
            await asyncio.gather(*(worker(time.monotonic() + warmup_s, False)
                                   for _ in range(concurrency)))
            began = time.monotonic()
            await asyncio.gather(*(worker(began + seconds, True) for _ in range(concurrency)))
            elapsed = time.monotonic() - began
            async with session.get(bench.facilitator_url + "/metrics") as r:
                exposition = await r.text()
    rpc_seconds = histogram_mean(exposition, "facilitator_rpc_request_duration_seconds",
                                 'method="eth_call"')
    batch = histogram_mean(exposition, "facilitator_rpc_batch_size", "")
    print(table([
        ("benchmark", "POST /verify (exact, EIP-3009, valid payloads)"),
        ("concurrency", str(concurrency)),
        ("duration", f"{elapsed:.1f} s (after {warmup_s:.0f} s warm-up)"),
        ("requests", str(len(latencies))),
        ("errors", str(errors)),
        ("throughput", f"{len(latencies) / elapsed:,.0f} verifies/s"),
        ("latency p50", f"{percentile(latencies, 0.50) * 1000:.1f} ms"),
        ("latency p99", f"{percentile(latencies, 0.99) * 1000:.1f} ms"),
        ("latency max", f"{max(latencies) * 1000:.1f} ms"),
        ("JSON-RPC round trip", f"{rpc_seconds * 1000:.1f} ms mean (eth_call)"),
        ("JSON-RPC batch size", f"{batch:.1f} calls per HTTP request (mean)"),
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--payloads", type=int, default=4000)
    args = parser.parse_args()
    asyncio.run(run(args.concurrency, args.seconds, args.warmup, args.payloads))


if __name__ == "__main__":
    main()

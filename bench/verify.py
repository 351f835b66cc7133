"""/verify throughput and latency against the devnet at a fixed concurrency.

Method: a fresh devnet (anvil automine, USDC at the canonical address, private PostgreSQL), the
facilitator as its own process pinned to CPU 0; this load generator, anvil and PostgreSQL on
CPU 1. Payloads are signed before the clock starts (signing is the client's cost, not ours).
A closed loop of `--concurrency` workers posts distinct valid payloads for `--seconds` after a
warm-up; every answer must be `200` with `isValid: true`. Throughput and latencies count only
such answers; any other answer (warm-up included) is an error and the script exits 1 after the
table. The JSON-RPC figures are the difference of two /metrics scrapes, at the start and the end
of the timed window (the counters are cumulative since the facilitator started).
Prints one table.

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

from common import devnet, histogram_mean, percentile, scrape, table  # noqa: E402
from eth_account import Account  # noqa: E402
from harness import pay  # noqa: E402


def is_valid(status: int, answer: bytes) -> bool:
    if status != 200:
        return False
    try:
        return orjson.loads(answer).get("isValid") is True
    except (orjson.JSONDecodeError, AttributeError):
        return False


async def run(concurrency: int, seconds: float, warmup_s: float, payloads: int) -> int:
    """Prints the table; returns the number of answers that were not `200` + `isValid: true`."""
    async with devnet(payers=20) as bench:
        pay_to = Account.create().address
        bodies = [orjson.dumps(pay(bench.payers[i % len(bench.payers)], pay_to, 10_000 + i))
                  for i in range(payloads)]
        source = itertools.cycle(bodies)
        latencies: list[float] = []  # of valid answers in the timed window only
        errors = {"warm-up": 0, "timed": 0}
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker(stop_at: float, record: bool) -> None:
                while time.monotonic() < stop_at:
                    body = next(source)
                    started = time.perf_counter()
                    async with session.post(bench.facilitator_url + "/verify", data=body,
                                            headers={"Content-Type": "application/json"}) as r:
                        answer = await r.read()
                    took = time.perf_counter() - started
                    if not is_valid(r.status, answer):
                        errors["timed" if record else "warm-up"] += 1
                    elif record:
                        latencies.append(took)
            await asyncio.gather(*(worker(time.monotonic() + warmup_s, False)
                                   for _ in range(concurrency)))
            before = await scrape(session, bench.facilitator_url)
            began = time.monotonic()
            await asyncio.gather(*(worker(began + seconds, True) for _ in range(concurrency)))
            elapsed = time.monotonic() - began
            after = await scrape(session, bench.facilitator_url)
    rpc_seconds = histogram_mean(after, "facilitator_rpc_request_duration_seconds", before,
                                 method="eth_call")
    batch = histogram_mean(after, "facilitator_rpc_batch_size", before)
    ms = (lambda q: f"{percentile(latencies, q) * 1000:.1f} ms") if latencies else (lambda q: "-")
    print(table([
        ("benchmark", "POST /verify (exact, EIP-3009, valid payloads)"),
        ("concurrency", str(concurrency)),
        ("duration", f"{elapsed:.1f} s (after {warmup_s:.0f} s warm-up)"),
        ("requests", f"{len(latencies)} answered 200 + isValid:true"),
        ("errors", f"{errors['timed']} in the timed window, {errors['warm-up']} in the warm-up"),
        ("throughput", f"{len(latencies) / elapsed:,.0f} verifies/s (valid answers)"),
        ("latency p50", ms(0.50)),
        ("latency p99", ms(0.99)),
        ("latency max", ms(1.0)),
        ("JSON-RPC round trip", f"{rpc_seconds * 1000:.1f} ms mean (eth_call, timed window)"),
        ("JSON-RPC batch size", f"{batch:.1f} calls per HTTP request (mean, timed window)"),
    ]))
    return errors["timed"] + errors["warm-up"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--payloads", type=int, default=4000)
    args = parser.parse_args()
    errors = asyncio.run(run(args.concurrency, args.seconds, args.warmup, args.payloads))
    if errors:
        raise SystemExit(f"{errors} answers were not 200 + isValid:true")


if __name__ == "__main__":
    main()

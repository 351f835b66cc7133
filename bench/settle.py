"""/settle throughput and latency with `--inflight` distinct payments in flight, for automine
and for interval mining (1-second blocks by default).

Method: a fresh devnet per mode (anvil, USDC at the canonical address, private PostgreSQL), the
facilitator as its own process pinned to CPU 0; this load generator, anvil and PostgreSQL on
CPU 1. Every payment is a distinct EIP-3009 authorization signed before the clock starts.
`--inflight` workers each settle payments back to back (closed loop) until `--payments` have been
answered. A settle counts as successful only with `success: true`; the on-chain Transfer count
must equal the number of successes (otherwise the script exits 1 after the tables). Throughput
and latencies count successful answers only; throughput is printed for the whole run and
sustained (from the `--inflight`-th successful answer to the last: the first burst arrives all at
once). Phase and RPC means are the difference of two /metrics scrapes, before and after the run.
Prints one table per mode.

    .venv/bin/python bench/settle.py [--payments 3000] [--inflight 300] [--block-time 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

RPC_METHODS = ("eth_createAccessList", "eth_sendRawTransaction", "eth_getTransactionReceipt")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


async def run_mode(label: str, payments: int, inflight: int, block_time_s: float | None
                   ) -> str | None:
    """Prints the mode's table; returns what went wrong, if anything."""
    async with devnet(payers=50, block_time_s=block_time_s,
                      env={"FACILITATOR_RECEIPT_TIMEOUT_S": "30",
                           "FACILITATOR_DB_POOL_SIZE": os.environ.get("POOL", "20"),
                           "FACILITATOR_RECEIPT_POLL_INTERVAL_S": os.environ.get("POLL", "0.1")}
                      ) as bench:
        pay_to = Account.create().address
        bodies = [orjson.dumps(pay(bench.payers[i % len(bench.payers)], pay_to, 1_000 + i))
                  for i in range(payments)]
        latencies: list[float] = []  # of successful answers
        answered_at: list[float] = []  # monotonic time of each successful answer
        outcomes: dict[str, int] = {}
        queue = list(reversed(bodies))
        connector = aiohttp.TCPConnector(limit=inflight)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    started = time.perf_counter()
                    async with session.post(bench.facilitator_url + "/settle", data=body,
                                            headers={"Content-Type": "application/json"}) as r:
                        status, raw = r.status, await r.read()
                    took = time.perf_counter() - started
                    try:
                        answer = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        answer = {"errorReason": f"HTTP {status}, not JSON"}
                    success = status == 200 and answer.get("success") is True
                    key = "success" if success else answer.get("errorReason", f"HTTP {status}")
                    if success:
                        latencies.append(took)
                        answered_at.append(time.monotonic())
                    outcomes[key] = outcomes.get(key, 0) + 1
            before = await scrape(session, bench.facilitator_url)
            began = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(inflight)))
            elapsed = time.monotonic() - began
            after = await scrape(session, bench.facilitator_url)
        transfers = await bench.anvil.rpc("eth_getLogs", [{
            "address": bench.usdc, "fromBlock": "0x0", "toBlock": "latest",
            "topics": [TRANSFER_TOPIC, None, "0x" + "00" * 12 + pay_to[2:].lower()]}])
    ok = outcomes.get("success", 0)
    print(table([
        ("benchmark", f"POST /settle (exact, EIP-3009), {label}"),
        ("payments", f"{payments} distinct, {inflight} in flight"),
        ("elapsed", f"{elapsed:.1f} s"),
        ("outcomes", ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))),
        ("on-chain transfers", f"{len(transfers)} ("
                               + ("= successes" if len(transfers) == ok else "MISMATCH") + ")"),
        ("throughput", f"{ok / elapsed:,.0f} settled/s (whole run)"),
        ("throughput sustained", f"{_sustained(answered_at, inflight):,.0f} settled/s (after "
                                 f"the first {inflight} answers)"),
        ("latency p50", f"{percentile(latencies, 0.50) * 1000:.0f} ms (successes)"),
        ("latency p99", f"{percentile(latencies, 0.99) * 1000:.0f} ms (successes)"),
        *((f"phase {phase}", f"{_phase_mean(after, before, phase) * 1000:.0f} ms mean")
          for phase in ("verify", "request_to_broadcast", "broadcast_to_inclusion")),
        *((f"rpc {method}", f"{_rpc_mean(after, before, method) * 1000:.1f} ms mean")
          for method in RPC_METHODS),
    ]))
    print()
    if len(transfers) != ok:
        return f"{label}: {len(transfers)} on-chain transfers for {ok} successful settles"
    return None


def _sustained(answered_at: list[float], warmup: int) -> float:
    """Answers per second once the first `warmup` are in (the first burst of requests arrives
    all at once, before anything is cached or pipelined), as the /verify bench's warm-up."""
    if len(answered_at) <= warmup:
        return float("nan")
    window = sorted(answered_at)[warmup - 1:]
    return (len(window) - 1) / (window[-1] - window[0])


def _phase_mean(after: str, before: str, phase: str) -> float:
    return histogram_mean(after, "facilitator_settlement_latency_seconds", before, phase=phase)


def _rpc_mean(after: str, before: str, method: str) -> float:
    return histogram_mean(after, "facilitator_rpc_request_duration_seconds", before,
                          method=method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payments", type=int, default=3000)
    parser.add_argument("--inflight", type=int, default=300)
    parser.add_argument("--block-time", type=float, default=1.0)
    parser.add_argument("--mode", choices=("both", "automine", "interval"), default="both")
    args = parser.parse_args()
    problems = []
    if args.mode in ("both", "automine"):
        problems.append(asyncio.run(run_mode("automine", args.payments, args.inflight, None)))
    if args.mode in ("both", "interval"):
        problems.append(asyncio.run(run_mode(f"{args.block_time:g} s blocks", args.payments,
                                             args.inflight, args.block_time)))
    problems = [p for p in problems if p]
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()

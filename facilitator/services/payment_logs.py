"""What the payment chain's logs mean to the facilitator: the configured assets' Transfer and
EIP-3009 AuthorizationUsed events.

Guarantees: a settlement becomes `included` from the logs when its authorization was used in a
transaction that also paid exactly what it promised (by us, or by a front-runner:
settled_by = external), or when our own signed transaction (any method, Permit2 included) paid
it; a transfer to a watched payee that matches no settlement is kept as unmatched; settlements
buried `confirmations` blocks deep in the processed canonical chain become `confirmed`; a reorg
sends affected settlements back to `broadcast` (our transaction) or `pending` (settled by someone
else's) and hands them to `on_reorged`. When the watcher runs in its own process
(`facilitator watch`), nothing is handed over: the serving process's tracker adopts such rows
from the database (Tracker.sweep).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from facilitator.adapters.chainstate import (
    AuthorizationUse,
    Block,
    PaymentChainState,
    RangeResult,
    TransferLog,
)
from facilitator.adapters.metrics import AGE_BUCKETS, Metrics, age_bucket
from facilitator.adapters.store import SettlementRow
from facilitator.core.abi import AUTHORIZATION_USED_TOPIC, TRANSFER_TOPIC
from facilitator.invariant import invariant
from facilitator.protocol.networks import Network
from facilitator.services.watcher import Derive, WatcherPolicy

TRANSFER = "0x" + TRANSFER_TOPIC.hex()
AUTHORIZATION_USED = "0x" + AUTHORIZATION_USED_TOPIC.hex()
UNFINISHED_STATES = ("pending", "signed", "broadcast", "included")
# Lower bounds of the age buckets after the first, in seconds (counted in SQL).
AGE_BOUNDS_S = (30.0, 300.0, 3600.0)
# How far back unmatched transfers are re-linked to late inclusions (bounded work per pass;
# the tracker records a front-run within seconds of its block).
LATE_LINK_WINDOW_S = 3600.0
LATE_LINK_INTERVAL_S = 10.0  # the race it repairs is rare: not a statement per watcher step
_BUCKET_LABELS = tuple(age_bucket(b) for b in (0.0, *AGE_BOUNDS_S))
invariant(_BUCKET_LABELS == AGE_BUCKETS, "AGE_BOUNDS_S must match metrics.age_bucket")


class PaymentLogs:
    def __init__(self, *, network: Network, state: PaymentChainState, metrics: Metrics,
                 policy: WatcherPolicy) -> None:
        self.network = network
        self._state = state
        self._metrics = metrics
        self._policy = policy
        self._linked_at = float("-inf")
        # Settlements moved back by a reorg (as they are now), for the tracker of this process.
        self.on_reorged: Callable[[list[SettlementRow]], Awaitable[None]] = _ignore

    def log_filter(self) -> dict[str, Any]:
        return {"address": [a.address for a in self.network.assets],
                "topics": [[TRANSFER, AUTHORIZATION_USED]]}

    async def prepare(self, blocks: list[Block], logs: list[dict[str, Any]]) -> Derive:
        transfers = [t for t in map(_transfer, logs) if t is not None]
        payees = await self._state.watched_payees(sorted({t.recipient for t in transfers}),
                                                  self._policy.watched_payees)
        watched = [t for t in transfers if t.recipient in payees]
        uses = [u for u in map(_authorization_use, logs) if u is not None]

        async def derive(conn: asyncpg.Connection) -> RangeResult:
            return await self._state.derive_payments(conn, watched, uses)
        return derive

    async def committed(self, result: RangeResult) -> None:
        net = self.network.key
        if result.unmatched_transfers:
            self._metrics.unmatched_transfers.labels(net).inc(result.unmatched_transfers)
        for _ in result.external:
            self._metrics.settlement_failures.labels(net, "front_run").inc()

    async def undo(self, conn: asyncpg.Connection, ancestor: int, accept: bool
                   ) -> list[SettlementRow]:
        return await self._state.revert_settlements(conn, ancestor, allow_confirmed=accept)

    async def protected_above(self, ancestor: int) -> int:
        return await self._state.confirmed_above(ancestor)

    async def reverted(self, moved: list[SettlementRow]) -> None:
        for _ in moved:
            self._metrics.settlement_failures.labels(self.network.key, "reorged").inc()
        if moved:
            await self.on_reorged(moved)

    async def housekeeping(self, processed: int) -> None:
        await self._unwind_orphaned()
        if time.monotonic() - self._linked_at >= LATE_LINK_INTERVAL_S:
            self._linked_at = time.monotonic()
            await self._state.link_late_inclusions(LATE_LINK_WINDOW_S)
        await self._confirm()
        await self._report_unfinished()

    async def report_halted(self) -> None:
        await self._report_unfinished()

    async def _unwind_orphaned(self) -> None:
        """A settlement the tracker saw included in a block that our canonical chain does not
        contain (reorged out before we processed that height) goes back to `broadcast` or
        `pending`."""
        moved = await self._state.unwind_orphaned_inclusions()
        if moved:
            await self.reverted(moved)

    async def _confirm(self) -> None:
        net = self.network.key
        for done in await self._state.confirm(self._policy.confirmations):
            self._metrics.settlements_confirmed.labels(net, done.settled_by or "facilitator").inc()
            latency = self._metrics.settlement_latency
            latency.labels(net, "inclusion_to_confirmation").observe(
                (done.confirmed_at - done.included_at).total_seconds())
            latency.labels(net, "end_to_end").observe(
                (done.confirmed_at - done.created_at).total_seconds())

    async def _report_unfinished(self) -> None:
        counts = {(state, age): 0 for state in UNFINISHED_STATES for age in AGE_BUCKETS}
        for state, bucket, count in await self._state.unfinished_by_age(AGE_BOUNDS_S):
            counts[(state, _BUCKET_LABELS[bucket])] = count
        for (state, age), value in counts.items():
            self._metrics.settlements_unfinished.labels(self.network.key, state, age).set(value)


def _address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


def _transfer(entry: dict[str, Any]) -> TransferLog | None:
    topics = entry.get("topics") or []
    if len(topics) != 3 or topics[0] != TRANSFER or entry.get("removed"):
        return None
    return TransferLog(block_number=int(entry["blockNumber"], 16),
                       block_hash=bytes.fromhex(entry["blockHash"][2:]),
                       tx_hash=bytes.fromhex(entry["transactionHash"][2:]),
                       log_index=int(entry["logIndex"], 16), asset=entry["address"].lower(),
                       sender=_address(topics[1]), recipient=_address(topics[2]),
                       amount=int(entry.get("data") or "0x0", 16))


def _authorization_use(entry: dict[str, Any]) -> AuthorizationUse | None:
    topics = entry.get("topics") or []
    if len(topics) != 3 or topics[0] != AUTHORIZATION_USED or entry.get("removed"):
        return None
    return AuthorizationUse(block_number=int(entry["blockNumber"], 16),
                            block_hash=bytes.fromhex(entry["blockHash"][2:]),
                            tx_hash=bytes.fromhex(entry["transactionHash"][2:]),
                            asset=entry["address"].lower(), payer=_address(topics[1]),
                            nonce=bytes.fromhex(topics[2][2:]))


async def _ignore(rows: list[SettlementRow]) -> None:
    return None

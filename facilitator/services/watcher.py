"""The chain watcher: follows the head of one chain, reads the configured assets' Transfer and
EIP-3009 AuthorizationUsed logs, matches them to settlements, confirms settlements buried
`confirmations` blocks deep, and undoes everything derived from blocks a reorg removed.

Guarantees (the Chainlink log poller's, adapted):
- No block is missed and none is processed twice, across crashes and restarts: a block range,
  what was derived from it and the checkpoint commit in one database transaction.
- A stored block whose hash is not the chain's block at that height is detected (parent-hash
  mismatch at the next range, or a hash check before confirming) and reverted, with everything
  derived from it, in one transaction; affected settlements go back to `broadcast`, and the
  tracker re-sends their stored bytes if the node dropped them (or they end `expired`).
- Only blocks on our processed canonical chain confirm anything: confirmation compares the
  settlement's block hash with the processed block at that height.
- A reorg deeper than `max_reorg_depth`, or one that would undo a confirmed settlement, halts
  confirmations on that chain (`facilitator_watcher_halted` = 1, a critical log line) until an
  operator resumes it; the head keeps being watched meanwhile.
- Log reads are bounded ranges; a provider's "range too large" halves the range.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from facilitator.adapters.chainstate import AuthorizationUse, Block, ChainState, TransferLog
from facilitator.adapters.metrics import AGE_BUCKETS, Metrics, age_bucket
from facilitator.core.abi import AUTHORIZATION_USED_TOPIC, TRANSFER_TOPIC
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.networks import Network

log = logging.getLogger("facilitator.watcher")

TRANSFER = "0x" + TRANSFER_TOPIC.hex()
AUTHORIZATION_USED = "0x" + AUTHORIZATION_USED_TOPIC.hex()


@dataclass(frozen=True, slots=True)
class WatcherPolicy:
    confirmations: int
    max_reorg_depth: int = 64
    range_blocks: int = 200
    poll_interval_s: float = 1.0
    start_lookback_blocks: int = 1_000
    retain_blocks: int = 5_000
    watched_payees: frozenset[str] = frozenset()


class ReorgDuringRead(Exception):
    """The chain changed between our reads; the step is retried from the checkpoint."""


class ChainWatcher:
    def __init__(self, *, network: Network, chain: Chain, state: ChainState, metrics: Metrics,
                 policy: WatcherPolicy) -> None:
        self.network = network
        self._chain = chain
        self._state = state
        self._metrics = metrics
        self._policy = policy
        self._range = policy.range_blocks
        self._assets = [a.address for a in network.assets]
        # Settlements moved back to `broadcast` by a reorg are handed to the tracker.
        self.on_reorged: Callable[[list[int]], Awaitable[None]] = _ignore
        # Periodic work of other components that should run while the chain is watched.
        self.after_step: Callable[[], Awaitable[None]] = _nothing

    async def resume(self) -> bool:
        """Clear a halt; the next step handles the deep reorg as accepted (confirmed settlements
        of the abandoned chain go back to broadcast). False when nothing was halted."""
        resumed = await self._state.resume_accepting_reorg()
        self._metrics.watcher_halted.labels(self.network.key).set(0)
        return resumed

    async def run(self) -> None:
        while True:
            try:
                caught_up = await self.step()
            except RpcUnavailable as exc:
                log.warning("watcher %s: chain unavailable: %s", self.network.key, exc)
                caught_up = True
            except ReorgDuringRead:
                caught_up = False
            except Exception:  # noqa: BLE001 - the watcher must survive; state is in the DB
                log.exception("watcher %s step failed", self.network.key)
                caught_up = True
            if caught_up:
                await asyncio.sleep(self._policy.poll_interval_s)

    async def step(self) -> bool:
        """Process the next range; True when caught up with the head."""
        head = int(await self._chain.request("eth_blockNumber", []), 16)
        self._metrics.chain_head.labels(self.network.key).set(head)
        cursor = await self._state.cursor()
        if cursor is None:
            await self._bootstrap(head)
            return False
        halted = cursor.halted_reason is not None
        self._report_lag(head, cursor.number, halted=halted)
        await self._state.record_chain_head(head)
        if halted:  # nothing is processed or confirmed until an operator resumes
            await self._report_unfinished()
            return True
        accept = cursor.accept_deep_reorg
        if head <= cursor.number:
            # No new block, but the tip itself may have been replaced (a reorg of the same or
            # lower height): compare our checkpoint with the node's block at that height.
            if not await self._node_has(cursor.number, cursor.hash):
                await self._handle_reorg(cursor.number, accept=accept)
                return False
            await self._housekeeping(cursor.number)
            return True
        first, last = cursor.number + 1, min(head, cursor.number + self._range)
        blocks = await self._read_blocks(first, last)
        if blocks[0].parent_hash != cursor.hash:
            await self._handle_reorg(cursor.number, accept=accept)
            return False
        await self._process(blocks)
        await self._housekeeping(blocks[-1].number)
        return blocks[-1].number >= head

    async def _node_has(self, number: int, block_hash: bytes) -> bool:
        answer = await self._chain.request("eth_getBlockByNumber", [hex(number), False])
        return isinstance(answer, dict) and bytes.fromhex(answer["hash"][2:]) == block_hash

    async def _bootstrap(self, head: int) -> None:
        """First run on this chain: start a little behind the head (settlements made before
        the watcher existed are still found by their transaction's receipt)."""
        start = max(head - self._policy.start_lookback_blocks, 0)
        [block] = await self._read_blocks(start, start)
        await self._state.commit_blocks([block], [], [])
        log.info("watcher %s starts at block %d", self.network.key, start)

    async def _read_blocks(self, first: int, last: int) -> list[Block]:
        calls = [("eth_getBlockByNumber", [hex(n), False]) for n in range(first, last + 1)]
        answers = await self._chain.request_many(calls)
        blocks: list[Block] = []
        for answer in answers:
            if not isinstance(answer, dict):  # the head moved back under us, or a node error
                break
            block = _block(answer)
            if blocks and block.parent_hash != blocks[-1].hash:
                raise ReorgDuringRead()
            blocks.append(block)
        if not blocks:
            raise ReorgDuringRead()
        return blocks

    async def _process(self, blocks: list[Block]) -> None:
        logs = await self._read_logs(blocks[0].number, blocks[-1].number)
        by_number = {b.number: b.hash for b in blocks}
        for entry in logs:  # a log from a block we did not read means the chain moved
            if by_number.get(int(entry["blockNumber"], 16)) != bytes.fromhex(entry["blockHash"][2:]):
                raise ReorgDuringRead()
        transfers = [t for t in map(_transfer, logs) if t is not None]
        payees = await self._state.watched_payees(sorted({t.recipient for t in transfers}),
                                                  self._policy.watched_payees)
        watched = [t for t in transfers if t.recipient in payees]
        uses = [u for u in map(_authorization_use, logs) if u is not None]
        result = await self._state.commit_blocks(blocks, watched, uses)
        if result.unmatched_transfers:
            self._metrics.unmatched_transfers.labels(self.network.key).inc(
                result.unmatched_transfers)
        for _ in result.external:
            self._metrics.settlement_failures.labels(self.network.key, "front_run").inc()

    async def _read_logs(self, first: int, last: int) -> list[dict[str, Any]]:
        """eth_getLogs over [first, last]; a "range too large" answer halves the range."""
        try:
            return await self._chain.request("eth_getLogs", [{
                "fromBlock": hex(first), "toBlock": hex(last), "address": self._assets,
                "topics": [[TRANSFER, AUTHORIZATION_USED]]}]) or []
        except RpcError as exc:
            if last > first and _range_too_large(exc):
                self._range = max(1, (last - first + 1) // 2)
                raise ReorgDuringRead() from None  # retried with the smaller range
            raise

    async def _handle_reorg(self, processed: int, *, accept: bool) -> None:
        """Revert to the common ancestor; a deep reorg halts instead, unless an operator has
        accepted it (`accept`, set by resume)."""
        ancestor = await self._common_ancestor(processed)
        depth = processed - ancestor
        self._metrics.reorg_depth.labels(self.network.key).observe(depth)
        deep = depth > self._policy.max_reorg_depth or await self._state.confirmed_above(ancestor)
        if deep and not accept:
            await self._halt(f"reorg of depth {depth} below block {processed} "
                             f"(maximum {self._policy.max_reorg_depth}, or it undoes "
                             "confirmed settlements)")
            return
        moved = await self._state.revert_to(ancestor, allow_confirmed=accept)
        log.warning("watcher %s: reorg of depth %d, reverted to block %d; %d settlement(s) "
                    "back to broadcast", self.network.key, depth, ancestor, len(moved))
        for _ in moved:
            self._metrics.settlement_failures.labels(self.network.key, "reorged").inc()
        if moved:
            await self.on_reorged(moved)

    async def _common_ancestor(self, processed: int) -> int:
        """Walk back until our stored hash equals the chain's hash at that height."""
        number = processed
        while number > 0:
            stored = await self._state.stored_hash(number)
            if stored is None:
                return number  # older than what we keep: treat as final
            answer = await self._chain.request("eth_getBlockByNumber", [hex(number), False])
            if isinstance(answer, dict) and bytes.fromhex(answer["hash"][2:]) == stored:
                return number
            number -= 1
        return 0

    async def _halt(self, reason: str) -> None:
        await self._state.halt(reason)
        self._metrics.watcher_halted.labels(self.network.key).set(1)
        log.critical("watcher %s HALTED: %s — confirmations stopped until an operator resumes "
                     "(POST /v1/ops/chains/%s/resume)", self.network.key, reason,
                     self.network.key)

    async def _housekeeping(self, processed: int) -> None:
        self._metrics.watcher_halted.labels(self.network.key).set(0)
        await self._unwind_orphaned()
        await self._confirm()
        await self._report_unfinished()
        await self._state.prune(processed - self._policy.retain_blocks)
        await self.after_step()

    async def _unwind_orphaned(self) -> None:
        """A settlement the tracker saw included in a block that our canonical chain does not
        contain (reorged out before we processed that height) goes back to `broadcast`."""
        moved = await self._state.unwind_orphaned_inclusions()
        if moved:
            log.warning("watcher %s: %d settlement(s) were included in orphaned blocks",
                        self.network.key, len(moved))
            for _ in moved:
                self._metrics.settlement_failures.labels(self.network.key, "reorged").inc()
            await self.on_reorged(moved)

    async def _confirm(self) -> None:
        for done in await self._state.confirm(self._policy.confirmations):
            net = self.network.key
            self._metrics.settlements_confirmed.labels(net, done.settled_by or "facilitator").inc()
            latency = self._metrics.settlement_latency
            latency.labels(net, "inclusion_to_confirmation").observe(
                (done.confirmed_at - done.included_at).total_seconds())
            latency.labels(net, "end_to_end").observe(
                (done.confirmed_at - done.created_at).total_seconds())

    async def _report_unfinished(self) -> None:
        counts = {(state, age): 0 for state in ("pending", "signed", "broadcast", "included")
                  for age in AGE_BUCKETS}
        for state, age_s in await self._state.unfinished_by_age():
            counts[(state, age_bucket(age_s))] += 1
        for (state, age), value in counts.items():
            self._metrics.settlements_unfinished.labels(self.network.key, state, age).set(value)

    def _report_lag(self, head: int, processed: int, *, halted: bool) -> None:
        self._metrics.watcher_head.labels(self.network.key).set(processed)
        self._metrics.watcher_lag.labels(self.network.key).set(max(head - processed, 0))
        self._metrics.watcher_halted.labels(self.network.key).set(1 if halted else 0)


def _block(answer: dict[str, Any]) -> Block:
    return Block(number=int(answer["number"], 16), hash=bytes.fromhex(answer["hash"][2:]),
                 parent_hash=bytes.fromhex(answer["parentHash"][2:]),
                 timestamp=int(answer["timestamp"], 16))


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


def _range_too_large(exc: RpcError) -> bool:
    text = exc.message.lower()
    return exc.code == -32005 or "range" in text or "too many" in text or "limit" in text


async def _ignore(settlement_ids: list[int]) -> None:
    return None


async def _nothing() -> None:
    return None


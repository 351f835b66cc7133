"""The chain watcher: follows the head of one chain in bounded block ranges, hands each range's
logs to a log processor (payments on Base, attestations on the OpenGradient chain), and undoes
everything derived from blocks a reorg removed.

Guarantees (the Chainlink log poller's, adapted):
- No block is missed and none is processed twice, across crashes and restarts: a block range,
  what the processor derived from it and the checkpoint commit in one database transaction.
- A stored block whose hash is not the chain's block at that height is detected (parent-hash
  mismatch at the next range, or a tip-hash check when no block is new) and reverted, with
  everything derived from it, in one transaction.
- A reorg deeper than `max_reorg_depth`, or one that would undo something the processor
  protects (confirmed settlements), halts the chain (`facilitator_watcher_halted` = 1, a
  critical log line): nothing is processed or confirmed until an operator resumes it, and the
  resume accepts that reorg once.
- A revert re-anchors the checkpoint on the node's block at the common ancestor (also when that
  block is older than what we keep); when the node cannot serve it, the chain halts with that
  reason instead of failing every step.
- Log reads are bounded ranges; a provider's "range too large" halves the range.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from facilitator.adapters.chainstate import Block, ChainState
from facilitator.adapters.metrics import Metrics
from facilitator.ports import Chain, RpcError, RpcUnavailable

log = logging.getLogger("facilitator.watcher")


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


Derive = Callable[[asyncpg.Connection], Awaitable[Any]]


class LogProcessor(Protocol):
    """What one chain's logs mean. `prepare` may do I/O and returns the database work that
    commits with the range; `undo` runs inside the revert transaction."""

    def log_filter(self) -> dict[str, Any]: ...

    async def prepare(self, blocks: list[Block], logs: list[dict[str, Any]]) -> Derive: ...

    async def committed(self, result: Any) -> None: ...

    async def undo(self, conn: asyncpg.Connection, ancestor: int, accept: bool) -> list[Any]: ...

    async def protected_above(self, ancestor: int) -> int: ...

    async def reverted(self, moved: list[Any]) -> None: ...

    async def housekeeping(self, processed: int) -> None: ...

    async def report_halted(self) -> None: ...


class ChainWatcher:
    def __init__(self, *, key: str, chain: Chain, state: ChainState, metrics: Metrics,
                 policy: WatcherPolicy, processor: LogProcessor) -> None:
        self.key = key
        self._chain = chain
        self._state = state
        self._metrics = metrics
        self._policy = policy
        self._processor = processor
        self._range = policy.range_blocks

    async def resume(self) -> bool:
        """Clear a halt; the next step handles the deep reorg as accepted. False when nothing
        was halted."""
        resumed = await self._state.resume_accepting_reorg()
        self._metrics.watcher_halted.labels(self.key).set(0)
        return resumed

    async def run(self) -> None:
        while True:
            try:
                caught_up = await self.step()
            except RpcUnavailable as exc:
                log.warning("watcher %s: chain unavailable: %s", self.key, exc)
                caught_up = True
            except ReorgDuringRead:
                caught_up = False
            except Exception:  # noqa: BLE001 - the watcher must survive; state is in the DB
                log.exception("watcher %s step failed", self.key)
                caught_up = True
            if caught_up:
                await asyncio.sleep(self._policy.poll_interval_s)

    async def step(self) -> bool:
        """Process the next range; True when caught up with the head."""
        head = int(await self._chain.request("eth_blockNumber", []), 16)
        self._metrics.chain_head.labels(self.key).set(head)
        cursor = await self._state.cursor(head)  # records the node's head too
        if cursor is None:
            await self._bootstrap(head)
            return False
        halted = cursor.halted_reason is not None
        self._report_lag(head, cursor.number, halted=halted)
        if halted:  # nothing is processed or confirmed until an operator resumes
            await self._processor.report_halted()
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
        await self._state.commit_blocks([block], _no_derivation)
        log.info("watcher %s starts at block %d", self.key, start)

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
            block_hash = bytes.fromhex(entry["blockHash"][2:])
            if by_number.get(int(entry["blockNumber"], 16)) != block_hash:
                raise ReorgDuringRead()
        derive = await self._processor.prepare(blocks, logs)
        result = await self._state.commit_blocks(blocks, derive)
        await self._processor.committed(result)

    async def _read_logs(self, first: int, last: int) -> list[dict[str, Any]]:
        """eth_getLogs over [first, last]; a "range too large" answer halves the range."""
        try:
            return await self._chain.request("eth_getLogs", [{
                "fromBlock": hex(first), "toBlock": hex(last),
                **self._processor.log_filter()}]) or []
        except RpcError as exc:
            if last > first and _range_too_large(exc):
                self._range = max(1, (last - first + 1) // 2)
                raise ReorgDuringRead() from None  # retried with the smaller range
            raise

    async def _handle_reorg(self, processed: int, *, accept: bool) -> None:
        """Revert to the common ancestor; a deep reorg halts instead, unless an operator has
        accepted it (`accept`, set by resume)."""
        ancestor = await self._common_ancestor(processed)
        if ancestor is None:
            await self._halt(f"reorg below block {processed}: the node serves no block to "
                             "re-anchor on at the common ancestor")
            return
        depth = processed - ancestor.number
        self._metrics.reorg_depth.labels(self.key).observe(depth)
        deep = (depth > self._policy.max_reorg_depth
                or await self._processor.protected_above(ancestor.number) > 0)
        if deep and not accept:
            await self._halt(f"reorg of depth {depth} below block {processed} "
                             f"(maximum {self._policy.max_reorg_depth}, or it undoes "
                             "confirmed settlements)")
            return

        async def undo(conn: asyncpg.Connection, block: int) -> list[Any]:
            return await self._processor.undo(conn, block, accept)
        moved = await self._state.revert_to(ancestor, undo)
        log.warning("watcher %s: reorg of depth %d, reverted to block %d; %d record(s) moved "
                    "back", self.key, depth, ancestor.number, len(moved))
        await self._processor.reverted(moved)

    async def _common_ancestor(self, processed: int) -> Block | None:
        """Walk back until our stored hash equals the node's hash at that height, and return
        the node's block there. A height we no longer keep (pruned, or below the first block
        we processed) is treated as final: the node's block at it is the anchor. None when the
        node has no block to anchor on."""
        number = processed
        while True:
            stored = await self._state.stored_hash(number)
            answer = await self._chain.request("eth_getBlockByNumber", [hex(number), False])
            node = _block(answer) if isinstance(answer, dict) else None
            if stored is None or number == 0:
                return node
            if node is not None and node.hash == stored:
                return node
            number -= 1

    async def _halt(self, reason: str) -> None:
        await self._state.halt(reason)
        self._metrics.watcher_halted.labels(self.key).set(1)
        log.critical("watcher %s HALTED: %s — nothing is confirmed until an operator resumes "
                     "(POST /v1/ops/chains/%s/resume)", self.key, reason, self.key)

    async def _housekeeping(self, processed: int) -> None:
        self._metrics.watcher_halted.labels(self.key).set(0)
        await self._processor.housekeeping(processed)
        await self._state.prune(processed - self._policy.retain_blocks)

    def _report_lag(self, head: int, processed: int, *, halted: bool) -> None:
        self._metrics.watcher_head.labels(self.key).set(processed)
        self._metrics.watcher_lag.labels(self.key).set(max(head - processed, 0))
        self._metrics.watcher_halted.labels(self.key).set(1 if halted else 0)


def _block(answer: dict[str, Any]) -> Block:
    return Block(number=int(answer["number"], 16), hash=bytes.fromhex(answer["hash"][2:]),
                 parent_hash=bytes.fromhex(answer["parentHash"][2:]),
                 timestamp=int(answer["timestamp"], 16))


def _range_too_large(exc: RpcError) -> bool:
    text = exc.message.lower()
    return exc.code == -32005 or "range" in text or "too many" in text or "limit" in text


async def _no_derivation(conn: asyncpg.Connection) -> None:
    return None

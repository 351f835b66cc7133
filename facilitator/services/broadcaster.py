"""The one place that sends transactions from a facilitator key: nonces, fees, gas, write-ahead.

One `Broadcaster` task per (network, signer) drains a bounded queue of claimed settlements in
batches: it checks that the signer can pay, allocates consecutive nonces, signs, stores every
signed raw transaction (one statement), and only then sends them (one JSON-RPC batch).

Guarantees:
- Write-ahead: no bytes reach a node before their row is `signed` with raw tx and hash stored.
- Nonces come from one allocator in one task, so hundreds of concurrent settles never collide
  ("nonce too low" / "replacement underpriced" cannot come from ourselves). After any send
  failure the allocator re-reads the chain's pending nonce and never moves below it.
- A nonce we allocated but could not use is never left as a hole that would stall every later
  transaction: it is reused by the next allocation, or filled by a zero-value self-transfer.
- A send that got no answer is Unknown: the row stays `signed` and the tracker re-sends the
  identical bytes; it is never re-signed unless the node proves those bytes can never be mined.
- The signer refuses work it cannot pay for (balance minus the worst-case cost of everything in
  flight), with a clear message and a metric, instead of broadcasting a doomed transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from facilitator.adapters.metrics import Metrics
from facilitator.adapters.signer import SignedTx, SignerKey, TxFields, sign_eip1559
from facilitator.adapters.store import SettlementRow, Signed, Store
from facilitator.core.fees import capped_max_fee, capped_priority_fee
from facilitator.core.send_errors import already_known, insufficient_funds, nonce_taken
from facilitator.core.settlement import Rejected
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.networks import Network
from facilitator.protocol.reasons import Reason
from facilitator.services.outcomes import OutcomeBoard
from facilitator.invariant import invariant

log = logging.getLogger("facilitator.broadcaster")

FILLER_GAS = 21_000
VIEW_MAX_AGE_S = 1.0
MAX_RESIGNS = 3


@dataclass(frozen=True, slots=True)
class GasPolicy:
    gas_limit_cap: int
    max_fee_per_gas_cap_wei: int
    priority_fee_wei: int
    batch_max: int = 100
    queue_max: int = 5_000


@dataclass(slots=True)
class Job:
    row: SettlementRow
    gas_limit: int
    resigns: int = 0
    submitted_at: float = field(default_factory=time.monotonic)


class Overloaded(Exception):
    """The signer's queue is full; the caller answers without claiming more work."""


@dataclass(frozen=True, slots=True)
class _ChainView:
    base_fee: int
    balance: int
    pending_nonce: int


class Broadcaster:
    def __init__(self, *, network: Network, chain: Chain, store: Store, key: SignerKey,
                 board: OutcomeBoard, metrics: Metrics, policy: GasPolicy) -> None:
        self.network = network
        self.key = key
        self._chain = chain
        self._store = store
        self._board = board
        self._metrics = metrics
        self._policy = policy
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=policy.queue_max)
        self._next_nonce: int | None = None
        self._balance_read_at = float("-inf")
        self._view: _ChainView | None = None
        self._view_read_at = float("-inf")
        self.on_sent: Callable[[Job, SignedTx, bool], None] = lambda job, tx, known: None
        self.reserved_wei: Callable[[], int] = lambda: 0

    @property
    def address(self) -> str:
        return self.key.address.lower()

    async def start(self) -> None:
        """Initialise the nonce from the chain and from our own unfinished rows."""
        chain_nonce = int(await self._chain.request(
            "eth_getTransactionCount", [self.address, "pending"]), 16)
        stored = await self._store.max_signer_nonce(self.network.chain_id, self.address)
        self._next_nonce = max(chain_nonce, (stored + 1) if stored is not None else 0)
        await self.refresh_balance()

    async def refresh_balance(self, min_interval_s: float = 0.0) -> None:
        """The signer balance gauge, also when no settlement is being sent (idle signers must
        still page someone when they run dry)."""
        now = time.monotonic()
        if now - self._balance_read_at < min_interval_s:
            return
        self._balance_read_at = now
        balance = await self._chain.request("eth_getBalance", [self.address, "latest"])
        self._metrics.signer_balance_wei.labels(self.network.key, self.key.address).set(
            int(balance, 16))

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.network.key}: signer queue is full") from None

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._policy.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._process(batch)
            except Exception:  # noqa: BLE001 - the sender must survive; rows stay recoverable
                log.exception("broadcast batch failed; rows stay pending for recovery")
                await self._fail_unsent(batch, "internal error while broadcasting")

    async def _process(self, batch: list[Job]) -> None:
        view = await self._chain_view()
        if self._tight(view, batch):
            self._view = None  # close to empty: decide on a fresh balance, not a cached one
            view = await self._chain_view()
        self._next_nonce = max(self._next_nonce or 0, view.pending_nonce)
        max_fee = self._max_fee(view.base_fee)
        affordable = await self._refuse_unaffordable(batch, view.balance, max_fee)
        signed = await self._sign_and_store(affordable, max_fee)
        if signed:
            await self._send(signed)

    def _tight(self, view: _ChainView, batch: list[Job]) -> bool:
        cost = sum(job.gas_limit for job in batch) * self._max_fee(view.base_fee)
        return view.balance - self.reserved_wei() < 4 * cost

    async def _chain_view(self) -> _ChainView:
        """Fee, balance and pending nonce, read at most once per `VIEW_MAX_AGE_S`: a batch
        every few milliseconds under load must not wait for a round trip each time. Stale by
        under a block is safe: the nonce never moves below our own allocator, and the balance
        check already reserves the cost of everything in flight."""
        now = time.monotonic()
        if self._view is None or now - self._view_read_at > VIEW_MAX_AGE_S:
            self._view = await self._read_chain()
            self._view_read_at = now
        return self._view

    async def _read_chain(self) -> _ChainView:
        block, balance, pending = await self._chain.request_many([
            ("eth_getBlockByNumber", ["latest", False]),
            ("eth_getBalance", [self.address, "latest"]),
            ("eth_getTransactionCount", [self.address, "pending"])])
        for answer in (block, balance, pending):
            if isinstance(answer, RpcError):
                raise RpcUnavailable(f"chain view failed: {answer.message}")
        self._metrics.signer_balance_wei.labels(self.network.key, self.key.address).set(
            int(balance, 16))
        return _ChainView(base_fee=int(block.get("baseFeePerGas") or "0x0", 16),
                          balance=int(balance, 16), pending_nonce=int(pending, 16))

    def _max_fee(self, base_fee: int) -> int:
        """The shared fee rule (`core.fees`): 2 x base fee + tip, capped by config."""
        return capped_max_fee(base_fee, self._policy.priority_fee_wei,
                              self._policy.max_fee_per_gas_cap_wei)

    def _priority_fee(self, max_fee: int) -> int:
        return capped_priority_fee(self._policy.priority_fee_wei, max_fee)

    async def _refuse_unaffordable(self, batch: list[Job], balance: int, max_fee: int
                                   ) -> list[Job]:
        budget = balance - self.reserved_wei()
        affordable = []
        for job in batch:
            cost = job.gas_limit * max_fee
            if cost <= budget:
                budget -= cost
                affordable.append(job)
                continue
            self._metrics.signer_underfunded.labels(self.network.key).inc()
            self._metrics.settlement_failures.labels(self.network.key, "signer_underfunded").inc()
            await self._fail(job, Reason.UNEXPECTED_SETTLE_ERROR,
                             f"facilitator signer {self.key.address} cannot pay gas for this "
                             "settlement; settlement refused (operator: fund the signer)")
        return affordable

    async def _sign_and_store(self, jobs: list[Job], max_fee: int) -> list[tuple[Job, SignedTx]]:
        if not jobs:
            return []
        invariant(self._next_nonce is not None, "start() first")
        first_nonce = self._next_nonce
        signed = []
        for job in jobs:
            tx = sign_eip1559(self.key, TxFields(
                chain_id=self.network.chain_id, nonce=self._next_nonce,
                max_priority_fee_per_gas=self._priority_fee(max_fee),
                max_fee_per_gas=max_fee, gas_limit=job.gas_limit, to=job.row.call_to, value=0,
                data=job.row.calldata))
            self._next_nonce += 1
            signed.append((job, tx))
        try:
            moved = await self._store.mark_signed(
                [_signed_record(job, tx, self.address) for job, tx in signed])
        except Exception:
            self._next_nonce = first_nonce  # nothing was sent: the nonces are still free
            raise
        return await self._keep_stored(signed, moved)

    async def _keep_stored(self, signed: list[tuple[Job, SignedTx]], moved: set[int]
                           ) -> list[tuple[Job, SignedTx]]:
        """Only rows whose signed state was stored may be sent; a nonce whose row did not move
        (its state changed under us) must still be consumed, so it gets a filler."""
        kept = []
        for job, tx in signed:
            if job.row.id in moved:
                kept.append((job, tx))
            else:
                log.error("settlement %s left pending before signing; filling nonce %s",
                          job.row.id, tx.fields.nonce)
                await self.fill_nonce(tx.fields.nonce, tx.fields.max_fee_per_gas)
        return kept

    async def _send(self, signed: list[tuple[Job, SignedTx]]) -> None:
        calls = [("eth_sendRawTransaction", ["0x" + tx.raw.hex()]) for _, tx in signed]
        try:
            answers = await self._chain.request_many(calls, retryable=True)
        except RpcUnavailable:
            # Unknown: the node may have them. The tracker re-sends the same bytes.
            for job, tx in signed:
                self.on_sent(job, tx, False)
            return
        accepted, problems = [], []
        for (job, tx), answer in zip(signed, answers, strict=True):
            if isinstance(answer, RpcError) and not already_known(answer.message):
                problems.append((job, tx, answer))
            else:
                accepted.append((job, tx))
        if accepted:
            await self._store.mark_broadcast([job.row.id for job, _ in accepted])
            for job, tx in accepted:
                self.on_sent(job, tx, True)
        if problems:
            await self._handle_rejections(
                problems, sent_nonces=[t.fields.nonce for _, t in accepted])

    async def _handle_rejections(self, problems: list[tuple[Job, SignedTx, RpcError]],
                                 sent_nonces: list[int]) -> None:
        highest_sent = max(sent_nonces, default=-1)
        reusable: list[int] = []  # refused nonces above everything sent: no hole, reuse them
        for job, tx, error in problems:
            if nonce_taken(error.message):
                if await self._node_knows(tx):  # ours after all (an earlier attempt sent it)
                    await self._store.mark_broadcast([job.row.id])
                    self.on_sent(job, tx, True)
                else:
                    await self._resign(job, "nonce_taken")
                continue
            await self._refused(job, error)
            if tx.fields.nonce < highest_sent:
                await self.fill_nonce(tx.fields.nonce, tx.fields.max_fee_per_gas)
            else:
                reusable.append(tx.fields.nonce)
        await self._resync_nonce("send_rejected", min(reusable, default=None))

    async def _refused(self, job: Job, error: RpcError) -> None:
        """The node refused the transaction. An empty signer (drained since our last balance
        read) is reported as such: it is the operator's problem, not the payment's."""
        if insufficient_funds(error.message):
            self._metrics.signer_underfunded.labels(self.network.key).inc()
            self._metrics.settlement_failures.labels(self.network.key, "signer_underfunded").inc()
            await self._fail(job, Reason.UNEXPECTED_SETTLE_ERROR,
                             f"facilitator signer {self.key.address} cannot pay gas for this "
                             "settlement; settlement refused (operator: fund the signer)")
            return
        self._metrics.settlement_failures.labels(self.network.key, "send_rejected").inc()
        await self._fail(job, Reason.UNEXPECTED_SETTLE_ERROR,
                         f"node refused the settlement transaction: {error.message[:200]}")

    async def _resync_nonce(self, cause: str, reusable: int | None) -> None:
        """Re-read the chain's pending nonce; never allocate below it, and reuse our lowest
        refused nonce when nothing above it was sent (so no hole forms)."""
        self._view = None  # fee, balance and nonce are read afresh for the next batch
        self._metrics.signer_nonce_resets.labels(self.network.key, cause).inc()
        chain_nonce = int(await self._chain.request(
            "eth_getTransactionCount", [self.address, "pending"]), 16)
        invariant(self._next_nonce is not None, "start() first")
        local = reusable if reusable is not None else self._next_nonce
        self._next_nonce = max(chain_nonce, local)

    async def _node_knows(self, tx: SignedTx) -> bool:
        known = await self._chain.request("eth_getTransactionByHash", ["0x" + tx.tx_hash.hex()])
        return known is not None

    async def _resign(self, job: Job, cause: str) -> None:
        """The node proved these bytes can never be mined: same authorization, new transaction."""
        self._metrics.signer_nonce_resets.labels(self.network.key, cause).inc()
        fresh = await self._store.mark_needs_resign(job.row.id) \
            if job.resigns < MAX_RESIGNS else None
        if fresh is None:
            self._metrics.settlement_failures.labels(self.network.key, "send_rejected").inc()
            await self._fail(job, Reason.UNEXPECTED_SETTLE_ERROR,
                             "settlement transaction could not be placed after re-signing")
            return
        self.submit(Job(row=fresh, gas_limit=job.gas_limit, resigns=job.resigns + 1))

    def resubmit(self, row: SettlementRow, gas_limit: int) -> None:
        """Queue a pending row (recovery after restart, or a re-sign requested by the tracker)."""
        self.submit(Job(row=row, gas_limit=gas_limit))

    async def fill_nonce(self, nonce: int, max_fee: int) -> None:
        """Consume `nonce` with a zero-value self-transfer so later transactions are not stuck."""
        tx = sign_eip1559(self.key, TxFields(
            chain_id=self.network.chain_id, nonce=nonce,
            max_priority_fee_per_gas=self._priority_fee(max_fee),
            max_fee_per_gas=max_fee, gas_limit=FILLER_GAS, to=self.address, value=0, data=b""))
        try:
            await self._chain.request("eth_sendRawTransaction", ["0x" + tx.raw.hex()])
            log.warning("filled signer nonce %s on %s", nonce, self.network.key)
        except (RpcError, RpcUnavailable) as exc:
            log.critical("could not fill signer nonce %s on %s: %s", nonce, self.network.key, exc)

    async def _fail(self, job: Job, reason: Reason, message: str) -> None:
        await self._store.mark_failed(job.row.id, str(reason), message)
        self._board.resolve(job.row.id, Rejected(reason, message))

    async def _fail_unsent(self, batch: list[Job], message: str) -> None:
        for job in batch:
            current = await _safe_get(self._store, job.row.id)
            if current is not None and current.state == "pending":
                self._metrics.settlement_failures.labels(self.network.key, "internal_error").inc()
                await self._fail(job, Reason.UNEXPECTED_SETTLE_ERROR, message)


def _signed_record(job: Job, tx: SignedTx, signer: str) -> Signed:
    return Signed(settlement_id=job.row.id, signer=signer, signer_nonce=tx.fields.nonce,
                  tx_hash=tx.tx_hash, raw_tx=tx.raw, gas_limit=tx.fields.gas_limit,
                  max_fee_per_gas=tx.fields.max_fee_per_gas)


async def _safe_get(store: Store, settlement_id: int) -> Any:
    try:
        return await store.get(settlement_id)
    except Exception:  # noqa: BLE001 - best effort during failure handling
        return None

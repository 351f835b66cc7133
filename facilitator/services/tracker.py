"""Follows every settlement transaction we signed until it has a receipt, and turns the receipt
into an outcome.

Guarantees:
- Receipts are fetched in batches once per new head (plus a bounded poll), so 300 transactions in
  flight cost one round trip per block, not 300 per poll. A head counts as checked only after a
  complete pass, and `receipt_recheck_s` (3 s) after the last pass the receipts are asked
  again even without a new block: a pass cut short by the node, or a node whose receipts lag
  its head (load-balanced RPCs), must not leave a mined transaction unnoticed until the next
  block, which on a quiet chain may never come.
- Success means status 1 *and* the asset's Transfer(payer, payTo, amount) log in the receipt.
- A reverted transaction is checked for front-running: if another transaction consumed the
  authorization (EIP-3009: AuthorizationUsed; exact Permit2: a call of the exact proxy's settle
  for this owner and nonce) and moved the money, the payment is recorded as settled by that
  transaction (settled_by = external) — neither lost nor settled twice.
- A transaction the node no longer knows (dropped, node restart) is re-sent with the identical
  stored bytes while the authorization is valid; afterwards the row ends `expired` (with its
  transfer method's expiry reason: `schemes.common.traits_of`) and the signer nonce it held is
  filled so later transactions are not stuck. A node's refusal of a re-send is classified by
  `core.send_errors`, as the broadcaster's and the data relay's are.
- Unfinished rows nobody in this process holds are adopted: those a reorg moved back (handed
  over by the in-process watcher, `adopt`), and, every `adopt_interval_s`, any found in the
  database (`sweep`: a watcher in another process, a lost task). Signed/broadcast rows are
  followed again; a pending row goes to `recover_pending` (the settler's recovery: expired,
  settled by someone else's transaction, refused, or signed and sent again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from facilitator.adapters.metrics import Metrics
from facilitator.adapters.signer import SignedTx
from facilitator.adapters.store import Inclusion, SettlementRow, Store
from facilitator.core.receipts import (
    ExpectedTransfer,
    authorization_used_filter,
    find_transfer_log,
    receipt_succeeded,
    settles_exact_permit,
    transfer_filter,
)
from facilitator.core.send_errors import already_known, nonce_taken
from facilitator.core.settlement import Rejected, Settled, SettledBy, State, Unknown
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.networks import Network
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import FrontRunEvidence, MethodTraits, traits_of
from facilitator.services.outcomes import OutcomeBoard
from facilitator.invariant import invariant

log = logging.getLogger("facilitator.tracker")

RECEIPT_CHUNK = 200
ADOPT_LIMIT = 100  # rows adopted per sweep (the next sweep takes the following ones)
FRONT_RUN_CANDIDATES = 100  # equal transfers examined per exact-Permit2 front-run search


@dataclass(slots=True)
class InFlight:
    settlement_id: int
    tx_hash: bytes
    raw_tx: bytes
    signer_nonce: int
    gas_limit: int
    max_fee_per_gas: int
    expected: ExpectedTransfer
    auth_nonce: bytes
    valid_before: int
    known_to_node: bool  # False while a send got no answer (row still `signed`)
    sent_at: float  # monotonic
    last_seen_at: float
    traits: MethodTraits  # the transfer method's: failure and expiry reasons, front-running

    @property
    def hash_hex(self) -> str:
        return "0x" + self.tx_hash.hex()

    @classmethod
    def from_row(cls, row: SettlementRow, *, known_to_node: bool, check_now: bool = False
                 ) -> InFlight:
        """From a stored signed/broadcast row (recovery); `check_now` asks the node at once."""
        invariant(row.tx_hash is not None and row.raw_tx is not None
                  and row.signer_nonce is not None, "a tracked row has signed bytes")
        now = time.monotonic()
        return cls(settlement_id=row.id, tx_hash=row.tx_hash, raw_tx=row.raw_tx,
                   signer_nonce=row.signer_nonce, gas_limit=row.gas_limit or 0,
                   max_fee_per_gas=row.max_fee_per_gas or 0,
                   expected=ExpectedTransfer(row.asset, row.payer, row.pay_to, row.amount),
                   auth_nonce=row.nonce, valid_before=row.valid_before,
                   known_to_node=known_to_node, sent_at=now,
                   last_seen_at=float("-inf") if check_now else now,
                   traits=traits_of(row.scheme, row.transfer_method))

    @classmethod
    def from_signed(cls, row: SettlementRow, tx: SignedTx, *, known_to_node: bool) -> InFlight:
        """From a pending row and the transaction just signed for it."""
        now = time.monotonic()
        return cls(settlement_id=row.id, tx_hash=tx.tx_hash, raw_tx=tx.raw,
                   signer_nonce=tx.fields.nonce, gas_limit=tx.fields.gas_limit,
                   max_fee_per_gas=tx.fields.max_fee_per_gas,
                   expected=ExpectedTransfer(row.asset, row.payer, row.pay_to, row.amount),
                   auth_nonce=row.nonce, valid_before=row.valid_before,
                   known_to_node=known_to_node, sent_at=now, last_seen_at=now,
                   traits=traits_of(row.scheme, row.transfer_method))


class Tracker:
    def __init__(self, *, network: Network, chain: Chain, store: Store, board: OutcomeBoard,
                 metrics: Metrics, poll_interval_s: float = 0.1, resend_after_s: float = 4.0,
                 front_run_lookback_blocks: int = 5_000, adopt_interval_s: float = 10.0,
                 adopt_grace_s: float = 10.0, receipt_recheck_s: float = 3.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.network = network
        self._chain = chain
        self._store = store
        self._board = board
        self._metrics = metrics
        self._poll_interval_s = poll_interval_s
        self._resend_after_s = resend_after_s
        self._lookback = front_run_lookback_blocks
        self._clock = clock
        self._inflight: dict[int, InFlight] = {}
        self._wake = asyncio.Event()
        self._last_head = -1
        # Longer than a Base block (2 s): on a live chain new heads drive the passes and the
        # recheck only fires on a quiet chain, or to retry a failed pass.
        self._receipt_recheck_s = receipt_recheck_s
        self._checked_at = float("-inf")
        self._pass_failed = False
        # The sweep: how often, and how long a row must be unchanged before it is adopted (so a
        # /settle between its claim and its broadcast is never taken over).
        self.adopt_interval_s = adopt_interval_s
        self.adopt_grace_s = adopt_grace_s
        self._swept_at = time.monotonic()  # start-up recovery has just run
        self.signer = "unknown"  # the signer address, for the in-flight gauge (set by wiring)
        self.resign: Callable[[int], Awaitable[None]] = _noop_resign
        self.fill_nonce: Callable[[int, int], Awaitable[None]] = _noop_fill
        # The settler's recovery of a pending row: expire, record an external settlement,
        # refuse, or check and send a new transaction (set by the `Settler`, as `resign` is).
        self.recover_pending: Callable[[SettlementRow], Awaitable[None]] = _noop_recover
        # Periodic work of the serving process, run with each sweep (watcher or not).
        self.on_sweep: Callable[[], Awaitable[None]] = _nothing

    def watch(self, item: InFlight) -> None:
        self._inflight[item.settlement_id] = item
        self._wake.set()

    def reserved_wei(self) -> int:
        """Worst-case gas cost of everything signed and not yet mined."""
        return sum(i.gas_limit * i.max_fee_per_gas for i in self._inflight.values())

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
            except asyncio.TimeoutError:
                pass
            woken, self._wake = self._wake.is_set(), asyncio.Event()
            try:
                await self._tick(woken)
            except RpcUnavailable as exc:
                log.warning("tracker tick skipped on %s: %s", self.network.key, exc)
            except Exception:  # noqa: BLE001 - the tracker must survive; state is in the DB
                log.exception("tracker tick failed on %s", self.network.key)
            if time.monotonic() - self._swept_at >= self.adopt_interval_s:
                self._swept_at = time.monotonic()
                await self._sweep_safely()

    # -- adoption -----------------------------------------------------------------------------

    async def adopt(self, rows: list[SettlementRow]) -> None:
        """Follow unfinished rows nobody in this process holds: signed/broadcast rows for their
        receipt (re-sending their stored bytes if dropped), pending rows to be settled again."""
        adopted = 0
        for row in rows:
            if row.id in self._inflight or self._board.owns(row.id):
                continue
            if row.state in (State.SIGNED, State.BROADCAST) and row.raw_tx is not None:
                self._board.expect(row.id, (row.asset, row.payer, row.nonce))
                self.watch(InFlight.from_row(row, known_to_node=row.state == State.BROADCAST,
                                             check_now=True))
            elif row.state == State.PENDING:
                self._board.expect(row.id, (row.asset, row.payer, row.nonce))
                try:
                    await self.recover_pending(row)
                except Exception as exc:  # noqa: BLE001 - released; the next sweep retries
                    log.warning("adopting pending settlement %s on %s failed: %r", row.id,
                                self.network.key, exc)
                    self._board.resolve(row.id, Unknown(None, "recovery interrupted"))
                    continue
            else:
                continue
            adopted += 1
        if adopted:
            log.warning("adopted %d unfinished settlement(s) on %s", adopted, self.network.key)

    async def sweep(self) -> None:
        """Adopt the unfinished rows of this chain that no task of this process holds and that
        have not changed for `adopt_grace_s` (bounded, index-backed)."""
        held = list(self._inflight.keys() | self._board.unresolved())
        signer = self.signer if self.signer.startswith("0x") else None
        rows = await self._store.unheld(self.network.chain_id, held,
                                        unchanged_for_s=self.adopt_grace_s, signer=signer,
                                        limit=ADOPT_LIMIT)
        await self.adopt(rows)

    async def _sweep_safely(self) -> None:
        for step in (self.sweep, self.on_sweep):
            try:
                await step()
            except RpcUnavailable as exc:
                log.warning("tracker sweep skipped on %s: %s", self.network.key, exc)
            except Exception:  # noqa: BLE001 - the tracker must survive; state is in the DB
                log.exception("tracker sweep failed on %s", self.network.key)

    async def _tick(self, woken: bool) -> None:
        self._metrics.signer_inflight.labels(self.network.key, self.signer).set(len(self._inflight))
        if not self._inflight:
            return
        try:
            await self._check_receipts_when_due(woken)
        finally:  # a failing receipt pass must not stop dropped transactions being re-sent
            await self._resend_stale()

    async def _check_receipts_when_due(self, woken: bool) -> None:
        """A pass per new head (or wake), and every `receipt_recheck_s` regardless. A head
        counts as checked only after a complete pass; a failed pass is retried after
        `receipt_recheck_s`, not at every poll."""
        head = int(await self._chain.request("eth_blockNumber", []), 16)
        now = time.monotonic()
        new_head = head != self._last_head and not self._pass_failed
        if not (new_head or woken or now - self._checked_at >= self._receipt_recheck_s):
            return
        self._checked_at, self._pass_failed = now, True
        await self._check_receipts()
        self._last_head, self._pass_failed = head, False

    async def _check_receipts(self) -> None:
        items = list(self._inflight.values())
        for start in range(0, len(items), RECEIPT_CHUNK):
            chunk = items[start:start + RECEIPT_CHUNK]
            receipts = await self._chain.request_many(
                [("eth_getTransactionReceipt", [i.hash_hex]) for i in chunk])
            included: list[tuple[InFlight, Inclusion]] = []
            for item, receipt in zip(chunk, receipts, strict=True):
                if isinstance(receipt, dict):
                    found = await self._judge_or_keep(item, receipt)
                    if found is not None:
                        included.append((item, found))
            await self._record_inclusions(included)

    async def _judge_or_keep(self, item: InFlight, receipt: dict[str, Any]
                             ) -> Inclusion | None:
        """`_judge`, except that a node failing the follow-up lookups (front-run search,
        block) leaves this one item in flight for the next pass instead of the whole pass."""
        try:
            return await self._judge(item, receipt)
        except (RpcUnavailable, RpcError) as exc:
            log.warning("settlement %s on %s: receipt not judged yet: %s", item.settlement_id,
                        self.network.key, exc)
            return None

    async def _judge(self, item: InFlight, receipt: dict[str, Any]) -> Inclusion | None:
        """An Inclusion for a paying receipt; anything else is settled here and now."""
        if receipt_succeeded(receipt):
            log_index = find_transfer_log(receipt, item.expected)
            if log_index is not None:
                return _inclusion(item.settlement_id, receipt, log_index, SettledBy.FACILITATOR)
            await self._finish_failed(
                item, Reason.TRANSFER_EVENT_MISMATCH,
                "receipt has no Transfer(payer, payTo, amount) from the asset")
            return None
        external = await self._find_external_settlement(item, receipt)
        if external is not None:
            return external
        await self._finish_reverted(item, receipt)
        return None

    async def _record_inclusions(self, included: list[tuple[InFlight, Inclusion]]) -> None:
        if not included:
            return
        moved = await self._store.mark_included([inc for _, inc in included])
        now = time.monotonic()
        for item, inc in included:
            self._inflight.pop(item.settlement_id, None)
            if inc.settlement_id in moved:  # else the chain watcher recorded it first
                self._metrics.settlement_latency.labels(
                    self.network.key, "broadcast_to_inclusion").observe(now - item.sent_at)
                if inc.settled_by is SettledBy.EXTERNAL:
                    self._count_failure("front_run")
            self._board.resolve(inc.settlement_id, Settled(
                inc.tx_hash, inc.block_number, inc.block_hash, inc.log_index, inc.settled_by))

    async def _find_external_settlement(self, item: InFlight, receipt: dict[str, Any]
                                        ) -> Inclusion | None:
        """Did another transaction consume this authorization (front-running)? Only where the
        traits say another sender can (EIP-3009, exact Permit2); the upto proxy only accepts
        its witness's facilitator (us)."""
        if item.traits.front_run is None:
            return None
        found = await find_external_settlement(
            self._chain, item.settlement_id, item.traits.front_run, item.expected,
            item.auth_nonce, exclude_tx=item.hash_hex,
            from_block=int(receipt["blockNumber"], 16) - self._lookback)
        if found is not None:
            log.warning("settlement %s was front-run by 0x%s", item.settlement_id,
                        found.tx_hash.hex())
        return found

    async def _finish_reverted(self, item: InFlight, receipt: dict[str, Any]) -> None:
        block = await self._chain.request("eth_getBlockByNumber", [receipt["blockNumber"], False])
        mined_at = int(block["timestamp"], 16) if isinstance(block, dict) else 0
        mined_in = int(receipt["blockNumber"], 16)
        if mined_at > item.valid_before:
            await self._finish_failed(item, item.traits.expired_reason,
                                      "transaction mined after the authorization expired",
                                      expired=True, block_number=mined_in)
        else:
            await self._finish_failed(item, item.traits.failure_reason,
                                      "settlement transaction reverted", block_number=mined_in)

    def _count_failure(self, cause: str) -> None:
        self._metrics.settlement_failures.labels(self.network.key, cause).inc()

    async def _finish_failed(self, item: InFlight, reason: Reason, message: str,
                             *, expired: bool = False, block_number: int | None = None) -> None:
        self._count_failure("expired" if expired else
                            "reverted" if reason is item.traits.failure_reason else str(reason))
        self._inflight.pop(item.settlement_id, None)
        await self._store.mark_failed(item.settlement_id, str(reason), message,
                                      tx_hash=item.tx_hash, expired=expired,
                                      block_number=block_number)
        mined = item.tx_hash if block_number is not None else None
        self._board.resolve(item.settlement_id, Rejected(reason, message, mined))

    async def _resend_stale(self) -> None:
        now = time.monotonic()
        stale = [i for i in self._inflight.values() if now - i.last_seen_at >= self._resend_after_s]
        if not stale:
            return
        known = await self._chain.request_many(
            [("eth_getTransactionByHash", [i.hash_hex]) for i in stale])
        for item, tx in zip(stale, known, strict=True):
            item.last_seen_at = now
            if tx is None or isinstance(tx, RpcError):
                await self._resend(item)

    async def _resend(self, item: InFlight) -> None:
        if self._clock() >= item.valid_before:
            await self._finish_failed(item, item.traits.expired_reason,
                                      "transaction dropped and the authorization expired",
                                      expired=True)
            await self.fill_nonce(item.signer_nonce, item.max_fee_per_gas)
            return
        try:
            await self._chain.request("eth_sendRawTransaction", ["0x" + item.raw_tx.hex()])
        except RpcError as exc:
            if nonce_taken(exc.message):
                await self._handle_nonce_taken(item)
                return
            if not already_known(exc.message):
                log.warning("re-send of settlement %s refused: %s", item.settlement_id, exc.message)
                return
        log.info("re-sent identical bytes for settlement %s", item.settlement_id)
        self._count_failure("dropped")
        if not item.known_to_node:
            await self._store.mark_broadcast([item.settlement_id])
            item.known_to_node = True

    async def _handle_nonce_taken(self, item: InFlight) -> None:
        """Our nonce was consumed. Either by this very transaction (receipt arriving) or by
        another one; only in the second case may the authorization get a new transaction."""
        receipt = await self._chain.request("eth_getTransactionReceipt", [item.hash_hex])
        if isinstance(receipt, dict):
            return  # the next receipt pass settles it
        self._inflight.pop(item.settlement_id, None)
        await self.resign(item.settlement_id)


async def find_external_settlement(chain: Chain, settlement_id: int, evidence: FrontRunEvidence,
                                   expected: ExpectedTransfer, auth_nonce: bytes, *,
                                   exclude_tx: str | None, from_block: int) -> Inclusion | None:
    """The transaction (not `exclude_tx`) that consumed this authorization and paid exactly
    what it promised, if any, found by the evidence its transfer method leaves."""
    finder = _FINDERS[evidence]
    return await finder(chain, settlement_id, expected, auth_nonce, exclude_tx, from_block)


async def _by_authorization_used(chain: Chain, settlement_id: int, expected: ExpectedTransfer,
                                 auth_nonce: bytes, exclude_tx: str | None, from_block: int
                                 ) -> Inclusion | None:
    """EIP-3009: the token's AuthorizationUsed(payer, nonce) event. A cancelled authorization
    pays nothing and is not found."""
    logs = await chain.request("eth_getLogs", [authorization_used_filter(
        expected.asset, expected.payer, auth_nonce, from_block)])
    for entry in logs or []:
        if entry.get("transactionHash") == exclude_tx:
            continue
        receipt = await chain.request("eth_getTransactionReceipt", [entry["transactionHash"]])
        if isinstance(receipt, dict) and receipt_succeeded(receipt):
            log_index = find_transfer_log(receipt, expected)
            if log_index is not None:
                return _inclusion(settlement_id, receipt, log_index, SettledBy.EXTERNAL)
    return None


async def _by_exact_proxy_call(chain: Chain, settlement_id: int, expected: ExpectedTransfer,
                               auth_nonce: bytes, exclude_tx: str | None, from_block: int
                               ) -> Inclusion | None:
    """Exact Permit2: Permit2 logs nothing per nonce, so a Transfer(payer -> payTo, amount) of
    the asset counts only when its transaction called the exact proxy's settle for this owner
    and nonce (a log exists only in a successful transaction)."""
    logs = await chain.request("eth_getLogs", [transfer_filter(expected, from_block)])
    nonce = int.from_bytes(auth_nonce, "big")
    # Newest first and bounded: a payer paying one payee a fixed price has many equal
    # transfers in the window, and the one that consumed this permit is recent.
    candidates = [e for e in reversed(logs or []) if not e.get("removed")
                  and e.get("transactionHash") != exclude_tx
                  and int(e.get("data") or "0x0", 16) == expected.amount][:FRONT_RUN_CANDIDATES]
    txs = await chain.request_many(
        [("eth_getTransactionByHash", [e["transactionHash"]]) for e in candidates])
    for entry, tx in zip(candidates, txs, strict=True):
        if settles_exact_permit(tx, expected, nonce):
            return Inclusion(settlement_id=settlement_id,
                             tx_hash=bytes.fromhex(entry["transactionHash"][2:]),
                             block_number=int(entry["blockNumber"], 16),
                             block_hash=bytes.fromhex(entry["blockHash"][2:]),
                             log_index=int(entry["logIndex"], 16),
                             settled_by=SettledBy.EXTERNAL)
    return None


_Finder = Callable[[Chain, int, ExpectedTransfer, bytes, str | None, int],
                   Awaitable[Inclusion | None]]
_FINDERS: dict[FrontRunEvidence, _Finder] = {
    FrontRunEvidence.AUTHORIZATION_USED: _by_authorization_used,
    FrontRunEvidence.EXACT_PROXY_CALL: _by_exact_proxy_call,
}


def _inclusion(settlement_id: int, receipt: dict[str, Any], log_index: int,
               settled_by: SettledBy) -> Inclusion:
    return Inclusion(settlement_id=settlement_id,
                     tx_hash=bytes.fromhex(receipt["transactionHash"][2:]),
                     block_number=int(receipt["blockNumber"], 16),
                     block_hash=bytes.fromhex(receipt["blockHash"][2:]), log_index=log_index,
                     settled_by=settled_by)


async def _noop_resign(settlement_id: int) -> None:
    raise RuntimeError("tracker.resign is not wired")


async def _noop_fill(nonce: int, max_fee: int) -> None:
    raise RuntimeError("tracker.fill_nonce is not wired")


async def _noop_recover(row: SettlementRow) -> None:
    raise RuntimeError("tracker.recover_pending is not wired")


async def _nothing() -> None:
    return None

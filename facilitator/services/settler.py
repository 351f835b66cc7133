"""Settlement of verified payments: claim, re-verify on chain, broadcast, wait, answer.

Guarantees:
- At most one settlement per authorization: the row claimed in PostgreSQL under
  UNIQUE(chain_id, asset, payer, nonce) decides who settles; every other request for the same
  authorization waits for that settlement or replays its stored answer.
- The same payload settled again answers `success: true` with the same transaction hash and
  sends nothing. A different payload reusing a consumed nonce gets the nonce-used reason.
- The answer is Unknown -> `settlement_pending` (with the tx hash) when no receipt arrives within
  the configured wait; the transaction stays tracked and a later identical /settle gets the
  final result. Unknown is never reported as a failure.
- After a restart, `recover()` resumes every unfinished row: pending rows are broadcast, signed
  rows have their stored bytes re-sent, broadcast rows are watched for their receipt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from facilitator.adapters.metrics import Metrics
from facilitator.adapters.store import SettlementRow, Store
from facilitator.core import abi
from facilitator.core.exact import Rejection, classify_transfer_revert
from facilitator.core.settlement import (
    IN_FLIGHT,
    SETTLED,
    Outcome,
    Rejected,
    Settled,
    SettledBy,
    State,
    Unknown,
)
from facilitator.adapters.signer import SignedTx
from facilitator.core.receipts import ExpectedTransfer
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.networks import Network
from facilitator.protocol.reasons import Reason
from facilitator.protocol.responses import SettleResponse
from facilitator.adapters.sessions import SessionStore
from facilitator.protocol.permit2 import UsageMetadata
from facilitator.schemes.common import ChainApproval, Checked, Scheme
from facilitator.services.broadcaster import Broadcaster, Job, Overloaded
from facilitator.services.outcomes import OutcomeBoard, wait_outcome
from facilitator.services.tracker import InFlight, Tracker, find_external_settlement
from facilitator.invariant import invariant

log = logging.getLogger("facilitator.settler")

DB_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class SettlePolicy:
    receipt_timeout_s: float
    gas_limit_cap: int
    # What a repeated /settle of an already settled payload gets: "replay" answers the stored
    # success (idempotent; a lost response is recovered), "reject" answers success only once
    # (x402-conformance F3; a payment presented twice cannot buy twice).
    duplicates: str = "replay"
    gas_headroom: float = 1.25
    front_run_lookback_blocks: int = 5_000


class Settler:
    def __init__(self, *, network: Network, chain: Chain, store: Store, sessions: SessionStore,
                 board: OutcomeBoard, broadcaster: Broadcaster, tracker: Tracker,
                 metrics: Metrics, policy: SettlePolicy) -> None:
        self.network = network
        self._chain = chain
        self._sessions = sessions
        self._store = store
        self._board = board
        self._broadcaster = broadcaster
        self._tracker = tracker
        self._metrics = metrics
        self._policy = policy
        broadcaster.on_sent = self._on_sent
        broadcaster.reserved_wei = tracker.reserved_wei
        tracker.resign = self._resign
        tracker.fill_nonce = broadcaster.fill_nonce

    async def settle(self, scheme: Scheme, checked: Checked, wire_network: str,
                     usage: UsageMetadata | None = None) -> SettleResponse:
        started = time.monotonic()
        intent = checked.intent
        if intent.transfer_method == "permit2" and intent.amount == 0:
            return await self._settle_nothing(checked, wire_network, usage)
        claim = await self._store.claim(intent)
        row: SettlementRow | SettleResponse = claim.row
        if not claim.created:
            row = await self._continue_existing(claim.row, checked, wire_network)
            if isinstance(row, SettleResponse):
                return row
        await self._record_usage(row, checked, usage)
        return await self._settle_claimed(row, scheme, checked, wire_network, started)

    async def _settle_nothing(self, checked: Checked, wire_network: str,
                              usage: UsageMetadata | None) -> SettleResponse:
        """An upto session that used nothing settles without a transaction (amount "0")."""
        await self._sessions.record_settled(checked.intent, self._broadcaster.address, None, usage)
        return SettleResponse(success=True, network=wire_network, transaction="",
                              payer=checked.payer, amount="0")

    async def _record_usage(self, row: SettlementRow, checked: Checked,
                            usage: UsageMetadata | None) -> None:
        if checked.intent.transfer_method == "permit2":
            await self._sessions.record_settled(checked.intent, self._broadcaster.address,
                                                row.id, usage)
        if usage is not None:
            await self._sessions.record_usage(row.id, usage)

    async def _continue_existing(self, row: SettlementRow, checked: Checked, wire_network: str
                                 ) -> SettlementRow | SettleResponse:
        """Another request already claimed this authorization: replay, wait, or take over a
        failed attempt (the only state whose authorization is certainly unconsumed)."""
        same = row.fingerprint == checked.intent.fingerprint
        if row.state == State.FAILED:
            reclaimed = await self._store.reclaim_failed(row.id, checked.intent)
            if reclaimed is not None:
                return reclaimed
            row = await self._store.get(row.id) or row
        if not same:  # another payment's record: answer without exposing it
            return SettleResponse(success=False, network=wire_network,
                                  error_reason=Reason.NONCE_ALREADY_USED, payer=checked.payer,
                                  error_message="this authorization nonce belongs to another "
                                                "payment")
        if row.state in IN_FLIGHT:
            return await self._wait_for_existing(row, wire_network, checked.payer)
        return await self._answer_from_row(row, wire_network, checked.payer)

    async def _settle_claimed(self, row: SettlementRow, scheme: Scheme, checked: Checked,
                              wire_network: str, started: float) -> SettleResponse:
        try:
            approval = await scheme.check_onchain(checked, for_settle=True)
        except RpcUnavailable as exc:
            self._count_failure("rpc_error")
            return await self._refuse(row, checked, wire_network, Rejection(
                Reason.UNEXPECTED_SETTLE_ERROR, f"chain unavailable before broadcast: {exc}"))
        if isinstance(approval, Rejection):
            return await self._refuse(row, checked, wire_network, approval)
        gas = self._gas_limit(approval)
        if gas is None:
            self._count_failure("gas_cap")
            return await self._refuse(row, checked, wire_network, Rejection(
                Reason.UNEXPECTED_SETTLE_ERROR, "gas estimate exceeds the configured cap"))
        future = self._board.expect(row.id, _key(row))
        try:
            self._broadcaster.submit(Job(row=row, gas_limit=gas))
        except Overloaded as exc:
            self._count_failure("overloaded")
            self._board.resolve(row.id, Rejected(Reason.UNEXPECTED_SETTLE_ERROR, str(exc)))
            return await self._refuse(row, checked, wire_network, Rejection(
                Reason.UNEXPECTED_SETTLE_ERROR, f"{exc}; retry later"))
        self._metrics.settlement_latency.labels(self.network.key, "verify").observe(
            time.monotonic() - started)
        outcome = await wait_outcome(future, self._policy.receipt_timeout_s)
        if outcome is None:
            self._count_failure("receipt_timeout")
        return await self._answer(row.id, outcome, wire_network, checked.payer)

    def is_in_flight(self, asset: str, payer: str, nonce: bytes) -> bool:
        return self._board.in_flight((asset, payer, nonce))

    def _count_failure(self, cause: str) -> None:
        self._metrics.settlement_failures.labels(self.network.key, cause).inc()

    def _gas_limit(self, approval: ChainApproval) -> int | None:
        invariant(approval.gas_estimate is not None, "settlement checks estimate gas")
        if approval.gas_estimate > self._policy.gas_limit_cap:
            return None
        return min(int(approval.gas_estimate * self._policy.gas_headroom),
                   self._policy.gas_limit_cap)

    async def _refuse(self, row: SettlementRow, checked: Checked, wire_network: str,
                      rejection: Rejection) -> SettleResponse:
        """Pre-broadcast rejection. A nonce consumed on chain may mean the payment was settled by
        someone else's transaction: that is recorded as an external settlement, not a failure."""
        if rejection.reason is Reason.NONCE_ALREADY_USED and row.transfer_method == "eip3009":
            external = await self._external_settlement(row)
            if external is not None:
                self._count_failure("front_run")
                return await self._answer(row.id, external, wire_network, checked.payer)
        if rejection.reason is not Reason.UNEXPECTED_SETTLE_ERROR:
            self._count_failure(str(rejection.reason))
        await self._store.mark_failed(row.id, str(rejection.reason), rejection.message)
        return SettleResponse(success=False, network=wire_network, error_reason=rejection.reason,
                              error_message=rejection.message, payer=checked.payer,
                              amount=_amount(row), extensions=_extensions(row.public_id,
                                                                          State.FAILED))

    async def _external_settlement(self, row: SettlementRow) -> Settled | None:
        head = int(await self._chain.request("eth_blockNumber", []), 16)
        inclusion = await find_external_settlement(
            self._chain, row.id, ExpectedTransfer(row.asset, row.payer, row.pay_to, row.amount),
            row.nonce, exclude_tx=None, from_block=head - self._policy.front_run_lookback_blocks)
        if inclusion is None:
            return None
        await self._store.mark_included([inclusion])
        return Settled(inclusion.tx_hash, inclusion.block_number, inclusion.block_hash,
                       inclusion.log_index, SettledBy.EXTERNAL)

    async def _wait_for_existing(self, row: SettlementRow, wire_network: str, payer: str
                                 ) -> SettleResponse:
        future = self._board.current(row.id)
        if future is not None:
            outcome = await wait_outcome(future, self._policy.receipt_timeout_s)
            return await self._answer(row.id, outcome, wire_network, payer)
        deadline = time.monotonic() + self._policy.receipt_timeout_s
        while row.state in IN_FLIGHT and time.monotonic() < deadline:
            await asyncio.sleep(DB_POLL_INTERVAL_S)
            row = await self._store.get(row.id) or row
        return await self._answer_from_row(row, wire_network, payer)

    async def _answer(self, settlement_id: int, outcome: Outcome | None, wire_network: str,
                      payer: str) -> SettleResponse:
        """The response for an outcome; None (no outcome in time) answers from the row."""
        if isinstance(outcome, Settled):
            return self._success(await self._store.count_success_answer(settlement_id),
                                 "0x" + outcome.tx_hash.hex(), wire_network, payer)
        row = await self._store.get(settlement_id)
        invariant(row is not None, "a claimed row never disappears")
        if outcome is None or isinstance(outcome, Unknown):
            return await self._answer_from_row(row, wire_network, payer)
        return SettleResponse(success=False, network=wire_network, error_reason=outcome.reason,
                              error_message=outcome.message, payer=payer, amount=_amount(row),
                              transaction="0x" + outcome.tx_hash.hex() if outcome.tx_hash else "",
                              extensions=_extensions(row.public_id, row.state))

    def _success(self, row: SettlementRow, transaction: str, wire_network: str,
                 payer: str) -> SettleResponse:
        """A success answer for a row whose answer was just counted, subject to the duplicate
        policy: the first success is always given; a repeat replays it ("replay") or is refused
        as a used nonce ("reject")."""
        if row.success_answers > 1:
            self._metrics.settle_replays.labels(self.network.key, self._policy.duplicates).inc()
            if self._policy.duplicates == "reject":
                return SettleResponse(
                    success=False, network=wire_network, error_reason=Reason.NONCE_ALREADY_USED,
                    error_message="this payment was already settled and its success answered",
                    transaction=transaction, payer=payer, amount=_amount(row),
                    extensions=_extensions(row.public_id, row.state))
        return SettleResponse(success=True, network=wire_network, transaction=transaction,
                              payer=payer, amount=_amount(row),
                              extensions=_extensions(row.public_id, row.state))

    async def _answer_from_row(self, row: SettlementRow, wire_network: str, payer: str
                               ) -> SettleResponse:
        if row.state in SETTLED:
            counted = await self._store.count_success_answer(row.id)
            return self._success(counted, counted.tx_hash_hex, wire_network, payer)
        if row.state in IN_FLIGHT:
            return SettleResponse(
                success=False, network=wire_network, error_reason=Reason.SETTLEMENT_PENDING,
                error_message="settlement broadcast; receipt not yet available, retry the same "
                              "request for the final result", transaction=row.tx_hash_hex,
                payer=payer, amount=_amount(row), extensions=_extensions(row.public_id, row.state))
        # A stored failure names the transaction only if one was mined (reverted or expired).
        return _failure(wire_network, payer, _reason(row.reason), row.message or "", row,
                        row.tx_hash_hex if row.block_number is not None else "")

    def _on_sent(self, job: Job, tx: SignedTx, known: bool) -> None:
        self._metrics.settlement_latency.labels(self.network.key, "request_to_broadcast").observe(
            time.monotonic() - job.submitted_at)
        self._tracker.watch(InFlight.from_signed(job.row, tx, known_to_node=known))

    async def _resign(self, settlement_id: int) -> None:
        if not await self._store.mark_needs_resign(settlement_id):
            return
        row = await self._store.get(settlement_id)
        if row is not None:
            self._broadcaster.resubmit(row, row.gas_limit or self._policy.gas_limit_cap)

    # -- recovery -----------------------------------------------------------------------------

    async def track_again(self, settlement_ids: list[int]) -> None:
        """Settlements a reorg moved back to `broadcast`: follow them again (the tracker re-sends
        their stored bytes if the node dropped them, or lets them expire)."""
        for settlement_id in settlement_ids:
            row = await self._store.get(settlement_id)
            if row is not None and row.state == State.BROADCAST and row.raw_tx is not None:
                self._tracker.watch(InFlight.from_row(row, known_to_node=False, check_now=True))

    async def recover(self) -> int:
        """Resume every unfinished row of this network; returns how many."""
        rows = await self._store.unfinished(self.network.chain_id)
        for row in rows:
            self._board.expect(row.id, _key(row))
            if row.state == State.PENDING:
                await self._recover_pending(row)
            else:
                known = row.state == State.BROADCAST
                self._tracker.watch(InFlight.from_row(row, known_to_node=known, check_now=True))
        if rows:
            log.warning("recovered %d unfinished settlements on %s", len(rows), self.network.key)
        return len(rows)

    async def _recover_pending(self, row: SettlementRow) -> None:
        """A row claimed but never signed: estimate again (the chain may have moved) and send."""
        call = {"from": self._broadcaster.address, "to": row.call_to,
                "data": "0x" + row.calldata.hex()}
        try:
            gas = int(await self._chain.request("eth_estimateGas", [call, "latest"]), 16)
        except RpcError as exc:
            reason = classify_transfer_revert(abi.decode_revert(exc.data, exc.message))
            await self._store.mark_failed(row.id, str(reason or Reason.TRANSACTION_FAILED),
                                          f"recovery: {exc.message[:200]}")
            self._board.resolve(row.id, Rejected(reason or Reason.TRANSACTION_FAILED, exc.message))
            return
        self._broadcaster.resubmit(
            row, min(int(gas * self._policy.gas_headroom), self._policy.gas_limit_cap))


def _key(row: SettlementRow) -> tuple[str, str, bytes]:
    return (row.asset, row.payer, row.nonce)


def _extensions(public_id: str, state: State | str) -> dict[str, object]:
    return {"settlement": {"id": public_id, "state": str(state)}}


def _reason(value: str | None) -> Reason:
    try:
        return Reason(value) if value else Reason.UNEXPECTED_SETTLE_ERROR
    except ValueError:
        return Reason.UNEXPECTED_SETTLE_ERROR


def _failure(wire_network: str, payer: str, reason: Reason, message: str, row: SettlementRow,
             transaction: str = "") -> SettleResponse:
    return SettleResponse(success=False, network=wire_network, error_reason=reason,
                          error_message=message, payer=payer, transaction=transaction,
                          amount=_amount(row), extensions=_extensions(row.public_id, row.state))


def _amount(row: SettlementRow) -> str | None:
    """upto answers carry the settled amount (the SDK requires it)."""
    return str(row.amount) if row.transfer_method == "permit2" else None


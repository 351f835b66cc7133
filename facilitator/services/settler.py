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
- A claimed row always has an owner: from the claim until the broadcaster takes it, any failure
  (a refusal, the chain unreachable, an unexpected exception) marks it `failed` — nothing was
  sent, so a retry may claim it again — and resolves its waiters; the request gets a protocol
  answer (`unexpected_settle_error`), never an orphaned `pending` row.
- After a restart, `recover()` resumes every unfinished row: pending rows are checked again as a
  settlement (the scheme's on-chain checks) and sent, or refused as /settle would; signed rows
  have their stored bytes re-sent; broadcast rows are watched for their receipt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from facilitator.adapters.metrics import Metrics
from facilitator.adapters.store import SettlementRow, Store
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.core.settlement import (
    IN_FLIGHT,
    SETTLED,
    Outcome,
    Rejected,
    Settled,
    SettledBy,
    SettlementIntent,
    State,
    Unknown,
)
from facilitator.adapters.signer import SignedTx
from facilitator.core.receipts import ExpectedTransfer
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.networks import Network, TransferMethod
from facilitator.protocol.reasons import Reason
from facilitator.protocol.responses import SettleResponse
from facilitator.adapters.sessions import SessionStore
from facilitator.protocol.permit2 import UsageMetadata
from facilitator.schemes.common import (
    ChainApproval,
    Checked,
    FrontRunEvidence,
    Scheme,
    SchemeKey,
    traits_of,
)
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
                 schemes: Mapping[SchemeKey, Scheme], metrics: Metrics, policy: SettlePolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.network = network
        self._schemes = schemes  # this network's, by key: what recovery checks rows with
        self._clock = clock
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
        tracker.recover_pending = self.recover_pending
        tracker.fill_nonce = broadcaster.fill_nonce

    async def settle(self, scheme: Scheme, checked: Checked, wire_network: str,
                     usage: UsageMetadata | None = None) -> SettleResponse:
        started = time.monotonic()
        intent = checked.intent
        if scheme.traits.sessions and intent.amount == 0:
            return await self._settle_nothing(checked, wire_network, usage)
        claim = await self._store.claim(intent)
        row: SettlementRow | SettleResponse = claim.row
        if not claim.created:
            row = await self._continue_existing(claim.row, checked, wire_network)
            if isinstance(row, SettleResponse):
                return row
        return await self._settle_claimed(row, scheme, checked, wire_network, usage, started)

    async def _settle_nothing(self, checked: Checked, wire_network: str,
                              usage: UsageMetadata | None) -> SettleResponse:
        """An upto session that used nothing settles without a transaction (amount "0")."""
        await self._sessions.record_settled(checked.intent, self._broadcaster.address, None, usage)
        return SettleResponse(success=True, network=wire_network, transaction="",
                              payer=checked.payer, amount="0")

    async def _record_usage(self, row: SettlementRow, scheme: Scheme, checked: Checked,
                            usage: UsageMetadata | None) -> None:
        """This attempt's session amount and usage report, before the on-chain checks (readers
        count them only through the settlement's state). Only the owner of a new or reclaimed
        pending row gets here: a failed earlier attempt's report is replaced or removed."""
        if scheme.traits.sessions:
            await self._sessions.record_settled(checked.intent, self._broadcaster.address,
                                                row.id, usage)
        if usage is not None:
            await self._sessions.record_usage(row.id, usage)
        elif row.attempts > 1:  # reclaimed: the usage stored is a failed attempt's
            await self._sessions.forget_usage(row.id)

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
                                  error_reason=_nonce_used(checked.intent.scheme,
                                                           checked.intent.transfer_method),
                                  payer=checked.payer,
                                  error_message="this authorization nonce belongs to another "
                                                "payment")
        if row.state in IN_FLIGHT:
            return await self._wait_for_existing(row, wire_network, checked.payer)
        return await self._answer_from_row(row, wire_network, checked.payer)

    async def _settle_claimed(self, row: SettlementRow, scheme: Scheme, checked: Checked,
                              wire_network: str, usage: UsageMetadata | None, started: float
                              ) -> SettleResponse:
        """This request owns `row` (pending) until the broadcaster takes it: every way out before
        that either submits it or refuses it (row failed, waiters resolved)."""
        try:
            await self._record_usage(row, scheme, checked, usage)
            gas = await self._check_before_broadcast(scheme, checked)
        except Exception as exc:  # noqa: BLE001 - nothing was sent: the row must not be orphaned
            gas = self._unexpected(row, exc)
        if isinstance(gas, Rejection):
            return await self._refuse(row, checked, wire_network, gas)
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

    async def _check_before_broadcast(self, scheme: Scheme, checked: Checked) -> int | Rejection:
        """The scheme's settlement checks at the current chain state: the gas limit to send
        with, or why not to send."""
        try:
            approval = await scheme.check_onchain(checked, for_settle=True)
        except RpcUnavailable as exc:
            self._count_failure("rpc_error")
            return Rejection(Reason.UNEXPECTED_SETTLE_ERROR,
                             f"chain unavailable before broadcast: {exc}")
        if isinstance(approval, Rejection):
            return approval
        gas = self._gas_limit(approval)
        if gas is None:
            self._count_failure("gas_cap")
            return Rejection(Reason.UNEXPECTED_SETTLE_ERROR,
                             "gas estimate exceeds the configured cap")
        return gas

    def _unexpected(self, row: SettlementRow, exc: Exception) -> Rejection:
        log.error("settlement %s failed before broadcast: %s", row.id, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        self._count_failure("internal_error")
        return Rejection(Reason.UNEXPECTED_SETTLE_ERROR,
                         f"settlement not sent: internal error ({type(exc).__name__}); retry later")

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
        """Pre-broadcast rejection of an owned row, answered."""
        outcome = await self._conclude_refusal(row, rejection)
        if isinstance(outcome, Settled):
            return await self._answer(row.id, outcome, wire_network, checked.payer)
        return SettleResponse(success=False, network=wire_network, error_reason=outcome.reason,
                              error_message=outcome.message, payer=checked.payer,
                              amount=_amount(row), extensions=_extensions(row.public_id,
                                                                          State.FAILED))

    async def _conclude_refusal(self, row: SettlementRow, rejection: Rejection
                                ) -> Settled | Rejected:
        """Pre-broadcast rejection of an owned pending row. An authorization consumed on chain
        may have been settled by someone else's transaction (only where another sender can
        consume it): that is recorded as an external settlement, not a failure. Anything else
        marks the row failed (nothing was sent). Waiters are resolved either way."""
        traits = traits_of(row.scheme, row.transfer_method)
        if rejection.reason is traits.nonce_used_reason and traits.front_run is not None:
            try:
                external = await self._external_settlement(row, traits.front_run)
            except (RpcUnavailable, RpcError) as exc:
                external = None
                rejection = Rejection(Reason.UNEXPECTED_SETTLE_ERROR,
                                      f"the authorization was used on chain; could not check for "
                                      f"an external settlement: {exc}; retry later")
            if external is not None:
                self._count_failure("front_run")
                self._board.resolve(row.id, external)
                return external
        if rejection.reason is not Reason.UNEXPECTED_SETTLE_ERROR:
            self._count_failure(str(rejection.reason))
        outcome = Rejected(rejection.reason, rejection.message)
        try:
            await self._store.mark_failed(row.id, str(rejection.reason), rejection.message)
        except Exception:  # noqa: BLE001 - still answered; recovery resumes the pending row
            log.exception("settlement %s could not be marked failed; it stays pending until "
                          "recovery", row.id)
        self._board.resolve(row.id, outcome)
        return outcome

    async def _external_settlement(self, row: SettlementRow, evidence: FrontRunEvidence
                                   ) -> Settled | None:
        head = int(await self._chain.request("eth_blockNumber", []), 16)
        inclusion = await find_external_settlement(
            self._chain, row.id, evidence,
            ExpectedTransfer(row.asset, row.payer, row.pay_to, row.amount),
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
                    success=False, network=wire_network,
                    error_reason=_nonce_used(row.scheme, row.transfer_method),
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
        row = await self._store.mark_needs_resign(settlement_id)
        if row is not None:
            self._broadcaster.resubmit(row, row.gas_limit or self._policy.gas_limit_cap)

    # -- recovery -----------------------------------------------------------------------------

    async def recover(self) -> int:
        """Resume every unfinished row of this network; returns how many."""
        rows = await self._store.unfinished(self.network.chain_id)
        for row in rows:
            self._board.expect(row.id, _key(row))
            if row.state == State.PENDING:
                await self.recover_pending(row)
            else:
                known = row.state == State.BROADCAST
                self._tracker.watch(InFlight.from_row(row, known_to_node=known, check_now=True))
        if rows:
            log.warning("recovered %d unfinished settlements on %s", len(rows), self.network.key)
        return len(rows)

    async def recover_pending(self, row: SettlementRow) -> None:
        """A row claimed but never signed (start-up recovery, or adopted by the tracker's
        sweep): expired, or checked again as a settlement by its scheme (the chain may have
        moved) and sent, or refused as /settle refuses it."""
        if self._clock() >= row.valid_before:
            await self._expire_unsent(row)
            return
        gas = await self._recheck_gas(row)
        if isinstance(gas, Rejection):
            await self._conclude_refusal(row, gas)
            return
        self._broadcaster.resubmit(row, gas)

    async def _expire_unsent(self, row: SettlementRow) -> None:
        reason = traits_of(row.scheme, row.transfer_method).expired_reason
        message = "recovery: the authorization expired before it was sent"
        self._count_failure("expired")
        await self._store.mark_failed(row.id, str(reason), message, expired=True)
        self._board.resolve(row.id, Rejected(reason, message))

    async def _recheck_gas(self, row: SettlementRow) -> int | Rejection:
        """The row's scheme's settlement checks at the current chain state."""
        scheme = self._schemes.get((row.scheme, TransferMethod(row.transfer_method)))
        if scheme is None:
            return Rejection(Reason.UNEXPECTED_SETTLE_ERROR,
                             f"scheme {row.scheme!r} is not served here")
        try:
            return await self._check_before_broadcast(scheme, _recheck(row))
        except Exception as exc:  # noqa: BLE001 - nothing was sent: refuse rather than orphan
            return self._unexpected(row, exc)


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


def _nonce_used(scheme: str, transfer_method: str) -> Reason:
    """The SDK's reason for a used nonce, per transfer method (EIP-3009 or Permit2)."""
    return traits_of(scheme, transfer_method).nonce_used_reason


def _amount(row: SettlementRow) -> str | None:
    """upto answers carry the settled amount (the SDK requires it)."""
    reports = traits_of(row.scheme, row.transfer_method).reports_amount
    return str(row.amount) if reports else None


def _recheck(row: SettlementRow) -> Checked:
    """A claimed row as the scheme's on-chain checks take it. Its signature was checked when it
    was claimed (ERC-1271 too) and the simulation proves it again; the EIP-712 domain the payer
    signed is not stored, so an unexplained revert is not diagnosed further."""
    intent = SettlementIntent(
        scheme=row.scheme, x402_version=row.x402_version, network=row.network,
        chain_id=row.chain_id, asset=row.asset, payer=row.payer, pay_to=row.pay_to,
        amount=row.amount, nonce=row.nonce, valid_after=row.valid_after,
        valid_before=row.valid_before, signature=row.signature, fingerprint=row.fingerprint,
        call_to=row.call_to, calldata=row.calldata, transfer_method=row.transfer_method,
        cap_amount=row.cap_amount)
    return Checked(intent=intent, digest=b"", signature_check=SignatureCheck.VALID_EOA,
                   payer=to_checksum(row.payer))


"""The settlement state machine and the three chain outcomes. Pure.

States of one payment authorization (one row per `(chain_id, asset, payer, nonce)`):

  pending    claimed by a /settle: the write-ahead row exists, no transaction signed yet
  signed     the raw transaction and its hash are stored; it may or may not have been sent
  broadcast  a node accepted the raw transaction (or may have: a send with no answer stays here)
  included   mined, with the asset's Transfer(payer -> payTo, value) in the receipt
  confirmed  included and buried under the network's confirmation depth (the chain watcher)
  failed     this attempt ended without moving money; the authorization was not consumed, so
             a later /settle of a valid payload may claim the row again (failed -> pending)
  expired    the authorization's validBefore passed before any inclusion: nothing can settle it

The same table of legal transitions is enforced by the database trigger in the migrations
(a pair assertion: code and database check the same rule independently).

Outcomes of a chain interaction have exactly three shapes: `Settled`, `Rejected`, `Unknown`.
Unknown (no receipt yet, no answer from the node) is never reported as a failure: a payer told
"failed" signs again and pays twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from facilitator.invariant import invariant
from facilitator.protocol.reasons import Reason


class State(StrEnum):
    PENDING = "pending"
    SIGNED = "signed"
    BROADCAST = "broadcast"
    INCLUDED = "included"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    EXPIRED = "expired"


TRANSITIONS: dict[State, frozenset[State]] = {
    # pending -> included: the authorization turned out to be consumed by someone else's tx.
    State.PENDING: frozenset({State.SIGNED, State.FAILED, State.INCLUDED, State.EXPIRED}),
    # signed -> pending: the node proved these bytes can never be mined (their signer nonce was
    # taken by another transaction), so the authorization needs a new transaction.
    State.SIGNED: frozenset({State.BROADCAST, State.PENDING, State.INCLUDED, State.FAILED,
                             State.EXPIRED}),
    State.BROADCAST: frozenset({State.INCLUDED, State.PENDING, State.FAILED, State.EXPIRED}),
    # included -> broadcast: the block was reorged out; our transaction is pending again.
    # included -> pending: the block was reorged out and the payment had been settled by
    # someone else's transaction (we hold none of our own): it must be settled again.
    State.INCLUDED: frozenset({State.CONFIRMED, State.BROADCAST, State.PENDING}),
    # confirmed -> broadcast|pending: the same, for a reorg deeper than the confirmation depth,
    # accepted by an operator who resumed the halted watcher. Never automatic.
    State.CONFIRMED: frozenset({State.BROADCAST, State.PENDING}),
    State.FAILED: frozenset({State.PENDING}),
    State.EXPIRED: frozenset(),
}

IN_FLIGHT = frozenset({State.PENDING, State.SIGNED, State.BROADCAST})
SETTLED = frozenset({State.INCLUDED, State.CONFIRMED})
TERMINAL = frozenset({State.EXPIRED})


def can_transition(current: State, target: State) -> bool:
    return target in TRANSITIONS[current]


def require_transition(current: State, target: State) -> None:
    invariant(can_transition(current, target),
              f"illegal settlement transition {current} -> {target}")


class SettledBy(StrEnum):
    FACILITATOR = "facilitator"
    EXTERNAL = "external"  # a transaction we did not send consumed the authorization


@dataclass(frozen=True, slots=True)
class Settled:
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    log_index: int
    settled_by: SettledBy = SettledBy.FACILITATOR


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    message: str
    tx_hash: bytes | None = None  # set when a mined transaction reverted


@dataclass(frozen=True, slots=True)
class Unknown:
    tx_hash: bytes | None
    message: str = ""


Outcome = Settled | Rejected | Unknown


@dataclass(frozen=True, slots=True)
class SettlementIntent:
    """Everything needed to settle one verified authorization, and to prove what was settled.
    Stored whole in the write-ahead row, so a restarted process can finish it."""

    scheme: str
    x402_version: int
    network: str  # the wire network string (CAIP-2 or v1 name)
    chain_id: int
    asset: str
    payer: str
    pay_to: str
    amount: int
    nonce: bytes
    valid_after: int
    valid_before: int
    signature: bytes
    fingerprint: bytes
    call_to: str  # contract the settlement transaction calls
    calldata: bytes
    transfer_method: str = "eip3009"  # or "permit2"
    cap_amount: int | None = None  # upto: the permitted maximum

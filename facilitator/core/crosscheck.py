"""Cross-check rules: paid upto sessions against TEE inference attestations and their records on
the OpenGradient chain (issue 5 §5–§6). Pure: no I/O and no clock — the adapter
(`facilitator.adapters.findings`) loads the facts, the service passes `now`.

Nothing cryptographic links a payment to an inference (notes/opengradient.md §3.7). The link is
what the facilitator itself saw: an attestation that names its session (`session_ref`, or the
payer and Permit2 nonce) and was resolved to an `upto_sessions` row. Rules over such links are
`linked`; where attestations carry no reference (real OpenGradient traffic today) the
facilitator can only reconcile per payee and time window, and says so (`linked = false`).

Rules (kind: fires when):
- `invalid_tee_signature` / `unknown_tee` / `tee_disabled`: the attestation's verification gave
  that verdict (`hash_mismatch`, recomputed hashes that differ from the signed ones, is
  reported as `invalid_tee_signature` with `evidence.verification = "hash_mismatch"`).
- `attestation_not_settled`: a *valid* batch or individual attestation has no record on the
  OpenGradient chain within `settle_window_s` of its receipt (batch: its exact leaf in a batch
  whose dump checked `valid`; individual: a matching `IndividualSettlement`). Decided only when
  the window has passed, the OpenGradient watcher has processed past its end, and no batch
  posted in that span still awaits its dump check.
- `attested_not_paid`: a *valid* attestation that names a session is not covered by a
  payment (the session has no confirmed settlement with a non-zero amount, or no session
  resolved for the reference). Decided after the permit deadline + `payment_grace_s`, or
  `payment_window_s` after receipt, whichever comes first; a settlement still in flight
  (pending/signed/broadcast) waits for the deadline + grace; an `included` one counts as paid.
- `paid_not_attested`: a settled session of a payee whose gateway links its attestations
  (any attestation was ever linked to a session paying that payTo) has no valid attestation;
  decided `attestation_grace_s` after the settlement's block, and not while a linked
  attestation is still pending verification.
- `amount_mismatch`: a settled session paid more than its cap, or (once `attestation_grace_s`
  has passed) an amount other than the summed `cost_opg` of its linked attestations, when every
  one of them carries a cost.
- `payto_mismatch`: a settled session paid a payTo that is not the registered paymentAddress
  of a TEE whose valid attestation is linked to it (TEEs without a registered address are not
  compared).
- `duplicate`: one inference (tee, input hash, output hash, tee timestamp) linked to two
  sessions; or one session's settlement paid by Transfer logs of two canonical transactions
  (one Permit2 nonce settled twice).
- `late_settlement`: the settlement's block (its timestamp as stored by the payment watcher)
  is later than the permit deadline.
- `batch_dump_invalid`: an OpenGradient batch whose dump checked `root_mismatch`,
  `size_mismatch` or `malformed`.
- `unlinked_reconciliation` (`linked = false`): per payment address (the TEEs registered with
  it) and aligned window of `reconcile_bucket_s`, valid attestations without any session
  reference against settled sessions to that address that no attestation is linked to (only
  for payees that do not link). A gap is: attestations but no payment within the window
  widened by `reconcile_margin_s` (`gap = attested_not_paid`); payments but no attestation in
  the widened window (`paid_not_attested`); or sums that differ by more than
  `reconcile_tolerance` of the larger (`amount`, only when every attestation has a cost).
  Decided `reconcile_margin_s + payment_grace_s` after the window's end. Boundaries are a
  heuristic: a session that straddles a window edge is seen by the margin, not by the sums.

Guarantees:
- Deterministic: the same facts and `now` give the same findings in the same order.
- A rule that waits for something that may still happen never fires before its window.
- `fingerprint` = SHA-256 of the canonical JSON of `[kind, *identity]`, where the identity is
  made of natural keys (chain, payer, Permit2 nonce; tee id, hashes, timestamp, session
  reference; batch transaction and root; payee and window start), never database ids or
  measured amounts: re-running finds the same fingerprints, so a discrepancy is stored once
  (with the evidence of its first detection).
- Evidence is JSON-ready: hashes and addresses as lower-case 0x hex, amounts as decimal
  strings, times as ISO-8601 UTC.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from facilitator.core import settlement
from facilitator.core.settlement import State

KINDS = ("paid_not_attested", "attested_not_paid", "invalid_tee_signature", "unknown_tee",
         "tee_disabled", "attestation_not_settled", "amount_mismatch", "payto_mismatch",
         "duplicate", "late_settlement", "batch_dump_invalid", "unlinked_reconciliation")
VERDICT_KINDS = {"invalid_signature": "invalid_tee_signature",
                 "hash_mismatch": "invalid_tee_signature",
                 "unknown_tee": "unknown_tee", "tee_disabled": "tee_disabled"}
INVALID_DUMPS = ("root_mismatch", "size_mismatch", "malformed")
# The settlement states as core.settlement defines them (one source of truth), in declaration
# order so messages and evidence are deterministic.
IN_FLIGHT = tuple(s.value for s in State if s in settlement.IN_FLIGHT)  # may still land
ON_CHAIN = tuple(s.value for s in State if s in settlement.SETTLED)
EVIDENCE_LIST_MAX = 100  # ids listed in a reconciliation finding (the counts are complete)
_DUMP_MEANING = {
    "root_mismatch": "the published dump's Merkle root is not the root posted on chain",
    "size_mismatch": "the published dump's leaf count (or leaf encoding) differs from the "
                     "batch size posted on chain",
    "malformed": "the published dump is not a valid StandardMerkleTree dump"}


@dataclass(frozen=True, slots=True)
class CrossCheckPolicy:
    """Timing windows (seconds) and thresholds of the rules; defaults suit Base + OpenGradient
    as documented in notes/opengradient.md (permits live 300 s, sessions settle 100 s after
    their last request, OpenGradient batches flush within 15 minutes)."""

    interval_s: float = 60.0             # continuous pass period
    lookback_s: float | None = None      # continuous pass window [now - lookback, now);
                                         # None: the longest decision window + 1 h, >= 6 h
    settle_window_s: float = 3600.0      # attestation_not_settled after this long
    attestation_grace_s: float = 300.0   # attestations may arrive after the payment
    payment_grace_s: float = 600.0       # after the permit deadline (settle jobs, confirmation)
    payment_window_s: float = 3600.0     # attested_not_paid at the latest this long after receipt
    reconcile_bucket_s: int = 3600       # unlinked reconciliation window (aligned to the epoch)
    reconcile_margin_s: float = 900.0    # how far a session may straddle a window edge
    reconcile_tolerance: float = 0.1     # relative sum difference tolerated per window
    clock_skew_s: float = 60.0           # TEE clock vs chain clock
    settled_states: tuple[str, ...] = ("confirmed",)  # a payment counts once final

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CrossCheckPolicy.{f.name} must be a finite number >= 0")
        if self.interval_s <= 0 or self.reconcile_bucket_s <= 0:
            raise ValueError("CrossCheckPolicy.interval_s and reconcile_bucket_s must be > 0")
        if not self.settled_states or not set(self.settled_states) <= set(ON_CHAIN):
            raise ValueError(f"CrossCheckPolicy.settled_states must be among {ON_CHAIN}")
        # A continuous pass only re-reads `lookback_s`: anything decided later than that
        # would leave the window before it could ever be decided.
        latest = max(self.settle_window_s, self.payment_window_s,
                     self.reconcile_bucket_s + self.reconcile_margin_s + self.payment_grace_s)
        least = latest + self.interval_s
        if self.lookback_s is None:
            object.__setattr__(self, "lookback_s", max(6 * 3600.0, least + 3600.0))
        elif self.lookback_s < least:
            raise ValueError(f"CrossCheckPolicy.lookback_s must be at least {least:.0f} (the "
                             "longest decision window plus interval_s)")

    def delay(self, name: str) -> timedelta:
        return timedelta(seconds=float(getattr(self, name)))


# -- facts ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transfer:
    tx_hash: bytes
    block_number: int
    log_index: int
    amount: int


@dataclass(frozen=True, slots=True)
class Payment:
    """A session's settlement on the payment chain."""
    settlement_id: str              # public id (uuid)
    state: str
    amount: int
    tx_hash: bytes | None
    block_number: int | None
    log_index: int | None
    block_time: datetime | None     # the block's timestamp, when the watcher stored the block
    included_at: datetime | None
    transfers: tuple[Transfer, ...] = ()

    @property
    def settled_time(self) -> datetime | None:
        return self.block_time or self.included_at


@dataclass(frozen=True, slots=True)
class Session:
    id: int
    chain_id: int
    payer: bytes
    nonce: bytes
    pay_to: bytes
    cap: int
    deadline: int                   # Permit2 deadline, unix seconds
    created_at: datetime
    settled_at: datetime | None     # when /settle recorded it
    settled_amount: int | None
    payment: Payment | None
    payee_links: bool               # the payee's gateway links attestations to sessions

    @property
    def key(self) -> tuple[Any, ...]:
        return ("session", self.chain_id, _hex(self.payer), _hex(self.nonce))


@dataclass(frozen=True, slots=True)
class DumpCheck:
    """What the check of a batch's published dump found: the root and leaf count recomputed
    from the dump, or why they could not be (None while unchecked)."""
    checked_at: datetime | None = None
    root: bytes | None = None
    leaf_count: int | None = None
    error: str | None = None


def dump_evidence(d: DumpCheck) -> dict[str, Any]:
    return {"dumpCheckedAt": iso(d.checked_at),
            "dumpRoot": None if d.root is None else _hex(d.root),
            "dumpLeafCount": None if d.leaf_count is None else str(d.leaf_count),
            "dumpError": d.error}


@dataclass(frozen=True, slots=True)
class BatchRecord:
    batch_id: int
    chain_id: int
    tx_hash: bytes
    block_number: int
    block_time: datetime
    log_index: int
    merkle_root: bytes
    batch_size: int
    blob_id: str
    dump_status: str
    leaf_index: int
    proof: tuple[str, ...]
    dump: DumpCheck


@dataclass(frozen=True, slots=True)
class IndividualRecord:
    record_id: int
    chain_id: int
    tx_hash: bytes
    block_number: int
    block_time: datetime
    log_index: int
    blob_id: str


@dataclass(frozen=True, slots=True)
class Attestation:
    id: int
    mode: str
    tee_id: bytes
    input_hash: bytes
    output_hash: bytes
    tee_timestamp: int
    session_ref: str
    payer: bytes | None
    permit_nonce: bytes | None
    session_id: int | None
    cost_opg: int | None
    verification: str
    received_at: datetime
    batch_records: tuple[BatchRecord, ...] = ()
    individual_records: tuple[IndividualRecord, ...] = ()

    @property
    def has_reference(self) -> bool:
        return self.session_ref != "" or self.payer is not None or self.session_id is not None

    @property
    def inference(self) -> tuple[Any, ...]:
        return (_hex(self.tee_id), _hex(self.input_hash), _hex(self.output_hash),
                self.tee_timestamp)

    @property
    def key(self) -> tuple[Any, ...]:
        return ("attestation", *self.inference, self.session_ref)


@dataclass(frozen=True, slots=True)
class Tee:
    tee_id: bytes
    payment_address: bytes | None


@dataclass(frozen=True, slots=True)
class Batch:
    id: int
    chain_id: int
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    block_time: datetime
    log_index: int
    merkle_root: bytes
    batch_size: int
    blob_id: str
    dump_status: str
    leaves_stored: int
    dump: DumpCheck


@dataclass(frozen=True, slots=True)
class OgView:
    """How far the OpenGradient watcher has read, and what it has not finished checking."""
    synced_to: datetime | None              # timestamp of its newest processed block
    unchecked_batches: tuple[datetime, ...] = ()  # block times of batches awaiting a dump check


@dataclass(frozen=True, slots=True)
class UnlinkedAttestation:
    id: int
    tee_id: bytes
    tee_timestamp: int
    cost_opg: int | None


@dataclass(frozen=True, slots=True)
class UnlinkedPayment:
    session_id: int
    chain_id: int
    payer: bytes
    created_at: datetime
    amount: int
    tx_hash: bytes | None
    block_number: int | None


@dataclass(frozen=True, slots=True)
class Payee:
    """One payment address, the TEEs registered with it, and its unlinked traffic."""
    address: bytes
    tee_ids: tuple[bytes, ...]
    attestations: tuple[UnlinkedAttestation, ...] = ()
    payments: tuple[UnlinkedPayment, ...] = ()


@dataclass(frozen=True, slots=True)
class Facts:
    now: datetime
    window_from: datetime
    window_to: datetime
    sessions: tuple[Session, ...] = ()
    attestations: tuple[Attestation, ...] = ()
    tees: Mapping[bytes, Tee] = field(default_factory=dict)
    batches: tuple[Batch, ...] = ()
    og: OgView = OgView(None)
    payees: tuple[Payee, ...] = ()


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    linked: bool
    fingerprint: bytes
    evidence: Mapping[str, Any]
    session_id: int | None = None
    attestation_id: int | None = None
    tee_id: bytes | None = None
    payer: bytes | None = None


def fingerprint(kind: str, identity: Sequence[Any]) -> bytes:
    canonical = json.dumps([kind, *identity], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).digest()


def finding(kind: str, identity: Sequence[Any], evidence: Mapping[str, Any], *,
            linked: bool = True, session_id: int | None = None,
            attestation_id: int | None = None, tee_id: bytes | None = None,
            payer: bytes | None = None) -> Finding:
    if kind not in KINDS:
        raise ValueError(f"unknown finding kind {kind!r}")
    return Finding(kind, linked, fingerprint(kind, identity), dict(evidence), session_id,
                   attestation_id, tee_id, payer)


# -- evaluation ----------------------------------------------------------------------------------

def evaluate(facts: Facts, policy: CrossCheckPolicy) -> list[Finding]:
    """Every finding the facts support at `facts.now`, each fingerprint once."""
    view = _View.of(facts)
    found: dict[bytes, Finding] = {}
    for rule in RULES:
        for item in rule(view, policy):
            found.setdefault(item.fingerprint, item)
    return list(found.values())


@dataclass(frozen=True, slots=True)
class _View:
    facts: Facts
    sessions: Mapping[int, Session]
    by_session: Mapping[int, tuple[Attestation, ...]]

    @classmethod
    def of(cls, facts: Facts) -> _View:
        by_session: dict[int, list[Attestation]] = defaultdict(list)
        for a in facts.attestations:
            if a.session_id is not None:
                by_session[a.session_id].append(a)
        return cls(facts, {s.id: s for s in facts.sessions},
                   {k: tuple(v) for k, v in by_session.items()})

    @property
    def now(self) -> datetime:
        return self.facts.now


def _paid(session: Session, policy: CrossCheckPolicy) -> bool:
    p = session.payment
    return p is not None and p.state in policy.settled_states and p.amount > 0


def verification_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for a in view.facts.attestations:
        kind = VERDICT_KINDS.get(a.verification)
        if kind is None:
            continue
        evidence: dict[str, Any] = {"attestation": attestation_evidence(a),
                                    "verification": a.verification}
        if a.verification == "hash_mismatch":
            evidence["detail"] = ("the input and output hashes recomputed from the individual "
                                  "record's request and response differ from the signed ones")
        yield _about_attestation(kind, a, evidence, view)


def not_settled_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    og = view.facts.og
    for a in view.facts.attestations:
        if a.mode not in ("batch", "individual") or a.verification != "valid":
            continue
        due = a.received_at + policy.delay("settle_window_s")
        if view.now < due or og.synced_to is None or og.synced_to < due:
            continue  # the window is open, or the chain has not been read that far
        earliest = from_unix(a.tee_timestamp) - policy.delay("clock_skew_s")
        if any(earliest <= t <= due for t in og.unchecked_batches):
            continue  # a batch of that span may hold the leaf: wait for its dump check
        if _settled_in_time(a, due):
            continue
        yield _about_attestation("attestation_not_settled", a, {
            "attestation": attestation_evidence(a), "settleWindowS": policy.settle_window_s,
            "deadline": iso(due), "ogProcessedTo": iso(og.synced_to),
            "records": records_evidence(a)}, view)


def _settled_in_time(a: Attestation, due: datetime) -> bool:
    if a.mode == "batch":
        return any(r.dump_status == "valid" and r.block_time <= due for r in a.batch_records)
    return any(r.block_time <= due for r in a.individual_records)


def attested_not_paid_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for a in view.facts.attestations:
        if a.verification != "valid" or not a.has_reference:
            continue  # unreferenced attestations are reconciled per payee instead
        session = view.sessions.get(a.session_id) if a.session_id is not None else None
        verdict = _unpaid(a, session, policy)
        if verdict is None:
            continue
        reason, due = verdict
        if view.now < due:
            continue
        evidence: dict[str, Any] = {"attestation": attestation_evidence(a), "reason": reason,
                                    "decidedAfter": iso(due)}
        if session is not None:
            evidence["session"] = session_evidence(session)
        yield _about_attestation("attested_not_paid", a, evidence, view)


def _unpaid(a: Attestation, session: Session | None,
            policy: CrossCheckPolicy) -> tuple[str, datetime] | None:
    """(why it is unpaid, when that may be said), or None when it is (or may yet be) paid."""
    window_end = a.received_at + policy.delay("payment_window_s")
    if session is None:
        return "no_session", window_end
    payment = session.payment
    if _paid(session, policy) or (payment is not None and payment.state == "included"):
        return None
    deadline_end = from_unix(session.deadline) + policy.delay("payment_grace_s")
    if payment is not None and payment.state in IN_FLIGHT:
        return "settlement_in_flight_past_deadline", deadline_end
    if payment is not None:
        reason = "settlement_" + payment.state  # failed | expired
    elif session.settled_at is not None:
        reason = "settled_zero"
    else:
        reason = "not_settled"
    return reason, min(deadline_end, window_end)


def paid_not_attested_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for s in view.facts.sessions:
        if not _paid(s, policy) or not s.payee_links:
            continue
        linked = view.by_session.get(s.id, ())
        if any(a.verification == "valid" for a in linked):
            continue
        if any(a.verification == "pending" for a in linked):
            continue  # a verdict is still to come
        settled = s.payment.settled_time if s.payment else None
        if settled is None or view.now < settled + policy.delay("attestation_grace_s"):
            continue
        yield _about_session("paid_not_attested", s, (), {
            "session": session_evidence(s),
            "attestations": [attestation_evidence(a) for a in linked],
            "attestationGraceS": policy.attestation_grace_s})


def amount_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for s in view.facts.sessions:
        if not _paid(s, policy) or s.payment is None:
            continue
        paid = s.payment.amount
        if paid > s.cap:
            yield _about_session("amount_mismatch", s, ("cap",), {
                "session": session_evidence(s), "reason": "exceeds_cap",
                "settledAmount": str(paid), "cap": str(s.cap)})
        expected = _summed_cost(view.by_session.get(s.id, ()))
        settled = s.payment.settled_time
        if expected is None or settled is None:
            continue
        if view.now < settled + policy.delay("attestation_grace_s") or paid == expected:
            continue
        linked = view.by_session[s.id]
        yield _about_session("amount_mismatch", s, ("cost",), {
            "session": session_evidence(s),
            "reason": "underpaid" if paid < expected else "overpaid",
            "settledAmount": str(paid), "expectedAmount": str(expected),
            "difference": str(paid - expected),
            "costs": [{"attestationId": a.id, "costOpg": str(a.cost_opg)} for a in linked]})


def _summed_cost(linked: Sequence[Attestation]) -> int | None:
    """The session's requests' summed cost, or None when it cannot be known."""
    if not linked or any(a.cost_opg is None for a in linked):
        return None
    return sum(a.cost_opg or 0 for a in linked)


def payto_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for s in view.facts.sessions:
        if not _paid(s, policy):
            continue
        by_tee: dict[bytes, list[Attestation]] = defaultdict(list)
        for a in view.by_session.get(s.id, ()):
            if a.verification == "valid":  # a forged tee id says nothing about the payee
                by_tee[a.tee_id].append(a)
        for tee_id in sorted(by_tee):
            tee = view.facts.tees.get(tee_id)
            if tee is None or tee.payment_address is None or tee.payment_address == s.pay_to:
                continue
            yield _about_session("payto_mismatch", s, (_hex(tee_id),), {
                "session": session_evidence(s), "payTo": _hex(s.pay_to), "teeId": _hex(tee_id),
                "registeredPaymentAddress": _hex(tee.payment_address),
                "attestationIds": [a.id for a in by_tee[tee_id]]}, tee_id=tee_id)


def duplicate_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    yield from _inference_in_two_sessions(view)
    for s in view.facts.sessions:
        transfers = s.payment.transfers if s.payment else ()
        if len({t.tx_hash for t in transfers}) > 1:
            yield _about_session("duplicate", s, ("nonce",), {
                "session": session_evidence(s), "reason": "nonce_settled_twice",
                "transfers": [transfer_evidence(t) for t in transfers]})


def _inference_in_two_sessions(view: _View) -> Iterator[Finding]:
    groups: dict[tuple[Any, ...], list[Attestation]] = defaultdict(list)
    for a in view.facts.attestations:
        if a.session_id is not None:
            groups[a.inference].append(a)
    for inference in sorted(groups):
        copies = sorted(groups[inference], key=lambda a: a.id)
        session_ids = sorted({a.session_id for a in copies if a.session_id is not None})
        if len(session_ids) < 2:
            continue
        first = copies[0]
        sessions = [view.sessions[i] for i in session_ids if i in view.sessions]
        yield finding("duplicate", ("inference", *inference), {
            "reason": "inference_in_two_sessions", "sessionIds": session_ids,
            "sessions": [session_evidence(s) for s in sessions],
            "attestations": [attestation_evidence(a) for a in copies]},
            session_id=session_ids[0], attestation_id=first.id, tee_id=first.tee_id,
            payer=sessions[0].payer if sessions else first.payer)


def late_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for s in view.facts.sessions:
        p = s.payment
        if p is None or p.state not in policy.settled_states or p.block_time is None:
            continue
        deadline = from_unix(s.deadline)
        if p.block_time <= deadline:  # Permit2: valid while block.timestamp <= deadline
            continue
        yield _about_session("late_settlement", s, (), {
            "session": session_evidence(s), "deadline": str(s.deadline),
            "deadlineAt": iso(deadline), "blockTime": iso(p.block_time),
            "lateByS": (p.block_time - deadline).total_seconds()})


def batch_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    for b in view.facts.batches:
        if b.dump_status not in INVALID_DUMPS:
            continue
        yield finding("batch_dump_invalid", ("batch", b.chain_id, _hex(b.tx_hash),
                                             _hex(b.merkle_root)), {
            "batch": batch_evidence(b), "dumpStatus": b.dump_status,
            "detail": _DUMP_MEANING[b.dump_status]})


def reconciliation_findings(view: _View, policy: CrossCheckPolicy) -> Iterator[Finding]:
    facts = view.facts
    for start, end in reconcile_buckets(facts.window_from, facts.window_to, policy):
        if facts.now < end + policy.delay("reconcile_margin_s") + policy.delay("payment_grace_s"):
            continue
        for payee in facts.payees:
            gap = _gap(payee, start, end, policy)
            if gap is not None:
                yield _reconciliation(payee, start, end, gap, policy)


def reconcile_buckets(window_from: datetime, window_to: datetime,
                      policy: CrossCheckPolicy) -> list[tuple[datetime, datetime]]:
    """The epoch-aligned reconciliation windows that overlap [window_from, window_to)."""
    size = int(policy.reconcile_bucket_s)
    first = math.floor(window_from.timestamp() / size) * size
    return [(from_unix(t), from_unix(t + size))
            for t in range(first, math.ceil(window_to.timestamp()), size)]


@dataclass(frozen=True, slots=True)
class _Gap:
    kind: str
    attested: list[UnlinkedAttestation]
    paid: list[UnlinkedPayment]


def _gap(payee: Payee, start: datetime, end: datetime, policy: CrossCheckPolicy) -> _Gap | None:
    margin = policy.delay("reconcile_margin_s")

    def attested(lo: datetime, hi: datetime) -> list[UnlinkedAttestation]:
        return [a for a in payee.attestations if lo <= from_unix(a.tee_timestamp) < hi]

    def paid(lo: datetime, hi: datetime) -> list[UnlinkedPayment]:
        return [p for p in payee.payments if lo <= p.created_at < hi]

    inside_a, inside_p = attested(start, end), paid(start, end)
    if inside_a and not paid(start - margin, end + margin):
        return _Gap("attested_not_paid", inside_a, inside_p)
    if inside_p and not attested(start - margin, end + margin):
        return _Gap("paid_not_attested", inside_a, inside_p)
    if not inside_a or not inside_p or any(a.cost_opg is None for a in inside_a):
        return None
    cost, amount = sum(a.cost_opg or 0 for a in inside_a), sum(p.amount for p in inside_p)
    if abs(cost - amount) <= policy.reconcile_tolerance * max(cost, amount):
        return None
    return _Gap("amount", inside_a, inside_p)


def _reconciliation(payee: Payee, start: datetime, end: datetime, gap: _Gap,
                    policy: CrossCheckPolicy) -> Finding:
    costs = [a.cost_opg for a in gap.attested]
    evidence = {
        "gap": gap.kind, "payTo": _hex(payee.address),
        "teeIds": [_hex(t) for t in payee.tee_ids],
        "window": {"from": iso(start), "to": iso(end)},
        "marginS": policy.reconcile_margin_s, "tolerance": policy.reconcile_tolerance,
        "attested": {
            "count": len(gap.attested),
            "costOpg": None if None in costs else str(sum(c or 0 for c in costs)),
            "attestationIds": [a.id for a in gap.attested][:EVIDENCE_LIST_MAX]},
        "paid": {
            "count": len(gap.paid), "amount": str(sum(p.amount for p in gap.paid)),
            "sessions": [{"id": p.session_id, "chainId": p.chain_id, "payer": _hex(p.payer),
                          "amount": str(p.amount), "transaction": _hex(p.tx_hash),
                          "blockNumber": p.block_number}
                         for p in gap.paid][:EVIDENCE_LIST_MAX]}}
    only_tee = payee.tee_ids[0] if len(payee.tee_ids) == 1 else None
    return finding("unlinked_reconciliation",
                   ("payee", _hex(payee.address), int(start.timestamp()),
                    int(policy.reconcile_bucket_s)),
                   evidence, linked=False, tee_id=only_tee)


RULES: tuple[Callable[[_View, CrossCheckPolicy], Iterable[Finding]], ...] = (
    verification_findings, not_settled_findings, attested_not_paid_findings,
    paid_not_attested_findings, amount_findings, payto_findings, duplicate_findings,
    late_findings, batch_findings, reconciliation_findings)


# -- finding builders and evidence ---------------------------------------------------------------

def _about_attestation(kind: str, a: Attestation, evidence: Mapping[str, Any],
                       view: _View) -> Finding:
    session = view.sessions.get(a.session_id) if a.session_id is not None else None
    return finding(kind, a.key, evidence, session_id=a.session_id, attestation_id=a.id,
                   tee_id=a.tee_id, payer=session.payer if session else a.payer)


def _about_session(kind: str, s: Session, detail: Sequence[Any], evidence: Mapping[str, Any],
                   *, tee_id: bytes | None = None) -> Finding:
    return finding(kind, (*s.key, *detail), evidence, session_id=s.id, tee_id=tee_id,
                   payer=s.payer)


def session_evidence(s: Session) -> dict[str, Any]:
    return {"id": s.id, "chainId": s.chain_id, "payer": _hex(s.payer), "nonce": _hex(s.nonce),
            "payTo": _hex(s.pay_to), "cap": str(s.cap), "deadline": str(s.deadline),
            "settledAmount": None if s.settled_amount is None else str(s.settled_amount),
            "settledAt": iso(s.settled_at),
            "payment": None if s.payment is None else payment_evidence(s.payment)}


def payment_evidence(p: Payment) -> dict[str, Any]:
    return {"settlementId": p.settlement_id, "state": p.state, "amount": str(p.amount),
            "transaction": _hex(p.tx_hash), "blockNumber": p.block_number,
            "logIndex": p.log_index, "blockTime": iso(p.block_time),
            "includedAt": iso(p.included_at)}


def transfer_evidence(t: Transfer) -> dict[str, Any]:
    return {"transaction": _hex(t.tx_hash), "blockNumber": t.block_number,
            "logIndex": t.log_index, "amount": str(t.amount)}


def attestation_evidence(a: Attestation) -> dict[str, Any]:
    return {"id": a.id, "mode": a.mode, "teeId": _hex(a.tee_id), "inputHash": _hex(a.input_hash),
            "outputHash": _hex(a.output_hash), "teeTimestamp": a.tee_timestamp,
            "sessionRef": a.session_ref, "sessionId": a.session_id,
            "verification": a.verification,
            "costOpg": None if a.cost_opg is None else str(a.cost_opg),
            "receivedAt": iso(a.received_at)}


def records_evidence(a: Attestation) -> dict[str, Any]:
    return {"batches": [{"chainId": r.chain_id, "transaction": _hex(r.tx_hash),
                         "blockNumber": r.block_number, "logIndex": r.log_index,
                         "blockTime": iso(r.block_time), "merkleRoot": _hex(r.merkle_root),
                         "batchSize": str(r.batch_size), "blobId": r.blob_id,
                         "dumpStatus": r.dump_status, **dump_evidence(r.dump),
                         "leafIndex": r.leaf_index, "proof": list(r.proof)}
                        for r in a.batch_records],
            "individual": [{"chainId": r.chain_id, "transaction": _hex(r.tx_hash),
                            "blockNumber": r.block_number, "logIndex": r.log_index,
                            "blockTime": iso(r.block_time), "blobId": r.blob_id}
                           for r in a.individual_records]}


def batch_evidence(b: Batch) -> dict[str, Any]:
    return {"chainId": b.chain_id, "transaction": _hex(b.tx_hash),
            "blockNumber": b.block_number, "blockHash": _hex(b.block_hash),
            "blockTime": iso(b.block_time), "logIndex": b.log_index,
            "merkleRoot": _hex(b.merkle_root), "batchSize": str(b.batch_size),
            "blobId": b.blob_id, **dump_evidence(b.dump), "leavesStored": b.leaves_stored}


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_MAX_UNIX = 253_402_300_799  # 9999-12-31T23:59:59Z: a uint256 deadline may be "never"


def from_unix(seconds: int | float) -> datetime:
    """Unix seconds as an aware UTC datetime, clamped to what datetime can hold."""
    return datetime.fromtimestamp(min(max(seconds, 0), _MAX_UNIX), UTC)

"""The cross-check rules (facilitator.core.crosscheck) on constructed facts: honest data gives no
finding, each planted discrepancy gives exactly its finding, the timing windows hold a rule
back until its window has passed, and fingerprints are stable natural-key hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from facilitator.core import crosscheck as cc
from facilitator.core.crosscheck import (
    Attestation,
    Batch,
    BatchRecord,
    DumpCheck,
    CrossCheckPolicy,
    Facts,
    IndividualRecord,
    OgView,
    Payee,
    Payment,
    Session,
    Tee,
    Transfer,
    UnlinkedAttestation,
    UnlinkedPayment,
    evaluate,
)

POLICY = CrossCheckPolicy()
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)   # sessions start here (an hour boundary)
NOW = T0 + timedelta(days=1)                    # every window long past
TEE, TEE_U = b"\x7e" * 32, b"\x7f" * 32
PAY_TO, PAY_TO_U = b"\xb1" * 20, b"\xb2" * 20
PAYER = b"\xa1" * 20
OG_CHAIN = 10740


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def unix(seconds: float) -> int:
    return int(at(seconds).timestamp())


def batch_record(leaf: int, *, status: str = "valid", time: float = 600) -> BatchRecord:
    return BatchRecord(batch_id=1, chain_id=OG_CHAIN, tx_hash=b"\xba" * 32, block_number=500,
                       block_time=at(time), log_index=2, merkle_root=b"\x12" * 32,
                       batch_size=2, blob_id="blob-1", dump_status=status, leaf_index=leaf,
                       proof=("0x" + "34" * 32,), dump=dump_check(status))


def individual_record(time: float = 60) -> IndividualRecord:
    return IndividualRecord(record_id=1, chain_id=OG_CHAIN, tx_hash=b"\x1d" * 32,
                            block_number=480, block_time=at(time), log_index=0, blob_id="blob-2")


def attestation(n: int, **changes: object) -> Attestation:
    base = Attestation(
        id=n, mode="batch", tee_id=TEE, input_hash=bytes([n]) * 32,
        output_hash=bytes([n + 100]) * 32,
        tee_timestamp=unix(10 * n), session_ref="gw-1", payer=None, permit_nonce=None,
        session_id=1, cost_opg=10, verification="valid", received_at=at(10 * n + 1),
        batch_records=(batch_record(n - 1),))
    return replace(base, **changes)  # type: ignore[arg-type]


def payment(amount: int = 30, **changes: object) -> Payment:
    base = Payment(settlement_id="0b7c1f1e-4a39-4f43-9a49-2f1c5d2b6a10", state="confirmed",
                   amount=amount, tx_hash=b"\x7a" * 32, block_number=100, log_index=3,
                   block_time=at(150), included_at=at(152),
                   transfers=(Transfer(b"\x7a" * 32, 100, 3, amount),))
    return replace(base, **changes)  # type: ignore[arg-type]


def session(n: int = 1, **changes: object) -> Session:
    base = Session(id=n, chain_id=84532, payer=PAYER, nonce=bytes([n]) * 32, pay_to=PAY_TO,
                   cap=100, deadline=unix(300), created_at=at(0), settled_at=at(140),
                   settled_amount=30, payment=payment(), payee_links=True)
    return replace(base, **changes)  # type: ignore[arg-type]


def honest(**changes: object) -> Facts:
    """A linked session paid 30 for three valid attestations (two batch, one individual), an
    unlinked payee whose attestations (2 x 5) and payment (10) balance in their hour, and a
    batch whose dump checked valid."""
    attestations = (attestation(1), attestation(2),
                    attestation(3, mode="individual", batch_records=(),
                                individual_records=(individual_record(),)))
    base = Facts(
        now=NOW, window_from=T0, window_to=T0 + timedelta(hours=1), sessions=(session(),),
        attestations=attestations,
        tees={TEE: Tee(TEE, PAY_TO), TEE_U: Tee(TEE_U, PAY_TO_U)},
        batches=(batch(),), og=OgView(NOW),
        payees=(unlinked_payee(),))
    return replace(base, **changes)  # type: ignore[arg-type]


def batch(status: str = "valid") -> Batch:
    return Batch(id=1, chain_id=OG_CHAIN, tx_hash=b"\xba" * 32, block_number=500,
                 block_hash=b"\xbb" * 32, block_time=at(600), log_index=2,
                 merkle_root=b"\x12" * 32, batch_size=2, blob_id="blob-1", dump_status=status,
                 leaves_stored=2 if status == "valid" else 0, dump=dump_check(status))


def dump_check(status: str) -> DumpCheck:
    """What the dump check would have stored for a batch with root 0x12..12 of two leaves."""
    if status == "pending":
        return DumpCheck()
    if status in ("malformed", "unavailable"):
        return DumpCheck(checked_at=at(601), error=f"{status} dump")
    root = b"\x12" * 32 if status == "valid" else b"\x13" * 32
    return DumpCheck(checked_at=at(601), root=root, leaf_count=2)


def unlinked_payee(attested: tuple[UnlinkedAttestation, ...] | None = None,
                   paid: tuple[UnlinkedPayment, ...] | None = None) -> Payee:
    if attested is None:
        attested = (UnlinkedAttestation(50, TEE_U, unix(600), 5),
                    UnlinkedAttestation(51, TEE_U, unix(700), 5))
    if paid is None:
        paid = (UnlinkedPayment(9, 84532, PAYER, at(590), 10, b"\x99" * 32, 120),)
    return Payee(PAY_TO_U, (TEE_U,), attested, paid)


def kinds(facts: Facts, policy: CrossCheckPolicy = POLICY) -> list[str]:
    return sorted(f.kind for f in evaluate(facts, policy))


def only(facts: Facts, policy: CrossCheckPolicy = POLICY) -> cc.Finding:
    found = evaluate(facts, policy)
    assert len(found) == 1, [(f.kind, f.evidence) for f in found]
    return found[0]


def with_attestation(facts: Facts, index: int, **changes: object) -> Facts:
    items = list(facts.attestations)
    items[index] = replace(items[index], **changes)  # type: ignore[arg-type]
    return replace(facts, attestations=tuple(items))


def with_session(facts: Facts, **changes: object) -> Facts:
    return replace(facts, sessions=(replace(facts.sessions[0], **changes),))  # type: ignore


# -- honest data ----------------------------------------------------------------------------------

def test_honest_data_gives_no_finding() -> None:
    assert evaluate(honest(), POLICY) == []


def test_honest_data_before_any_window_passed_gives_no_finding() -> None:
    for seconds in (0, 200, 400, 3000, 3700, 7200):
        assert evaluate(honest(now=at(seconds)), POLICY) == [], seconds


# -- verification verdicts ------------------------------------------------------------------------

@pytest.mark.parametrize(("verdict", "kind"), [
    ("invalid_signature", "invalid_tee_signature"), ("hash_mismatch", "invalid_tee_signature"),
    ("unknown_tee", "unknown_tee"), ("tee_disabled", "tee_disabled")])
def test_each_verdict_gives_its_finding(verdict: str, kind: str) -> None:
    found = only(with_attestation(honest(), 0, verification=verdict))
    assert (found.kind, found.linked, found.attestation_id, found.session_id) == (kind, True, 1, 1)
    assert found.evidence["verification"] == verdict
    assert found.evidence["attestation"]["teeId"] == "0x" + TEE.hex()
    if verdict == "hash_mismatch":
        assert "recomputed" in found.evidence["detail"]


def test_pending_verification_gives_no_verdict_finding() -> None:
    assert evaluate(with_attestation(honest(), 0, verification="pending"), POLICY) == []


# -- attestation_not_settled ----------------------------------------------------------------------

def test_a_missing_batch_record_is_not_settled() -> None:
    found = only(with_attestation(honest(), 1, batch_records=()))
    assert found.kind == "attestation_not_settled" and found.attestation_id == 2
    assert found.evidence["records"] == {"batches": [], "individual": []}
    assert found.evidence["deadline"] == cc.iso(at(21) + timedelta(hours=1))


def test_a_missing_individual_record_is_not_settled() -> None:
    assert only(with_attestation(honest(), 2, individual_records=())).kind == \
        "attestation_not_settled"


def test_a_leaf_only_in_an_invalid_dump_or_too_late_is_not_settled() -> None:
    tampered = with_attestation(honest(), 0,
                                batch_records=(batch_record(0, status="root_mismatch"),))
    found = only(tampered)
    assert found.kind == "attestation_not_settled"
    assert found.evidence["records"]["batches"][0]["dumpStatus"] == "root_mismatch"
    late = with_attestation(honest(), 0, batch_records=(batch_record(0, time=3 * 3600),))
    assert only(late).kind == "attestation_not_settled"


def test_private_and_invalid_attestations_are_not_expected_on_chain() -> None:
    private = with_attestation(honest(), 0, mode="private", batch_records=())
    assert evaluate(private, POLICY) == []
    forged = with_attestation(honest(), 0, verification="invalid_signature", batch_records=())
    assert kinds(forged) == ["invalid_tee_signature"]


def test_not_settled_waits_for_its_window_the_og_watcher_and_unchecked_dumps() -> None:
    missing = with_attestation(honest(), 1, batch_records=())
    due = at(21) + timedelta(seconds=POLICY.settle_window_s)
    assert evaluate(replace(missing, now=due - timedelta(seconds=1)), POLICY) == []
    assert kinds(replace(missing, now=due)) == ["attestation_not_settled"]
    # the OpenGradient watcher has not read the chain up to the window's end
    assert evaluate(replace(missing, og=OgView(due - timedelta(seconds=1))), POLICY) == []
    assert evaluate(replace(missing, og=OgView(None)), POLICY) == []
    # a batch posted in that span still awaits its dump check: it may hold the leaf
    assert evaluate(replace(missing, og=OgView(NOW, (at(900),))), POLICY) == []
    assert kinds(replace(missing, og=OgView(NOW, (due + timedelta(seconds=1),)))) == \
        ["attestation_not_settled"]


# -- attested_not_paid ----------------------------------------------------------------------------

def test_a_session_that_never_settled_leaves_its_attestations_unpaid() -> None:
    facts = with_session(honest(), payment=None, settled_at=None, settled_amount=None)
    found = evaluate(facts, POLICY)
    assert sorted(f.attestation_id for f in found) == [1, 2, 3]
    assert {f.kind for f in found} == {"attested_not_paid"}
    assert found[0].evidence["reason"] == "not_settled"
    assert found[0].evidence["session"]["id"] == 1


@pytest.mark.parametrize(("state", "reason"), [("failed", "settlement_failed"),
                                               ("expired", "settlement_expired")])
def test_a_failed_settlement_leaves_attestations_unpaid(state: str, reason: str) -> None:
    facts = with_session(honest(), payment=payment(state=state, block_number=None,
                                                   block_time=None, transfers=()))
    found = evaluate(facts, POLICY)
    assert {(f.kind, f.evidence["reason"]) for f in found} == {("attested_not_paid", reason)}


def test_a_zero_settlement_leaves_attestations_unpaid() -> None:
    facts = with_session(honest(), payment=None, settled_amount=0)
    assert {f.evidence["reason"] for f in evaluate(facts, POLICY)} == {"settled_zero"}


def test_an_unresolved_session_reference_is_unpaid_after_the_payment_window() -> None:
    orphan = attestation(4, session_ref="gw-unknown", session_id=None)
    facts = replace(honest(), attestations=(*honest().attestations, orphan))
    found = only(facts)
    assert (found.kind, found.evidence["reason"], found.session_id) == \
        ("attested_not_paid", "no_session", None)
    due = orphan.received_at + timedelta(seconds=POLICY.payment_window_s)
    assert evaluate(replace(facts, now=due - timedelta(seconds=1)), POLICY) == []


def test_unpaid_waits_for_the_deadline_grace_or_the_window() -> None:
    unpaid = with_session(honest(), payment=None, settled_at=None, settled_amount=None)
    deadline_due = at(300) + timedelta(seconds=POLICY.payment_grace_s)
    assert evaluate(replace(unpaid, now=deadline_due - timedelta(seconds=1)), POLICY) == []
    assert len(evaluate(replace(unpaid, now=deadline_due), POLICY)) == 3
    # a far deadline: the payment window (from receipt) decides instead
    far = with_session(unpaid, deadline=unix(10 * 86400))
    window_due = at(21) + timedelta(seconds=POLICY.payment_window_s)  # a3 came at 31
    assert [f.attestation_id for f in evaluate(replace(far, now=window_due), POLICY)] == [1, 2]


def test_a_settlement_in_flight_waits_for_the_deadline_and_included_counts_as_paid() -> None:
    far = unix(10 * 86400)
    in_flight = with_session(honest(), deadline=far,
                             payment=payment(state="broadcast", block_number=None,
                                             block_time=None, transfers=()))
    assert evaluate(in_flight, POLICY) == []  # a day later, but the permit is still valid
    past = replace(in_flight, now=at(10 * 86400 + POLICY.payment_grace_s))
    assert {f.evidence["reason"] for f in evaluate(past, POLICY)} == \
        {"settlement_in_flight_past_deadline"}
    included = with_session(honest(), payment=payment(state="included"))
    assert evaluate(included, POLICY) == []


# -- paid_not_attested ----------------------------------------------------------------------------

def test_a_paid_session_without_attestations_is_paid_not_attested() -> None:
    found = only(replace(honest(), attestations=()))
    assert (found.kind, found.session_id, found.payer) == ("paid_not_attested", 1, PAYER)
    assert found.evidence["session"]["payment"]["transaction"] == "0x" + "7a" * 32


def test_paid_not_attested_waits_for_the_grace_and_pending_verdicts() -> None:
    facts = replace(honest(), attestations=())
    due = at(150) + timedelta(seconds=POLICY.attestation_grace_s)
    assert evaluate(replace(facts, now=due - timedelta(seconds=1)), POLICY) == []
    assert kinds(replace(facts, now=due)) == ["paid_not_attested"]
    pending = replace(honest(), attestations=(attestation(1, verification="pending"),))
    pending = with_session(pending, payment=payment(amount=10))
    assert evaluate(pending, POLICY) == []


def test_only_invalid_attestations_give_paid_not_attested_too() -> None:
    forged = replace(honest(), attestations=(
        attestation(1, verification="invalid_signature"),))
    forged = with_session(forged, payment=payment(amount=10))
    assert kinds(forged) == ["invalid_tee_signature", "paid_not_attested"]


def test_a_payee_that_does_not_link_is_left_to_reconciliation() -> None:
    facts = with_session(replace(honest(), attestations=()), payee_links=False)
    assert evaluate(facts, POLICY) == []


# -- amount_mismatch ------------------------------------------------------------------------------

@pytest.mark.parametrize(("paid", "reason"), [(20, "underpaid"), (40, "overpaid")])
def test_a_session_paid_other_than_its_summed_cost(paid: int, reason: str) -> None:
    found = only(with_session(honest(), payment=payment(amount=paid)))
    assert found.kind == "amount_mismatch"
    assert (found.evidence["reason"], found.evidence["settledAmount"],
            found.evidence["expectedAmount"]) == (reason, str(paid), "30")
    assert [c["costOpg"] for c in found.evidence["costs"]] == ["10", "10", "10"]


def test_a_session_paid_over_its_cap() -> None:
    facts = with_session(honest(), cap=25)
    found = only(facts)
    assert (found.kind, found.evidence["reason"], found.evidence["cap"]) == \
        ("amount_mismatch", "exceeds_cap", "25")


def test_amount_is_compared_only_when_every_cost_is_known_and_after_the_grace() -> None:
    unknown = with_attestation(with_session(honest(), payment=payment(amount=20)), 0,
                               cost_opg=None)
    assert evaluate(unknown, POLICY) == []
    under = with_session(honest(), payment=payment(amount=20))
    due = at(150) + timedelta(seconds=POLICY.attestation_grace_s)
    assert evaluate(replace(under, now=due - timedelta(seconds=1)), POLICY) == []


# -- payto_mismatch -------------------------------------------------------------------------------

def test_a_payto_that_is_not_the_tees_registered_address() -> None:
    facts = replace(honest(), tees={**honest().tees, TEE: Tee(TEE, b"\xee" * 20)})
    found = only(facts)
    assert (found.kind, found.tee_id, found.session_id) == ("payto_mismatch", TEE, 1)
    assert found.evidence["registeredPaymentAddress"] == "0x" + "ee" * 20
    assert found.evidence["payTo"] == "0x" + PAY_TO.hex()
    assert found.evidence["attestationIds"] == [1, 2, 3]


def test_payto_is_not_compared_for_tees_without_an_address_or_forged_ids() -> None:
    assert evaluate(replace(honest(), tees={TEE: Tee(TEE, None)}), POLICY) == []


# -- duplicate ------------------------------------------------------------------------------------

def test_one_inference_counted_in_two_sessions() -> None:
    facts = honest()
    copy = replace(facts.attestations[0], id=9, session_ref="gw-2", session_id=2, cost_opg=10)
    second = session(2, payment=payment(amount=10, tx_hash=b"\x7b" * 32,
                                        transfers=(Transfer(b"\x7b" * 32, 101, 0, 10),)))
    facts = replace(facts, attestations=(*facts.attestations, copy),
                    sessions=(*facts.sessions, second))
    found = only(facts)
    assert found.kind == "duplicate" and found.evidence["reason"] == "inference_in_two_sessions"
    assert found.evidence["sessionIds"] == [1, 2] and found.session_id == 1
    assert [a["id"] for a in found.evidence["attestations"]] == [1, 9]


def test_one_nonce_settled_by_two_transactions() -> None:
    transfers = (Transfer(b"\x7a" * 32, 100, 3, 30), Transfer(b"\x7c" * 32, 104, 1, 30))
    found = only(with_session(honest(), payment=payment(transfers=transfers)))
    assert (found.kind, found.evidence["reason"]) == ("duplicate", "nonce_settled_twice")
    assert [t["transaction"] for t in found.evidence["transfers"]] == \
        ["0x" + "7a" * 32, "0x" + "7c" * 32]


# -- late_settlement ------------------------------------------------------------------------------

def test_a_settlement_mined_after_the_deadline() -> None:
    found = only(with_session(honest(), payment=payment(block_time=at(301))))
    assert found.kind == "late_settlement"
    assert found.evidence["lateByS"] == 1.0 and found.evidence["deadline"] == str(unix(300))


def test_mined_at_the_deadline_is_on_time_and_unknown_block_times_are_not_judged() -> None:
    assert evaluate(with_session(honest(), payment=payment(block_time=at(300))), POLICY) == []
    assert evaluate(with_session(honest(), payment=payment(block_time=None)), POLICY) == []


# -- batch_dump_invalid ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["root_mismatch", "size_mismatch", "malformed"])
def test_a_tampered_dump(status: str) -> None:
    found = only(replace(honest(), batches=(batch(status),)))
    assert (found.kind, found.evidence["dumpStatus"]) == ("batch_dump_invalid", status)
    assert found.evidence["batch"]["merkleRoot"] == "0x" + "12" * 32
    assert found.evidence["batch"]["batchSize"] == "2"
    recomputed = None if status == "malformed" else "0x" + "13" * 32
    assert found.evidence["batch"]["dumpRoot"] == recomputed
    assert (found.evidence["batch"]["dumpError"] is None) == (status != "malformed")


def test_an_unavailable_or_pending_dump_is_not_a_tampered_one() -> None:
    for status in ("unavailable", "pending"):
        assert evaluate(replace(honest(), batches=(batch(status),)), POLICY) == []


# -- unlinked reconciliation ----------------------------------------------------------------------

def test_unlinked_attestations_without_any_payment() -> None:
    attested = (*unlinked_payee().attestations,
                UnlinkedAttestation(60, TEE_U, unix(3 * 3600 + 10), 5))
    facts = honest(payees=(unlinked_payee(attested=attested),),
                   window_to=T0 + timedelta(hours=4))
    found = only(facts)
    assert (found.kind, found.linked, found.tee_id) == ("unlinked_reconciliation", False, TEE_U)
    assert found.evidence["gap"] == "attested_not_paid"
    assert found.evidence["attested"] == {"count": 1, "costOpg": "5", "attestationIds": [60]}
    assert found.evidence["window"]["from"] == cc.iso(T0 + timedelta(hours=3))


def test_unlinked_payments_without_any_attestation() -> None:
    paid = (*unlinked_payee().payments,
            UnlinkedPayment(10, 84532, PAYER, at(2 * 3600 + 1800), 7, b"\x98" * 32, 130))
    found = only(honest(payees=(unlinked_payee(paid=paid),),
                        window_to=T0 + timedelta(hours=3)))
    assert found.evidence["gap"] == "paid_not_attested"
    assert found.evidence["paid"]["sessions"][0]["id"] == 10


def test_unlinked_sums_within_and_beyond_the_tolerance() -> None:
    def paying(amount: int) -> Facts:
        return honest(payees=(unlinked_payee(paid=(
            UnlinkedPayment(9, 84532, PAYER, at(590), amount, None, None),)),))
    assert evaluate(paying(11), POLICY) == []  # 1 of 11: within 10 %
    assert evaluate(paying(9), POLICY) == []   # 1 of 10
    assert kinds(paying(12)) == ["unlinked_reconciliation"]
    assert kinds(paying(8)) == ["unlinked_reconciliation"]


def test_unlinked_reconciliation_tolerance_and_margin() -> None:
    paid = (UnlinkedPayment(9, 84532, PAYER, at(590), 30, None, None),)
    found = only(honest(payees=(unlinked_payee(paid=paid),)))
    assert (found.evidence["gap"], found.evidence["paid"]["amount"],
            found.evidence["attested"]["costOpg"]) == ("amount", "30", "10")
    # a session that starts a few minutes into the next hour covers attestations at the end
    attested = (UnlinkedAttestation(50, TEE_U, unix(3500), 5),)
    paid = (UnlinkedPayment(9, 84532, PAYER, at(3700), 5, None, None),)
    assert evaluate(honest(payees=(unlinked_payee(attested, paid),),
                           window_to=T0 + timedelta(hours=2)), POLICY) == []


def test_unlinked_reconciliation_waits_until_its_window_is_closed() -> None:
    facts = honest(payees=(unlinked_payee(paid=()),))
    due = T0 + timedelta(hours=1, seconds=POLICY.reconcile_margin_s + POLICY.payment_grace_s)
    assert evaluate(replace(facts, now=due - timedelta(seconds=1)), POLICY) == []
    assert kinds(replace(facts, now=due)) == ["unlinked_reconciliation"]


def test_unknown_costs_skip_only_the_sum_comparison() -> None:
    attested = (UnlinkedAttestation(50, TEE_U, unix(600), None),)
    paid = (UnlinkedPayment(9, 84532, PAYER, at(590), 1000, None, None),)
    assert evaluate(honest(payees=(unlinked_payee(attested, paid),)), POLICY) == []


# -- fingerprints ---------------------------------------------------------------------------------

def test_fingerprints_are_stable_natural_key_hashes() -> None:
    facts = with_session(honest(), payment=payment(amount=20))
    first, again = evaluate(facts, POLICY), evaluate(facts, POLICY)
    assert [f.fingerprint for f in first] == [f.fingerprint for f in again]
    expected = hashlib.sha256(json.dumps(
        ["amount_mismatch", "session", 84532, "0x" + PAYER.hex(), "0x" + "01" * 32, "cost"],
        separators=(",", ":")).encode()).digest()
    assert first[0].fingerprint == expected
    # the measured amounts are evidence, not identity: the same discrepancy, one fingerprint
    other = evaluate(with_session(honest(), payment=payment(amount=25)), POLICY)
    assert other[0].fingerprint == expected and other[0].evidence != first[0].evidence
    # database ids are not identity either
    renumbered = with_session(facts, id=77)
    renumbered = replace(renumbered, attestations=tuple(
        replace(a, session_id=77) for a in renumbered.attestations))
    assert evaluate(renumbered, POLICY)[0].fingerprint == expected


def test_fingerprints_differ_per_kind_and_subject() -> None:
    found = evaluate(replace(
        with_session(honest(), cap=25, payment=payment(amount=40)),
        batches=(batch("malformed"),)), POLICY)
    assert len({f.fingerprint for f in found}) == len(found) == 3
    assert sorted(f.evidence.get("reason", f.kind) for f in found) == \
        ["batch_dump_invalid", "exceeds_cap", "overpaid"]


def test_findings_are_json_ready_and_deterministic() -> None:
    facts = replace(honest(attestations=()), batches=(batch("root_mismatch"),))
    found = evaluate(facts, POLICY)
    json.dumps([f.evidence for f in found])  # no bytes, datetimes or Decimals
    assert [f.kind for f in found] == ["paid_not_attested", "batch_dump_invalid"]


def test_policy_refuses_a_lookback_shorter_than_its_windows() -> None:
    with pytest.raises(ValueError, match="lookback_s"):
        CrossCheckPolicy(lookback_s=3600)
    with pytest.raises(ValueError, match="settle_window_s"):
        CrossCheckPolicy(settle_window_s=-1)
    with pytest.raises(ValueError, match="settled_states"):
        CrossCheckPolicy(settled_states=("broadcast",))
    CrossCheckPolicy(settle_window_s=60, payment_window_s=60, reconcile_bucket_s=60,
                     reconcile_margin_s=0, payment_grace_s=0, interval_s=1, lookback_s=61)
    # by default the lookback follows the longest window (a configured 30-day settle window)
    assert CrossCheckPolicy().lookback_s == 6 * 3600
    assert CrossCheckPolicy(settle_window_s=30 * 86400).lookback_s == 30 * 86400 + 60 + 3600

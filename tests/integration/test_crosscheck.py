"""The attestation cross-check on a real PostgreSQL database: an honest world (linked sessions
paid exactly for their attestations, batch and individual records on the OpenGradient chain,
an unlinked payee whose traffic balances) gives no finding; each planted discrepancy gives
exactly its finding and no other; a second pass adds nothing; rules wait for their windows;
the continuous loop and `facilitator crosscheck` work over the same rows.

Rows are planted with SQL through the schema's constraints and the settlement transition
trigger (settlements inserted `pending`, then moved through legal transitions): see
crosscheck_world.py, shared with test_findings_api.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

import asyncpg
import orjson
import pytest
from crosscheck_world import (
    OG_CHAIN,
    PAYERS,
    PAY_A,
    Plant,
    TEE_A,
    TEE_U,
    WINDOW,
    World,
    addr,
    amount,
    at,
    attested_never_paid,
    checker_for,
    disabled_tee,
    forged_signature,
    h,
    inference_in_two_sessions,
    late_settlement,
    missing_batch,
    missing_individual_record,
    nonce_settled_twice,
    over_cap,
    paid_without_attestation,
    payto_mismatch,
    plant_attestation,
    plant_session,
    recomputed_hashes_differ,
    seed_honest,
    strangers_batch,
    tampered_dump,
    unknown_tee,
    unlinked_gap,
)
from harness import wait_until

from facilitator.adapters.metrics import Metrics
from facilitator.audit.crosscheck_cli import add_crosscheck_parser, run_crosscheck
from facilitator.core.crosscheck import CrossCheckPolicy


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
async def world(pool: asyncpg.Pool) -> World:
    return await seed_honest(pool)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def stored(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT kind, linked, session_id, attestation_id, tee_id, payer, "
                            "evidence::text AS evidence FROM findings ORDER BY id")


# -- honest data ----------------------------------------------------------------------------------

async def test_honest_data_gives_no_finding(world: World, metrics: Metrics) -> None:
    checker = checker_for(world, metrics)
    assert await checker.run_once(*WINDOW) == []
    assert await stored(world.pool) == []
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="ok") == 1
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="error") == 0


# -- one discrepancy at a time --------------------------------------------------------------------

Check = Callable[[World, dict], None]


def check_forged(world: World, evidence: dict) -> None:
    assert evidence["verification"] == "invalid_signature"
    assert evidence["attestation"]["id"] == world.attestations["a1"].id


def check_hashes(world: World, evidence: dict) -> None:
    assert evidence["verification"] == "hash_mismatch" and "recomputed" in evidence["detail"]


def check_not_settled(world: World, evidence: dict) -> None:
    assert evidence["attestation"]["id"] == world.attestations["a2"].id
    assert evidence["records"] == {"batches": [], "individual": []}
    assert evidence["ogProcessedTo"] == "2025-03-02T12:00:00.000000Z"


def check_tampered(world: World, evidence: dict) -> None:
    batch = evidence["batch"]
    assert evidence["dumpStatus"] == "root_mismatch"
    assert (batch["transaction"], batch["blockNumber"], batch["logIndex"], batch["merkleRoot"],
            batch["batchSize"], batch["blobId"]) == (
        "0x" + h("og-tx:tampered").hex(), 503, 1, "0x" + h("root:tampered").hex(), "7",
        "blob-tampered")
    assert (batch["dumpRoot"], batch["dumpLeafCount"], batch["dumpError"]) == (
        "0x" + h("dump-root:tampered").hex(), "1", None)
    assert batch["dumpCheckedAt"].endswith("Z")


def check_amount(reason: str) -> Check:
    def check(world: World, evidence: dict) -> None:
        assert (evidence["reason"], evidence["expectedAmount"]) == (reason, "30")
        assert evidence["session"]["payment"]["transaction"] == "0x" + h("tx:s1").hex()
        assert evidence["session"]["payment"]["blockNumber"] == 100
    return check


def check_payto(world: World, evidence: dict) -> None:
    assert evidence["payTo"] == "0x" + PAY_A.hex()
    assert evidence["registeredPaymentAddress"] == "0x" + addr("tee-a-registered").hex()


def check_two_sessions(world: World, evidence: dict) -> None:
    assert evidence["sessionIds"] == sorted([world.sessions["s1"], world.sessions["s3"]])
    assert evidence["reason"] == "inference_in_two_sessions"


def check_nonce(world: World, evidence: dict) -> None:
    assert [(t["transaction"], t["blockNumber"], t["logIndex"]) for t in evidence["transfers"]] \
        == [("0x" + h("tx:s1").hex(), 100, 0), ("0x" + h("tx:s1:second").hex(), 104, 5)]


def check_late(world: World, evidence: dict) -> None:
    assert (evidence["blockTime"], evidence["lateByS"]) == ("2025-03-01T12:05:01.000000Z", 1.0)


def check_unpaid(world: World, evidence: dict) -> None:
    assert evidence["reason"] == "not_settled"
    assert evidence["session"]["id"] == world.sessions["s5"]


def check_gap(world: World, evidence: dict) -> None:
    assert evidence["gap"] == "attested_not_paid"
    assert evidence["attested"]["count"] == 3 and evidence["attested"]["costOpg"] == "15"
    assert evidence["paid"] == {"count": 0, "amount": "0", "sessions": []}
    assert evidence["window"] == {"from": "2025-03-01T13:00:00.000000Z",
                                  "to": "2025-03-01T14:00:00.000000Z"}


SCENARIOS: dict[str, tuple[Plant, str, Check | None]] = {
    "forged signature": (forged_signature, "invalid_tee_signature", check_forged),
    "recomputed hashes differ": (recomputed_hashes_differ, "invalid_tee_signature",
                                 check_hashes),
    "unknown TEE": (unknown_tee, "unknown_tee", None),
    "disabled TEE": (disabled_tee, "tee_disabled", None),
    "missing batch": (missing_batch, "attestation_not_settled", check_not_settled),
    "batch posted by a stranger": (strangers_batch, "attestation_not_settled",
                                   check_not_settled),
    "missing individual record": (missing_individual_record, "attestation_not_settled", None),
    "tampered dump": (tampered_dump, "batch_dump_invalid", check_tampered),
    "underpaid session": (amount(20), "amount_mismatch", check_amount("underpaid")),
    "overpaid session": (amount(40), "amount_mismatch", check_amount("overpaid")),
    "paid over the cap": (over_cap, "amount_mismatch", None),
    "payTo mismatch": (payto_mismatch, "payto_mismatch", check_payto),
    "inference in two sessions": (inference_in_two_sessions, "duplicate", check_two_sessions),
    "nonce settled twice": (nonce_settled_twice, "duplicate", check_nonce),
    "late settlement": (late_settlement, "late_settlement", check_late),
    "paid, never attested": (paid_without_attestation, "paid_not_attested", None),
    "attested, never paid": (attested_never_paid, "attested_not_paid", check_unpaid),
    "unlinked reconciliation gap": (unlinked_gap, "unlinked_reconciliation", check_gap),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_each_discrepancy_gives_exactly_its_finding(world: World, metrics: Metrics,
                                                          scenario: str) -> None:
    plant, kind, check = SCENARIOS[scenario]
    async with world.pool.acquire() as conn, conn.transaction():
        await plant(world, conn)
    checker = checker_for(world, metrics)

    first = await checker.run_once(*WINDOW)
    assert [(d.finding.kind, d.new) for d in first] == [(kind, True)]
    [row] = await stored(world.pool)
    evidence = json.loads(row["evidence"])
    assert row["kind"] == kind and row["linked"] is (kind != "unlinked_reconciliation")
    if check is not None:
        check(world, evidence)
    linked = "false" if kind == "unlinked_reconciliation" else "true"
    assert sample(metrics, "facilitator_findings_total", kind=kind, linked=linked) == 1

    again = await checker.run_once(*WINDOW)  # the same discrepancy, found again
    assert [(d.finding.fingerprint, d.new) for d in again] == [(first[0].finding.fingerprint,
                                                                 False)]
    assert len(await stored(world.pool)) == 1
    assert sample(metrics, "facilitator_findings_total", kind=kind, linked=linked) == 1
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="ok") == 2


async def test_findings_carry_their_subjects(world: World, metrics: Metrics) -> None:
    async with world.pool.acquire() as conn, conn.transaction():
        await forged_signature(world, conn)
        await amount(20)(world, conn)
        await unlinked_gap(world, conn)
    await checker_for(world, metrics).run_once(*WINDOW)
    rows = {r["kind"]: r for r in await stored(world.pool)}
    assert set(rows) == {"invalid_tee_signature", "amount_mismatch", "unlinked_reconciliation"}
    forged = rows["invalid_tee_signature"]
    assert (forged["session_id"], forged["attestation_id"], bytes(forged["tee_id"]),
            bytes(forged["payer"])) == (world.sessions["s1"], world.attestations["a1"].id,
                                        TEE_A, PAYERS[0])
    assert rows["amount_mismatch"]["attestation_id"] is None
    gap = rows["unlinked_reconciliation"]
    assert (gap["linked"], bytes(gap["tee_id"]), gap["session_id"]) == (False, TEE_U, None)


# -- timing ---------------------------------------------------------------------------------------

async def test_rules_wait_for_their_windows(world: World, metrics: Metrics) -> None:
    async with world.pool.acquire() as conn, conn.transaction():
        await paid_without_attestation(world, conn)   # settled at +200: grace 300 s
        await missing_batch(world, conn)              # a2 received at +25: window 1 h
        await attested_never_paid(world, conn)        # deadline +300, grace 600 s
    policy = CrossCheckPolicy()

    async def kinds_at(seconds: float) -> list[str]:
        found = await checker_for(world, metrics, now=at(seconds)).run_once(*WINDOW)
        return sorted(d.finding.kind for d in found)

    assert await kinds_at(499) == []
    assert await kinds_at(500) == ["paid_not_attested"]
    assert await kinds_at(300 + policy.payment_grace_s - 1) == ["paid_not_attested"]
    assert await kinds_at(300 + policy.payment_grace_s) == ["attested_not_paid",
                                                            "paid_not_attested"]
    assert await kinds_at(25 + policy.settle_window_s - 1) == ["attested_not_paid",
                                                               "paid_not_attested"]
    assert await kinds_at(25 + policy.settle_window_s) == [
        "attestation_not_settled", "attested_not_paid", "paid_not_attested"]
    assert len(await stored(world.pool)) == 3


async def test_not_settled_waits_for_the_og_watcher(world: World, metrics: Metrics) -> None:
    async with world.pool.acquire() as conn, conn.transaction():
        await missing_batch(world, conn)
        await conn.execute("UPDATE chain_blocks SET timestamp = $2 WHERE chain_id = $1",
                           OG_CHAIN, at(25 + 3000))
    checker = checker_for(world, metrics)
    assert await checker.run_once(*WINDOW) == []  # the chain has not been read far enough
    await world.pool.execute("UPDATE chain_blocks SET timestamp = $2 WHERE chain_id = $1",
                             OG_CHAIN, at(25 + 3600))
    # a batch of that hour whose dump is not checked yet may hold the leaf
    await world.pool.execute(
        "INSERT INTO og_batches (chain_id, tx_hash, block_number, block_hash, block_time, "
        "log_index, merkle_root, batch_size, blob_id) VALUES ($1, $2, 520, $3, $4, 0, $5, 1, "
        "'blob-pending')", OG_CHAIN, h("pending-tx"), h("pending-block"), at(900),
        h("pending-root"))
    assert await checker.run_once(*WINDOW) == []
    await world.pool.execute("UPDATE og_batches SET dump_status = 'unavailable' "
                             "WHERE blob_id = 'blob-pending'")
    assert [d.finding.kind for d in await checker.run_once(*WINDOW)] == \
        ["attestation_not_settled"]


async def test_the_window_selects_what_is_checked(world: World, metrics: Metrics) -> None:
    async with world.pool.acquire() as conn, conn.transaction():
        await tampered_dump(world, conn)  # its block at +900
    checker = checker_for(world, metrics)
    assert await checker.run_once(at(901), at(7200)) == []
    assert [d.finding.kind for d in await checker.run_once(at(900), at(901))] == \
        ["batch_dump_invalid"]


async def test_a_session_is_judged_on_all_its_attestations(world: World,
                                                           metrics: Metrics) -> None:
    """A window that holds one attestation of s1 (a3, received at +65) loads s1 with all three:
    its cost is 30, as paid, not the 10 of the part inside the window."""
    checker = checker_for(world, metrics)
    assert await checker.run_once(at(64), at(66)) == []
    async with world.pool.acquire() as conn, conn.transaction():
        await plant_session(world, conn, "s3", payer=PAYERS[3], pay_to=PAY_A, amount=10,
                            block=102, block_time=at(170))
        await plant_attestation(world, conn, "a1-again", tee=TEE_A, session="s3",
                                same_as="a1", received_s=5000)
    # only the copy is in this window: s1 comes in through the shared inference, whole
    [found] = await checker.run_once(at(4999), at(5001))
    assert found.finding.kind == "duplicate"
    assert found.finding.evidence["sessionIds"] == [world.sessions["s1"], world.sessions["s3"]]


# -- failures and the continuous loop -------------------------------------------------------------

async def test_a_failed_pass_counts_as_an_error_and_stores_nothing(
        world: World, metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    checker = checker_for(world, metrics)

    async def broken(*args: object) -> None:
        raise asyncpg.PostgresConnectionError("database went away")
    monkeypatch.setattr(checker._store, "facts", broken)  # noqa: SLF001
    with pytest.raises(asyncpg.PostgresConnectionError):
        await checker.run_once(*WINDOW)
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="error") == 1
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="ok") == 0
    with pytest.raises(ValueError, match="later"):
        await checker.run_once(WINDOW[1], WINDOW[0])


async def test_the_continuous_loop_checks_a_window_ending_now(world: World,
                                                             metrics: Metrics) -> None:
    async with world.pool.acquire() as conn, conn.transaction():
        await tampered_dump(world, conn)
    checker = checker_for(world, metrics, now=at(3 * 3600),
                          policy=CrossCheckPolicy(interval_s=0.05))
    task = asyncio.get_running_loop().create_task(checker.run())

    def runs() -> str:
        return (f"runs ok={sample(metrics, 'facilitator_crosscheck_runs_total', result='ok')}, "
                f"error={sample(metrics, 'facilitator_crosscheck_runs_total', result='error')}")

    async def three_passes() -> bool:
        return sample(metrics, "facilitator_crosscheck_runs_total", result="ok") >= 3
    try:
        await wait_until(three_passes, what="three passes of the continuous loop", detail=runs)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="ok") >= 3
    assert sample(metrics, "facilitator_crosscheck_runs_total", result="error") == 0
    assert [r["kind"] for r in await stored(world.pool)] == ["batch_dump_invalid"]
    assert sample(metrics, "facilitator_findings_total", kind="batch_dump_invalid",
                  linked="true") == 1


# -- the CLI --------------------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="facilitator")
    add_crosscheck_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["crosscheck", *argv])


async def test_the_cli_over_a_window(world: World, database_url: str,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FACILITATOR_OG_CHAIN_ID", str(OG_CHAIN))
    monkeypatch.delenv("FACILITATOR_CONFIG", raising=False)
    async with world.pool.acquire() as conn, conn.transaction():
        await tampered_dump(world, conn)
        await late_settlement(world, conn)
    window = ("--from", "2025-03-01T11:00:00Z", "--to", "2025-03-01T14:00:00+01:00")

    assert await run_crosscheck(parse(*window, "--format", "json")) == 0
    out, err = capsys.readouterr()
    body = orjson.loads(out)
    assert body["window"] == {"from": "2025-03-01T11:00:00.000000Z",
                              "to": "2025-03-01T13:00:00.000000Z"}
    assert (body["found"], body["new"]) == (2, 2)
    assert sorted((f["kind"], f["new"]) for f in body["findings"]) == [
        ("batch_dump_invalid", True), ("late_settlement", True)]
    late = next(f for f in body["findings"] if f["kind"] == "late_settlement")
    assert late["sessionId"] == world.sessions["s1"]
    assert late["evidence"]["session"]["payment"]["transaction"] == "0x" + h("tx:s1").hex()
    assert "2 finding(s) for the window, 2 new" in err

    assert await run_crosscheck(parse(*window)) == 0  # again, as a table: nothing new
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["detectedAt", "kind", "linked", "new", "sessionId",
                                           "attestationId", "teeId"]
    assert "batch_dump_invalid" in out and "late_settlement" in out
    assert all(line.split()[3] == "False" for line in out.splitlines()[1:])  # `new`
    assert "0 new" in err
    assert len(await stored(world.pool)) == 2

    assert await run_crosscheck(parse("--from", "2025-03-01", "--to", window[3])) == 2
    assert "--from" in capsys.readouterr().err
    assert await run_crosscheck(parse("--from", window[3], "--to", window[1])) == 2
    assert "--to: must be later than from" in capsys.readouterr().err

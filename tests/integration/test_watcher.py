"""The chain watcher on a real anvil chain: confirmations, reorgs (anvil_reorg, anvil_rollback),
deep-reorg halting, restarts while blocks keep coming, and unmatched transfers."""

from __future__ import annotations

import time

import pytest
from eth_account import Account
from harness import DevChain, db_fetch, metric_value, pay, wait_until

from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS

FAST_WATCHER = {"FACILITATOR_WATCHER_POLL_INTERVAL_S": "0.05",
                "FACILITATOR_RECEIPT_POLL_INTERVAL_S": "0.05",
                "FACILITATOR_RESEND_AFTER_S": "0.3"}


# Reorgs rewrite history: `chain` (tests/conftest.py) is module-scoped, so the chain is this
# module's own.


fetch = db_fetch  # one-shot reads in assertions


async def state_of(facilitator, tx_or_id: str) -> dict:
    return (await facilitator.http.get(f"/settle/{tx_or_id}")).json()


metric = metric_value  # a series' value in a Prometheus exposition (0 when absent)


async def test_settlement_is_confirmed_after_n_blocks_with_latency_observed(
        chain, facilitator_factory):
    facilitator = await facilitator_factory(FACILITATOR_CONFIRMATIONS="3", **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await facilitator.settle(pay(payer, pay_to))
    tx = answer["transaction"]
    assert (await state_of(facilitator, tx))["state"] == "included"
    await chain.mine(1)
    await _caught_up(facilitator, chain)  # the watcher has seen the new block: 2 of 3
    assert (await state_of(facilitator, tx))["state"] == "included", "2 of 3 confirmations"
    await chain.mine(2)

    async def confirmed() -> bool:
        return (await state_of(facilitator, tx))["state"] == "confirmed"
    await wait_until(confirmed, what="confirmation after 3 blocks")
    status = await state_of(facilitator, tx)
    assert status["confirmations"] >= 3
    assert [e["to"] for e in status["timeline"]] == [
        "pending", "signed", "broadcast", "included", "confirmed"]
    text = (await facilitator.http.get("/metrics")).text
    for phase in ("verify", "request_to_broadcast", "broadcast_to_inclusion",
                  "inclusion_to_confirmation", "end_to_end"):
        assert metric(text, "facilitator_settlement_latency_seconds_count",
                      network="base-sepolia", phase=phase) >= 1, phase
    assert metric(text, "facilitator_settlements_confirmed_total",
                  settled_by="facilitator") >= 1


@pytest.mark.parametrize("depth", [1, 3])
async def test_reorg_reverts_inclusion_and_resends_identical_bytes(
        chain, facilitator_factory, database_url, depth):
    facilitator = await facilitator_factory(FACILITATOR_CONFIRMATIONS="10", **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await facilitator.settle(pay(payer, pay_to))
    tx = answer["transaction"]
    [before] = await fetch(database_url, "SELECT raw_tx, block_hash FROM settlements")
    await chain.mine(depth - 1)
    await _caught_up(facilitator, chain)
    await chain.rpc("anvil_reorg", [depth, []])

    async def reincluded() -> bool:
        rows = await fetch(database_url, "SELECT state, block_hash FROM settlements")
        return rows[0]["state"] == "included" and rows[0]["block_hash"] != before["block_hash"]
    await wait_until(reincluded, what=f"re-inclusion after a depth-{depth} reorg")
    [after] = await fetch(database_url, "SELECT raw_tx, tx_hash FROM settlements")
    assert after["raw_tx"] == before["raw_tx"], "the same bytes were re-sent"
    assert "0x" + after["tx_hash"].hex() == tx
    timeline = [e["to"] for e in (await state_of(facilitator, tx))["timeline"]]
    assert timeline[-3:] == ["included", "broadcast", "included"]
    assert len(await chain.transfer_logs_to(pay_to)) == 1, "counted once on the final chain"
    await _caught_up(facilitator, chain)
    [settled] = await fetch(database_url, "SELECT block_hash FROM settlements")
    [transfer] = await fetch(database_url, "SELECT tx_hash, block_hash FROM chain_transfers")
    assert "0x" + transfer["tx_hash"].hex() == tx, "the re-included transfer is indexed"
    assert transfer["block_hash"] == settled["block_hash"], "no orphaned transfer left behind"
    text = (await facilitator.http.get("/metrics")).text
    assert metric(text, "facilitator_settlement_failures_total", cause="reorged") >= 1
    assert metric(text, "facilitator_reorg_depth_blocks_count") >= 1


async def test_rollback_after_expiry_ends_the_settlement_expired(
        chain, facilitator_factory, database_url):
    facilitator = await facilitator_factory(FACILITATOR_CONFIRMATIONS="10", **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    valid_before = int(time.time()) + 7
    answer = await facilitator.settle(pay(payer, pay_to, valid_before=valid_before))
    assert answer["success"], answer
    await _caught_up(facilitator, chain)

    async def expired_by_wall_clock() -> bool:
        return time.time() > valid_before + 1
    await wait_until(expired_by_wall_clock, timeout_s=15, interval_s=0.2,
                     what="the authorization to expire")
    await chain.rpc("anvil_rollback", [1])
    await chain.mine(1)

    async def expired() -> bool:
        rows = await fetch(database_url, "SELECT state, reason FROM settlements")
        return rows[0]["state"] == "expired"
    await wait_until(expired, what="the reorged, expired settlement to end expired")
    [row] = await fetch(database_url, "SELECT reason FROM settlements")
    assert row["reason"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert await chain.token_balance(pay_to) == 0
    retry = await facilitator.settle(pay(payer, pay_to, valid_before=valid_before))
    assert retry["success"] is False


async def test_reorg_deeper_than_the_maximum_halts_confirmations(
        chain, facilitator_factory, database_url):
    facilitator = await facilitator_factory(FACILITATOR_CONFIRMATIONS="2",
                                            FACILITATOR_MAX_REORG_DEPTH="2", **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    await chain.mine(3)
    await _caught_up(facilitator, chain)
    await chain.rpc("anvil_reorg", [3, []])

    async def halted() -> bool:
        text = (await facilitator.http.get("/metrics")).text
        return metric(text, "facilitator_watcher_halted", network="base-sepolia") == 1
    await wait_until(halted, what="the watcher to halt")
    answer = await facilitator.settle(pay(payer, pay_to))
    await chain.mine(5)
    await _caught_up_or_halted(facilitator, chain)
    assert (await state_of(facilitator, answer["transaction"]))["state"] == "included", \
        "no confirmation while halted"
    [cursor] = await fetch(database_url, "SELECT halted_reason FROM chain_cursors")
    assert "reorg of depth 3" in cursor["halted_reason"]


async def test_operator_resume_accepts_the_deep_reorg_and_confirmations_continue(
        chain, facilitator_factory, database_url):
    operator, auditor = "op-" + "x" * 20, "au-" + "y" * 20
    tokens = f"operator:{_sha(operator)},auditor:{_sha(auditor)}"
    facilitator = await facilitator_factory(FACILITATOR_CONFIRMATIONS="2",
                                            FACILITATOR_MAX_REORG_DEPTH="2",
                                            FACILITATOR_API_TOKENS=tokens, **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await facilitator.settle(pay(payer, pay_to))
    await chain.mine(4)
    await _caught_up(facilitator, chain)
    status = await state_of(facilitator, answer["transaction"])
    assert status["state"] == "confirmed"
    depth = await chain.block_number() - status["blockNumber"] + 1
    await chain.rpc("anvil_reorg", [depth, []])  # undoes the confirmed settlement: halt

    async def halted() -> bool:
        text = (await facilitator.http.get("/metrics")).text
        return metric(text, "facilitator_watcher_halted", network="base-sepolia") == 1
    await wait_until(halted, what="the watcher to halt")
    path = "/v1/ops/chains/base-sepolia/resume"
    assert (await facilitator.http.post(path)).status_code == 401
    denied = await facilitator.http.post(path, headers={"Authorization": f"Bearer {auditor}"})
    assert denied.status_code == 403
    resumed = await facilitator.http.post(path, headers={"Authorization": f"Bearer {operator}"})
    assert resumed.json() == {"network": "base-sepolia", "resumed": True}

    async def confirmed_again() -> bool:
        await chain.mine(1)
        status = await state_of(facilitator, answer["transaction"])
        timeline = [e["to"] for e in status["timeline"]]
        return timeline[-4:] == ["confirmed", "broadcast", "included", "confirmed"]
    await wait_until(confirmed_again, what="revert, re-inclusion and confirmation after resume")
    assert not await halted()
    assert len(await chain.transfer_logs_to(pay_to)) == 1


def _sha(token: str) -> str:
    import hashlib
    return hashlib.sha256(token.encode()).hexdigest()


async def test_restart_while_blocks_keep_coming_misses_and_repeats_nothing(
        chain, facilitator_factory, database_url):
    signer_key = await chain.new_funded_key()
    first = await facilitator_factory(signer_key=signer_key, FACILITATOR_CONFIRMATIONS="2",
                                      **FAST_WATCHER)
    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await first.settle(pay(payer, pay_to))
    await chain.mine(3)
    await _caught_up(first, chain)
    await first.stop()
    await chain.mine(25)  # blocks keep coming while nobody watches
    second = await facilitator_factory(signer_key=signer_key, FACILITATOR_CONFIRMATIONS="2",
                                       **FAST_WATCHER)
    await _caught_up(second, chain)
    rows = await fetch(database_url, "SELECT number, hash FROM chain_blocks ORDER BY number")
    numbers = [r["number"] for r in rows]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "contiguous, no repeats"
    assert numbers[-1] == await chain.block_number()
    for row in rows[-30:]:
        block = await chain.rpc("eth_getBlockByNumber", [hex(row["number"]), False])
        assert bytes.fromhex(block["hash"][2:]) == row["hash"]
    assert (await state_of(second, answer["transaction"]))["state"] == "confirmed"


async def test_transfer_to_a_watched_payee_without_a_settlement_is_kept_unmatched(
        chain, facilitator_factory, database_url):
    payee = Account.create().address
    facilitator = await facilitator_factory(FACILITATOR_WATCH_PAY_TO=payee, **FAST_WATCHER)
    await _caught_up(facilitator, chain)
    await contracts.mint(chain.url, DEV_KEYS[0], chain.usdc, payee, 4242)
    await chain.mine(1)
    await _caught_up(facilitator, chain)
    rows = await fetch(database_url, "SELECT amount, settlement_id FROM chain_transfers")
    assert [(int(r["amount"]), r["settlement_id"]) for r in rows] == [(4242, None)]
    text = (await facilitator.http.get("/metrics")).text
    assert metric(text, "facilitator_unmatched_transfers_total", network="base-sepolia") == 1


async def _caught_up(facilitator, chain: DevChain) -> None:
    async def done() -> bool:
        text = (await facilitator.http.get("/metrics")).text
        head = await chain.block_number()
        return metric(text, "facilitator_watcher_processed_block", network="base-sepolia") == head
    await wait_until(done, what="the watcher to reach the head")


async def _caught_up_or_halted(facilitator, chain: DevChain) -> None:
    async def done() -> bool:
        text = (await facilitator.http.get("/metrics")).text
        return metric(text, "facilitator_chain_head_block", network="base-sepolia") == \
            await chain.block_number()
    await wait_until(done, what="the watcher to see the head")

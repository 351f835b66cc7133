"""Reorgs around front-run (externally settled) payments, the split deployment (`facilitator
watch` in its own process), and a reorg below the first stored block — real anvil, real
PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from harness import (
    DevChain,
    body_v2,
    db_fetch,
    metric_value,
    requirements,
    sign_authorization,
    wait_until,
)

from facilitator.app import WatchService
from facilitator.config import load_settings
from facilitator.core.abi import transfer_with_authorization
from facilitator.devnet import contracts
from facilitator.devnet.anvil import free_port

FAST = {"FACILITATOR_WATCHER_POLL_INTERVAL_S": "0.05",
        "FACILITATOR_RECEIPT_POLL_INTERVAL_S": "0.05",
        "FACILITATOR_RESEND_AFTER_S": "0.3", "FACILITATOR_CONFIRMATIONS": "20"}


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[DevChain]:
    """Reorgs rewrite history, so this module has its own chain."""
    devchain = await DevChain.start()
    yield devchain
    await devchain.stop()


async def settlement(database_url: str) -> Any:
    [row] = await db_fetch(database_url, "SELECT * FROM settlements")
    return row


async def timeline(database_url: str) -> list[str]:
    rows = await db_fetch(database_url, "SELECT to_state FROM settlement_events ORDER BY id")
    return [r["to_state"] for r in rows]


def _hex(raw: bytes | None) -> str | None:
    return None if raw is None else "0x" + bytes(raw).hex()


async def _processed(database_url: str) -> int:
    rows = await db_fetch(database_url, "SELECT head_number FROM chain_cursors")
    return rows[0]["head_number"] if rows else -1


async def _watched_to_head(database_url: str, chain: DevChain) -> None:
    async def done() -> bool:
        return await _processed(database_url) == await chain.block_number()
    await wait_until(done, what="the watcher to reach the head")


async def _front_run(chain: DevChain, payload: dict[str, Any], *, tip_gwei: int = 0) -> str:
    """Someone else submits the payer's authorization (transferWithAuthorization) first."""
    auth = payload["authorization"]
    calldata = transfer_with_authorization(
        auth["from"].lower(), auth["to"].lower(), int(auth["value"]), int(auth["validAfter"]),
        int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]),
        bytes.fromhex(payload["signature"][2:]))
    outsider = Account.from_key(await chain.new_funded_key())
    if not tip_gwei:
        receipt = await contracts.transact(chain.url, outsider.key.hex(), chain.usdc, calldata)
        return receipt["transactionHash"].to_0x_hex()
    nonce = await chain.tx_count(outsider.address)
    tx = {"type": 2, "chainId": 84532, "nonce": nonce, "to": chain.usdc, "value": 0,
          "gas": 200_000, "maxFeePerGas": 2 * tip_gwei * 10**9,
          "maxPriorityFeePerGas": tip_gwei * 10**9, "data": calldata}
    raw = outsider.sign_transaction(tx).raw_transaction
    return await chain.rpc("eth_sendRawTransaction", ["0x" + bytes(raw).hex()])


async def _reorg_out(chain: DevChain, block_number: int) -> None:
    """Replace every block from `block_number` to the head with empty ones (same height)."""
    depth = await chain.block_number() - block_number + 1
    await chain.rpc("anvil_reorg", [depth, []])


async def _canonical_transfer(chain: DevChain, pay_to: str) -> dict[str, Any]:
    [log] = await chain.transfer_logs_to(pay_to)  # exactly one payment on the final chain
    return log


async def _settled_on_canonical_chain(database_url: str, chain: DevChain, pay_to: str) -> bool:
    row = await settlement(database_url)
    logs = await chain.transfer_logs_to(pay_to)
    return (row["state"] in ("included", "confirmed") and len(logs) == 1
            and _hex(row["tx_hash"]) == logs[0]["transactionHash"]
            and _hex(row["block_hash"]) == logs[0]["blockHash"])


async def test_reorged_external_settlement_is_settled_again(chain, facilitator_factory,
                                                            database_url):
    """A payment recorded as settled by someone else's transaction (no transaction of ours)
    whose block is reorged away goes back to `pending` and is settled again by us."""
    facilitator = await facilitator_factory(**FAST)
    payer, pay_to = await chain.new_payer(), Account.create().address
    payload = sign_authorization(payer, to=pay_to, value=10_000)
    external_tx = await _front_run(chain, payload)
    answer = await facilitator.settle(body_v2(payload, requirements(pay_to)))
    assert answer["success"] is True and answer["transaction"] == external_tx
    before = await settlement(database_url)
    assert before["settled_by"] == "external" and before["raw_tx"] is None
    await _watched_to_head(database_url, chain)

    await _reorg_out(chain, before["block_number"])
    assert await chain.transfer_logs_to(pay_to) == [], "the front-runner's payment is gone"

    async def settled_again() -> bool:
        return await _settled_on_canonical_chain(database_url, chain, pay_to)
    await wait_until(settled_again, timeout_s=20, what="the payment to be settled again")
    after = await settlement(database_url)
    log = await _canonical_transfer(chain, pay_to)
    assert log["transactionHash"] != external_tx
    assert after["settled_by"] == "facilitator", "our own transaction settled it"
    assert _hex(after["signed_tx_hash"]) == log["transactionHash"]
    states = await timeline(database_url)
    assert states[:3] == ["pending", "included", "pending"], states
    assert states[-3:] == ["signed", "broadcast", "included"], states
    assert await chain.token_balance(pay_to) == 10_000
    status = (await facilitator.http.get(f"/settle/{log['transactionHash']}")).json()
    assert status["state"] == "included" and status["settledBy"] == "facilitator"
    replay = await facilitator.settle(body_v2(payload, requirements(pay_to)))
    assert replay["success"] is True and replay["transaction"] == log["transactionHash"]


async def test_reorged_front_run_restores_our_transaction(chain, facilitator_factory,
                                                          database_url):
    """Our transaction reverted because a front-runner's settled the payment first; when a reorg
    removes both, the row goes back to `broadcast` with OUR transaction (hash and bytes), which is
    re-sent and settles it."""
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5", **FAST)
    payer, pay_to = await chain.new_payer(), Account.create().address
    payload = sign_authorization(payer, to=pay_to, value=10_000)
    body = body_v2(payload, requirements(pay_to))
    async with chain.manual_mining():
        pending = await facilitator.settle(body)
        assert pending["errorReason"] == "settlement_pending", pending
        ours = pending["transaction"]
        front_run = await _front_run(chain, payload, tip_gwei=100)
        await chain.mine()

        async def external() -> bool:
            row = await settlement(database_url)
            return row["state"] == "included"
        await wait_until(external, what="the front-run to be recorded")
    row = await settlement(database_url)
    assert row["settled_by"] == "external" and _hex(row["tx_hash"]) == front_run
    assert _hex(row["signed_tx_hash"]) == ours, "our own transaction's hash is kept"
    status = (await facilitator.http.get(f"/settle/{ours}")).json()
    assert status["transaction"] == front_run, "found by our hash, names the settling one"
    raw_before = row["raw_tx"]
    await _watched_to_head(database_url, chain)

    await _reorg_out(chain, row["block_number"])

    async def settled_again() -> bool:
        return await _settled_on_canonical_chain(database_url, chain, pay_to)
    await wait_until(settled_again, timeout_s=20, what="our transaction to settle the payment")
    after = await settlement(database_url)
    log = await _canonical_transfer(chain, pay_to)
    if log["transactionHash"] == ours:
        assert after["settled_by"] == "facilitator"
    else:  # the node kept the front-runner's transaction and mined it again first
        assert log["transactionHash"] == front_run and after["settled_by"] == "external"
    assert after["raw_tx"] == raw_before and _hex(after["signed_tx_hash"]) == ours
    states = await timeline(database_url)
    assert "broadcast" in states[states.index("included"):], states
    final = await facilitator.settle(body)
    assert final["success"] is True and final["transaction"] == log["transactionHash"]


@pytest.mark.parametrize("front_run", [False, True], ids=["ours", "external"])
async def test_split_deployment_serve_adopts_rows_the_watcher_moved_back(
        chain, facilitator_factory, database_url, front_run):
    """`facilitator watch` in its own process and `serve` with FACILITATOR_WATCHER=off: a reorg
    the watcher undoes is finished by the serving process (its tracker's sweep)."""
    facilitator = await facilitator_factory(FACILITATOR_WATCHER="off", **FAST)
    tracker = facilitator.service.networks["base-sepolia"].tracker
    tracker.adopt_interval_s, tracker.adopt_grace_s = 0.2, 0.3
    watch_env = {**facilitator.env, "FACILITATOR_PORT": str(free_port())}
    watch = await WatchService.create(load_settings(watch_env))
    await watch.start()
    try:
        payer, pay_to = await chain.new_payer(), Account.create().address
        payload = sign_authorization(payer, to=pay_to, value=10_000)
        if front_run:
            await _front_run(chain, payload)
        answer = await facilitator.settle(body_v2(payload, requirements(pay_to)))
        assert answer["success"] is True, answer
        before = await settlement(database_url)
        await _watched_to_head(database_url, chain)

        await _reorg_out(chain, before["block_number"])

        async def settled_again() -> bool:
            return await _settled_on_canonical_chain(database_url, chain, pay_to)
        await wait_until(settled_again, timeout_s=20,
                         what="the serving process to settle the reorged row again")
        states = await timeline(database_url)
        moved_to = states[states.index("included") + 1]
        assert moved_to == ("pending" if front_run else "broadcast"), states
        after = await settlement(database_url)
        log = await _canonical_transfer(chain, pay_to)
        if not front_run:
            assert log["transactionHash"] == answer["transaction"], "the same bytes re-sent"
        assert after["settled_by"] == "facilitator"
    finally:
        await watch.stop()


async def test_reorg_below_the_first_stored_block_reanchors(chain, facilitator_factory,
                                                            database_url):
    """The watcher starts at the head (only that block stored); a reorg replaces it, so the
    common ancestor is a block we never stored: the checkpoint is re-anchored on the node's
    block there (no NULL hash, no crash loop) and watching continues."""
    await chain.mine(2)
    facilitator = await facilitator_factory(FACILITATOR_WATCHER_START_LOOKBACK_BLOCKS="0",
                                            **FAST)
    await _watched_to_head(database_url, chain)
    [first] = await db_fetch(database_url, "SELECT number FROM chain_blocks")
    await chain.rpc("anvil_reorg", [1, []])  # the only stored block is replaced
    await chain.mine(2)

    async def anchored() -> bool:
        rows = await db_fetch(database_url, "SELECT number, hash FROM chain_blocks "
                                            "ORDER BY number")
        if not rows or rows[-1]["number"] != await chain.block_number():
            return False
        for row in rows:
            block = await chain.rpc("eth_getBlockByNumber", [hex(row["number"]), False])
            if _hex(row["hash"]) != block["hash"]:
                return False
        return True
    await wait_until(anchored, what="the watcher to re-anchor and reach the head")
    numbers = [r["number"] for r in await db_fetch(
        database_url, "SELECT number FROM chain_blocks ORDER BY number")]
    assert numbers[0] == first["number"] - 1, "anchored on the node's block below"
    assert numbers == list(range(numbers[0], numbers[-1] + 1))
    [cursor] = await db_fetch(database_url, "SELECT halted_reason FROM chain_cursors")
    assert cursor["halted_reason"] is None
    text = (await facilitator.http.get("/metrics")).text
    assert metric_value(text, "facilitator_reorg_depth_blocks_count",
                        network="base-sepolia") >= 1
    await chain.mine(3)
    await _watched_to_head(database_url, chain)  # and it keeps following the chain

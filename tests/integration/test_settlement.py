"""Settlement guarantees on a real chain and database: at most once, write-ahead, Unknown is
never failure, restarts lose nothing, and the signer's nonces never collide."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from eth_account import Account
from harness import (
    DevChain,
    body_v2,
    db_fetch,
    pay,
    requirements,
    sign_authorization,
    wait_until,
)
from rpc_proxy import RpcFaultProxy

from facilitator.devnet import contracts

# This module pauses and resumes mining (`chain.manual_mining`, blocks only when the test mines
# them; one more block afterwards): `chain` (tests/conftest.py) is module-scoped, so the chain is
# this module's own.


async def settlement_rows(database_url: str) -> list[asyncpg.Record]:
    return await db_fetch(database_url, "SELECT * FROM settlements ORDER BY id")


async def unfinished(database_url: str) -> list[tuple[object, ...]]:
    """Where the unfinished settlements stand, for a failure message."""
    rows = await db_fetch(database_url, """
        SELECT id, state, signer_nonce, updated_at FROM settlements
        WHERE state NOT IN ('included', 'confirmed') ORDER BY id LIMIT 10""")
    return [tuple(r) for r in rows]


async def test_same_payload_settled_twice_moves_money_once(chain, facilitator):
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    first, second = await facilitator.settle(body), await facilitator.settle(body)
    assert first["success"] and second["success"]
    assert second["transaction"] == first["transaction"]
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_fifty_concurrent_identical_settles_make_one_transfer(
        chain, facilitator, database_url):
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    answers = await asyncio.gather(*(facilitator.settle(body) for _ in range(50)))
    assert all(a["success"] for a in answers), [a for a in answers if not a["success"]][:3]
    assert len({a["transaction"] for a in answers}) == 1
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    assert await chain.token_balance(pay_to) == 10_000
    assert len(await settlement_rows(database_url)) == 1


async def test_two_hundred_concurrent_payments_settle_without_nonce_errors(
        chain, facilitator, database_url):
    payers = await asyncio.gather(*(chain.new_payer(10**9) for _ in range(20)))
    pay_to = Account.create().address
    bodies = [pay(p, pay_to, 1_000 + i) for p in payers for i in range(10)]
    answers = await asyncio.gather(*(facilitator.settle(b) for b in bodies))
    failures = [a for a in answers if not a["success"]]
    assert not failures, (failures[:3], await unfinished(database_url))
    assert len({a["transaction"] for a in answers}) == 200
    assert len(await chain.transfer_logs_to(pay_to)) == 200
    assert await chain.token_balance(pay_to) == sum(1_000 + i for _ in payers for i in range(10))
    signer_nonce = await chain.tx_count(facilitator.signer, "latest")
    assert signer_nonce == 200, "one transaction per payment, no gaps, no retries"
    rows = await settlement_rows(database_url)
    assert sorted(r["signer_nonce"] for r in rows) == list(range(200))


async def test_other_payload_reusing_a_consumed_nonce_is_refused(chain, facilitator):
    payer, pay_to = await chain.new_payer(), Account.create().address
    nonce = os.urandom(32)
    first = pay(payer, pay_to, 10_000, nonce=nonce)
    assert (await facilitator.settle(first))["success"]
    other = pay(payer, pay_to, 20_000, nonce=nonce)
    answer = await facilitator.settle(other)
    assert answer["success"] is False
    assert answer["errorReason"] == "invalid_exact_evm_nonce_already_used"
    assert answer["transaction"] == "" and answer["network"] == "eip155:84532"
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_receipt_timeout_answers_pending_then_the_final_result(chain, facilitator_factory):
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    async with chain.manual_mining(mine_on_exit=True):
        pending = await facilitator.settle(body)
        assert pending["success"] is False and pending["errorReason"] == "settlement_pending"
        assert pending["transaction"].startswith("0x") and len(pending["transaction"]) == 66
        assert pending["network"] == "eip155:84532"
        await chain.mine()
        final = await facilitator.settle(body)
    assert final["success"] is True and final["transaction"] == pending["transaction"]
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_mined_settlement_is_noticed_after_a_failed_receipt_pass_without_a_new_block(
        chain, facilitator_factory):
    """The node fails every receipt lookup (through all client retries) of the pass that
    follows the settlement's block, and no further block comes: the pass is repeated anyway,
    and the payer gets the final answer, not `settlement_pending`."""
    proxy = await RpcFaultProxy(chain.url).start()
    try:
        facilitator = await facilitator_factory(FACILITATOR_RPC_URLS=proxy.url,
                                                FACILITATOR_RECEIPT_TIMEOUT_S="30")
        payer, pay_to = await chain.new_payer(), Account.create().address
        async with chain.manual_mining(mine_on_exit=True):
            settling = asyncio.create_task(facilitator.settle(pay(payer, pay_to)))

            async def sent() -> bool:
                return await chain.tx_count(facilitator.signer, "pending") == 1
            await wait_until(sent, what="the settlement transaction to reach the node")
            proxy.failing.add("eth_getTransactionReceipt")
            await chain.mine()
            refused_at_mine = proxy.refused["eth_getTransactionReceipt"]

            async def full_pass_failed_after_the_block() -> bool:
                # Two passes' worth of refusals (1 + 3 retries each) after the block: the
                # second pass started after the first ended, so it read the new head. A tracker
                # that does not repeat a failed pass never gets there.
                return proxy.refused["eth_getTransactionReceipt"] - refused_at_mine >= 8
            await wait_until(full_pass_failed_after_the_block,
                             what="a failed receipt pass to be repeated with no new block")
            assert not settling.done()
            proxy.failing.clear()
            answer = await settling
    finally:
        await proxy.stop()
    assert answer["success"] is True, answer
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_restart_between_broadcast_and_receipt_completes_without_resending(
        chain, facilitator_factory):
    signer_key = await chain.new_funded_key()
    first = await facilitator_factory(signer_key=signer_key, FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    async with chain.manual_mining(mine_on_exit=True):
        pending = await first.settle(body)
        assert pending["errorReason"] == "settlement_pending"
        await first.stop()
        second = await facilitator_factory(signer_key=signer_key)
        await chain.mine()

        async def included() -> bool:
            status = (await second.http.get(f"/settle/{pending['transaction']}")).json()
            return status.get("state") == "included"
        await wait_until(included, what="the restarted service to record the inclusion")
        final = await second.settle(body)
    assert final["success"] and final["transaction"] == pending["transaction"]
    sent = await chain.tx_count(second.signer, "latest")
    assert sent == 1, "the restarted service must not send a second transaction"
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_dropped_transaction_is_resent_with_identical_bytes(chain, facilitator_factory):
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5",
                                            FACILITATOR_RESEND_AFTER_S="0.3")
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    async with chain.manual_mining(mine_on_exit=True):
        pending = await facilitator.settle(body)
        tx_hash = pending["transaction"]
        raw_before = await chain.rpc("eth_getRawTransactionByHash", [tx_hash])
        await chain.rpc("anvil_dropAllTransactions", [])
        assert await chain.rpc("eth_getTransactionByHash", [tx_hash]) is None

        async def back_in_pool() -> bool:
            return await chain.rpc("eth_getTransactionByHash", [tx_hash]) is not None
        await wait_until(back_in_pool, what="the tracker to re-send the dropped transaction")
        assert await chain.rpc("eth_getRawTransactionByHash", [tx_hash]) == raw_before
        await chain.mine()
        final = await facilitator.settle(body)
    assert final["success"] and final["transaction"] == tx_hash
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_a_failing_receipt_pass_does_not_stop_resending(chain, facilitator_factory):
    """The node fails every receipt lookup: a dropped transaction is re-sent all the same (the
    receipt pass and the re-send are independent steps)."""
    proxy = await RpcFaultProxy(chain.url).start()
    try:
        facilitator = await facilitator_factory(
            FACILITATOR_RPC_URLS=proxy.url, FACILITATOR_RECEIPT_TIMEOUT_S="0.5",
            FACILITATOR_RESEND_AFTER_S="0.3")
        payer, pay_to = await chain.new_payer(), Account.create().address
        body = pay(payer, pay_to)
        async with chain.manual_mining(mine_on_exit=True):
            pending = await facilitator.settle(body)
            tx_hash = pending["transaction"]
            proxy.failing.add("eth_getTransactionReceipt")

            async def receipt_pass_failed() -> bool:  # 1 + 3 retries of one pass
                return proxy.refused["eth_getTransactionReceipt"] >= 4
            await wait_until(receipt_pass_failed, what="a receipt pass to fail")
            await chain.rpc("anvil_dropAllTransactions", [])

            async def back_in_pool() -> bool:
                return await chain.rpc("eth_getTransactionByHash", [tx_hash]) is not None
            await wait_until(back_in_pool, what="the re-send while receipts fail")
            proxy.failing.clear()
            await chain.mine()
            final = await facilitator.settle(body)
    finally:
        await proxy.stop()
    assert final["success"] and final["transaction"] == tx_hash


async def test_authorization_front_run_before_settle_is_recorded_as_external(
        chain, facilitator):
    payer, pay_to = await chain.new_payer(), Account.create().address
    payload = sign_authorization(payer, to=pay_to, value=10_000)
    outsider = Account.from_key(await chain.new_funded_key())
    auth = payload["authorization"]
    calldata = _transfer_with_authorization_bytes(auth, payload["signature"])
    receipt = await contracts.transact(chain.url, outsider.key.hex(), chain.usdc, calldata)
    external_tx = receipt["transactionHash"].to_0x_hex()

    answer = await facilitator.settle(body_v2(payload, requirements(pay_to)))
    assert answer["success"] is True and answer["transaction"] == external_tx
    status = (await facilitator.http.get(f"/settle/{external_tx}")).json()
    assert status["settledBy"] == "external" and status["state"] == "included"
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    sent = await chain.tx_count(facilitator.signer, "latest")
    assert sent == 0


async def test_front_run_while_our_transaction_is_pending(chain, facilitator_factory):
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    payer, pay_to = await chain.new_payer(), Account.create().address
    outsider = Account.from_key(await chain.new_funded_key())
    payload = sign_authorization(payer, to=pay_to, value=10_000)
    body = body_v2(payload, requirements(pay_to))
    calldata = _transfer_with_authorization_bytes(payload["authorization"], payload["signature"])
    async with chain.manual_mining(mine_on_exit=True):
        pending = await facilitator.settle(body)
        assert pending["errorReason"] == "settlement_pending"
        front_run = await _send_with_high_tip(chain, outsider, calldata)
        await chain.mine()

        async def settled() -> bool:
            return (await facilitator.settle(body))["success"] is True
        await wait_until(settled, what="the reverted settlement to be matched to the front-runner")
    final = await facilitator.settle(body)
    assert final["transaction"] == front_run
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_underfunded_signer_refuses_to_broadcast(chain, facilitator_factory):
    broke_key = "0x" + os.urandom(32).hex()
    facilitator = await facilitator_factory(signer_key=broke_key)
    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await facilitator.settle(pay(payer, pay_to))
    assert answer["success"] is False
    assert answer["errorReason"] == "unexpected_settle_error"
    assert "cannot pay gas" in answer["errorMessage"]
    metrics = (await facilitator.http.get("/metrics")).text
    assert 'facilitator_signer_underfunded_total{network="base-sepolia"} 1.0' in metrics
    assert await chain.token_balance(pay_to) == 0


async def test_external_use_of_the_signer_key_does_not_break_settlement(chain, facilitator_factory):
    signer_key = await chain.new_funded_key()
    facilitator = await facilitator_factory(signer_key=signer_key)
    payer, pay_to = await chain.new_payer(), Account.create().address
    assert (await facilitator.settle(pay(payer, pay_to)))["success"]
    await contracts.transact(chain.url, signer_key, Account.create().address, b"", value=1)
    answer = await facilitator.settle(pay(payer, pay_to))
    assert answer["success"], answer
    assert len(await chain.transfer_logs_to(pay_to)) == 2


def _transfer_with_authorization_bytes(auth: dict, signature: str) -> bytes:
    from facilitator.core.abi import transfer_with_authorization
    return transfer_with_authorization(
        auth["from"].lower(), auth["to"].lower(), int(auth["value"]), int(auth["validAfter"]),
        int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]), bytes.fromhex(signature[2:]))


async def _send_with_high_tip(chain: DevChain, account, calldata: bytes) -> str:
    nonce = await chain.tx_count(account.address)
    tx = {"type": 2, "chainId": 84532, "nonce": nonce, "to": chain.usdc, "value": 0,
          "gas": 200_000, "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 100 * 10**9,
          "data": calldata}
    raw = account.sign_transaction(tx).raw_transaction
    return await chain.rpc("eth_sendRawTransaction", ["0x" + bytes(raw).hex()])




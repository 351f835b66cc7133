"""An upto settlement whose Permit2 deadline passes before its transaction is mined ends
`expired` with the upto reason (`permit2_deadline_expired`), not the EIP-3009 one: the tracker
takes its reasons from the row's transfer method (`schemes.common.traits_of`).

The second test moves the chain clock ahead (`evm_increaseTime`), which anvil cannot undo; the
`chain` fixture is module-scoped, so this module runs on its own anvil, and that test runs last.
"""

from __future__ import annotations

import asyncio
import time

from eth_account import Account
from harness import OPG, db_fetch, sign_upto, upto_body, upto_requirements, wait_until

CAP = 10**17
UPTO_EXPIRED = "permit2_deadline_expired"


async def upto_settle_body(chain, facilitator, seconds_left: int) -> tuple[dict, str]:
    """A funded, approved payer's upto /settle body (set up while the chain mines) whose
    deadline is `seconds_left` after the set-up, however long that took: (body, payTo)."""
    payer, pay_to = await chain.new_upto_payer(), Account.create().address
    deadline = int(time.time()) + seconds_left
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer,
                        deadline=deadline)
    return upto_body(payload, requirements, 4_321), pay_to


async def settle_pending(facilitator, body: dict) -> str:
    """/settle while mining is off: `settlement_pending`; returns the transaction hash."""
    pending = await facilitator.settle(body)
    assert pending["errorReason"] == "settlement_pending", pending
    return pending["transaction"]


async def row_of(database_url: str):
    [row] = await db_fetch(database_url, "SELECT state, reason FROM settlements")
    return row


async def test_dropped_upto_transaction_past_its_deadline_expires_with_the_upto_reason(
        chain, facilitator_factory, database_url):
    """Before: `expired` with `invalid_exact_evm_payload_authorization_valid_before`."""
    facilitator = await facilitator_factory(signer_key=await chain.new_funded_key(),
                                            FACILITATOR_RECEIPT_TIMEOUT_S="0.5",
                                            FACILITATOR_RESEND_AFTER_S="0.3")
    # The settle-time check wants the deadline at least 6 s away.
    body, pay_to = await upto_settle_body(chain, facilitator, 12)
    deadline = int(body["paymentPayload"]["payload"]["permit2Authorization"]["deadline"])
    async with chain.manual_mining(mine_on_exit=True):
        tx_hash = await settle_pending(facilitator, body)
        await asyncio.sleep(max(0.0, deadline + 1 - time.time()))  # the tracker's wall clock
        await chain.rpc("anvil_dropAllTransactions", [])
        assert await chain.rpc("eth_getTransactionByHash", [tx_hash]) is None

        async def decided() -> bool:
            return (await row_of(database_url))["state"] != "broadcast"
        await wait_until(decided, what="the tracker to give up the dropped transaction")
    row = await row_of(database_url)
    assert (row["state"], row["reason"]) == ("expired", UPTO_EXPIRED), dict(row)
    answer = await facilitator.settle(body)
    assert (answer["success"], answer["errorReason"]) == (False, UPTO_EXPIRED), answer
    assert await chain.token_balance(pay_to, OPG) == 0


async def test_upto_transaction_mined_after_its_deadline_expires_with_the_upto_reason(
        chain, facilitator_factory, database_url):
    """The transaction is mined (and reverts) in a block past the permit deadline. Before:
    `invalid_exact_evm_payload_authorization_valid_before`. Moves the chain clock: runs last."""
    facilitator = await facilitator_factory(signer_key=await chain.new_funded_key(),
                                            FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    body, pay_to = await upto_settle_body(chain, facilitator, 120)
    async with chain.manual_mining(mine_on_exit=True):
        await settle_pending(facilitator, body)
        await chain.rpc("evm_increaseTime", [3_600])
        await chain.mine()

        async def decided() -> bool:
            return (await row_of(database_url))["state"] not in ("signed", "broadcast")
        await wait_until(decided, what="the tracker to judge the reverted transaction")
    row = await row_of(database_url)
    assert (row["state"], row["reason"]) == ("expired", UPTO_EXPIRED), dict(row)
    answer = await facilitator.settle(body)
    assert (answer["success"], answer["errorReason"]) == (False, UPTO_EXPIRED), answer
    assert await chain.token_balance(pay_to, OPG) == 0

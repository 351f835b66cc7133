"""EIP-3009 validity windows against the chain's clock, not only the wall clock.

The off-chain checks use the facilitator's wall clock (SDK 2.25.0: validBefore >= now + 6,
validAfter <= now); the token checks `validAfter < block.timestamp < validBefore`. Here the chain
clock is moved ahead of the wall clock (`evm_increaseTime` + `evm_mine`), which anvil cannot undo,
so this module runs on its own anvil (the `chain` fixture of tests/conftest.py is module-scoped).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from eth_account import Account
from harness import NETWORK, DevChain, body_v2, requirements, sign_authorization, wait_until

AMOUNT = 10_000
VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"


async def advance_chain(chain: DevChain, seconds: int) -> int:
    """Move the chain clock forward by `seconds` and mine a block; returns the new chain time."""
    before = await chain.chain_time()
    await chain.rpc("evm_increaseTime", [seconds])
    await chain.rpc("evm_mine", [])
    after = await chain.chain_time()
    assert after >= before + seconds, (before, after)
    return after


def payment(payer: Any, pay_to: str, **sign_args: Any) -> dict[str, Any]:
    return body_v2(sign_authorization(payer, to=pay_to, value=AMOUNT, **sign_args),
                   requirements(pay_to, AMOUNT))


async def test_valid_before_passed_on_chain_but_not_on_wall_clock(chain, facilitator):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    valid_before = max(int(time.time()), await chain.chain_time()) + 120
    body = payment(payer, pay_to, valid_before=valid_before)
    assert await facilitator.verify(body) == {"isValid": True, "payer": payer.address}

    chain_now = await advance_chain(chain, 3_600)
    assert chain_now > valid_before  # expired for the token ...
    assert int(time.time()) + 6 < valid_before  # ... but not for the off-chain check

    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == VALID_BEFORE, verdict
    assert verdict["payer"] == payer.address
    assert "expired" in verdict.get("invalidMessage", ""), verdict

    sent = await chain.tx_count(facilitator.signer)
    answer = await facilitator.settle(body)
    assert answer["success"] is False, answer
    assert answer["errorReason"] == VALID_BEFORE, answer
    assert answer["transaction"] == ""
    assert answer["network"] == NETWORK
    assert answer["payer"] == payer.address
    assert await chain.tx_count(facilitator.signer) == sent, "an expired payment was broadcast"
    assert await chain.transfer_logs_to(pay_to) == []
    assert await chain.token_balance(payer.address) == 1_000 * 10**6


async def test_window_in_chain_time_settles_when_chain_is_ahead(chain, facilitator):
    """The converse: with the chain clock well ahead of the wall clock, a window that is open on
    chain (and passes the wall-clock checks) settles normally."""
    chain_now = await advance_chain(chain, 600)
    payer = await chain.new_payer()
    pay_to = Account.create().address
    body = payment(payer, pay_to, valid_before=chain_now + 300)
    assert await facilitator.verify(body) == {"isValid": True, "payer": payer.address}
    answer = await facilitator.settle(body)
    assert answer["success"] is True, answer
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_valid_after_in_the_future_by_wall_clock(chain, facilitator):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    body = payment(payer, pay_to, valid_after=int(time.time()) + 60)
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == VALID_AFTER, verdict
    assert verdict["payer"] == payer.address
    sent = await chain.tx_count(facilitator.signer)
    answer = await facilitator.settle(body)
    assert answer["success"] is False, answer
    assert answer["errorReason"] == VALID_AFTER, answer
    assert answer["transaction"] == ""
    assert answer["network"] == NETWORK
    assert await chain.tx_count(facilitator.signer) == sent
    assert await chain.transfer_logs_to(pay_to) == []


async def test_authorization_expiring_while_the_transaction_is_pending(chain, facilitator):
    """Valid at verify and at broadcast; the block that includes the transaction is stamped after
    validBefore, so the token reverts it. The answer names the expiry and the (reverted)
    transaction; no money moved."""
    payer = await chain.new_payer()
    pay_to = Account.create().address
    valid_before = max(int(time.time()), await chain.chain_time()) + 60
    body = payment(payer, pay_to, valid_before=valid_before)
    sent = await chain.tx_count(facilitator.signer)
    async with chain.manual_mining():
        settling = asyncio.create_task(facilitator.settle(body))

        async def broadcast() -> bool:
            return await chain.tx_count(facilitator.signer) == sent + 1

        await wait_until(broadcast, what="the settlement transaction in the mempool")
        await chain.rpc("evm_setNextBlockTimestamp", [valid_before + 1])
        await chain.rpc("evm_mine", [])
    answer = await asyncio.wait_for(settling, 30)
    assert answer["success"] is False, answer
    assert answer["errorReason"] == VALID_BEFORE, answer
    assert answer["network"] == NETWORK
    assert answer["transaction"].startswith("0x") and len(answer["transaction"]) == 66, answer
    receipt = await chain.rpc("eth_getTransactionReceipt", [answer["transaction"]])
    assert int(receipt["status"], 16) == 0
    assert await chain.transfer_logs_to(pay_to) == []
    # Asked again, the same final answer (from the stored row), nothing re-sent.
    again = await facilitator.settle(body)
    assert again["success"] is False
    assert again["errorReason"] == VALID_BEFORE
    assert again["transaction"] == answer["transaction"]
    assert await chain.tx_count(facilitator.signer) == sent + 1

"""While a payment's settlement is in flight (broadcast, not yet mined), `/verify` of the same
authorization answers invalid: a resource server cannot be told "valid" for money that is
already being moved for another request. Another authorization of the same payer stays valid."""

from __future__ import annotations

import asyncio

import asyncpg
from eth_account import Account
from harness import pay, wait_until


async def test_verify_refuses_an_authorization_being_settled(chain, facilitator, database_url):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    body, other = pay(payer, pay_to), pay(payer, pay_to)
    await chain.set_automine(False)
    try:
        settling = asyncio.create_task(facilitator.settle(body))

        async def broadcast() -> bool:
            conn = await asyncpg.connect(database_url)
            try:
                return await conn.fetchval("SELECT state FROM settlements") == "broadcast"
            finally:
                await conn.close()
        await wait_until(broadcast, what="the settlement to be broadcast")

        during = await facilitator.verify(body)
        assert during["isValid"] is False
        assert during["invalidReason"] == "invalid_exact_evm_nonce_already_used"
        assert during["payer"] == payer.address
        assert await facilitator.verify(other) == {"isValid": True, "payer": payer.address}
    finally:
        await chain.set_automine(True)
        await chain.mine()
    settled = await settling
    assert settled["success"] is True, settled
    after = await facilitator.verify(body)  # now consumed on chain
    assert (after["isValid"], after["invalidReason"]) == (
        False, "invalid_exact_evm_nonce_already_used")

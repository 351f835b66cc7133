"""A first end-to-end pass through the running service on a real chain and database."""

from __future__ import annotations

from eth_account import Account
from harness import pay


async def test_verify_settle_replay(chain, facilitator):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    body = pay(payer, pay_to)
    verdict = await facilitator.verify(body)
    assert verdict == {"isValid": True, "payer": payer.address}
    first = await facilitator.settle(body)
    assert first["success"] is True, first
    second = await facilitator.settle(body)
    assert second["transaction"] == first["transaction"]
    assert await chain.token_balance(pay_to) == 10_000
    assert len(await chain.transfer_logs_to(pay_to)) == 1

"""The SDK resource server's single automatic retry on `settlement_pending`, against our
facilitator, with mining paused on a real anvil (this module's own chain).

Official behaviour (x402/server_base.py:349-388, `settle_with_pending_retry_async`): when
`/settle` answers `success:false, errorReason:"settlement_pending"` with a transaction hash, the
resource server resends the identical body exactly once. Our facilitator must reconcile that
retry with the transaction it already broadcast — never broadcast a second one.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from harness import NETWORK, V1_NETWORK, RunningFacilitator, metric_value, wait_until
from sdk_parties import (
    PAID_BODY,
    assert_paid_once_on_chain,
    receipt_of,
    resource_server,
    sdk_client,
    v1_app,
    v2_app,
)
from x402.http.clients import x402HttpxClient

PENDING = "settlement_pending"
SETTLE_ANSWERS = "facilitator_settle_requests_total"

# (app builder, receipt header, wire network)
VERSIONS = {
    "v2": (v2_app, "PAYMENT-RESPONSE", NETWORK),
    "v1": (v1_app, "X-PAYMENT-RESPONSE", V1_NETWORK),
}


async def settle_answers(facilitator: RunningFacilitator) -> tuple[float, float]:
    """(`settlement_pending` answers, all answers) of our /settle, from our /metrics."""
    text = (await facilitator.http.get("/metrics")).text
    return metric_value(text, SETTLE_ANSWERS, reason=PENDING), metric_value(text, SETTLE_ANSWERS)


@pytest.mark.parametrize("version", list(VERSIONS))
async def test_retry_after_pending_returns_the_same_transaction(chain, facilitator_factory, serve,
                                                                version):
    """Mined between the first (pending) answer and the SDK's retry: the buyer gets 200 and the
    receipt names the one transaction that was broadcast."""
    build, header, network = VERSIONS[version]
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="1")
    api, pay_to = await resource_server(serve, facilitator, build)
    payer = await chain.new_payer()

    async def mine_after_first_pending() -> None:
        async def pending_seen() -> bool:
            pending, _ = await settle_answers(facilitator)
            return pending >= 1
        await wait_until(pending_seen, timeout_s=30, what="a settlement_pending answer")
        await chain.mine()

    async with chain.manual_mining():
        miner = asyncio.create_task(mine_after_first_pending())
        try:
            async with x402HttpxClient(sdk_client(payer), timeout=60) as http:
                paid = await http.get(f"{api.url}/paid")
            await miner
        finally:
            miner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await miner

    assert paid.status_code == 200, (paid.text, dict(paid.headers))
    assert paid.json() == PAID_BODY
    receipt = receipt_of(paid, header)
    assert receipt.success is True and receipt.network == network, receipt
    pending, answers = await settle_answers(facilitator)
    assert pending == 1, (pending, answers)  # the first answer was pending ...
    assert answers == 2, (pending, answers)  # ... and the SDK retried exactly once
    assert await chain.tx_count(facilitator.signer) == 1, "the retry must not broadcast again"
    await assert_paid_once_on_chain(chain, payer.address, pay_to, receipt.transaction)


@pytest.mark.parametrize("version", list(VERSIONS))
async def test_still_pending_after_retry_names_the_transaction_then_settles(
        chain, facilitator_factory, serve, version):
    """Not mined during the request: both answers are pending with the same transaction, the
    buyer sees 402 with a receipt naming it, and once mined our status endpoint reports it."""
    build, header, network = VERSIONS[version]
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    api, pay_to = await resource_server(serve, facilitator, build)
    payer = await chain.new_payer()

    async with chain.manual_mining():
        async with x402HttpxClient(sdk_client(payer), timeout=60) as http:
            response = await http.get(f"{api.url}/paid")
        assert response.status_code == 402, (response.text, dict(response.headers))
        receipt = receipt_of(response, header)
        assert receipt.success is False and receipt.error_reason == PENDING, receipt
        assert receipt.network == network
        tx = receipt.transaction
        assert tx.startswith("0x") and len(tx) == 66
        pending, answers = await settle_answers(facilitator)
        # the first answer and the SDK's one retry
        assert pending == 2 and answers == 2, (pending, answers)
        assert await chain.tx_count(facilitator.signer) == 1, "the retry must not broadcast again"
        assert await chain.rpc("eth_getTransactionByHash", [tx]) is not None
        await chain.mine()

    async def included() -> bool:
        reply = await facilitator.http.get(f"/settle/{tx}")
        return reply.status_code == 200 and reply.json()["state"] in ("included", "confirmed")

    await wait_until(included, timeout_s=30, what="the pending settlement to be recorded")
    await assert_paid_once_on_chain(chain, payer.address, pay_to, tx)


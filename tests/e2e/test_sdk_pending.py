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
from collections.abc import AsyncIterator

import pytest
from eth_account import Account
from harness import NETWORK, V1_NETWORK, DevChain, RunningFacilitator, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sdk_parties import (
    PAID_BODY,
    assert_paid_once_on_chain,
    receipt_of,
    sdk_client,
    v1_app,
    v2_app,
)
from x402.http.clients import x402HttpxClient

PENDING = "settlement_pending"

# (app builder, receipt header, wire network)
VERSIONS = {
    "v2": (v2_app, "PAYMENT-RESPONSE", NETWORK),
    "v1": (v1_app, "X-PAYMENT-RESPONSE", V1_NETWORK),
}


@contextlib.asynccontextmanager
async def manual_mining(chain: DevChain) -> AsyncIterator[None]:
    await chain.set_automine(False)
    try:
        yield
    finally:
        await chain.set_automine(True)


async def settle_answers(facilitator: RunningFacilitator) -> dict[str, float]:
    """`facilitator_settle_requests_total` from our /metrics, keyed by result/reason."""
    text = (await facilitator.http.get("/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "facilitator_settle_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['result']}/{sample.labels['reason']}"
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def pending_answers(counts: dict[str, float]) -> float:
    return sum(v for k, v in counts.items() if k.endswith("/" + PENDING))


async def signer_sent(chain: DevChain, facilitator: RunningFacilitator) -> int:
    return int(await chain.rpc("eth_getTransactionCount", [facilitator.signer, "pending"]), 16)


@pytest.mark.parametrize("version", list(VERSIONS))
async def test_retry_after_pending_returns_the_same_transaction(chain, facilitator_factory, serve,
                                                                version):
    """Mined between the first (pending) answer and the SDK's retry: the buyer gets 200 and the
    receipt names the one transaction that was broadcast."""
    build, header, network = VERSIONS[version]
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="1")
    pay_to = Account.create().address
    api = await serve(lambda: build(facilitator.url, pay_to))
    payer = await chain.new_payer()

    async def mine_after_first_pending() -> None:
        async def pending_seen() -> bool:
            return pending_answers(await settle_answers(facilitator)) >= 1
        await wait_until(pending_seen, timeout_s=30, what="a settlement_pending answer")
        await chain.mine()

    async with manual_mining(chain):
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
    counts = await settle_answers(facilitator)
    assert pending_answers(counts) == 1, counts  # the first answer was pending ...
    assert sum(counts.values()) == 2, counts  # ... and the SDK retried exactly once
    assert await signer_sent(chain, facilitator) == 1, "the retry must not broadcast again"
    await assert_paid_once_on_chain(chain, payer.address, pay_to, receipt.transaction)


@pytest.mark.parametrize("version", list(VERSIONS))
async def test_still_pending_after_retry_names_the_transaction_then_settles(
        chain, facilitator_factory, serve, version):
    """Not mined during the request: both answers are pending with the same transaction, the
    buyer sees 402 with a receipt naming it, and once mined our status endpoint reports it."""
    build, header, network = VERSIONS[version]
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5")
    pay_to = Account.create().address
    api = await serve(lambda: build(facilitator.url, pay_to))
    payer = await chain.new_payer()

    async with manual_mining(chain):
        async with x402HttpxClient(sdk_client(payer), timeout=60) as http:
            response = await http.get(f"{api.url}/paid")
        assert response.status_code == 402, (response.text, dict(response.headers))
        receipt = receipt_of(response, header)
        assert receipt.success is False and receipt.error_reason == PENDING, receipt
        assert receipt.network == network
        tx = receipt.transaction
        assert tx.startswith("0x") and len(tx) == 66
        counts = await settle_answers(facilitator)
        assert pending_answers(counts) == 2, counts  # the first answer and the SDK's one retry
        assert await signer_sent(chain, facilitator) == 1, "the retry must not broadcast again"
        assert await chain.rpc("eth_getTransactionByHash", [tx]) is not None
        await chain.mine()

    async def included() -> bool:
        reply = await facilitator.http.get(f"/settle/{tx}")
        return reply.status_code == 200 and reply.json()["state"] in ("included", "confirmed")

    await wait_until(included, timeout_s=30, what="the pending settlement to be recorded")
    await assert_paid_once_on_chain(chain, payer.address, pay_to, tx)


"""`GET /settle/{id}` counts confirmations from the chain watcher's stored head, as the audit
API's `GET /v1/settlements/{id}` does: the two agree, and a status poll does not wait on the RPC
(with the node gone it still answers at once, with the last head the watcher stored)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from eth_account import Account
from harness import DevChain, pay, wait_until

TOKEN = "aud_" + secrets.token_urlsafe(32)
AUDITOR = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def own_chain() -> AsyncIterator[DevChain]:
    """A chain of this test alone: it is stopped midway."""
    devchain = await DevChain.start()
    yield devchain
    await devchain.stop()


async def test_status_and_audit_confirmations_agree_and_survive_a_dead_rpc(
        own_chain, facilitator_factory) -> None:
    facilitator = await facilitator_factory(
        chain_=own_chain, FACILITATOR_CONFIRMATIONS="2",
        FACILITATOR_WATCHER_POLL_INTERVAL_S="0.05", FACILITATOR_RECEIPT_POLL_INTERVAL_S="0.05",
        FACILITATOR_API_TOKENS=f"auditor:{hashlib.sha256(TOKEN.encode()).hexdigest()}")
    payer = await own_chain.new_payer()
    answer = await facilitator.settle(pay(payer, Account.create().address))
    tx, settlement_id = answer["transaction"], answer["extensions"]["settlement"]["id"]
    await own_chain.mine(3)

    async def watcher_at_head() -> bool:
        status = (await facilitator.http.get(f"/settle/{tx}")).json()
        return status["state"] == "confirmed" and \
            status["confirmations"] == await own_chain.block_number() - status["blockNumber"] + 1
    await wait_until(watcher_at_head, timeout_s=20, what="the watcher to reach the head")

    status = (await facilitator.http.get(f"/settle/{tx}")).json()
    audit = (await facilitator.http.get(f"/v1/settlements/{settlement_id}",
                                        headers=AUDITOR)).json()
    assert status["confirmations"] == audit["confirmations"] == 4
    assert audit["watcher"]["headNumber"] == status["blockNumber"] + 3

    await own_chain.stop()  # the RPC is gone; the stored head is still the answer
    started = time.monotonic()
    response = await facilitator.http.get(f"/settle/{settlement_id}")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["confirmations"] == 4
    assert elapsed < 2.0, f"GET /settle/{{id}} waited {elapsed:.1f} s on a dead RPC"

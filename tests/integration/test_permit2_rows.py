"""Permit2 (upto) settlement rows next to EIP-3009 ones: each method's authorization key is its
own (a nonce of one never blocks the other), and the chain watcher recognises our own Permit2
transaction when it sees the block before the tracker does — real anvil, real PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

from eth_account import Account
from harness import (
    OPG,
    OWNER_KEY,
    USDC,
    db_fetch,
    metric_value,
    pay,
    sign_upto,
    upto_body,
    upto_requirements,
    wait_until,
)

from facilitator.devnet import contracts

CAP = 10**6


async def _usdc_payer_approving_permit2(chain):
    """A payer holding USDC who also approved Permit2 for USDC (one token, both methods)."""
    key = await chain.new_funded_key(1)
    payer = Account.from_key(key)
    await contracts.mint(chain.url, OWNER_KEY, chain.usdc, payer.address, 100 * CAP)
    await contracts.approve_permit2(chain.url, key, chain.usdc)
    return payer


async def test_permit2_nonce_equal_to_a_used_eip3009_nonce_settles(chain, facilitator,
                                                                    database_url):
    payer, pay_to = await _usdc_payer_approving_permit2(chain), Account.create().address
    nonce = os.urandom(32)
    exact = await facilitator.settle(pay(payer, pay_to, 10_000, nonce=nonce))
    assert exact["success"] is True, exact
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer, asset=USDC)
    permit = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer,
                       token=USDC, nonce=int.from_bytes(nonce, "big"))
    upto = await facilitator.settle(upto_body(permit, requirements, 5_000))
    assert upto["success"] is True, upto
    assert upto["transaction"] != exact["transaction"]
    assert await chain.token_balance(pay_to) == 15_000
    rows = await db_fetch(database_url, "SELECT transfer_method, nonce, asset, payer, state "
                                        "FROM settlements ORDER BY id")
    assert [r["transfer_method"] for r in rows] == ["eip3009", "permit2"]
    assert len({(bytes(r["nonce"]), bytes(r["asset"]), bytes(r["payer"])) for r in rows}) == 1


async def test_eip3009_nonce_equal_to_a_used_permit2_nonce_settles(chain, facilitator):
    payer, pay_to = await _usdc_payer_approving_permit2(chain), Account.create().address
    nonce = os.urandom(32)
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer, asset=USDC)
    permit = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer,
                       token=USDC, nonce=int.from_bytes(nonce, "big"))
    upto = await facilitator.settle(upto_body(permit, requirements, 5_000))
    assert upto["success"] is True, upto
    exact = await facilitator.settle(pay(payer, pay_to, 10_000, nonce=nonce))
    assert exact["success"] is True, exact
    assert await chain.token_balance(pay_to) == 15_000
    again = await facilitator.settle(upto_body(permit, requirements, 5_000))
    assert again["success"] is True and again["transaction"] == upto["transaction"], \
        "the Permit2 row is still found by its own key"


_NETWORK_WITH_OPG = f"""
[[networks]]
key = "base-sepolia"
chain_id = 84532
v1_name = "base-sepolia"

[[networks.assets]]
address = "{USDC}"
name = "USDC"
version = "2"
decimals = 6

[[networks.assets]]
address = "{OPG}"
name = "OPG"
version = "2"
transfer_method = "permit2"
"""


async def test_upto_settlement_seen_by_the_watcher_first_is_included_not_unmatched(
        chain, facilitator_factory, database_url, tmp_path: Path):
    """The watcher processes the block of our Permit2 transaction before the tracker reads its
    receipt (here: the tracker polls once a minute): the payee's Transfer is matched to the
    settlement by our transaction's hash, which becomes `included` — no unmatched transfer."""
    payer, pay_to = await chain.new_upto_payer(), Account.create().address
    config = tmp_path / "facilitator.toml"
    config.write_text(_NETWORK_WITH_OPG)
    facilitator = await facilitator_factory(
        FACILITATOR_CONFIG=str(config), FACILITATOR_RPC_URLS_BASE_SEPOLIA=chain.url,
        FACILITATOR_WATCH_PAY_TO=pay_to, FACILITATOR_WATCHER_POLL_INTERVAL_S="0.05",
        FACILITATOR_RECEIPT_POLL_INTERVAL_S="60", FACILITATOR_RECEIPT_TIMEOUT_S="0.5")

    async def watched_to_head() -> bool:
        rows = await db_fetch(database_url, "SELECT head_number FROM chain_cursors")
        return bool(rows) and rows[0]["head_number"] == await chain.block_number()
    await wait_until(watched_to_head, what="the watcher to reach the head")
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    permit = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer)
    body = upto_body(permit, requirements, 7_000)
    async with chain.manual_mining():
        pending = await facilitator.settle(body)
        assert pending["errorReason"] == "settlement_pending", pending
        await chain.mine()

        async def included() -> bool:
            rows = await db_fetch(database_url, "SELECT state FROM settlements")
            return rows[0]["state"] == "included"
        await wait_until(included, what="the watcher to record the upto inclusion")
    [row] = await db_fetch(database_url, "SELECT id, settled_by, tx_hash FROM settlements")
    assert row["settled_by"] == "facilitator"
    assert "0x" + row["tx_hash"].hex() == pending["transaction"]
    transfers = await db_fetch(database_url, "SELECT settlement_id, amount FROM chain_transfers")
    assert [(t["settlement_id"], int(t["amount"])) for t in transfers] == [(row["id"], 7_000)]
    text = (await facilitator.http.get("/metrics")).text
    assert metric_value(text, "facilitator_unmatched_transfers_total",
                        network="base-sepolia") == 0
    final = await facilitator.settle(body)
    assert final["success"] is True and final["transaction"] == pending["transaction"]
    assert await chain.token_balance(pay_to, OPG) == 7_000

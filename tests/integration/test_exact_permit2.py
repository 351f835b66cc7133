"""The x402 `exact` scheme over Permit2 (`extra.assetTransferMethod: "permit2"`) on a real chain:
the official SDK pays and calls us over HTTP, every rejection carries the SDK's reason, one
permit settles once, and a permit someone else submitted first is recorded as settled by them.

Payloads are signed for real: by the SDK's exact client, or here with eth_account over the SDK's
own witness types (never with the facilitator's digest code)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from harness import (
    CHAIN_ID,
    EXACT_PROXY,
    NETWORK,
    OPG,
    OWNER_KEY,
    PERMIT2,
    USDC,
    DevChain,
    body_v2,
    db_fetch,
    sign_upto,
    upto_body,
    upto_requirements,
    wait_until,
)
from rpc_proxy import RpcFaultProxy
from web3 import Web3
from x402 import x402Client, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mechanisms.evm.constants import PERMIT2_WITNESS_TYPES
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_server
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

from facilitator.devnet import contracts

PRICE = 10_000
FAST = {"FACILITATOR_WATCHER_POLL_INTERVAL_S": "0.05"}


def exact_requirements(pay_to: str, amount: int = PRICE, *, asset: str = OPG
                       ) -> dict[str, Any]:
    name = "USDC" if asset == USDC else contracts.OPG_NAME
    return {"scheme": "exact", "network": NETWORK, "amount": str(amount), "asset": asset,
            "payTo": pay_to, "maxTimeoutSeconds": 300,
            "extra": {"name": name, "version": "2", "assetTransferMethod": "permit2"}}


def sign_exact(payer: LocalAccount, *, pay_to: str, amount: int = PRICE, token: str = OPG,
               nonce: int | None = None, deadline: int | None = None, valid_after: int = 0,
               spender: str = EXACT_PROXY, signer: LocalAccount | None = None
               ) -> dict[str, Any]:
    """An exact Permit2 payload, signed with eth_account over the SDK's witness types."""
    nonce = nonce if nonce is not None else int.from_bytes(os.urandom(32), "big")
    deadline = deadline if deadline is not None else int(time.time()) + 300
    message = {"permitted": {"token": token, "amount": amount}, "spender": spender,
               "nonce": nonce, "deadline": deadline,
               "witness": {"to": pay_to, "validAfter": valid_after}}
    typed = {"types": {"EIP712Domain": [{"name": "name", "type": "string"},
                                        {"name": "chainId", "type": "uint256"},
                                        {"name": "verifyingContract", "type": "address"}],
                       **PERMIT2_WITNESS_TYPES},
             "primaryType": "PermitWitnessTransferFrom", "message": message,
             "domain": {"name": "Permit2", "chainId": CHAIN_ID, "verifyingContract": PERMIT2}}
    signature = (signer or payer).sign_typed_data(full_message=typed).signature
    return {"signature": "0x" + bytes(signature).hex(),
            "permit2Authorization": {
                "from": payer.address, "permitted": {"token": token, "amount": str(amount)},
                "spender": spender, "nonce": str(nonce), "deadline": str(deadline),
                "witness": {"to": pay_to, "validAfter": str(valid_after)}}}


async def permit2_payer(chain: DevChain, *, token: str = OPG, amount: int = 10**18,
                        approve: bool = True) -> LocalAccount:
    """A payer holding `token` who approved Permit2 once (unless `approve` is False)."""
    payer = Account.from_key(await chain.new_funded_key(1))
    if amount:
        await contracts.mint(chain.url, OWNER_KEY, token, payer.address, amount)
    if approve:
        await contracts.approve_permit2(chain.url, payer.key.hex(), token)
    return payer


async def transfers(chain: DevChain, pay_to: str, token: str = OPG) -> list[dict[str, Any]]:
    return await chain.transfer_logs_to(pay_to, token)


async def settlement_rows(database_url: str) -> list[Any]:
    return await db_fetch(database_url, "SELECT * FROM settlements")


# -- end to end with the official SDK ---------------------------------------------------------

async def test_sdk_client_pays_and_sdk_server_verifies_and_settles(chain, facilitator,
                                                                   database_url):
    payer = await permit2_payer(chain, token=USDC, amount=10**9)
    pay_to = Account.create().address
    requirements = PaymentRequirements.model_validate(exact_requirements(pay_to, asset=USDC))
    client = register_exact_evm_client(x402Client(), payer)
    payload = await client.create_payment_payload(PaymentRequired(
        resource=ResourceInfo(url="http://127.0.0.1/paid"), accepts=[requirements]))
    assert "permit2Authorization" in payload.payload, "the SDK signed a Permit2 payment"
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        server = register_exact_evm_server(x402ResourceServer(fac))
        await asyncio.to_thread(server.initialize)  # GET /supported, blocking
        verdict = await server.verify_payment(payload, requirements)
        settled = await server.settle_payment(payload, requirements)
    assert verdict.is_valid is True and verdict.payer == payer.address, verdict
    assert settled.success is True, settled
    [log] = await transfers(chain, pay_to, USDC)
    assert log["transactionHash"] == settled.transaction
    assert int(log["topics"][1], 16) == int(payer.address, 16) and int(log["data"], 16) == PRICE
    tx = await chain.rpc("eth_getTransactionByHash", [settled.transaction])
    assert tx["to"].lower() == EXACT_PROXY.lower(), "settled through the exact Permit2 proxy"
    [row] = await settlement_rows(database_url)
    assert (row["scheme"], row["transfer_method"], row["settled_by"]) == (
        "exact", "permit2", "facilitator")


# -- rejections with the SDK's reasons ---------------------------------------------------------

@pytest.mark.parametrize(("case", "reason"), [
    ("wrong_spender", "invalid_permit2_spender"),
    ("recipient_mismatch", "invalid_permit2_recipient_mismatch"),
    ("expired_deadline", "permit2_deadline_expired"),
    ("not_yet_valid", "permit2_not_yet_valid"),
    ("amount_mismatch", "permit2_amount_mismatch"),
    ("token_mismatch", "permit2_token_mismatch"),
    ("bad_signature", "invalid_permit2_signature"),
])
async def test_each_offchain_rejection_names_its_sdk_reason(chain, facilitator, case, reason):
    payer, pay_to = await permit2_payer(chain), Account.create().address
    args: dict[str, Any] = {
        "wrong_spender": {"spender": contracts.UPTO_PROXY_ADDRESS},
        "recipient_mismatch": {"pay_to": Account.create().address},
        "expired_deadline": {"deadline": int(time.time()) + 3},
        "not_yet_valid": {"valid_after": int(time.time()) + 600},
        "amount_mismatch": {"amount": PRICE + 1},
        "token_mismatch": {"token": USDC},
        "bad_signature": {"signer": Account.create()},
    }[case]
    payload = sign_exact(payer, **{"pay_to": pay_to, **args})
    body = body_v2(payload, exact_requirements(pay_to))
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False and verdict["invalidReason"] == reason, verdict
    answer = await facilitator.settle(body)
    assert answer["success"] is False and answer["errorReason"] == reason, answer
    assert await transfers(chain, pay_to) == []


@pytest.mark.parametrize(("case", "reason"), [
    ("no_allowance", "permit2_allowance_required"),
    ("no_balance", "invalid_exact_evm_insufficient_balance"),
])
async def test_each_chain_rejection_names_its_sdk_reason(chain, facilitator, database_url,
                                                         case, reason):
    payer = await permit2_payer(chain, approve=case != "no_allowance",
                                amount=PRICE - 1 if case == "no_balance" else 10**18)
    pay_to = Account.create().address
    body = body_v2(sign_exact(payer, pay_to=pay_to), exact_requirements(pay_to))
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False and verdict["invalidReason"] == reason, verdict
    answer = await facilitator.settle(body)
    assert answer["success"] is False and answer["errorReason"] == reason, answer
    assert await transfers(chain, pay_to) == []
    [row] = await settlement_rows(database_url)
    assert row["state"] == "failed", "nothing was sent; a later valid payload may claim it"


async def test_a_settled_permit_replayed_in_another_payload_is_refused(chain, facilitator):
    payer, pay_to = await permit2_payer(chain), Account.create().address
    nonce = int.from_bytes(os.urandom(32), "big")
    first = sign_exact(payer, pay_to=pay_to, nonce=nonce)
    assert (await facilitator.settle(body_v2(first, exact_requirements(pay_to))))["success"]
    again = sign_exact(payer, pay_to=pay_to, nonce=nonce, deadline=int(time.time()) + 250)
    body = body_v2(again, exact_requirements(pay_to))
    verdict = await facilitator.verify(body)
    assert verdict["invalidReason"] == "permit2_invalid_nonce", verdict
    answer = await facilitator.settle(body)
    assert answer["success"] is False, answer
    assert len(await transfers(chain, pay_to)) == 1


async def test_a_nonce_used_by_upto_cannot_pay_exact(chain, facilitator, database_url):
    """Permit2 nonces are the owner's, whatever the proxy: one row per (payer, nonce) across
    the two Permit2 schemes."""
    payer, pay_to = await permit2_payer(chain), Account.create().address
    nonce = int.from_bytes(os.urandom(32), "big")
    upto = sign_upto(payer, pay_to=pay_to, cap=PRICE, facilitator=facilitator.signer,
                     nonce=nonce)
    used = await facilitator.settle(upto_body(
        upto, upto_requirements(pay_to, PRICE, facilitator=facilitator.signer), PRICE))
    assert used["success"] is True, used
    body = body_v2(sign_exact(payer, pay_to=pay_to, nonce=nonce), exact_requirements(pay_to))
    assert (await facilitator.verify(body))["invalidReason"] == "permit2_invalid_nonce"
    answer = await facilitator.settle(body)
    assert answer["success"] is False
    assert answer["errorReason"] == "permit2_invalid_nonce", answer
    assert len(await transfers(chain, pay_to)) == 1
    assert len(await settlement_rows(database_url)) == 1


# -- at most once -----------------------------------------------------------------------------

async def test_twenty_concurrent_identical_settles_make_one_transfer(chain, facilitator,
                                                                     database_url):
    payer, pay_to = await permit2_payer(chain), Account.create().address
    body = body_v2(sign_exact(payer, pay_to=pay_to), exact_requirements(pay_to))
    answers = await asyncio.gather(*(facilitator.settle(body) for _ in range(20)))
    assert all(a["success"] for a in answers), answers
    assert len({a["transaction"] for a in answers}) == 1
    [log] = await transfers(chain, pay_to)
    assert log["transactionHash"] == answers[0]["transaction"]
    assert len(await settlement_rows(database_url)) == 1


# -- front-running ----------------------------------------------------------------------------

async def _submit_to_proxy(chain: DevChain, payload: dict[str, Any], *, tip_gwei: int = 0
                           ) -> str:
    """Someone else submits the payer's permit to the exact proxy (anyone may)."""
    auth = payload["permit2Authorization"]
    args = [((auth["permitted"]["token"], int(auth["permitted"]["amount"])), int(auth["nonce"]),
             int(auth["deadline"])), auth["from"],
            (auth["witness"]["to"], int(auth["witness"]["validAfter"])),
            bytes.fromhex(payload["signature"][2:])]
    outsider = Account.from_key(await chain.new_funded_key())
    proxy = Web3().eth.contract(abi=contracts.load_artifact("X402ExactPermit2Proxy").abi)
    calldata = proxy.encode_abi("settle", args)
    if not tip_gwei:
        receipt = await contracts.transact(chain.url, outsider.key.hex(), EXACT_PROXY, calldata)
        return receipt["transactionHash"].to_0x_hex()
    tx = {"type": 2, "chainId": CHAIN_ID, "nonce": await chain.tx_count(outsider.address),
          "to": EXACT_PROXY, "value": 0, "gas": 300_000, "maxFeePerGas": 2 * tip_gwei * 10**9,
          "maxPriorityFeePerGas": tip_gwei * 10**9, "data": calldata}
    raw = outsider.sign_transaction(tx).raw_transaction
    return await chain.rpc("eth_sendRawTransaction", ["0x" + bytes(raw).hex()])


async def test_permit_submitted_by_someone_else_first_is_settled_by_them(chain, facilitator,
                                                                        database_url):
    """The nonce is consumed before our checks: the other transaction paid payTo exactly, so
    the answer is success with its hash, never a failure."""
    payer, pay_to = await permit2_payer(chain), Account.create().address
    payload = sign_exact(payer, pay_to=pay_to)
    external = await _submit_to_proxy(chain, payload)
    answer = await facilitator.settle(body_v2(payload, exact_requirements(pay_to)))
    assert answer["success"] is True and answer["transaction"] == external, answer
    [row] = await settlement_rows(database_url)
    assert row["settled_by"] == "external" and row["raw_tx"] is None
    assert len(await transfers(chain, pay_to)) == 1


async def test_front_run_in_the_same_block_reverts_ours_and_is_settled_by_them(
        chain, facilitator_factory, database_url):
    """Our transaction is mined after the front-runner's (higher tip) and reverts: the tracker
    finds the other call of the proxy for this owner and nonce and records it."""
    facilitator = await facilitator_factory(FACILITATOR_RECEIPT_TIMEOUT_S="0.5", **FAST)
    payer, pay_to = await permit2_payer(chain), Account.create().address
    payload = sign_exact(payer, pay_to=pay_to)
    body = body_v2(payload, exact_requirements(pay_to))
    async with chain.manual_mining():
        pending = await facilitator.settle(body)
        assert pending["errorReason"] == "settlement_pending", pending
        ours = pending["transaction"]
        front_run = await _submit_to_proxy(chain, payload, tip_gwei=100)
        await chain.mine()

        async def recorded() -> bool:
            [row] = await settlement_rows(database_url)
            return row["state"] == "included"
        await wait_until(recorded, what="the front-run to be recorded")
    receipt = await chain.rpc("eth_getTransactionReceipt", [ours])
    assert int(receipt["status"], 16) == 0, "our transaction reverted (nonce consumed)"
    [row] = await settlement_rows(database_url)
    assert row["settled_by"] == "external" and "0x" + bytes(row["tx_hash"]).hex() == front_run
    again = await facilitator.settle(body)
    assert again["success"] is True and again["transaction"] == front_run, again
    assert len(await transfers(chain, pay_to)) == 1


async def test_a_front_run_transfer_the_watcher_stored_first_is_linked_to_the_payment(
        chain, facilitator_factory, database_url):
    """The watcher stores the front-runner's Transfer while our row is still in flight (the
    node fails every receipt lookup, so the tracker cannot judge yet): it is unmatched then.
    Once the tracker records the front-run, that transfer belongs to the payment."""
    proxy = await RpcFaultProxy(chain.url).start()
    try:
        facilitator = await facilitator_factory(
            FACILITATOR_RPC_URLS=proxy.url, FACILITATOR_RECEIPT_TIMEOUT_S="0.5", **FAST)
        payer, pay_to = await permit2_payer(chain), Account.create().address
        body = body_v2(sign_exact(payer, pay_to=pay_to), exact_requirements(pay_to))
        async with chain.manual_mining(mine_on_exit=True):
            pending = await facilitator.settle(body)
            assert pending["errorReason"] == "settlement_pending", pending
            proxy.failing.add("eth_getTransactionReceipt")
            front_run = await _submit_to_proxy(chain, body["paymentPayload"]["payload"],
                                               tip_gwei=100)
            await chain.mine()

            async def linked_to() -> list[Any]:
                found = await db_fetch(database_url, "SELECT settlement_id FROM "
                                       "chain_transfers WHERE tx_hash = $1",
                                       bytes.fromhex(front_run[2:]))
                return [r["settlement_id"] for r in found]

            async def stored_unmatched() -> bool:
                return await linked_to() == [None]
            await wait_until(stored_unmatched, what="the watcher to store the transfer")
            proxy.failing.clear()
            [row] = await settlement_rows(database_url)

            async def linked() -> bool:
                return await linked_to() == [row["id"]]
            await wait_until(linked, what="the front-runner's transfer linked to the payment")

            # The race the link inside the inclusion cannot close (the watcher's transaction
            # stores the transfer while the inclusion commits): the watcher's housekeeping
            # repairs its outcome.
            await db_fetch(database_url, "UPDATE chain_transfers SET settlement_id = NULL "
                           "WHERE tx_hash = $1 RETURNING 1", bytes.fromhex(front_run[2:]))
            await wait_until(linked, timeout_s=30, what="the watcher to link the transfer again")
    finally:
        await proxy.stop()
    [row] = await settlement_rows(database_url)
    assert row["settled_by"] == "external" and "0x" + bytes(row["tx_hash"]).hex() == front_run


async def test_a_nonce_consumed_by_a_call_that_did_not_pay_this_payment_is_a_failure(
        chain, facilitator, database_url):
    """The same owner and nonce spent through the upto proxy (another payee): no exact proxy
    call paid this payTo, so the refusal stands and nothing is recorded as settled."""
    payer = await permit2_payer(chain)
    pay_to, other = Account.create().address, Account.create().address
    nonce = int.from_bytes(os.urandom(32), "big")
    outsider = Account.from_key(await chain.new_funded_key())
    permit = contracts.sign_upto_permit(
        payer.key.hex(), chain_id=CHAIN_ID, token=OPG, cap=PRICE, nonce=nonce,
        deadline=int(time.time()) + 300, to=other, facilitator=outsider.address)
    await contracts.upto_settle(chain.url, outsider.key.hex(), permit, PRICE)
    answer = await facilitator.settle(body_v2(sign_exact(payer, pay_to=pay_to, nonce=nonce),
                                              exact_requirements(pay_to)))
    assert answer["success"] is False and answer["errorReason"] == "permit2_invalid_nonce"
    [row] = await settlement_rows(database_url)
    assert row["state"] == "failed" and row["settled_by"] is None


# -- routing and malformed payloads -----------------------------------------------------------

@pytest.mark.parametrize(("mutate", "field"), [
    (lambda p: p["permit2Authorization"].pop("witness"),
     "paymentPayload.payload.permit2Authorization.witness"),
    (lambda p: p["permit2Authorization"]["witness"].pop("validAfter"),
     "paymentPayload.payload.permit2Authorization.witness.validAfter"),
    (lambda p: p["permit2Authorization"]["permitted"].update(amount="01"),
     "paymentPayload.payload.permit2Authorization.permitted.amount"),
    (lambda p: p["permit2Authorization"].update(spender="0x1234"),
     "paymentPayload.payload.permit2Authorization.spender"),
    (lambda p: p.update(signature=12), "paymentPayload.payload.signature"),
])
async def test_malformed_payload_is_http_400_naming_the_field(chain, facilitator, mutate, field):
    pay_to = Account.create().address
    payload = sign_exact(Account.create(), pay_to=pay_to)
    mutate(payload)
    for path in ("/verify", "/settle"):
        response = await facilitator.http.post(path, json=body_v2(payload,
                                                                   exact_requirements(pay_to)))
        assert response.status_code == 400, response.text
        assert response.json()["field"] == field

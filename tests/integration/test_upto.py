"""The x402 `upto` scheme over Permit2 (OPG at its Base Sepolia address) on a real chain: verify
once, settle the actual amount later, every rejection with the SDK's reason."""

from __future__ import annotations

import asyncio
import time

import pytest
from eth_account import Account
from harness import OPG, OWNER_KEY, db_fetch, sign_upto, upto_body, upto_requirements

from facilitator.devnet import contracts

CAP = 10**17  # 0.1 OPG, OpenGradient's session cap


async def opg_balance(chain, holder: str) -> int:
    return await chain.token_balance(holder, OPG)


rows = db_fetch  # one-shot reads in assertions


@pytest.fixture
async def session(chain, facilitator):
    """A payer with OPG and a Permit2 approval, a payee, and a signed session permit."""
    payer, pay_to = await chain.new_upto_payer(), Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer)
    return payer, pay_to, requirements, payload


async def test_supported_advertises_upto_with_the_facilitator_address(facilitator):
    kinds = (await facilitator.http.get("/supported")).json()["kinds"]
    upto = [k for k in kinds if k["scheme"] == "upto"]
    assert upto == [{"x402Version": 2, "scheme": "upto", "network": "eip155:84532",
                     "extra": {"facilitatorAddress": facilitator.signer}}]


async def test_verify_once_then_settle_the_used_amount(chain, facilitator, session,
                                                       database_url):
    payer, pay_to, requirements, payload = session
    verdict = await facilitator.verify(upto_body(payload, requirements))
    assert verdict == {"isValid": True, "payer": payer.address}
    used = 12_345_678_900_000
    usage = {"sessionId": "sess-1", "requestCount": 3, "costOpg": str(used), "costUsd": "0.0123",
             "inputTokens": 30, "outputTokens": 90, "totalTokens": 120, "service": "chat",
             "model": "gpt-4.1"}
    answer = await facilitator.settle(upto_body(payload, requirements, used, usage))
    assert answer["success"] is True, answer
    assert answer["amount"] == str(used)
    assert await opg_balance(chain, pay_to) == used
    assert await opg_balance(chain, payer.address) == 10 * 10**18 - used
    [s] = await rows(database_url, "SELECT * FROM upto_sessions")
    assert int(s["cap"]) == CAP and int(s["settled_amount"]) == used
    assert s["gateway_session_id"] == "sess-1" and s["verifications"] == 1
    usage_rows = (await facilitator.http.get("/usage?days=1")).json()["usage"]
    assert usage_rows[0]["requests"] == 3 and usage_rows[0]["costOpg"] == str(used)
    assert usage_rows[0]["payTo"] == pay_to and usage_rows[0]["service"] == "chat"


async def test_zero_usage_settles_without_a_transaction(chain, facilitator, session):
    payer, pay_to, requirements, payload = session
    answer = await facilitator.settle(upto_body(payload, requirements, 0))
    assert answer == {"success": True, "payer": payer.address, "transaction": "",
                      "network": "eip155:84532", "amount": "0"}
    assert await opg_balance(chain, pay_to) == 0


async def test_settling_more_than_the_cap_is_refused(chain, facilitator, session):
    _, pay_to, requirements, payload = session
    answer = await facilitator.settle(upto_body(payload, requirements, CAP + 1))
    assert answer["success"] is False
    assert answer["errorReason"] == "invalid_upto_evm_payload_settlement_exceeds_amount"
    assert answer["transaction"] == "" and await opg_balance(chain, pay_to) == 0


async def test_replayed_permit2_nonce_is_refused(chain, facilitator, session):
    payer, pay_to, requirements, payload = session
    assert (await facilitator.settle(upto_body(payload, requirements, 1000)))["success"]
    nonce = int(payload["permit2Authorization"]["nonce"])
    again = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer, nonce=nonce,
                      deadline=int(time.time()) + 200)
    verdict = await facilitator.verify(upto_body(again, requirements))
    assert verdict["invalidReason"] == "permit2_invalid_nonce"
    answer = await facilitator.settle(upto_body(again, requirements, 2000))
    assert answer["success"] is False and answer["errorReason"] in (
        "permit2_invalid_nonce", "invalid_exact_evm_nonce_already_used")
    assert await opg_balance(chain, pay_to) == 1000


# A fragment of each rejection's invalidMessage: it names what is wrong, not just any text.
MESSAGE_FRAGMENTS = {
    "expired_deadline": "deadline must be at least", "wrong_facilitator": "witness.facilitator",
    "wrong_spender": "spender must be", "wrong_pay_to": "witness.to is not payTo",
    "not_yet_valid": "validAfter is in the future",
    "cap_below_requirement": f"permitted amount {CAP - 1} is below the required {CAP}",
    "other_token": "permitted.token", "forged_signature": "does not recover to the owner",
}


@pytest.mark.parametrize(("case", "reason"), [
    ("expired_deadline", "permit2_deadline_expired"),
    ("wrong_facilitator", "upto_facilitator_mismatch"),
    ("wrong_spender", "invalid_permit2_spender"),
    ("wrong_pay_to", "invalid_permit2_recipient_mismatch"),
    ("not_yet_valid", "permit2_not_yet_valid"),
    ("cap_below_requirement", "permit2_amount_mismatch"),
    ("other_token", "permit2_token_mismatch"),
    ("forged_signature", "invalid_permit2_signature"),
])
async def test_each_offchain_rejection_names_its_reason(chain, facilitator, session, case,
                                                        reason):
    payer, pay_to, requirements, _ = session
    args = {"pay_to": pay_to, "cap": CAP, "facilitator": facilitator.signer}
    if case == "expired_deadline":
        args["deadline"] = int(time.time()) + 3
    elif case == "wrong_facilitator":
        args["facilitator"] = Account.create().address
    elif case == "wrong_spender":
        args["spender"] = Account.create().address
    elif case == "wrong_pay_to":
        args["pay_to"] = Account.create().address
    elif case == "not_yet_valid":
        args["valid_after"] = int(time.time()) + 120
    elif case == "cap_below_requirement":
        args["cap"] = CAP - 1
    elif case == "other_token":
        args["token"] = chain.usdc
    elif case == "forged_signature":
        args["signer"] = Account.create()
    payload = sign_upto(payer, **args)
    verdict = await facilitator.verify(upto_body(payload, requirements))
    message = verdict.pop("invalidMessage", None)
    assert verdict == {"isValid": False, "invalidReason": reason, "payer": payer.address}
    assert isinstance(message, str) and MESSAGE_FRAGMENTS[case] in message, message
    if case == "cap_below_requirement":
        return  # at settle the amount asked is checked against the cap, not the verify price
    settle = await facilitator.settle(upto_body(payload, requirements, 1000))
    assert settle["success"] is False and settle["transaction"] == ""
    assert settle["errorReason"] == reason
    assert await opg_balance(chain, pay_to) == 0


async def test_missing_permit2_allowance_is_refused(chain, facilitator):
    payer = await chain.new_upto_payer(approve=False)
    pay_to = Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer)
    verdict = await facilitator.verify(upto_body(payload, requirements))
    assert verdict["invalidReason"] == "permit2_allowance_required"


async def test_insufficient_balance_is_refused(chain, facilitator):
    payer = await chain.new_upto_payer(opg=CAP - 1)
    pay_to = Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer)
    verdict = await facilitator.verify(upto_body(payload, requirements))
    assert verdict["invalidReason"] == "permit2_insufficient_balance"
    answer = await facilitator.settle(upto_body(payload, requirements, CAP // 2))
    assert answer["success"] is True, "the settled amount is what the balance must cover"


async def test_smart_wallet_owner_signs_for_the_wallet(chain, facilitator):
    owner = Account.create()
    wallet = await contracts.deploy_smart_wallet(chain.url, await chain.new_funded_key(),
                                                 owner.address)
    await contracts.mint(chain.url, OWNER_KEY, OPG, wallet, CAP)
    approve = bytes.fromhex("095ea7b3") + bytes(12) + bytes.fromhex(contracts.PERMIT2_ADDRESS[2:]) \
        + (2**256 - 1).to_bytes(32, "big")
    await chain.rpc("anvil_setBalance", [owner.address, hex(10**18)])
    await contracts.wallet_execute(chain.url, owner.key.hex(), wallet, OPG, approve)
    pay_to = Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(owner, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer,
                        owner=wallet)
    assert (await facilitator.verify(upto_body(payload, requirements)))["isValid"] is True
    answer = await facilitator.settle(upto_body(payload, requirements, 777))
    assert answer["success"] is True and await opg_balance(chain, pay_to) == 777


async def test_concurrent_settles_of_one_permit_move_money_once(chain, facilitator, session):
    _, pay_to, requirements, payload = session
    body = upto_body(payload, requirements, 5_000)
    answers = await asyncio.gather(*(facilitator.settle(body) for _ in range(20)))
    assert len({a["transaction"] for a in answers}) == 1
    assert await opg_balance(chain, pay_to) == 5_000


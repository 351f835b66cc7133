"""Every reason code the facilitator emits, produced by a really signed payload through HTTP.

Each case goes through `/verify` (HTTP 200, `isValid: false`, the exact `invalidReason` string and
`payer` where the Python SDK 2.25.0 names it) and then `/settle` with the same body (HTTP 200,
`success: false`, the same `errorReason`, `transaction: ""`, `network` present) and checks that
nothing was broadcast (the facilitator signer's transaction count is unchanged). Stateless cases
share one facilitator per module; cases that change chain or database state get their own.

Reason strings are literals on purpose: this file must not follow `facilitator.protocol.reasons`
if that enum drifts from the SDK.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from harness import (
    CHAIN_ID,
    NETWORK,
    OWNER_KEY,
    USDC,
    V1_NETWORK,
    DevChain,
    RunningFacilitator,
    body_v1,
    body_v2,
    requirements,
    requirements_v1,
    sign_authorization,
)

from facilitator.devnet import contracts

AMOUNT = 10_000
ERC6492_MAGIC = bytes.fromhex("6492" * 16)
PERMIT2_PROXY = "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"


class _Unchecked:
    """Marker: the test does not pin `payer` for this case (see the dedicated payer tests)."""


UNCHECKED = _Unchecked()
NO_PAYER = None  # `payer` must be absent


# -- module-wide setup -------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    payer: LocalAccount  # holds plenty of USDC; used by every off-chain case
    other_name_token: str  # TestUSDC whose EIP-712 name is "USD Coin" (not "USDC")
    other_version_token: str  # TestUSDC whose EIP-712 version is "1" (not "2")
    wallet: str  # a contract without EIP-3009 (a SmartWallet), for eip3009_not_supported


@pytest.fixture(scope="module")
async def world(chain: DevChain) -> World:
    payer = await chain.new_payer(10**12)
    name_token = await contracts.deploy_usdc(chain.url, OWNER_KEY, name="USD Coin", version="2")
    version_token = await contracts.deploy_usdc(chain.url, OWNER_KEY, name="USDC", version="1")
    for token in (name_token, version_token):
        await contracts.mint(chain.url, OWNER_KEY, token, payer.address, 10**9)
    wallet = await contracts.deploy_smart_wallet(chain.url, OWNER_KEY, payer.address)
    return World(payer, name_token, version_token, wallet)


# The stateless off-chain table shares one facilitator, `module_facilitator` (tests/conftest.py:
# its own database). Cases use random nonces, so they cannot interfere.


# -- helpers -----------------------------------------------------------------------------------


async def post(facilitator: RunningFacilitator, path: str, body: Any) -> dict[str, Any]:
    response = await facilitator.http.post(path, json=body)
    assert response.status_code == 200, (path, response.status_code, response.text)
    assert "Traceback" not in response.text
    return response.json()


def _check_payer(answer: dict[str, Any], payer: str | None | _Unchecked) -> None:
    if isinstance(payer, _Unchecked):
        return
    if payer is None:
        assert "payer" not in answer, answer
    else:
        assert answer.get("payer") == payer, answer


async def assert_verify_rejects(facilitator: RunningFacilitator, body: Any, reason: str,
                                payer: str | None | _Unchecked) -> dict[str, Any]:
    verdict = await post(facilitator, "/verify", body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == reason, verdict
    _check_payer(verdict, payer)
    return verdict


async def assert_settle_rejects(facilitator: RunningFacilitator, chain: DevChain, body: Any,
                                reason: str, payer: str | None | _Unchecked,
                                network: str) -> dict[str, Any]:
    sent_before = await chain.tx_count(facilitator.signer)
    answer = await post(facilitator, "/settle", body)
    assert answer["success"] is False, answer
    assert answer["errorReason"] == reason, answer
    assert answer["transaction"] == "", answer
    assert answer["network"] == network, answer
    _check_payer(answer, payer)
    assert await chain.tx_count(facilitator.signer) == sent_before, "a rejection was broadcast"
    return answer


def _signed_v2(payer: LocalAccount, pay_to: str, *, reqs: dict[str, Any] | None = None,
               accepted: dict[str, Any] | None = None, **sign_args: Any) -> dict[str, Any]:
    reqs = reqs or requirements(pay_to, AMOUNT)
    sign_args.setdefault("to", pay_to)
    sign_args.setdefault("value", AMOUNT)
    return body_v2(sign_authorization(payer, **sign_args), reqs, accepted)


def _signed_v1(payer: LocalAccount, pay_to: str, *, reqs: dict[str, Any] | None = None,
               **sign_args: Any) -> dict[str, Any]:
    reqs = reqs or requirements_v1(pay_to, AMOUNT)
    sign_args.setdefault("to", pay_to)
    sign_args.setdefault("value", AMOUNT)
    return body_v1(sign_authorization(payer, **sign_args), reqs)


def _now() -> int:
    return int(time.time())


# -- builders for the off-chain table ----------------------------------------------------------
# Each returns (body, expected payer, settle network).

Built = tuple[dict[str, Any], str | None | _Unchecked, str]
Builder = Callable[[LocalAccount, str], Built]


def scheme_everywhere(name: str) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        reqs = {**requirements(pay_to, AMOUNT), "scheme": name}
        return _signed_v2(payer, pay_to, reqs=reqs), UNCHECKED, NETWORK
    return build


def scheme_in_accepted_only(name: str) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        reqs = requirements(pay_to, AMOUNT)
        return _signed_v2(payer, pay_to, reqs=reqs, accepted={**reqs, "scheme": name}), \
            UNCHECKED, NETWORK
    return build


def scheme_in_requirements_only(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    return _signed_v2(payer, pay_to, reqs={**reqs, "scheme": "foo"}, accepted=reqs), UNCHECKED, \
        NETWORK


def accepted_on_other_network(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    body = _signed_v2(payer, pay_to, reqs=reqs, accepted={**reqs, "network": "eip155:8453"})
    return body, payer.address, "eip155:8453"


def unserved_network(network: str) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        reqs = requirements(pay_to, AMOUNT, network=network)
        return _signed_v2(payer, pay_to, reqs=reqs), UNCHECKED, network
    return build


def extra(value: dict[str, Any]) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        reqs = {**requirements(pay_to, AMOUNT), "extra": value}
        return _signed_v2(payer, pay_to, reqs=reqs), payer.address, NETWORK
    return build


def signed_to_someone_else(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v2(payer, pay_to, to=Account.create().address), payer.address, NETWORK


def accepted_pay_to_differs(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    other = {**reqs, "payTo": Account.create().address}
    return _signed_v2(payer, pay_to, reqs=reqs, accepted=other), payer.address, NETWORK


def signed_value(value: int) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        return _signed_v2(payer, pay_to, value=value), payer.address, NETWORK
    return build


def accepted_amount_differs(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    other = {**reqs, "amount": str(AMOUNT - 1)}
    return _signed_v2(payer, pay_to, reqs=reqs, accepted=other), payer.address, NETWORK


def accepted_asset_differs(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    other = {**reqs, "asset": Account.create().address}
    return _signed_v2(payer, pay_to, reqs=reqs, accepted=other), payer.address, NETWORK


def valid_before(offset_s: int) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        return _signed_v2(payer, pay_to, valid_before=_now() + offset_s), payer.address, NETWORK
    return build


def valid_after(offset_s: int) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        return _signed_v2(payer, pay_to, valid_after=_now() + offset_s), payer.address, NETWORK
    return build


def signed_by_another_key(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v2(payer, pay_to, signer=Account.create()), payer.address, NETWORK


def tampered_value(payer: LocalAccount, pay_to: str) -> Built:
    """Signed for 10 000, then value and amount raised to 20 000 with the signature kept."""
    body = _signed_v2(payer, pay_to)
    body["paymentPayload"]["payload"]["authorization"]["value"] = str(2 * AMOUNT)
    body["paymentRequirements"]["amount"] = str(2 * AMOUNT)
    body["paymentPayload"]["accepted"] = copy.deepcopy(body["paymentRequirements"])
    return body, payer.address, NETWORK


def tampered_nonce(payer: LocalAccount, pay_to: str) -> Built:
    body = _signed_v2(payer, pay_to)
    body["paymentPayload"]["payload"]["authorization"]["nonce"] = "0x" + os.urandom(32).hex()
    return body, payer.address, NETWORK


def signed_for_other_chain(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v2(payer, pay_to, chain_id=8453), payer.address, NETWORK


def empty_signature(payer: LocalAccount, pay_to: str) -> Built:
    body = _signed_v2(payer, pay_to)
    body["paymentPayload"]["payload"]["signature"] = "0x"
    return body, payer.address, NETWORK


def high_s_signature(payer: LocalAccount, pay_to: str) -> Built:
    """The malleable twin (n - s, flipped v) of a valid signature: FiatToken refuses it."""
    body = _signed_v2(payer, pay_to)
    raw = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = n - int.from_bytes(raw[32:64], "big")
    v = 55 - raw[64]  # 27 <-> 28
    twin = raw[:32] + s.to_bytes(32, "big") + bytes([v])
    body["paymentPayload"]["payload"]["signature"] = "0x" + twin.hex()
    return body, payer.address, NETWORK


def erc6492_wrapped(payer: LocalAccount, pay_to: str) -> Built:
    """A counterfactual-wallet signature: abi.encode(factory, calldata, sig) ++ magic suffix,
    `from` an address with no code (the SDK's condition for a factory deployment)."""
    wallet_owner = Account.create()
    counterfactual = Account.create().address
    body = _signed_v2(payer, pay_to, signer=wallet_owner, from_=counterfactual)
    inner = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
    factory = Account.create().address
    deploy_call = keccak(text="createAccount(address,uint256)")[:4] + abi_encode(
        ["address", "uint256"], [wallet_owner.address, 0])
    wrapped = abi_encode(["address", "bytes", "bytes"], [factory, deploy_call, inner])
    body["paymentPayload"]["payload"]["signature"] = "0x" + (wrapped + ERC6492_MAGIC).hex()
    return body, counterfactual, NETWORK


def _permit2_payload(payer: LocalAccount, pay_to: str) -> dict[str, Any]:
    """An exact Permit2 payload whose signature is an EIP-3009 one (not over the permit)."""
    signature = sign_authorization(payer, to=pay_to, value=AMOUNT)["signature"]
    return {"signature": signature, "permit2Authorization": {
        "from": payer.address, "permitted": {"token": USDC, "amount": str(AMOUNT)},
        "spender": PERMIT2_PROXY, "nonce": str(int.from_bytes(os.urandom(16), "big")),
        "deadline": str(_now() + 300), "witness": {"to": pay_to, "validAfter": "0"}}}


def permit2_payload(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements(pay_to, AMOUNT)
    return body_v2(_permit2_payload(payer, pay_to), reqs), UNCHECKED, NETWORK


def v1_permit2_payload(payer: LocalAccount, pay_to: str) -> Built:
    body = _signed_v1(payer, pay_to)
    body["paymentPayload"]["payload"] = _permit2_payload(payer, pay_to)
    return body, UNCHECKED, V1_NETWORK


def x402_version(version: int) -> Builder:
    def build(payer: LocalAccount, pay_to: str) -> Built:
        body = _signed_v2(payer, pay_to)
        body["x402Version"] = version
        body["paymentPayload"]["x402Version"] = version
        return body, NO_PAYER, ""
    return build


# v1 bodies: the same strings.

def v1_scheme(payer: LocalAccount, pay_to: str) -> Built:
    body = _signed_v1(payer, pay_to)
    body["paymentPayload"]["scheme"] = "upto-x"
    return body, UNCHECKED, V1_NETWORK


def v1_payload_network(payer: LocalAccount, pay_to: str) -> Built:
    body = _signed_v1(payer, pay_to)
    body["paymentPayload"]["network"] = "base"
    return body, payer.address, "base"


def v1_unserved_network(payer: LocalAccount, pay_to: str) -> Built:
    reqs = requirements_v1(pay_to, AMOUNT, network="base")
    return _signed_v1(payer, pay_to, reqs=reqs), UNCHECKED, "base"


def v1_extra_string_without_version(payer: LocalAccount, pay_to: str) -> Built:
    reqs = {**requirements_v1(pay_to, AMOUNT), "extra": '{"name": "USDC"}'}
    return _signed_v1(payer, pay_to, reqs=reqs), payer.address, V1_NETWORK


def v1_recipient(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v1(payer, pay_to, to=Account.create().address), payer.address, V1_NETWORK


def v1_value(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v1(payer, pay_to, value=AMOUNT + 1), payer.address, V1_NETWORK


def v1_valid_before(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v1(payer, pay_to, valid_before=_now() + 3), payer.address, V1_NETWORK


def v1_valid_after(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v1(payer, pay_to, valid_after=_now() + 120), payer.address, V1_NETWORK


def v1_signature(payer: LocalAccount, pay_to: str) -> Built:
    return _signed_v1(payer, pay_to, signer=Account.create()), payer.address, V1_NETWORK


OFFCHAIN_CASES: list[tuple[str, Builder, str]] = [
    ("scheme-upto-x", scheme_everywhere("upto-x"), "unsupported_scheme"),
    ("scheme-foo-accepted", scheme_in_accepted_only("foo"), "unsupported_scheme"),
    ("scheme-foo-requirements", scheme_in_requirements_only, "unsupported_scheme"),
    ("network-mismatch", accepted_on_other_network, "network_mismatch"),
    ("network-unserved-base", unserved_network("eip155:8453"),
     "invalid_exact_evm_failed_to_get_network_config"),
    ("network-unserved-not-caip2", unserved_network("base-sepolia"),
     "invalid_exact_evm_failed_to_get_network_config"),
    ("extra-empty", extra({}), "missing_eip712_domain"),
    ("extra-no-version", extra({"name": "USDC"}), "missing_eip712_domain"),
    ("extra-no-name", extra({"version": "2"}), "missing_eip712_domain"),
    ("recipient", signed_to_someone_else, "invalid_exact_evm_payload_recipient_mismatch"),
    ("accepted-payto", accepted_pay_to_differs, "invalid_exact_evm_payload_recipient_mismatch"),
    ("value-lower", signed_value(AMOUNT - 1),
     "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("value-higher", signed_value(AMOUNT + 1),
     "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("accepted-amount", accepted_amount_differs,
     "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("accepted-asset", accepted_asset_differs, "invalid_payment_requirements"),
    ("valid-before-now+3", valid_before(3), "invalid_exact_evm_payload_authorization_valid_before"),
    ("valid-before-past", valid_before(-60),
     "invalid_exact_evm_payload_authorization_valid_before"),
    ("valid-after-future", valid_after(120),
     "invalid_exact_evm_payload_authorization_valid_after"),
    ("signature-other-key", signed_by_another_key, "invalid_exact_evm_payload_signature"),
    ("signature-tampered-value", tampered_value, "invalid_exact_evm_payload_signature"),
    ("signature-tampered-nonce", tampered_nonce, "invalid_exact_evm_payload_signature"),
    ("signature-other-chain", signed_for_other_chain, "invalid_exact_evm_payload_signature"),
    ("signature-empty", empty_signature, "invalid_exact_evm_payload_signature"),
    ("signature-high-s", high_s_signature, "invalid_exact_evm_payload_signature"),
    ("erc6492", erc6492_wrapped, "eip6492_factory_not_allowed"),
    # exact over Permit2 is routed by payload shape (x402 v2 only), then checked as the SDK's
    # verify_permit2 does: this permit's signature is not over it.
    ("permit2-payload", permit2_payload, "invalid_permit2_signature"),
    ("v1-permit2-payload", v1_permit2_payload, "unsupported_payload_type"),
    ("x402-version-3", x402_version(3), "invalid_x402_version"),
    ("x402-version-0", x402_version(0), "invalid_x402_version"),
    ("v1-scheme", v1_scheme, "unsupported_scheme"),
    ("v1-network-mismatch", v1_payload_network, "network_mismatch"),
    ("v1-network-unserved", v1_unserved_network, "invalid_exact_evm_failed_to_get_network_config"),
    ("v1-extra-string", v1_extra_string_without_version, "missing_eip712_domain"),
    ("v1-recipient", v1_recipient, "invalid_exact_evm_payload_recipient_mismatch"),
    ("v1-value", v1_value, "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("v1-valid-before", v1_valid_before, "invalid_exact_evm_payload_authorization_valid_before"),
    ("v1-valid-after", v1_valid_after, "invalid_exact_evm_payload_authorization_valid_after"),
    ("v1-signature", v1_signature, "invalid_exact_evm_payload_signature"),
]


@pytest.mark.parametrize(("build", "reason"), [(b, r) for _, b, r in OFFCHAIN_CASES],
                         ids=[i for i, _, _ in OFFCHAIN_CASES])
async def test_offchain_reason_on_verify_and_settle(chain, world, module_facilitator, build,
                                                    reason):
    pay_to = Account.create().address
    body, payer, network = build(world.payer, pay_to)
    await assert_verify_rejects(module_facilitator, body, reason, payer)
    await assert_settle_rejects(module_facilitator, chain, body, reason, payer, network)
    assert await chain.transfer_logs_to(pay_to) == []


async def test_control_unmodified_payment_is_valid_and_settles(chain, world, facilitator):
    """Control for the table above: the unmodified builder body is valid and settles, so each
    rejection is caused by the one thing the case changes."""
    pay_to = Account.create().address
    body = _signed_v2(world.payer, pay_to)
    assert await post(facilitator, "/verify", body) == {"isValid": True,
                                                         "payer": world.payer.address}
    settled = await post(facilitator, "/settle", body)
    assert settled["success"] is True, settled
    assert settled["network"] == NETWORK
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    body_1 = _signed_v1(world.payer, pay_to)
    assert await post(facilitator, "/verify", body_1) == {"isValid": True,
                                                           "payer": world.payer.address}


# -- precedence: with two faults, the first check in the SDK's order decides ------------------


def variant(*, version: int | None = None, scheme: str | None = None,
            accepted_network: str | None = None, accepted_pay_to: bool = False,
            extra_: dict[str, Any] | None = None, wrong_to: bool = False, value: int = AMOUNT,
            valid_before_in: int | None = None, valid_after_in: int = 0,
            other_signer: bool = False, erc6492: bool = False, unfunded: bool = False,
            asset: str | None = None) -> Builder:
    """A v2 payment with the named faults (times are offsets from now, in seconds)."""
    def build(payer: LocalAccount, pay_to: str) -> Built:
        if unfunded:
            payer = Account.create()
        token = asset or USDC
        reqs = requirements(pay_to, AMOUNT, asset=token)
        if extra_ is not None:
            reqs["extra"] = extra_
        accepted = copy.deepcopy(reqs)
        if scheme:
            reqs["scheme"] = accepted["scheme"] = scheme
        if accepted_network:
            accepted["network"] = accepted_network
        if accepted_pay_to:
            accepted["payTo"] = Account.create().address
        sign_args: dict[str, Any] = {"asset": token, "valid_after": _now() + valid_after_in}
        if not valid_after_in:
            sign_args["valid_after"] = 0
        if valid_before_in is not None:
            sign_args["valid_before"] = _now() + valid_before_in
        if other_signer:
            sign_args["signer"] = Account.create()
        body = _signed_v2(payer, pay_to, reqs=reqs, accepted=accepted, value=value,
                          to=Account.create().address if wrong_to else pay_to, **sign_args)
        if erc6492:
            inner = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
            wrapped = abi_encode(["address", "bytes", "bytes"],
                                 [Account.create().address, b"\x01" * 36, inner])
            body["paymentPayload"]["payload"]["signature"] = "0x" + (wrapped + ERC6492_MAGIC).hex()
        if version is not None:
            body["x402Version"] = body["paymentPayload"]["x402Version"] = version
        return body, UNCHECKED, NETWORK
    return build


NOWHERE = "0x000000000000000000000000000000000000dEaD"  # no code on the devnet

PRECEDENCE_CASES: list[tuple[str, Builder, str]] = [
    ("version>scheme", variant(version=3, scheme="upto-x"), "invalid_x402_version"),
    ("scheme>network", variant(scheme="upto-x", accepted_network="eip155:8453"),
     "unsupported_scheme"),
    ("network>domain", variant(accepted_network="eip155:8453", extra_={}), "network_mismatch"),
    ("accepted-binding>domain", variant(accepted_pay_to=True, extra_={}),
     "invalid_exact_evm_payload_recipient_mismatch"),
    ("domain>recipient", variant(extra_={}, wrong_to=True), "missing_eip712_domain"),
    ("recipient>value", variant(wrong_to=True, value=AMOUNT + 1),
     "invalid_exact_evm_payload_recipient_mismatch"),
    ("value>valid_before", variant(value=AMOUNT + 1, valid_before_in=3),
     "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("valid_before>valid_after", variant(valid_before_in=3, valid_after_in=60),
     "invalid_exact_evm_payload_authorization_valid_before"),
    ("valid_after>signature", variant(valid_after_in=60, other_signer=True),
     "invalid_exact_evm_payload_authorization_valid_after"),
    ("valid_before>erc6492", variant(valid_before_in=3, erc6492=True),
     "invalid_exact_evm_payload_authorization_valid_before"),
    ("signature>asset", variant(other_signer=True, asset=NOWHERE),
     "invalid_exact_evm_payload_signature"),
    ("signature>balance", variant(other_signer=True, unfunded=True),
     "invalid_exact_evm_payload_signature"),
    ("asset>balance", variant(asset=NOWHERE, unfunded=True), "asset_not_deployed_contract"),
]


@pytest.mark.parametrize(("build", "reason"), [(b, r) for _, b, r in PRECEDENCE_CASES],
                         ids=[i for i, _, _ in PRECEDENCE_CASES])
async def test_precedence_of_two_faults(chain, world, module_facilitator, build, reason):
    pay_to = Account.create().address
    body, _, _ = build(world.payer, pay_to)
    await assert_verify_rejects(module_facilitator, body, reason, UNCHECKED)


# -- routing answers: the SDK's choices --------------------------------------------------------


async def test_requirements_on_unserved_network_paid_on_ours_is_network_mismatch(
        chain, world, facilitator):
    """The client paid on eip155:84532 (`accepted.network`, which is what the SDK routes by)
    while the requirements name eip155:8453. The SDK's mechanism answers `network_mismatch`
    (its check precedes the chain-id lookup); the condition is the mismatch, not our config."""
    pay_to = Account.create().address
    reqs = requirements(pay_to, AMOUNT)
    body = _signed_v2(world.payer, pay_to, reqs={**reqs, "network": "eip155:8453"}, accepted=reqs)
    await assert_verify_rejects(facilitator, body, "network_mismatch", world.payer.address)
    await assert_settle_rejects(facilitator, chain, body, "network_mismatch",
                                world.payer.address, NETWORK)


async def test_v1_requirements_on_unserved_network_paid_on_ours_is_network_mismatch(
        chain, world, facilitator):
    pay_to = Account.create().address
    body = _signed_v1(world.payer, pay_to, reqs=requirements_v1(pay_to, AMOUNT, network="base"))
    body["paymentPayload"]["network"] = V1_NETWORK
    await assert_verify_rejects(facilitator, body, "network_mismatch", world.payer.address)


@pytest.mark.parametrize("case", ["v1-requirements-scheme", "v2-unserved-network",
                                  "v1-unserved-network"])
async def test_routing_rejections_name_the_payer(chain, world, facilitator, case):
    """The SDK mechanisms put `payer = authorization.from` in every rejection they produce,
    including unsupported_scheme (v1 checks payload and requirements scheme) and
    failed_to_get_network_config."""
    pay_to = Account.create().address
    if case == "v1-requirements-scheme":
        body = _signed_v1(world.payer, pay_to, reqs={**requirements_v1(pay_to, AMOUNT),
                                                      "scheme": "foo"})
        reason = "unsupported_scheme"
    elif case == "v2-unserved-network":
        body = _signed_v2(world.payer, pay_to,
                          reqs=requirements(pay_to, AMOUNT, network="eip155:8453"))
        reason = "invalid_exact_evm_failed_to_get_network_config"
    else:
        body = _signed_v1(world.payer, pay_to,
                          reqs=requirements_v1(pay_to, AMOUNT, network="base"))
        reason = "invalid_exact_evm_failed_to_get_network_config"
    await assert_verify_rejects(facilitator, body, reason, world.payer.address)


async def test_unsupported_scheme_message_names_the_unsupported_scheme(chain, world,
                                                                       module_facilitator):
    """The client paid with "exact"; the requirements' scheme "foo" is what is unsupported."""
    pay_to = Account.create().address
    body = _signed_v1(world.payer, pay_to, reqs={**requirements_v1(pay_to, AMOUNT),
                                                  "scheme": "foo"})
    verdict = await assert_verify_rejects(module_facilitator, body, "unsupported_scheme",
                                          UNCHECKED)
    assert "'foo'" in verdict.get("invalidMessage", ""), verdict


async def test_non_65_byte_signature_from_codeless_payer_is_undeployed_smart_wallet(
        chain, world, facilitator):
    """SDK 2.25.0 `classify_eip3009_signature`: no code at `from`, no ERC-6492 data and a
    signature that is not 65 bytes is classified as a smart wallet that is not deployed yet ->
    `invalid_exact_evm_payload_undeployed_smart_wallet` (not `..._payload_signature`)."""
    pay_to = Account.create().address
    body = _signed_v2(world.payer, pay_to)
    signature = body["paymentPayload"]["payload"]["signature"]
    body["paymentPayload"]["payload"]["signature"] = signature + "00"  # 66 bytes
    await assert_verify_rejects(facilitator, body,
                                "invalid_exact_evm_payload_undeployed_smart_wallet",
                                world.payer.address)


# -- on-chain reasons --------------------------------------------------------------------------


async def test_insufficient_balance_then_settle_retried_after_funding(chain, facilitator):
    payer = await chain.new_payer(0)
    pay_to = Account.create().address
    body = _signed_v2(payer, pay_to)
    await assert_verify_rejects(facilitator, body, "invalid_exact_evm_insufficient_balance",
                                payer.address)
    failed = await assert_settle_rejects(facilitator, chain, body,
                                         "invalid_exact_evm_insufficient_balance", payer.address,
                                         NETWORK)
    settlement_id = failed["extensions"]["settlement"]["id"]
    assert failed["extensions"]["settlement"]["state"] == "failed"
    # Partly funded: still short by one unit.
    await contracts.mint(chain.url, OWNER_KEY, USDC, payer.address, AMOUNT - 1)
    await assert_settle_rejects(facilitator, chain, body, "invalid_exact_evm_insufficient_balance",
                                payer.address, NETWORK)
    # Funded: the failed settlement row is reclaimed and the same body settles.
    await contracts.mint(chain.url, OWNER_KEY, USDC, payer.address, 1)
    assert await post(facilitator, "/verify", body) == {"isValid": True, "payer": payer.address}
    settled = await post(facilitator, "/settle", body)
    assert settled["success"] is True, settled
    assert settled["payer"] == payer.address
    assert settled["extensions"]["settlement"]["id"] == settlement_id  # the same row, reclaimed
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    assert await chain.token_balance(pay_to) == AMOUNT
    assert await chain.token_balance(payer.address) == 0
    # And it is now a replay, not a second payment.
    again = await post(facilitator, "/settle", body)
    assert again["transaction"] == settled["transaction"]
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_insufficient_balance_v1(chain, facilitator):
    payer = await chain.new_payer(AMOUNT - 1)
    pay_to = Account.create().address
    body = _signed_v1(payer, pay_to)
    await assert_verify_rejects(facilitator, body, "invalid_exact_evm_insufficient_balance",
                                payer.address)
    await assert_settle_rejects(facilitator, chain, body, "invalid_exact_evm_insufficient_balance",
                                payer.address, V1_NETWORK)


async def test_nonce_already_used_after_settle(chain, world, facilitator):
    pay_to = Account.create().address
    nonce = os.urandom(32)
    body = _signed_v2(world.payer, pay_to, nonce=nonce)
    settled = await post(facilitator, "/settle", body)
    assert settled["success"] is True, settled
    await assert_verify_rejects(facilitator, body, "invalid_exact_evm_nonce_already_used",
                                world.payer.address)
    # A different payment (another amount) that reuses the consumed nonce.
    reuse = _signed_v2(world.payer, pay_to, nonce=nonce, value=2 * AMOUNT,
                       reqs=requirements(pay_to, 2 * AMOUNT))
    await assert_verify_rejects(facilitator, reuse, "invalid_exact_evm_nonce_already_used",
                                world.payer.address)
    await assert_settle_rejects(facilitator, chain, reuse, "invalid_exact_evm_nonce_already_used",
                                world.payer.address, NETWORK)
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_nonce_consumed_outside_this_facilitator(chain, world, facilitator):
    """The payer cancels the authorization on chain (EIP-3009 cancelAuthorization): the nonce is
    used although this facilitator never settled it."""
    pay_to = Account.create().address
    nonce = os.urandom(32)
    body = _signed_v2(world.payer, pay_to, nonce=nonce)
    cancel = world.payer.sign_typed_data(full_message=contracts.cancel_typed_data(
        token=USDC, chain_id=CHAIN_ID, authorizer=world.payer.address, nonce=nonce)).signature
    data = keccak(text="cancelAuthorization(address,bytes32,bytes)")[:4] + abi_encode(
        ["address", "bytes32", "bytes"], [world.payer.address, nonce, bytes(cancel)])
    await contracts.transact(chain.url, OWNER_KEY, USDC, data, what="cancelAuthorization")
    await assert_verify_rejects(facilitator, body, "invalid_exact_evm_nonce_already_used",
                                world.payer.address)
    await assert_settle_rejects(facilitator, chain, body, "invalid_exact_evm_nonce_already_used",
                                world.payer.address, NETWORK)
    v1 = _signed_v1(world.payer, pay_to, nonce=nonce)
    await assert_verify_rejects(facilitator, v1, "invalid_exact_evm_nonce_already_used",
                                world.payer.address)


async def test_asset_not_deployed_contract(chain, world, facilitator):
    pay_to = Account.create().address
    nowhere = Account.create().address  # no code there
    reqs = requirements(pay_to, AMOUNT, asset=nowhere)
    body = _signed_v2(world.payer, pay_to, reqs=reqs, asset=nowhere)
    await assert_verify_rejects(facilitator, body, "asset_not_deployed_contract",
                                world.payer.address)
    await assert_settle_rejects(facilitator, chain, body, "asset_not_deployed_contract",
                                world.payer.address, NETWORK)


async def test_asset_without_eip3009_is_eip3009_not_supported(chain, world, facilitator):
    pay_to = Account.create().address
    reqs = requirements(pay_to, AMOUNT, asset=world.wallet)
    body = _signed_v2(world.payer, pay_to, reqs=reqs, asset=world.wallet)
    await assert_verify_rejects(facilitator, body, "invalid_exact_evm_eip3009_not_supported",
                                world.payer.address)
    await assert_settle_rejects(facilitator, chain, body,
                                "invalid_exact_evm_eip3009_not_supported", world.payer.address,
                                NETWORK)


@pytest.mark.parametrize("which", ["name", "version"])
async def test_token_domain_mismatch(chain, world, facilitator, which):
    """The payer signs under `extra` {name: "USDC", version: "2"}, the token's own EIP-712 domain
    differs (name "USD Coin" / version "1"). Off chain the signature recovers (it was made under
    `extra`); the token's simulation reverts "FiatTokenV2: invalid signature". SDK 2.25.0 v2
    (`ExactEvmScheme._verify`) maps a classified revert first (`parse_eip3009_transfer_error`:
    "invalid signature" -> `invalid_exact_evm_payload_signature`) and only diagnoses name/version
    for an unclassified one, so the SDK answer is `invalid_exact_evm_payload_signature`."""
    token = world.other_name_token if which == "name" else world.other_version_token
    pay_to = Account.create().address
    reqs = requirements(pay_to, AMOUNT, asset=token)
    body = _signed_v2(world.payer, pay_to, reqs=reqs, asset=token)
    verdict = await assert_verify_rejects(facilitator, body, "invalid_exact_evm_payload_signature",
                                          world.payer.address)
    assert "invalid signature" in verdict.get("invalidMessage", "").lower(), verdict
    await assert_settle_rejects(facilitator, chain, body, "invalid_exact_evm_payload_signature",
                                world.payer.address, NETWORK)
    # Signed under the token's real domain, the same payment is valid.
    good_extra = {"name": "USD Coin", "version": "2"} if which == "name" else \
        {"name": "USDC", "version": "1"}
    good_reqs = {**reqs, "extra": good_extra}
    good = _signed_v2(world.payer, pay_to, reqs=good_reqs, asset=token, **good_extra)
    assert await post(facilitator, "/verify", good) == {"isValid": True,
                                                         "payer": world.payer.address}

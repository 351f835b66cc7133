"""`core/exact.py`: each off-chain check alone produces its reason, adjacent checks keep their
precedence, signature classification, and revert classification (SDK as the oracle)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import function_signature_to_4byte_selector
from x402.mechanisms.evm.constants import ERR_TRANSACTION_FAILED
from x402.mechanisms.evm.exact.eip3009_utils import parse_eip3009_transfer_error

from facilitator.core import abi
from facilitator.core.ecdsa import SECP256K1_N
from facilitator.core.exact import (
    ERC6492_MAGIC_SUFFIX, ExactContext, SignatureCheck, authorization_digest, check_offchain,
    check_signature, classify_transfer_revert,
)
from facilitator.protocol.eip3009 import parse_eip3009_payload
from facilitator.protocol.messages import parse_request
from facilitator.protocol.reasons import Reason
from unit.builders import (
    AMOUNT, CHAIN_ID, USDC, authorization, body_v1, body_v2, requirements_v2, sign_auth,
    signable,
)

NOW = 1_750_000_000
OTHER = "0x" + "77" * 20
OTHER_ASSET = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYER = Account.from_key(
    bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"))


def make_ctx(*, now: int = NOW, requirements: dict[str, Any] | None = None,
             accepted: dict[str, Any] | None = None, auth: dict[str, Any] | None = None,
             signature: str | None = None, v1: bool = False, account=PAYER) -> ExactContext:
    """A context from a genuinely signed payment, through the real parsers."""
    wire_auth = authorization(account.address, valid_after=now - 600, valid_before=now + 60)
    wire_auth.update({k: str(v) if isinstance(v, int) else v for k, v in (auth or {}).items()})
    payload = {"signature": sign_auth(account, wire_auth) if signature is None else signature,
               "authorization": wire_auth}
    if v1:
        body = body_v1(payload)
    else:
        reqs = requirements_v2(**(requirements or {}))
        acc = requirements_v2(**{**(requirements or {}), **(accepted or {})})
        body = body_v2(payload, requirements=reqs, accepted=acc)
    request = parse_request(body)
    return ExactContext(request=request, payment=parse_eip3009_payload(request.payload),
                        chain_id=CHAIN_ID, now=now)


def reason_of(ctx: ExactContext) -> Reason | None:
    rejection = check_offchain(ctx)
    return None if rejection is None else rejection.reason


def test_valid_payment_passes() -> None:
    assert check_offchain(make_ctx()) is None
    assert check_offchain(make_ctx(v1=True)) is None


# ---- each check alone ------------------------------------------------------------------------

SINGLE = {
    "scheme (both)": (dict(requirements={"scheme": "upto"}), Reason.UNSUPPORTED_SCHEME),
    "scheme (accepted only)": (dict(accepted={"scheme": "upto"}), Reason.UNSUPPORTED_SCHEME),
    "network": (dict(accepted={"network": "eip155:8453"}), Reason.NETWORK_MISMATCH),
    "accepted payTo": (dict(accepted={"payTo": OTHER}), Reason.RECIPIENT_MISMATCH),
    "accepted amount": (dict(accepted={"amount": str(AMOUNT + 1)}), Reason.VALUE_MISMATCH),
    "accepted asset": (dict(accepted={"asset": OTHER_ASSET}), Reason.INVALID_PAYMENT_REQUIREMENTS),
    "extra empty": (dict(requirements={"extra": {}}), Reason.MISSING_EIP712_DOMAIN),
    "extra version not string": (dict(requirements={"extra": {"name": "USDC", "version": 2}}),
                                 Reason.MISSING_EIP712_DOMAIN),
    "recipient": (dict(auth={"to": OTHER}), Reason.RECIPIENT_MISMATCH),
    "value high": (dict(auth={"value": AMOUNT + 1}), Reason.VALUE_MISMATCH),
    "value low": (dict(auth={"value": AMOUNT - 1}), Reason.VALUE_MISMATCH),
    "expired": (dict(auth={"validBefore": NOW - 1}), Reason.VALID_BEFORE_EXPIRED),
    "not yet valid": (dict(auth={"validAfter": NOW + 100}), Reason.VALID_AFTER_FUTURE),
    "empty signature": (dict(signature="0x"), Reason.INVALID_SIGNATURE),
}


@pytest.mark.parametrize(("kwargs", "reason"), list(SINGLE.values()), ids=list(SINGLE))
def test_single_failure_gives_its_reason(kwargs: dict[str, Any], reason: Reason) -> None:
    assert reason_of(make_ctx(**kwargs)) == reason


def test_v1_requirements_network_mismatch() -> None:
    ctx = make_ctx(v1=True)
    body = body_v1({"signature": "0x" + ctx.payment.signature.hex(),
                    "authorization": ctx.request.payload["authorization"]})
    body["paymentPayload"]["network"] = "base"
    request = parse_request(body)
    ctx = ExactContext(request=request, payment=ctx.payment, chain_id=CHAIN_ID, now=NOW)
    assert reason_of(ctx) == Reason.NETWORK_MISMATCH


# ---- time boundaries ---------------------------------------------------------------------------

def test_valid_before_exactly_now_plus_6_passes() -> None:
    assert reason_of(make_ctx(auth={"validBefore": NOW + 6})) is None


def test_valid_before_now_plus_5_fails() -> None:
    assert reason_of(make_ctx(auth={"validBefore": NOW + 5})) == Reason.VALID_BEFORE_EXPIRED


def test_valid_after_equal_now_passes() -> None:
    assert reason_of(make_ctx(auth={"validAfter": NOW})) is None


def test_valid_after_now_plus_1_fails() -> None:
    assert reason_of(make_ctx(auth={"validAfter": NOW + 1})) == Reason.VALID_AFTER_FUTURE


# ---- precedence of adjacent checks -------------------------------------------------------------

PAIRS = {
    "scheme over network": (dict(accepted={"scheme": "upto", "network": "eip155:8453"}),
                            Reason.UNSUPPORTED_SCHEME),
    "network over accepted binding": (dict(accepted={"network": "eip155:8453", "payTo": OTHER}),
                                      Reason.NETWORK_MISMATCH),
    "accepted payTo over accepted amount": (dict(accepted={"payTo": OTHER, "amount": "1"}),
                                            Reason.RECIPIENT_MISMATCH),
    "accepted amount over accepted asset": (dict(accepted={"amount": "1", "asset": OTHER_ASSET}),
                                            Reason.VALUE_MISMATCH),
    "accepted binding over eip712 domain": (dict(accepted={"asset": OTHER_ASSET},
                                                 requirements={"extra": {}}),
                                            Reason.INVALID_PAYMENT_REQUIREMENTS),
    "eip712 domain over recipient": (dict(requirements={"extra": {}}, auth={"to": OTHER}),
                                     Reason.MISSING_EIP712_DOMAIN),
    "recipient over value": (dict(auth={"to": OTHER, "value": 1}), Reason.RECIPIENT_MISMATCH),
    "value over valid_before": (dict(auth={"value": 1, "validBefore": NOW}), Reason.VALUE_MISMATCH),
    "valid_before over valid_after": (dict(auth={"validBefore": NOW, "validAfter": NOW + 10}),
                                      Reason.VALID_BEFORE_EXPIRED),
    "valid_after over empty signature": (dict(auth={"validAfter": NOW + 10}, signature="0x"),
                                         Reason.VALID_AFTER_FUTURE),
}


@pytest.mark.parametrize(("kwargs", "reason"), list(PAIRS.values()), ids=list(PAIRS))
def test_adjacent_failures_keep_precedence(kwargs: dict[str, Any], reason: Reason) -> None:
    assert reason_of(make_ctx(**kwargs)) == reason


# ---- signature classification ------------------------------------------------------------------

def test_authorization_digest_is_what_eth_account_signs() -> None:
    from eth_account.messages import _hash_eip191_message
    ctx = make_ctx()
    expected = _hash_eip191_message(signable("USDC", "2", CHAIN_ID, USDC,
                                             ctx.request.payload["authorization"]))
    assert authorization_digest(ctx) == expected


def test_correct_eoa_signature_is_valid_eoa() -> None:
    ctx = make_ctx()
    assert check_signature(authorization_digest(ctx), ctx.payment) is SignatureCheck.VALID_EOA


def test_v_zero_one_signature_is_valid_eoa() -> None:
    ctx = make_ctx()
    sig = ctx.payment.signature
    ctx = make_ctx(signature="0x" + (sig[:64] + bytes([sig[64] - 27])).hex())
    assert check_signature(authorization_digest(ctx), ctx.payment) is SignatureCheck.VALID_EOA


def test_signature_by_another_key_needs_contract_check(seed: int) -> None:
    other = Account.from_key(random.Random(seed).randbytes(32))
    wire = authorization(PAYER.address, valid_after=NOW - 600, valid_before=NOW + 60)
    ctx = make_ctx(signature=sign_auth(other, wire))
    assert check_signature(authorization_digest(ctx), ctx.payment) is \
        SignatureCheck.NEEDS_CONTRACT_CHECK


def test_signature_under_another_domain_needs_contract_check() -> None:
    wire = authorization(PAYER.address, valid_after=NOW - 600, valid_before=NOW + 60)
    ctx = make_ctx(signature=sign_auth(PAYER, wire, name="USD Coin"))
    assert check_signature(authorization_digest(ctx), ctx.payment) is \
        SignatureCheck.NEEDS_CONTRACT_CHECK


def test_high_s_form_of_a_valid_signature_is_not_valid_eoa() -> None:
    sig = make_ctx().payment.signature
    s = int.from_bytes(sig[32:64], "big")
    malleated = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    ctx = make_ctx(signature="0x" + malleated.hex())
    assert check_signature(authorization_digest(ctx), ctx.payment) is not SignatureCheck.VALID_EOA


def test_erc6492_wrapped_signature_is_counterfactual() -> None:
    inner = make_ctx().payment.signature
    wrapped = encode(["address", "bytes", "bytes"],
                     ["0x" + "fa" * 20, b"\x01\x02\x03", inner]) + ERC6492_MAGIC_SUFFIX
    ctx = make_ctx(signature="0x" + wrapped.hex())
    assert check_signature(authorization_digest(ctx), ctx.payment) is \
        SignatureCheck.COUNTERFACTUAL_WALLET


def test_erc6492_magic_suffix_value() -> None:
    assert ERC6492_MAGIC_SUFFIX == bytes.fromhex("64926492" * 8)


# ---- revert classification -------------------------------------------------------------------

FIAT_TOKEN_REVERTS = [
    "FiatTokenV2: authorization is expired",
    "FiatTokenV2: authorization is not yet valid",
    "FiatTokenV2: authorization is used or canceled",
    "FiatTokenV2: invalid signature",
    "ERC20: transfer amount exceeds balance",
    "ECRecover: invalid signature 's' value",
    "ECRecover: invalid signature 'v' value",
    "FiatTokenV2: caller must be the payee",
    "Blacklistable: account is blacklisted",
    "Pausable: paused",
    "ERC20: transfer to the zero address",
    "execution reverted",
]

SDK_TO_REASON = {r.value: r for r in Reason}


@pytest.mark.parametrize("revert", FIAT_TOKEN_REVERTS)
@pytest.mark.parametrize("prefix", ["", "execution reverted: ", "EXECUTION REVERTED: "])
def test_classify_transfer_revert_agrees_with_sdk(revert: str, prefix: str) -> None:
    sdk = parse_eip3009_transfer_error(Exception(prefix + revert))
    expected = None if sdk == ERR_TRANSACTION_FAILED else SDK_TO_REASON[sdk]
    assert classify_transfer_revert(prefix + revert) == expected


@pytest.mark.parametrize(("revert", "reason"), [
    ("FiatTokenV2: authorization is expired", Reason.VALID_BEFORE_EXPIRED),
    ("FiatTokenV2: authorization is not yet valid", Reason.VALID_AFTER_FUTURE),
    ("FiatTokenV2: authorization is used or canceled", Reason.NONCE_ALREADY_USED),
    ("FiatTokenV2: invalid signature", Reason.INVALID_SIGNATURE),
    ("ERC20: transfer amount exceeds balance", Reason.INSUFFICIENT_BALANCE),
    ("Pausable: paused", None),
])
def test_classify_fiat_token_reverts(revert: str, reason: Reason | None) -> None:
    assert classify_transfer_revert(revert) == reason


def _custom_error(signature: str, types: list[str], args: list[object]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


def test_custom_error_revert_is_classified_through_decode_revert() -> None:
    """The service classifies `classify_transfer_revert(decode_revert(data, message))`.
    `classify_transfer_revert` matches custom-error *names* (erc20insufficientbalance,
    authorizationexpired, signermismatch, …), but `decode_revert` turns any custom error into
    'custom error 0x<selector>', so those branches can never match in production. OpenZeppelin
    v5's ERC20InsufficientBalance is the common real case."""
    data = _custom_error("ERC20InsufficientBalance(address,uint256,uint256)",
                         ["address", "uint256", "uint256"], ["0x" + "11" * 20, 1, 2])
    assert classify_transfer_revert(abi.decode_revert(data, "execution reverted")) == \
        Reason.INSUFFICIENT_BALANCE

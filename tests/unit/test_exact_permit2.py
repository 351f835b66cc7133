"""The exact scheme over Permit2, the pure parts: the EIP-712 digest against eth_account's, the
proxy's call data against eth_abi and the SDK's ABI, the payload parser's field names, the
front-run evidence check, and the precedence of the off-chain checks."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from x402.mechanisms.evm.constants import (
    PERMIT2_WITNESS_TYPES,
    X402_EXACT_PERMIT2_PROXY_ABI,
    X402_EXACT_PERMIT2_PROXY_ADDRESS,
    X402_EXACT_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI,
)

from facilitator.core import abi
from facilitator.core.exact_permit2 import (
    EXACT_PROXY_ADDRESS,
    ExactPermit2Context,
    check_offchain,
    classify_exact_proxy_revert,
    exact_permit_digest,
)
from facilitator.core.permit2 import PERMIT2_ADDRESS
from facilitator.core.receipts import ExpectedTransfer, settles_exact_permit
from facilitator.protocol.fields import BadRequest
from facilitator.protocol.messages import parse_request
from facilitator.protocol.permit2 import parse_exact_permit2_payload
from facilitator.protocol.reasons import Reason

CHAIN_ID = 84532
NOW = 1_800_000_000


def _address() -> str:
    return "0x" + os.urandom(20).hex()


def _payload(**auth: Any) -> dict[str, Any]:
    base = {"from": _address(), "permitted": {"token": _address(), "amount": "1000"},
            "spender": EXACT_PROXY_ADDRESS, "nonce": str(random.getrandbits(256)),
            "deadline": str(NOW + 300), "witness": {"to": _address(), "validAfter": "0"}}
    base.update(auth)
    return {"signature": "0x" + "11" * 65, "permit2Authorization": base}


def _sdk_digest(payload: dict[str, Any]) -> bytes:
    """The digest by eth_account from the SDK's own witness types."""
    auth = payload["permit2Authorization"]
    types = {"EIP712Domain": [{"name": "name", "type": "string"},
                              {"name": "chainId", "type": "uint256"},
                              {"name": "verifyingContract", "type": "address"}],
             **PERMIT2_WITNESS_TYPES}
    message = {"permitted": {"token": to_checksum_address(auth["permitted"]["token"]),
                             "amount": int(auth["permitted"]["amount"])},
               "spender": to_checksum_address(auth["spender"]), "nonce": int(auth["nonce"]),
               "deadline": int(auth["deadline"]),
               "witness": {"to": to_checksum_address(auth["witness"]["to"]),
                           "validAfter": int(auth["witness"]["validAfter"])}}
    signable = encode_typed_data(full_message={
        "types": types, "primaryType": "PermitWitnessTransferFrom", "message": message,
        "domain": {"name": "Permit2", "chainId": CHAIN_ID,
                   "verifyingContract": to_checksum_address(PERMIT2_ADDRESS)}})
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


@pytest.mark.parametrize("seed", range(20))
def test_digest_equals_eth_account_over_the_sdk_types(seed: int) -> None:
    random.seed(seed)
    payload = _payload(permitted={"token": _address(), "amount": str(random.getrandbits(256))},
                       witness={"to": _address(), "validAfter": str(random.getrandbits(64))})
    permit = parse_exact_permit2_payload(payload).permit
    assert exact_permit_digest(CHAIN_ID, permit) == _sdk_digest(payload)


def _settle_args(seed: int) -> abi.ExactProxySettle:
    random.seed(seed)
    return abi.ExactProxySettle(token=_address(), amount=random.getrandbits(256),
                                nonce=random.getrandbits(256), deadline=random.getrandbits(64),
                                owner=_address(), to=_address(),
                                valid_after=random.getrandbits(64))


@pytest.mark.parametrize(("seed", "signature_length"), [(1, 65), (2, 64), (3, 300)])
def test_settle_calldata_is_the_sdk_abi_encoding(seed: int, signature_length: int) -> None:
    s, signature = _settle_args(seed), os.urandom(signature_length)
    [settle] = [f for f in X402_EXACT_PERMIT2_PROXY_ABI if f.get("name") == "settle"]
    types = "((address,uint256),uint256,uint256),address,(address,uint256),bytes"
    assert [i["type"] for i in settle["inputs"]] == ["tuple", "address", "tuple", "bytes"]
    expected = keccak(text=f"settle({types})")[:4] + abi_encode(
        ["((address,uint256),uint256,uint256)", "address", "(address,uint256)", "bytes"],
        [((s.token, s.amount), s.nonce, s.deadline), s.owner, (s.to, s.valid_after),
         signature])
    assert abi.exact_proxy_settle(s, signature) == expected
    assert abi.decode_exact_proxy_settle(expected + b"suffix") == s


def test_decode_refuses_other_calls() -> None:
    data = abi.exact_proxy_settle(_settle_args(4), bytes(65))
    assert abi.decode_exact_proxy_settle(abi.UPTO_PROXY_SETTLE + data[4:]) is None
    assert abi.decode_exact_proxy_settle(data[:100]) is None
    assert EXACT_PROXY_ADDRESS == X402_EXACT_PERMIT2_PROXY_ADDRESS.lower()


def test_a_settle_with_permit_call_is_front_run_evidence_too() -> None:
    """The real proxy's EIP-2612 variant (the SDK uses it with the gas-sponsoring extension),
    encoded from the SDK's own ABI, names the same owner, nonce and payment."""
    s = _settle_args(7)
    [function] = X402_EXACT_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI
    assert [i["type"] for i in function["inputs"]] == ["tuple", "tuple", "address", "tuple",
                                                       "bytes"]
    types = ["(uint256,uint256,bytes32,bytes32,uint8)", "((address,uint256),uint256,uint256)",
             "address", "(address,uint256)", "bytes"]
    calldata = keccak(text=f"settleWithPermit({','.join(types)})")[:4] + abi_encode(
        types, [(s.amount, s.deadline, os.urandom(32), os.urandom(32), 27),
                ((s.token, s.amount), s.nonce, s.deadline), s.owner, (s.to, s.valid_after),
                os.urandom(65)])
    assert abi.decode_exact_proxy_settle(calldata) == s
    tx = {"to": X402_EXACT_PERMIT2_PROXY_ADDRESS, "input": "0x" + calldata.hex()}
    expected = ExpectedTransfer(s.token, s.owner, s.to, s.amount)
    assert settles_exact_permit(tx, expected, s.nonce)
    assert not settles_exact_permit(tx, expected, s.nonce ^ 1)


def test_front_run_evidence_must_name_this_owner_nonce_and_payment() -> None:
    s = _settle_args(5)
    expected = ExpectedTransfer(s.token, s.owner, s.to, s.amount)
    tx = {"to": X402_EXACT_PERMIT2_PROXY_ADDRESS,
          "input": "0x" + abi.exact_proxy_settle(s, bytes(65)).hex()}
    assert settles_exact_permit(tx, expected, s.nonce)
    assert not settles_exact_permit(tx, expected, s.nonce + 1)
    assert not settles_exact_permit({**tx, "to": _address()}, expected, s.nonce)
    other_payer = ExpectedTransfer(s.token, _address(), s.to, s.amount)
    assert not settles_exact_permit(tx, other_payer, s.nonce)
    assert not settles_exact_permit({**tx, "input": "0xzz"}, expected, s.nonce)
    assert not settles_exact_permit(None, expected, s.nonce)


@pytest.mark.parametrize(("path", "value", "field"), [
    (("permit2Authorization",), "x", "paymentPayload.payload.permit2Authorization"),
    (("permit2Authorization", "from"), "0x12", "paymentPayload.payload.permit2Authorization.from"),
    (("permit2Authorization", "permitted", "amount"), "+1",
     "paymentPayload.payload.permit2Authorization.permitted.amount"),
    (("permit2Authorization", "nonce"), None, "paymentPayload.payload.permit2Authorization.nonce"),
    (("permit2Authorization", "witness", "to"), 5,
     "paymentPayload.payload.permit2Authorization.witness.to"),
    (("permit2Authorization", "witness", "validAfter"), "1e3",
     "paymentPayload.payload.permit2Authorization.witness.validAfter"),
    (("signature",), "0xabc", "paymentPayload.payload.signature"),
])
def test_malformed_payload_names_the_field(path: tuple[str, ...], value: Any, field: str
                                           ) -> None:
    payload: Any = _payload()
    target = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(BadRequest) as raised:
        parse_exact_permit2_payload(payload)
    assert raised.value.field == field


def _context(payload: dict[str, Any], **requirements: Any) -> ExactPermit2Context:
    auth = payload["permit2Authorization"]
    reqs = {"scheme": "exact", "network": "eip155:84532", "amount": "1000",
            "asset": auth["permitted"]["token"], "payTo": auth["witness"]["to"],
            "maxTimeoutSeconds": 60, "extra": {"assetTransferMethod": "permit2"}}
    reqs.update(requirements)
    request = parse_request({"x402Version": 2, "paymentRequirements": reqs, "paymentPayload": {
        "x402Version": 2, "accepted": reqs, "payload": payload}})
    return ExactPermit2Context(request=request, payment=parse_exact_permit2_payload(payload),
                               now=NOW)


def test_checks_follow_the_sdk_order() -> None:
    """Every field wrong at once: each fix reveals the next reason, in verify_permit2's order."""
    good = _payload()
    auth = good["permit2Authorization"]
    bad = _payload(spender=_address(), deadline=str(NOW), witness={"to": _address(),
                                                                    "validAfter": str(NOW + 9)},
                   permitted={"token": _address(), "amount": "999"})
    bad["permit2Authorization"]["from"] = auth["from"]
    order = [("spender", Reason.PERMIT2_INVALID_SPENDER),
             ("witness", Reason.PERMIT2_RECIPIENT_MISMATCH),
             ("deadline", Reason.PERMIT2_DEADLINE_EXPIRED),
             ("witness", Reason.PERMIT2_NOT_YET_VALID),
             ("permitted", Reason.PERMIT2_AMOUNT_MISMATCH),
             ("permitted", Reason.PERMIT2_TOKEN_MISMATCH)]
    witness = {"to": auth["witness"]["to"], "validAfter": str(NOW + 9)}
    fixes = {"spender": auth["spender"], "deadline": auth["deadline"]}
    fixed_witness = [witness, auth["witness"]]
    permitted = [{"token": bad["permit2Authorization"]["permitted"]["token"], "amount": "1000"},
                 auth["permitted"]]
    for field, reason in order:
        rejection = check_offchain(_context(bad, asset=auth["permitted"]["token"],
                                            payTo=auth["witness"]["to"]))
        assert rejection is not None and rejection.reason is reason
        if field == "witness":
            bad["permit2Authorization"]["witness"] = fixed_witness.pop(0)
        elif field == "permitted":
            bad["permit2Authorization"]["permitted"] = permitted.pop(0)
        else:
            bad["permit2Authorization"][field] = fixes[field]
    assert check_offchain(_context(bad)) is None


@pytest.mark.parametrize("error", [
    "Permit2612AmountMismatch()", "InvalidAmount()", "InvalidDestination()", "InvalidOwner()",
    "PaymentTooEarly()", "InvalidSignature()", "SignatureExpired(1)", "InvalidNonce()",
    "InvalidSigner()", "ERC20InsufficientBalance(0x01, 1, 2)", "execution reverted"])
def test_proxy_reverts_map_as_the_sdk_maps_them(error: str) -> None:
    """Our classification equals the SDK's own `_map_settle_error` on the same text."""
    from x402.mechanisms.evm.exact.permit2_utils import _map_settle_error

    sdk = _map_settle_error(Exception(error), "eip155:84532", "0x" + "11" * 20).error_reason
    ours = classify_exact_proxy_revert(error) or Reason.TRANSACTION_FAILED
    assert str(ours) == sdk

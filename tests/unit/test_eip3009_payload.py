"""`parse_eip3009_payload`: validated authorization values, errors named by path."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from facilitator.protocol.eip3009 import is_permit2_payload, parse_eip3009_payload
from facilitator.protocol.fields import BadRequest
from unit.builders import PAY_TO, new_account, signed_payload

AUTH = "paymentPayload.payload.authorization"


@pytest.fixture
def payload(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    return signed_payload(new_account(rng), value=rng.randrange(1, 10**12),
                          valid_after=rng.randrange(10**9),
                          valid_before=rng.randrange(10**9, 2**40),
                          nonce=rng.randbytes(32))


def test_happy_path_parses_every_value(payload: dict[str, Any]) -> None:
    auth = payload["authorization"]
    parsed = parse_eip3009_payload(payload)
    a = parsed.authorization
    assert a.payer == auth["from"].lower() and a.pay_to == PAY_TO.lower()
    assert (a.value, a.valid_after, a.valid_before) == (
        int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]))
    assert a.nonce == bytes.fromhex(auth["nonce"][2:]) and len(a.nonce) == 32
    assert parsed.signature == bytes.fromhex(payload["signature"][2:])
    assert len(parsed.signature) == 65


def test_empty_signature_parses(payload: dict[str, Any]) -> None:
    payload["signature"] = "0x"
    assert parse_eip3009_payload(payload).signature == b""


def _mutated(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return body


_DELETE = object()

CASES = [
    ("nonce 31 bytes", "authorization.nonce", "0x" + "11" * 31, f"{AUTH}.nonce"),
    ("nonce 33 bytes", "authorization.nonce", "0x" + "11" * 33, f"{AUTH}.nonce"),
    ("value leading zero", "authorization.value", "010000", f"{AUTH}.value"),
    ("value with sign", "authorization.value", "+10000", f"{AUTH}.value"),
    ("value as number", "authorization.value", 10000, f"{AUTH}.value"),
    ("validBefore number", "authorization.validBefore", 1740672154, f"{AUTH}.validBefore"),
    ("validAfter spaces", "authorization.validAfter", " 0", f"{AUTH}.validAfter"),
    ("from missing", "authorization.from", _DELETE, f"{AUTH}.from"),
    ("to malformed", "authorization.to", "0x1234", f"{AUTH}.to"),
    ("signature not hex", "signature", "0xzz", "paymentPayload.payload.signature"),
    ("signature odd digits", "signature", "0xabc", "paymentPayload.payload.signature"),
    ("signature no prefix", "signature", "ab" * 65, "paymentPayload.payload.signature"),
    ("signature missing", "signature", _DELETE, "paymentPayload.payload.signature"),
    ("authorization missing", "authorization", _DELETE, AUTH),
    ("authorization a string", "authorization", "{}", AUTH),
]


@pytest.mark.parametrize(("path", "value", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed_payload_names_the_field(payload: dict[str, Any], path: str, value: Any,
                                           field: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_eip3009_payload(_mutated(payload, path, value))
    assert err.value.field == field


def test_permit2_payload_detected_by_shape(payload: dict[str, Any]) -> None:
    assert not is_permit2_payload(payload)
    assert is_permit2_payload({"signature": "0x", "permit2Authorization": {}})

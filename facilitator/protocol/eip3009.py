"""The `exact` scheme's EIP-3009 payload: `{signature, authorization: {from, to, value,
validAfter, validBefore, nonce}}` (all authorization values are strings on the wire).

Guarantee: `parse_eip3009_payload` returns fully validated values or raises `BadRequest` naming
the field. An empty signature ("0x") parses; the verifier answers it with the SDK's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from facilitator.protocol import fields as f

PAYLOAD = "paymentPayload.payload"
AUTH = f"{PAYLOAD}.authorization"


@dataclass(frozen=True, slots=True)
class TransferAuthorization:
    """The EIP-3009 `TransferWithAuthorization` message (addresses lower-case 0x-hex)."""

    payer: str
    pay_to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes  # 32 bytes


@dataclass(frozen=True, slots=True)
class Eip3009Payload:
    authorization: TransferAuthorization
    signature: bytes


def is_permit2_payload(payload: Mapping[str, Any]) -> bool:
    """Every SDK dispatches on payload shape: Permit2 payloads carry `permit2Authorization`."""
    return "permit2Authorization" in payload


def parse_eip3009_payload(payload: Mapping[str, Any]) -> Eip3009Payload:
    auth = f.require_object(f.member(payload, "authorization", PAYLOAD), AUTH)
    signature = f.hex_bytes(f.member(payload, "signature", PAYLOAD), f"{PAYLOAD}.signature")
    return Eip3009Payload(
        authorization=TransferAuthorization(
            payer=f.address(f.member(auth, "from", AUTH), f"{AUTH}.from"),
            pay_to=f.address(f.member(auth, "to", AUTH), f"{AUTH}.to"),
            value=f.uint256_decimal(f.member(auth, "value", AUTH), f"{AUTH}.value"),
            valid_after=f.uint256_decimal(f.member(auth, "validAfter", AUTH), f"{AUTH}.validAfter"),
            valid_before=f.uint256_decimal(f.member(auth, "validBefore", AUTH),
                                           f"{AUTH}.validBefore"),
            nonce=f.hex_bytes(f.member(auth, "nonce", AUTH), f"{AUTH}.nonce", length=32),
        ),
        signature=signature,
    )

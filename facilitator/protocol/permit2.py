"""The `upto` scheme's Permit2 payload (x402 `upto` on EVM; OpenGradient's session payments):

    {"signature": "0x…",
     "permit2Authorization": {"from", "permitted": {"token", "amount"}, "spender",
                              "nonce": "<uint256 decimal>", "deadline": "<unix>",
                              "witness": {"to", "facilitator", "validAfter"}}}

and the optional `usageMetadata` a resource server may attach to `/settle`.

Guarantee: parsers return validated values or raise `BadRequest` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from facilitator.protocol import fields as f
from facilitator.protocol.fields import BadRequest

PAYLOAD = "paymentPayload.payload"
AUTH = f"{PAYLOAD}.permit2Authorization"


@dataclass(frozen=True, slots=True)
class UptoWitness:
    to: str
    facilitator: str
    valid_after: int


@dataclass(frozen=True, slots=True)
class PermitWitnessTransfer:
    """A signed Permit2 `PermitWitnessTransferFrom` with the x402 upto witness."""

    owner: str
    token: str
    cap: int  # permitted.amount: the most the spender may move
    spender: str
    nonce: int
    deadline: int
    witness: UptoWitness


@dataclass(frozen=True, slots=True)
class UptoPayload:
    permit: PermitWitnessTransfer
    signature: bytes


def parse_upto_payload(payload: Mapping[str, Any]) -> UptoPayload:
    auth = f.require_object(f.member(payload, "permit2Authorization", PAYLOAD), AUTH)
    permitted = f.require_object(f.member(auth, "permitted", AUTH), f"{AUTH}.permitted")
    witness = f.require_object(f.member(auth, "witness", AUTH), f"{AUTH}.witness")
    return UptoPayload(
        permit=PermitWitnessTransfer(
            owner=f.address(f.member(auth, "from", AUTH), f"{AUTH}.from"),
            token=f.address(f.member(permitted, "token", f"{AUTH}.permitted"),
                            f"{AUTH}.permitted.token"),
            cap=f.uint256_decimal(f.member(permitted, "amount", f"{AUTH}.permitted"),
                                  f"{AUTH}.permitted.amount"),
            spender=f.address(f.member(auth, "spender", AUTH), f"{AUTH}.spender"),
            nonce=f.uint256_decimal(f.member(auth, "nonce", AUTH), f"{AUTH}.nonce"),
            deadline=f.uint256_decimal(f.member(auth, "deadline", AUTH), f"{AUTH}.deadline"),
            witness=UptoWitness(
                to=f.address(f.member(witness, "to", f"{AUTH}.witness"), f"{AUTH}.witness.to"),
                facilitator=f.address(f.member(witness, "facilitator", f"{AUTH}.witness"),
                                      f"{AUTH}.witness.facilitator"),
                valid_after=f.uint256_decimal(f.member(witness, "validAfter", f"{AUTH}.witness"),
                                              f"{AUTH}.witness.validAfter")),
        ),
        signature=f.hex_bytes(f.member(payload, "signature", PAYLOAD), f"{PAYLOAD}.signature"),
    )


@dataclass(frozen=True, slots=True)
class UsageMetadata:
    """What the resource server says a settled session consumed (OpenGradient's facilitator
    API). Kept whole for auditors and rolled up by /usage; never trusted for money movement."""

    session_id: str | None
    request_count: int | None
    cost_opg: int | None
    cost_usd: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    service: str | None
    model: str | None
    raw: Mapping[str, Any]


_USAGE = "usageMetadata"


def parse_usage_metadata(value: Any) -> UsageMetadata | None:
    if value is None:
        return None
    obj = f.require_object(value, _USAGE)
    if len(obj) > 64:
        raise BadRequest(_USAGE, "has too many members")
    return UsageMetadata(
        session_id=_opt_text(obj, "sessionId", 128),
        request_count=_opt_count(obj, "requestCount"),
        cost_opg=_opt_count(obj, "costOpg"),
        cost_usd=_opt_decimal_text(obj, "costUsd"),
        input_tokens=_opt_count(obj, "inputTokens"),
        output_tokens=_opt_count(obj, "outputTokens"),
        total_tokens=_opt_count(obj, "totalTokens"),
        service=_opt_text(obj, "service", 128),
        model=_opt_text(obj, "model", 256),
        raw=obj,
    )


def _opt_text(obj: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = obj.get(key)
    return None if value is None else f.text(value, f"{_USAGE}.{key}", max_length=limit)


def _opt_count(obj: Mapping[str, Any], key: str) -> int | None:
    """A non-negative integer, as a JSON number or a canonical decimal string."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return f.uint256_decimal(value, f"{_USAGE}.{key}")
    return f.integer(value, f"{_USAGE}.{key}", maximum=2**255)


def _opt_decimal_text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{_USAGE}.{key}", "must be a decimal number or string")
    text = repr(value) if isinstance(value, float) else str(value)
    if not _DECIMAL.fullmatch(text):
        raise BadRequest(f"{_USAGE}.{key}", "must be a non-negative decimal")
    return text


_DECIMAL = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?", re.ASCII)

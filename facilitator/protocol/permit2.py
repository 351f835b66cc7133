"""The `upto` scheme's Permit2 payload (x402 `upto` on EVM; OpenGradient's session payments):

    {"signature": "0x…",
     "permit2Authorization": {"from", "permitted": {"token", "amount"}, "spender",
                              "nonce": "<uint256 decimal>", "deadline": "<unix>",
                              "witness": {"to", "facilitator", "validAfter"}}}

and the optional `usageMetadata` a resource server may attach to `/settle`.

Guarantee: parsers return validated values or raise `BadRequest` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
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
        cost_opg=_opt_count(obj, "costOpg", maximum=UINT256_MAX),
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


# What the usage columns hold: counts are bigint (costOpg numeric(78, 0)), costUsd numeric(40, 18).
BIGINT_MAX = 2**63 - 1
UINT256_MAX = 2**256 - 1


def _opt_count(obj: Mapping[str, Any], key: str, maximum: int = BIGINT_MAX) -> int | None:
    """A non-negative integer, as a JSON number (an integral one written with a fraction or an
    exponent, such as `3.0` or `1e3`, too) or a canonical decimal string."""
    value = obj.get(key)
    field = f"{_USAGE}.{key}"
    if value is None:
        return None
    if isinstance(value, str):
        number = f.uint256_decimal(value, field)
    elif isinstance(value, float):
        exact = Decimal(_number_text(value, field))
        if exact != exact.to_integral_value():
            raise BadRequest(field, "must be a non-negative integer")
        number = int(exact)
    else:
        number = f.integer(value, field, maximum=maximum)
    if not 0 <= number <= maximum:
        raise BadRequest(field, f"must be between 0 and {maximum}")
    return number


def _opt_decimal_text(obj: Mapping[str, Any], key: str) -> str | None:
    """A non-negative decimal as text, exactly as the JSON number or string was written (a
    number without its exponent: 0.00002, never 2e-05)."""
    value = obj.get(key)
    field = f"{_USAGE}.{key}"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(field, "must be a decimal number or string")
    text = value if isinstance(value, str) else _number_text(value, field)
    if not _DECIMAL.fullmatch(text):
        raise BadRequest(field, "must be a non-negative decimal with at most 22 integer digits")
    return text


def _number_text(value: int | float, field: str) -> str:
    """A JSON number's decimal value in positional notation. orjson gives a float for any number
    with a fraction or an exponent; its repr is the shortest text that reads back as the same
    number (the number as written, for up to 15-17 significant digits), in exponent form for
    small and large values, which `format(..., "f")` writes out."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise BadRequest(field, "must be a finite number")
    return format(Decimal(repr(value)), "f")


_DECIMAL = re.compile(r"[0-9]{1,22}(\.[0-9]{1,30})?", re.ASCII)

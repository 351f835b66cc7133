"""The Permit2 payloads: `upto` (x402 `upto` on EVM; OpenGradient's session payments) and
`exact` with `extra.assetTransferMethod: "permit2"` (its witness is `{to, validAfter}`):

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
WITNESS = f"{AUTH}.witness"


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


@dataclass(frozen=True, slots=True)
class ExactWitness:
    to: str
    valid_after: int


@dataclass(frozen=True, slots=True)
class ExactPermitTransfer:
    """A signed Permit2 `PermitWitnessTransferFrom` with the x402 exact witness: the proxy moves
    exactly `amount`, whoever submits it."""

    owner: str
    token: str
    amount: int  # permitted.amount
    spender: str
    nonce: int
    deadline: int
    witness: ExactWitness


@dataclass(frozen=True, slots=True)
class ExactPermit2Payload:
    permit: ExactPermitTransfer
    signature: bytes


@dataclass(frozen=True, slots=True)
class _Signed:
    """What both permit payloads carry outside their witness."""

    owner: str
    token: str
    amount: int
    spender: str
    nonce: int
    deadline: int
    witness: Mapping[str, Any]
    signature: bytes


def _address(obj: Mapping[str, Any], key: str, path: str) -> str:
    return f.address(f.member(obj, key, path), f"{path}.{key}")


def _uint(obj: Mapping[str, Any], key: str, path: str) -> int:
    return f.uint256_decimal(f.member(obj, key, path), f"{path}.{key}")


def _signed(payload: Mapping[str, Any]) -> _Signed:
    auth = f.require_object(f.member(payload, "permit2Authorization", PAYLOAD), AUTH)
    permitted = f.require_object(f.member(auth, "permitted", AUTH), f"{AUTH}.permitted")
    witness = f.require_object(f.member(auth, "witness", AUTH), WITNESS)
    return _Signed(
        owner=_address(auth, "from", AUTH),
        token=_address(permitted, "token", f"{AUTH}.permitted"),
        amount=_uint(permitted, "amount", f"{AUTH}.permitted"),
        spender=_address(auth, "spender", AUTH), nonce=_uint(auth, "nonce", AUTH),
        deadline=_uint(auth, "deadline", AUTH), witness=witness,
        signature=f.hex_bytes(f.member(payload, "signature", PAYLOAD), f"{PAYLOAD}.signature"))


def parse_upto_payload(payload: Mapping[str, Any]) -> UptoPayload:
    s = _signed(payload)
    witness = UptoWitness(to=_address(s.witness, "to", WITNESS),
                          facilitator=_address(s.witness, "facilitator", WITNESS),
                          valid_after=_uint(s.witness, "validAfter", WITNESS))
    return UptoPayload(
        permit=PermitWitnessTransfer(owner=s.owner, token=s.token, cap=s.amount,
                                     spender=s.spender, nonce=s.nonce, deadline=s.deadline,
                                     witness=witness),
        signature=s.signature)


def parse_exact_permit2_payload(payload: Mapping[str, Any]) -> ExactPermit2Payload:
    """The x402 `exact` Permit2 payload (`extra.assetTransferMethod: "permit2"`); its witness
    is `{to, validAfter}`."""
    s = _signed(payload)
    witness = ExactWitness(to=_address(s.witness, "to", WITNESS),
                           valid_after=_uint(s.witness, "validAfter", WITNESS))
    return ExactPermit2Payload(
        permit=ExactPermitTransfer(owner=s.owner, token=s.token, amount=s.amount,
                                   spender=s.spender, nonce=s.nonce, deadline=s.deadline,
                                   witness=witness),
        signature=s.signature)


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

"""The `/verify` and `/settle` request body, x402 v1 and v2, parsed into one internal shape.

Body: `{x402Version, paymentPayload, paymentRequirements}`.
- v2: `paymentPayload = {x402Version: 2, accepted: <requirements>, payload, resource?,
  extensions?}`,
  requirements carry `amount`.
- v1: `paymentPayload = {x402Version: 1, scheme, network, payload}`, requirements carry
  `maxAmountRequired`, `resource`, `description`, and `extra` may arrive as a JSON string.

Guarantee: `parse_request` returns a `PaymentRequest` whose envelope and requirements are fully
validated, or raises `BadRequest` naming the offending field. The scheme-specific `payload` object
is left to the scheme (it is only meaningful once the scheme and network are known to be served).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from facilitator.protocol import fields as f
from facilitator.protocol.fields import BadRequest

SUPPORTED_VERSIONS = (1, 2)
_EMPTY: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class Requirements:
    """What the resource server asks for (one element of `accepts`)."""

    scheme: str
    network: str
    amount: int
    asset: str  # lower-case hex
    pay_to: str  # lower-case hex
    max_timeout_s: int
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A parsed `/verify` or `/settle` body."""

    version: int
    scheme: str  # the scheme the client paid with (v2: accepted.scheme)
    network: str  # the network the client paid on (v2: accepted.network)
    requirements: Requirements
    accepted: Requirements | None  # v2 only: the client's copy of the requirements
    payload: Mapping[str, Any]  # scheme-specific, parsed by the scheme
    extensions: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnsupportedVersion:
    """A well-formed body whose x402Version we do not speak (answered with a reason, not 400)."""

    version: int


def parse_request(body: Any) -> PaymentRequest | UnsupportedVersion:
    body = f.require_object(body, "body")
    payment = f.require_object(f.member(body, "paymentPayload", ""), "paymentPayload")
    version = f.integer(
        f.member(payment, "x402Version", "paymentPayload"), "paymentPayload.x402Version",
        maximum=1_000)
    # The SDK clients send a top-level copy; the spec's examples omit it. When present it
    # must agree.
    if body.get("x402Version") is not None:
        if f.integer(body["x402Version"], "x402Version", maximum=1_000) != version:
            raise BadRequest("x402Version", "must equal paymentPayload.x402Version")
    if version not in SUPPORTED_VERSIONS:
        return UnsupportedVersion(version)
    raw_requirements = f.member(body, "paymentRequirements", "")
    if version == 2:
        return _parse_v2(payment, raw_requirements)
    return _parse_v1(payment, raw_requirements)


def _parse_v2(payment: Mapping[str, Any], raw_requirements: Any) -> PaymentRequest:
    requirements = parse_requirements_v2(raw_requirements, "paymentRequirements")
    accepted = parse_requirements_v2(
        f.member(payment, "accepted", "paymentPayload"), "paymentPayload.accepted")
    payload = f.require_object(f.member(payment, "payload", "paymentPayload"),
                               "paymentPayload.payload")
    raw_extensions = payment.get("extensions")
    extensions = _EMPTY if raw_extensions is None else f.require_object(
        raw_extensions, "paymentPayload.extensions")
    return PaymentRequest(version=2, scheme=accepted.scheme, network=accepted.network,
                          requirements=requirements, accepted=accepted, payload=payload,
                          extensions=extensions)


def _parse_v1(payment: Mapping[str, Any], raw_requirements: Any) -> PaymentRequest:
    requirements = parse_requirements_v1(raw_requirements, "paymentRequirements")
    scheme = f.text(f.member(payment, "scheme", "paymentPayload"), "paymentPayload.scheme",
                    max_length=64)
    network = f.text(f.member(payment, "network", "paymentPayload"), "paymentPayload.network",
                     max_length=64)
    payload = f.require_object(f.member(payment, "payload", "paymentPayload"),
                               "paymentPayload.payload")
    return PaymentRequest(version=1, scheme=scheme, network=network, requirements=requirements,
                          accepted=None, payload=payload)


def parse_requirements_v2(value: Any, path: str) -> Requirements:
    obj = f.require_object(value, path)
    return Requirements(
        scheme=f.text(f.member(obj, "scheme", path), f"{path}.scheme", max_length=64),
        network=f.text(f.member(obj, "network", path), f"{path}.network", max_length=64),
        amount=f.uint256_decimal(f.member(obj, "amount", path), f"{path}.amount"),
        asset=f.address(f.member(obj, "asset", path), f"{path}.asset"),
        pay_to=f.address(f.member(obj, "payTo", path), f"{path}.payTo"),
        max_timeout_s=f.integer(f.member(obj, "maxTimeoutSeconds", path),
                                f"{path}.maxTimeoutSeconds", maximum=10**9),
        extra=_extra(obj.get("extra"), f"{path}.extra"),
    )


def parse_requirements_v1(value: Any, path: str) -> Requirements:
    obj = f.require_object(value, path)
    f.text(f.member(obj, "resource", path), f"{path}.resource", max_length=4096)
    if "description" in obj:
        f.text(obj["description"], f"{path}.description", max_length=4096)
    return Requirements(
        scheme=f.text(f.member(obj, "scheme", path), f"{path}.scheme", max_length=64),
        network=f.text(f.member(obj, "network", path), f"{path}.network", max_length=64),
        amount=f.uint256_decimal(f.member(obj, "maxAmountRequired", path),
                                 f"{path}.maxAmountRequired"),
        asset=f.address(f.member(obj, "asset", path), f"{path}.asset"),
        pay_to=f.address(f.member(obj, "payTo", path), f"{path}.payTo"),
        max_timeout_s=f.integer(f.member(obj, "maxTimeoutSeconds", path),
                                f"{path}.maxTimeoutSeconds", maximum=10**9),
        extra=_extra(obj.get("extra"), f"{path}.extra"),
    )


def _extra(value: Any, path: str) -> Mapping[str, Any]:
    """`extra` is optional; v1 servers sometimes send it JSON-encoded as a string."""
    if value is None:
        return _EMPTY
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest(path, "must be an object (or a JSON-encoded object)") from None
    return f.require_object(value, path)

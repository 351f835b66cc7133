"""`parse_request`: v2 and v1 bodies to one internal shape; malformed bodies named by path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from facilitator.protocol.fields import BadRequest
from facilitator.protocol.messages import PaymentRequest, UnsupportedVersion, parse_request
from unit.builders import (
    AMOUNT, NETWORK, PAY_TO, USDC, V1_NETWORK, body_v1, body_v2, requirements_v1,
    requirements_v2,
)

PAYLOAD = {"signature": "0x" + "ab" * 65,
           "authorization": {"from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": PAY_TO,
                             "value": "10000", "validAfter": "0", "validBefore": "1740672154",
                             "nonce": "0x" + "f3" * 32}}


def _v2() -> dict[str, Any]:
    return body_v2(copy.deepcopy(PAYLOAD))


def _v1() -> dict[str, Any]:
    return body_v1(copy.deepcopy(PAYLOAD))


def test_v2_body_parses_to_its_values() -> None:
    body = _v2()
    body["paymentPayload"]["extensions"] = {"bazaar": {"info": {}}}
    request = parse_request(body)
    assert isinstance(request, PaymentRequest)
    assert (request.version, request.scheme, request.network) == (2, "exact", NETWORK)
    req = request.requirements
    assert (req.scheme, req.network, req.amount, req.max_timeout_s) == \
        ("exact", NETWORK, AMOUNT, 60)
    assert req.asset == USDC.lower() and req.pay_to == PAY_TO.lower()
    assert dict(req.extra) == {"name": "USDC", "version": "2"}
    assert request.accepted == req
    assert request.payload == PAYLOAD
    assert dict(request.extensions) == {"bazaar": {"info": {}}}


def test_v2_scheme_and_network_come_from_accepted() -> None:
    body = _v2()
    body["paymentPayload"]["accepted"].update(scheme="upto", network="eip155:8453")
    request = parse_request(body)
    assert (request.scheme, request.network) == ("upto", "eip155:8453")
    assert (request.requirements.scheme, request.requirements.network) == ("exact", NETWORK)


def test_v1_body_parses_to_its_values() -> None:
    request = parse_request(_v1())
    assert isinstance(request, PaymentRequest)
    assert (request.version, request.scheme, request.network) == (1, "exact", V1_NETWORK)
    assert request.requirements.amount == AMOUNT
    assert request.requirements.pay_to == PAY_TO.lower()
    assert request.accepted is None
    assert request.payload == PAYLOAD


def test_v1_extra_as_json_string_is_accepted() -> None:
    body = _v1()
    body["paymentRequirements"]["extra"] = json.dumps({"name": "USDC", "version": "2"})
    assert dict(parse_request(body).requirements.extra) == {"name": "USDC", "version": "2"}


def test_missing_extra_is_empty() -> None:
    body = _v2()
    for part in (body["paymentRequirements"], body["paymentPayload"]["accepted"]):
        del part["extra"]
    assert dict(parse_request(body).requirements.extra) == {}


@pytest.mark.parametrize("version", [3, 0, 999])
def test_unsupported_version_is_returned_not_raised(version: int) -> None:
    body = _v2()
    body["x402Version"] = body["paymentPayload"]["x402Version"] = version
    assert parse_request(body) == UnsupportedVersion(version)


def test_spec_example_body_without_top_level_version_parses() -> None:
    """x402 v2 spec §7.1's /verify example carries only `paymentPayload` and
    `paymentRequirements`; the version lives in `paymentPayload.x402Version`."""
    body = _v2()
    del body["x402Version"]
    request = parse_request(body)
    assert isinstance(request, PaymentRequest) and request.version == 2


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def mutate(body: dict[str, Any]) -> None:
        node = body
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def mutate(body: dict[str, Any]) -> None:
        node = body
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


MALFORMED_V2 = [
    ("missing paymentPayload", _delete("paymentPayload"), "paymentPayload"),
    ("paymentPayload not object", _set("paymentPayload", "x"), "paymentPayload"),
    ("missing paymentRequirements", _delete("paymentRequirements"), "paymentRequirements"),
    ("paymentRequirements not object", _set("paymentRequirements", ["x"]), "paymentRequirements"),
    ("paymentRequirements null", _set("paymentRequirements", None), "paymentRequirements"),
    ("version as string", _set("x402Version", "2"), "x402Version"),
    ("bool version", _set("x402Version", True), "x402Version"),
    ("version mismatch", _set("x402Version", 1), "x402Version"),
    ("missing inner version", _delete("paymentPayload.x402Version"), "paymentPayload.x402Version"),
    ("missing accepted", _delete("paymentPayload.accepted"), "paymentPayload.accepted"),
    ("accepted.payTo malformed", _set("paymentPayload.accepted.payTo", "0x1234"),
     "paymentPayload.accepted.payTo"),
    ("accepted.payTo bad checksum",
     _set("paymentPayload.accepted.payTo", "0x209693bc6afc0C5328bA36FaF03C514EF312287C"),
     "paymentPayload.accepted.payTo"),
    ("amount 1e3", _set("paymentRequirements.amount", "1e3"), "paymentRequirements.amount"),
    ("amount as number", _set("paymentRequirements.amount", 10000), "paymentRequirements.amount"),
    ("accepted amount leading zero", _set("paymentPayload.accepted.amount", "010000"),
     "paymentPayload.accepted.amount"),
    ("maxTimeoutSeconds as string", _set("paymentRequirements.maxTimeoutSeconds", "60"),
     "paymentRequirements.maxTimeoutSeconds"),
    ("maxTimeoutSeconds float", _set("paymentRequirements.maxTimeoutSeconds", 60.0),
     "paymentRequirements.maxTimeoutSeconds"),
    ("maxTimeoutSeconds negative", _set("paymentRequirements.maxTimeoutSeconds", -1),
     "paymentRequirements.maxTimeoutSeconds"),
    ("missing network", _delete("paymentRequirements.network"), "paymentRequirements.network"),
    ("scheme not string", _set("paymentRequirements.scheme", 1), "paymentRequirements.scheme"),
    ("asset missing", _delete("paymentRequirements.asset"), "paymentRequirements.asset"),
    ("extra not object", _set("paymentRequirements.extra", 5), "paymentRequirements.extra"),
    ("extra list", _set("paymentPayload.accepted.extra", ["x"]), "paymentPayload.accepted.extra"),
    ("missing payload", _delete("paymentPayload.payload"), "paymentPayload.payload"),
    ("payload not object", _set("paymentPayload.payload", "0xab"), "paymentPayload.payload"),
    ("extensions not object", _set("paymentPayload.extensions", "x"), "paymentPayload.extensions"),
    # A falsy non-object is as malformed as a truthy one (the SDK model types it dict | None).
    ("extensions empty list", _set("paymentPayload.extensions", []), "paymentPayload.extensions"),
]


@pytest.mark.parametrize(("mutate", "field"), [(m, f) for _, m, f in MALFORMED_V2],
                         ids=[name for name, _, _ in MALFORMED_V2])
def test_malformed_v2_body_names_the_field(mutate: Callable[[dict[str, Any]], None],
                                           field: str) -> None:
    body = _v2()
    mutate(body)
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert err.value.field == field


MALFORMED_V1 = [
    ("extra not JSON", _set("paymentRequirements.extra", "name=USDC"), "paymentRequirements.extra"),
    ("extra JSON array", _set("paymentRequirements.extra", "[1, 2]"), "paymentRequirements.extra"),
    ("maxAmountRequired +10", _set("paymentRequirements.maxAmountRequired", "+10"),
     "paymentRequirements.maxAmountRequired"),
    ("missing maxAmountRequired", _delete("paymentRequirements.maxAmountRequired"),
     "paymentRequirements.maxAmountRequired"),
    ("missing resource", _delete("paymentRequirements.resource"), "paymentRequirements.resource"),
    ("description not string", _set("paymentRequirements.description", 5),
     "paymentRequirements.description"),
    ("missing payload scheme", _delete("paymentPayload.scheme"), "paymentPayload.scheme"),
    ("payload network not string", _set("paymentPayload.network", 84532),
     "paymentPayload.network"),
    ("missing payload", _delete("paymentPayload.payload"), "paymentPayload.payload"),
    ("payTo 19 bytes", _set("paymentRequirements.payTo", "0x" + "ab" * 19),
     "paymentRequirements.payTo"),
]


@pytest.mark.parametrize(("mutate", "field"), [(m, f) for _, m, f in MALFORMED_V1],
                         ids=[name for name, _, _ in MALFORMED_V1])
def test_malformed_v1_body_names_the_field(mutate: Callable[[dict[str, Any]], None],
                                           field: str) -> None:
    body = _v1()
    mutate(body)
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert err.value.field == field


@pytest.mark.parametrize("body", [[], "x", None, 1], ids=repr)
def test_non_object_body_is_bad_request(body: object) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert err.value.field == "body"


def test_v1_amount_field_is_max_amount_required_not_amount() -> None:
    body = _v1()
    body["paymentRequirements"] = requirements_v1(maxAmountRequired="5")
    body["paymentRequirements"]["amount"] = "7"
    assert parse_request(body).requirements.amount == 5


def test_v2_requirements_ignore_v1_amount_field() -> None:
    body = _v2()
    body["paymentRequirements"] = requirements_v2()
    del body["paymentRequirements"]["amount"]
    body["paymentRequirements"]["maxAmountRequired"] = "10000"
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert err.value.field == "paymentRequirements.amount"

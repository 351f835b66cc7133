"""Malformed `/verify` and `/settle` requests: HTTP 400 `{"error": "invalid_request", "field",
"message"}` naming the offending JSON path; never a 500, never a stack trace, and the service keeps
answering valid requests.

The table mutates one thing in an otherwise valid, really signed body (the control test checks that
the unmutated body is valid), so each 400 is caused by that one thing.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from harness import (
    USDC,
    DevChain,
    RunningFacilitator,
    body_v1,
    body_v2,
    requirements,
    requirements_v1,
    sign_authorization,
)

MAX_BODY = 64 * 1024
AUTH = "paymentPayload.payload.authorization"


@pytest.fixture(scope="module")
async def payer(chain: DevChain) -> LocalAccount:
    return await chain.new_payer()


# One facilitator for the whole table, `module_facilitator` (tests/conftest.py: its own
# database): a malformed request changes no state, and sharing it also proves that the service
# survives every case in a row.


def valid_v2(payer: LocalAccount) -> dict[str, Any]:
    pay_to = Account.create().address
    reqs = requirements(pay_to, 10_000)
    return body_v2(sign_authorization(payer, to=pay_to, value=10_000,
                                      valid_before=int(time.time()) + 600),
                   reqs, accepted=copy.deepcopy(reqs))  # not aliased: cases mutate one copy


def valid_v1(payer: LocalAccount) -> dict[str, Any]:
    pay_to = Account.create().address
    return body_v1(sign_authorization(payer, to=pay_to, value=10_000,
                                      valid_before=int(time.time()) + 600),
                   requirements_v1(pay_to, 10_000))


def _bad_checksum(address: str) -> str:
    """Flip the case of one letter of a checksummed address: mixed case, wrong checksum."""
    body = address[2:]
    i = next(i for i, c in enumerate(body) if c.isalpha())
    return "0x" + body[:i] + body[i].swapcase() + body[i + 1:]


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


# Each case turns a valid body (dict) into the raw request bytes.
Mutation = Callable[[dict[str, Any]], bytes]


def raw(data: bytes) -> Mutation:
    return lambda _body: data


def set_path(path: str, value: Any) -> Mutation:
    """Set (or, with value DELETE, remove) one member; `path` is dotted, as the `field` names it."""
    def mutate(body: dict[str, Any]) -> bytes:
        body = copy.deepcopy(body)
        *parents, last = path.split(".")
        node = body
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return _dumps(body)
    return mutate


def both_versions(value: Any) -> Mutation:
    """Top-level and paymentPayload x402Version both set to `value` (or both removed)."""
    def mutate(body: dict[str, Any]) -> bytes:
        body = copy.deepcopy(body)
        for node in (body, body["paymentPayload"]):
            if value is DELETE:
                del node["x402Version"]
            else:
                node["x402Version"] = value
        return _dumps(body)
    return mutate


def map_path(path: str, fn: Callable[[Any], Any]) -> Mutation:
    def mutate(body: dict[str, Any]) -> bytes:
        body = copy.deepcopy(body)
        *parents, last = path.split(".")
        node = body
        for key in parents:
            node = node[key]
        node[last] = fn(node[last])
        return _dumps(body)
    return mutate


def sized(total: int) -> Mutation:
    """A valid body grown to exactly `total` bytes with an ignored `padding` member."""
    def mutate(body: dict[str, Any]) -> bytes:
        overhead = len(_dumps({**body, "padding": ""}))
        data = _dumps({**body, "padding": "x" * (total - overhead)})
        assert len(data) == total
        return data
    return mutate


def nested_extension(depth: int) -> Mutation:
    """A valid body whose (free-form) `paymentPayload.extensions` nests `depth` levels, under
    the size limit."""
    def mutate(body: dict[str, Any]) -> bytes:
        text = _dumps(body).decode()
        deep = '{"a":' * depth + "1" + "}" * depth
        marker = '"paymentPayload": {'
        assert marker in text
        return text.replace(marker, marker + '"extensions": ' + deep + ", ", 1).encode()
    return mutate


DELETE = object()
_EIGHT_HEX = "0x" + "ab" * 20

V2_CASES: list[tuple[str, Mutation, str]] = [
    ("not-json", raw(b"{not json"), "body"),
    ("empty-body", raw(b""), "body"),
    ("invalid-utf8", raw(b"\xff\xfe{}"), "body"),
    ("json-array", raw(b"[]"), "body"),
    ("json-string", raw(b'"verify"'), "body"),
    ("json-null", raw(b"null"), "body"),
    ("deeply-nested-array", raw(b"[" * 30_000 + b"]" * 30_000), "body"),
    ("deeply-nested-extension", nested_extension(5_000), "body"),
    ("64KiB-plus-one", sized(MAX_BODY + 1), "body"),
    ("over-64KiB", sized(4 * MAX_BODY), "body"),
    # The authoritative version is paymentPayload.x402Version; the top-level copy (sent by the
    # SDK clients, omitted in the spec's examples) is optional but must be well-formed and agree.
    ("missing-both-x402Version", both_versions(DELETE), "paymentPayload.x402Version"),
    ("x402Version-string", set_path("x402Version", "2"), "x402Version"),
    ("x402Version-bool", set_path("x402Version", True), "x402Version"),
    ("x402Version-float", set_path("x402Version", 2.0), "x402Version"),
    ("x402Version-huge", set_path("x402Version", 1_001), "x402Version"),
    ("x402Version-disagrees", set_path("paymentPayload.x402Version", 1), "x402Version"),
    ("payload-x402Version-string", both_versions("2"), "paymentPayload.x402Version"),
    ("payload-x402Version-bool", both_versions(True), "paymentPayload.x402Version"),
    ("payload-x402Version-huge", both_versions(1_001), "paymentPayload.x402Version"),
    ("missing-paymentPayload", set_path("paymentPayload", DELETE), "paymentPayload"),
    ("paymentPayload-string", set_path("paymentPayload", "{}"), "paymentPayload"),
    ("missing-paymentRequirements", set_path("paymentRequirements", DELETE),
     "paymentRequirements"),
    ("paymentRequirements-null", set_path("paymentRequirements", None), "paymentRequirements"),
    ("paymentRequirements-array", set_path("paymentRequirements", []), "paymentRequirements"),
    ("missing-accepted", set_path("paymentPayload.accepted", DELETE),
     "paymentPayload.accepted"),
    ("missing-payload", set_path("paymentPayload.payload", DELETE), "paymentPayload.payload"),
    ("missing-scheme", set_path("paymentRequirements.scheme", DELETE),
     "paymentRequirements.scheme"),
    ("network-number", set_path("paymentRequirements.network", 84532),
     "paymentRequirements.network"),
    ("amount-plus", set_path("paymentRequirements.amount", "+10"), "paymentRequirements.amount"),
    ("amount-space", set_path("paymentRequirements.amount", " 10"), "paymentRequirements.amount"),
    ("amount-trailing-space", set_path("paymentRequirements.amount", "10 "),
     "paymentRequirements.amount"),
    ("amount-underscore", set_path("paymentRequirements.amount", "1_0"),
     "paymentRequirements.amount"),
    ("amount-exponent", set_path("paymentRequirements.amount", "1e3"),
     "paymentRequirements.amount"),
    ("amount-leading-zero", set_path("paymentRequirements.amount", "010"),
     "paymentRequirements.amount"),
    ("amount-negative", set_path("paymentRequirements.amount", "-1"),
     "paymentRequirements.amount"),
    ("amount-empty", set_path("paymentRequirements.amount", ""), "paymentRequirements.amount"),
    ("amount-fullwidth", set_path("paymentRequirements.amount", "\uff11\uff10"),
     "paymentRequirements.amount"),
    ("amount-hex", set_path("paymentRequirements.amount", "0x10"), "paymentRequirements.amount"),
    ("amount-number", set_path("paymentRequirements.amount", 10_000),
     "paymentRequirements.amount"),
    ("amount-over-uint256", set_path("paymentRequirements.amount", str(2**256)),
     "paymentRequirements.amount"),
    ("accepted-amount-plus", set_path("paymentPayload.accepted.amount", "+10000"),
     "paymentPayload.accepted.amount"),
    ("value-leading-zero", set_path(f"{AUTH}.value", "010000"), f"{AUTH}.value"),
    ("value-plus", set_path(f"{AUTH}.value", "+10000"), f"{AUTH}.value"),
    ("value-space", set_path(f"{AUTH}.value", " 10000"), f"{AUTH}.value"),
    ("value-exponent", set_path(f"{AUTH}.value", "1e4"), f"{AUTH}.value"),
    ("value-number", set_path(f"{AUTH}.value", 10_000), f"{AUTH}.value"),
    ("validAfter-negative", set_path(f"{AUTH}.validAfter", "-1"), f"{AUTH}.validAfter"),
    ("validBefore-number", map_path(f"{AUTH}.validBefore", int), f"{AUTH}.validBefore"),
    ("payTo-short", set_path("paymentRequirements.payTo", "0x1234"), "paymentRequirements.payTo"),
    ("payTo-21-bytes", set_path("paymentRequirements.payTo", _EIGHT_HEX + "ab"),
     "paymentRequirements.payTo"),
    ("payTo-no-prefix", set_path("paymentRequirements.payTo", "ab" * 20),
     "paymentRequirements.payTo"),
    ("payTo-not-hex", set_path("paymentRequirements.payTo", "0x" + "zz" * 20),
     "paymentRequirements.payTo"),
    ("asset-bad-checksum", set_path("paymentRequirements.asset", _bad_checksum(USDC)),
     "paymentRequirements.asset"),
    ("from-bad-checksum", map_path(f"{AUTH}.from", _bad_checksum), f"{AUTH}.from"),
    ("to-number", set_path(f"{AUTH}.to", 1), f"{AUTH}.to"),
    ("nonce-31-bytes", set_path(f"{AUTH}.nonce", "0x" + "11" * 31), f"{AUTH}.nonce"),
    ("nonce-33-bytes", set_path(f"{AUTH}.nonce", "0x" + "11" * 33), f"{AUTH}.nonce"),
    ("nonce-odd-digits", set_path(f"{AUTH}.nonce", "0x" + "1" * 63), f"{AUTH}.nonce"),
    ("signature-not-hex", set_path("paymentPayload.payload.signature", "0xnothex"),
     "paymentPayload.payload.signature"),
    ("signature-no-prefix", map_path("paymentPayload.payload.signature", lambda s: s[2:]),
     "paymentPayload.payload.signature"),
    ("signature-odd-digits", map_path("paymentPayload.payload.signature", lambda s: s[:-1]),
     "paymentPayload.payload.signature"),
    ("signature-missing", set_path("paymentPayload.payload.signature", DELETE),
     "paymentPayload.payload.signature"),
    ("authorization-missing", set_path(f"{AUTH}", DELETE), AUTH),
    ("authorization-string", set_path(f"{AUTH}", "{}"), AUTH),
    ("maxTimeoutSeconds-string", set_path("paymentRequirements.maxTimeoutSeconds", "300"),
     "paymentRequirements.maxTimeoutSeconds"),
    ("maxTimeoutSeconds-negative", set_path("paymentRequirements.maxTimeoutSeconds", -1),
     "paymentRequirements.maxTimeoutSeconds"),
    ("maxTimeoutSeconds-float", set_path("paymentRequirements.maxTimeoutSeconds", 300.5),
     "paymentRequirements.maxTimeoutSeconds"),
    ("extra-array", set_path("paymentRequirements.extra", ["USDC", "2"]),
     "paymentRequirements.extra"),
]

V1_CASES: list[tuple[str, Mutation, str]] = [
    ("v1-maxAmountRequired-plus", set_path("paymentRequirements.maxAmountRequired", "+10000"),
     "paymentRequirements.maxAmountRequired"),
    ("v1-maxAmountRequired-leading-zero",
     set_path("paymentRequirements.maxAmountRequired", "010000"),
     "paymentRequirements.maxAmountRequired"),
    ("v1-missing-resource", set_path("paymentRequirements.resource", DELETE),
     "paymentRequirements.resource"),
    ("v1-extra-bad-json-string", set_path("paymentRequirements.extra", "{name: USDC"),
     "paymentRequirements.extra"),
    ("v1-missing-payload-scheme", set_path("paymentPayload.scheme", DELETE),
     "paymentPayload.scheme"),
    ("v1-value-plus", set_path(f"{AUTH}.value", "+10000"), f"{AUTH}.value"),
    ("v1-nonce-31-bytes", set_path(f"{AUTH}.nonce", "0x" + "11" * 31), f"{AUTH}.nonce"),
]

CASES = [(i, m, f, valid_v2) for i, m, f in V2_CASES] + \
    [(i, m, f, valid_v1) for i, m, f in V1_CASES]


async def _assert_still_serving(service: RunningFacilitator, payer: LocalAccount) -> None:
    verdict = await service.verify(valid_v2(payer))
    assert verdict == {"isValid": True, "payer": payer.address}


def _assert_invalid_request(response: Any, field: str) -> None:
    assert "Traceback" not in response.text
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["error"] == "invalid_request", answer
    assert answer["field"] == field, answer
    assert isinstance(answer["message"], str) and answer["message"], answer
    assert set(answer) == {"error", "field", "message"}, answer


async def test_unmutated_bodies_are_valid(module_facilitator, payer):
    """Control: the bodies the table mutates are accepted as they are, and so is a body without
    the optional top-level x402Version (the spec's examples omit it)."""
    for make in (valid_v2, valid_v1):
        assert await module_facilitator.verify(make(payer)) == {"isValid": True,
                                                                "payer": payer.address}
        body = make(payer)
        del body["x402Version"]
        assert await module_facilitator.verify(body) == {"isValid": True, "payer": payer.address}


@pytest.mark.parametrize("endpoint", ["/verify", "/settle"])
@pytest.mark.parametrize(("mutate", "field", "make"), [(m, f, mk) for _, m, f, mk in CASES],
                         ids=[i for i, _, _, _ in CASES])
async def test_malformed_request_is_400_naming_the_field(module_facilitator, payer, endpoint,
                                                         mutate, field, make):
    data = mutate(make(payer))
    response = await module_facilitator.http.post(endpoint, content=data,
                                                  headers={"content-type": "application/json"})
    _assert_invalid_request(response, field)
    await _assert_still_serving(module_facilitator, payer)


@pytest.mark.parametrize("endpoint", ["/verify", "/settle"])
async def test_oversized_chunked_body_without_content_length(module_facilitator, payer, endpoint):
    """No Content-Length to refuse up front: the limit must hold while reading."""
    data = sized(MAX_BODY + 1)(valid_v2(payer))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]

    response = await module_facilitator.http.post(endpoint, content=chunks(),
                                                  headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    _assert_invalid_request(response, "body")
    await _assert_still_serving(module_facilitator, payer)


async def test_body_of_exactly_64KiB_is_accepted(module_facilitator, payer):
    data = sized(MAX_BODY)(valid_v2(payer))
    response = await module_facilitator.http.post("/verify", content=data,
                                                  headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json() == {"isValid": True, "payer": payer.address}


@pytest.mark.parametrize("key", ["garbage", "0x1234", "0x" + "zz" * 32, "0x" + "ab" * 33,
                                 "12345678-1234-1234-1234-12345678901g", "%20", "..%2F..%2Fetc"])
async def test_settlement_status_with_garbage_id_is_400_naming_id(module_facilitator, key):
    response = await module_facilitator.http.get(f"/settle/{key}")
    _assert_invalid_request(response, "id")


@pytest.mark.parametrize("key", ["0b1c2d3e-0000-4000-8000-000000000000", "0x" + "ab" * 32])
async def test_settlement_status_of_unknown_id_is_404_json(module_facilitator, key):
    response = await module_facilitator.http.get(f"/settle/{key}")
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "not_found"
    assert "Traceback" not in response.text


@pytest.mark.parametrize(("method", "path", "statuses"), [
    ("GET", "/nope", {404}),
    ("POST", "/nope", {404}),
    ("POST", "/verify/extra", {404}),
    ("GET", "/settle/a/b", {404}),
    ("GET", "/verify", {405}),
    ("PUT", "/settle", {405}),
    ("DELETE", "/supported", {405}),
])
async def test_unknown_routes_and_methods_are_never_500(module_facilitator, payer, method, path,
                                                        statuses):
    response = await module_facilitator.http.request(method, path, content=b"{}")
    assert response.status_code in statuses, (response.status_code, response.text)
    assert "Traceback" not in response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(response.json(), dict)
    await _assert_still_serving(module_facilitator, payer)


async def test_service_answers_after_the_whole_table(module_facilitator, payer):
    """Runs last in this module: every malformed request above went to this same service."""
    await _assert_still_serving(module_facilitator, payer)
    health = await module_facilitator.http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}

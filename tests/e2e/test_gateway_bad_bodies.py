"""The devnet TEE gateway answers a malformed chat body with 400 `{"error"}`, never a 500 (it
shares the devnet's event loop, and its docstring promises 400s), and still serves good ones."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from gateway_fixtures import GatewayFactory, chat_body, gateways

from facilitator.devnet.gateway import PAYMENT_REQUIRED_HEADER, TeeGateway


@pytest.fixture
async def gateway(facilitator_factory) -> AsyncIterator[TeeGateway]:
    factory: GatewayFactory
    async with gateways(facilitator_factory) as factory:
        yield await factory()


def tool(function: Any) -> dict[str, Any]:
    return {"type": "function", "function": function}


BAD_BODIES = {
    "text part not a string": chat_body(
        messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    "tools[0].function a string": chat_body(tools=[tool("abc")]),
    "tools[0].function.name a number": chat_body(tools=[tool({"name": 7})]),
    "tool_choice.function a string": chat_body(tools=[tool({"name": "f"})],
                                               tool_choice={"type": "function",
                                                            "function": "x"}),
    "temperature beyond a float": chat_body(temperature=10**400),
}
RAW_BODIES = {
    "an integer of 5000 digits": b'{"model": "gpt-4.1", "max_tokens": ' + b"9" * 5000 + b"}",
    "not JSON": b"{nope",
    "not UTF-8": b'{"model": "\xff"}',
}


async def expect_400(gateway: TeeGateway, raw: bytes) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.chat_url, data=raw, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400, await response.text()
        assert isinstance((await response.json())["error"], str)


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
async def test_malformed_chat_bodies_are_400(gateway: TeeGateway, body: dict[str, Any]) -> None:
    await expect_400(gateway, json.dumps(body).encode())


@pytest.mark.parametrize("raw", list(RAW_BODIES.values()), ids=list(RAW_BODIES))
async def test_unreadable_chat_bodies_are_400(gateway: TeeGateway, raw: bytes) -> None:
    await expect_400(gateway, raw)


async def test_a_good_body_next_to_them_is_still_served(gateway: TeeGateway) -> None:
    """Well-formed tool bodies reach the payment step (an unpaid request gets the 402)."""
    async with aiohttp.ClientSession() as http:
        for body in (chat_body(), chat_body(tools=[tool({"name": "calculator"})]),
                     chat_body(tools=[tool({"name": "f"})],
                               tool_choice={"type": "function", "function": {"name": "f"}})):
            async with http.post(gateway.chat_url, json=body) as response:
                assert response.status == 402 and PAYMENT_REQUIRED_HEADER in response.headers

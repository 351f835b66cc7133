"""Shared pieces of the TEE-gateway end-to-end tests: gateway emulators in front of a running
facilitator, the official x402 SDK as an `upto` payer, a `/settle_data` recorder, and the
on-chain and metrics reads the assertions need (database reads: `harness.db_fetch`).

The fixtures wrapping `gateways` and `settle_data_sinks` (`gateway_factory`, `sink_factory`) are
in tests/e2e/conftest.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount
from harness import OPG, DevChain, RunningFacilitator, metric_value, wait_until
from x402 import x402Client
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.upto import UptoEvmClientScheme

from facilitator.devnet.gateway import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SESSION_HEADER,
    SETTLEMENT_TYPE_HEADER,
    TeeGateway,
)

NETWORK = "eip155:84532"
MODEL = "gpt-4.1"


def chat_body(text: str = "What is 2 + 2?", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0,
            **extra}


# -- gateways --------------------------------------------------------------------------------------

GatewayFactory = Callable[..., Awaitable[TeeGateway]]


@asynccontextmanager
async def gateways(facilitator_factory: Any) -> AsyncIterator[GatewayFactory]:
    """Start gateway emulators (default: in front of a fresh facilitator, a fresh payee, a 0.3 s
    idle timeout); all stopped on exit. Use inside a test's fixture, before the facilitators
    are stopped."""
    running: list[TeeGateway] = []

    async def make(facilitator: RunningFacilitator | None = None, **options: Any) -> TeeGateway:
        facilitator = facilitator or await facilitator_factory()
        options.setdefault("pay_to", Account.create().address)
        options.setdefault("idle_timeout_s", 0.3)
        gateway = TeeGateway(facilitator.url, **options)
        running.append(gateway)
        return await gateway.start()

    try:
        yield make
    finally:
        for gateway in reversed(running):
            await gateway.stop()


# -- the official x402 SDK as the paying client ------------------------------------------------


def sdk_upto_client(payer: LocalAccount) -> x402Client:
    """x402 2.25.0's upto client (spend controls off: OPG is not one of its default assets)."""
    client = x402Client()
    client.register(NETWORK, UptoEvmClientScheme(payer))
    client.set_spend_controls(False)
    return client


@dataclass
class SdkChatClient:
    """Session handling around the SDK client, as OpenGradient's og-x402 transport does it: send
    the cached `X-Upto-Session`; on a 402 drop it and re-challenge; pay a `PAYMENT-REQUIRED`."""

    client: x402Client
    http: httpx.AsyncClient
    session: str | None = None
    payments: int = 0

    async def chat(self, url: str, body: dict[str, Any], settlement_type: str | None = None
                   ) -> httpx.Response:
        headers = {SETTLEMENT_TYPE_HEADER: settlement_type} if settlement_type else {}
        if self.session:
            response = await self.http.post(url, json=body,
                                            headers={**headers, SESSION_HEADER: self.session})
            if response.status_code != 402:
                return response
            self.session = None
        response = await self.http.post(url, json=body, headers=headers)
        if response.status_code == 402:
            required = decode_payment_required_header(response.headers[PAYMENT_REQUIRED_HEADER])
            payload = await self.client.create_payment_payload(required)
            self.payments += 1
            response = await self.http.post(url, json=body, headers={
                **headers, PAYMENT_SIGNATURE_HEADER: encode_payment_signature_header(payload)})
        if response.status_code == 200:
            self.session = response.headers.get(SESSION_HEADER) or self.session
        return response


# -- a /settle_data recorder -----------------------------------------------------------------------


@dataclass
class SettleDataSink:
    """Records every `/settle_data` post. With `forward_to`, the post is forwarded there and that
    answer is returned; otherwise it answers as OpenGradient's facilitator does (202 with a
    queued job, `{"settlementJob": null}` for private)."""

    forward_to: str | None = None
    posts: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> SettleDataSink:
        app = web.Application()
        app.router.add_post("/settle_data", self._settle_data)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _settle_data(self, request: web.Request) -> web.Response:
        mode = request.headers.get("x-settlement-type")
        data = request.headers.get("x-settlement-data")
        record: dict[str, Any] = {"type": mode, "header": data, "body": await request.read(),
                                  "payload": json.loads(base64.b64decode(data)) if data else None}
        self.posts.append(record)
        if self.forward_to is not None:
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(self.forward_to + "/settle_data", headers={
                    "x-settlement-type": mode or "", "x-settlement-data": data or ""})
            record["forwarded"] = (answer.status_code, answer.json())
            return web.json_response(answer.json(), status=answer.status_code)
        if mode == "private":
            return web.json_response({"settlementJob": None}, status=202)
        job = {"jobId": f"data-{len(self.posts)}", "status": "queued", "settlementType": mode}
        return web.json_response({"settlementJob": job}, status=202)


@asynccontextmanager
async def settle_data_sinks() -> AsyncIterator[Callable[..., Awaitable[SettleDataSink]]]:
    """Start `/settle_data` recorders; all stopped on exit."""
    sinks: list[SettleDataSink] = []

    async def make(forward_to: str | None = None) -> SettleDataSink:
        sink = SettleDataSink(forward_to)
        sinks.append(sink)
        return await sink.start()

    try:
        yield make
    finally:
        for sink in sinks:
            await sink.stop()


# -- reads for the assertions ------------------------------------------------------------------


async def opg_transfers_to(chain: DevChain, pay_to: str) -> list[tuple[str, int, str]]:
    """(from, amount, tx hash) of every OPG Transfer to `pay_to`."""
    logs = await chain.transfer_logs_to(pay_to, OPG)
    return [("0x" + log["topics"][1][-40:], int(log["data"], 16), log["transactionHash"])
            for log in logs]


async def metric_total(facilitator: RunningFacilitator, name: str, **labels: str) -> float:
    """Sum of the samples `name` on the facilitator's /metrics whose labels include `labels`."""
    return metric_value((await facilitator.http.get("/metrics")).text, name, **labels)


async def settled(gateway: TeeGateway, session_id: str, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until the gateway's reaper finished settling the session."""
    async def done() -> bool:
        return gateway.sessions[session_id].state not in ("open", "settling")
    await wait_until(done, timeout_s=timeout_s, what=f"session {session_id} to be settled",
                     detail=lambda: f"state {gateway.sessions[session_id].state!r}")

"""A real HTTP hop between the service and a real node that can be told to fail: while a method
is in `failing`, every request (single or batch) that contains it is answered HTTP 503 without
reaching the node. Everything else is forwarded byte for byte. Nothing is mocked: the node, the
service's JSON-RPC client and its retries are the real ones; only the network misbehaves."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from facilitator.devnet.anvil import free_port


class RpcFaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failing: set[str] = set()
        self.refused: Counter[str] = Counter()  # method -> requests answered 503
        self._port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> RpcFaultProxy:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        hit = _methods(orjson.loads(body)) & self.failing
        if hit:
            self.refused.update(hit)
            return web.Response(status=503, text="injected fault")
        assert self._session is not None
        async with self._session.post(self.upstream, data=body,
                                      headers={"Content-Type": "application/json"}) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type="application/json")


def _methods(payload: Any) -> set[str]:
    calls = payload if isinstance(payload, list) else [payload]
    return {c.get("method", "") for c in calls if isinstance(c, dict)}

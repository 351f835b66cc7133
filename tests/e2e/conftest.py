"""End-to-end fixtures: resource servers built from the official x402 SDK, served by uvicorn;
TEE gateway emulators and `/settle_data` recorders (gateway_fixtures.py).

The SDK is the independent party here. Its FastAPI middleware fetches `GET /supported`
*synchronously* when it is built, and our facilitator runs in the test's event loop, so every
resource server is built in a worker thread and served by uvicorn in a background thread with its
own event loop, on a socket bound to a free 127.0.0.1 port. Readiness is polled (no fixed sleeps).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from gateway_fixtures import GatewayFactory, SettleDataSink, gateways, settle_data_sinks
from harness import wait_until


@dataclass
class ThreadedServer:
    """An ASGI app served by uvicorn in a daemon thread (its own event loop)."""

    build: Callable[[], Any]
    name: str = "resource-server"
    app: Any = None
    url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _crash: list[BaseException] = field(default_factory=list)

    async def start(self) -> ThreadedServer:
        # Building may block on HTTP (the SDK's GET /supported): keep it off our loop, which is
        # the loop our facilitator answers on.
        self.app = await asyncio.to_thread(self.build)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", loop="asyncio",
                                access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=self.name,
                                        daemon=True)
        self._thread.start()

        async def ready() -> bool:
            if self._crash or not self._thread.is_alive():
                raise AssertionError(f"{self.name} died while starting: {self._crash!r}")
            return self._server.started

        await wait_until(ready, timeout_s=15, interval_s=0.01, what=f"{self.name} to listen")
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting test
            self._crash.append(exc)
        finally:
            sock.close()

    async def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        # Joining must not block our loop: the server may still be waiting for our facilitator.
        await asyncio.to_thread(self._thread.join, 15)
        if self._thread.is_alive():
            self._server.force_exit = True
            await asyncio.to_thread(self._thread.join, 5)
        assert not self._thread.is_alive(), f"{self.name} did not stop"


ServerFactory = Callable[[Callable[[], Any]], Awaitable[ThreadedServer]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    """Start resource servers from app builders (called in a worker thread); all stopped at the
    end of the test."""
    running: list[ThreadedServer] = []

    async def start(build: Callable[[], Any], name: str = "resource-server") -> ThreadedServer:
        server = ThreadedServer(build, name)
        running.append(server)
        return await server.start()

    yield start
    for server in reversed(running):
        await server.stop()


@pytest.fixture
async def gateway_factory(facilitator_factory: Any) -> AsyncIterator[GatewayFactory]:
    """Start TEE gateway emulators (`gateway_fixtures.gateways`); all stopped at the end of the
    test, before its facilitators."""
    async with gateways(facilitator_factory) as make:
        yield make


@pytest.fixture
async def sink_factory() -> AsyncIterator[Callable[..., Awaitable[SettleDataSink]]]:
    """Start `/settle_data` recorders (`gateway_fixtures.settle_data_sinks`); all stopped at the
    end of the test."""
    async with settle_data_sinks() as make:
        yield make

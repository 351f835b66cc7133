"""The batching JSON-RPC client against a real local HTTP server that answers as each test needs:
no caller waits forever, `max_batch` bounds every HTTP request, the outstanding-call bound counts
calls until their send finishes, waiting for a connection slot is bounded, and only HTTP
429/5xx are retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from facilitator.adapters.jsonrpc import JsonRpcClient
from facilitator.adapters.metrics import Metrics
from facilitator.ports import RpcError, RpcUnavailable

Handler = Callable[[Any], Awaitable[tuple[int, Any]]]


class FakeNode:
    """An HTTP JSON-RPC endpoint whose answers the test chooses; records every request body."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.handler: Handler = self.echo
        self.stopping = asyncio.Event()  # handlers that hang wait for this
        self._runner: web.AppRunner | None = None
        self.url = ""

    @staticmethod
    async def echo(body: Any) -> tuple[int, Any]:
        return 200, [{"jsonrpc": "2.0", "id": c["id"], "result": c["params"]} for c in body]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        status, payload = await self.handler(body)
        if isinstance(payload, (bytes, str)):
            return web.Response(status=status, body=payload)
        return web.json_response(payload, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the chosen free port
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        self.stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def node() -> AsyncIterator[FakeNode]:
    server = FakeNode()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_client(node: FakeNode) -> AsyncIterator[Callable[..., Awaitable[JsonRpcClient]]]:
    made: list[JsonRpcClient] = []

    async def make(**options: Any) -> JsonRpcClient:
        client = JsonRpcClient([node.url], chain="test", metrics=Metrics(), **options)
        await client.start()
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def bounded(awaitable: Awaitable[Any], seconds: float = 5.0) -> Any:
    """Fails the test (instead of hanging it) if the client never answers."""
    return await asyncio.wait_for(awaitable, seconds)


async def test_a_non_integer_error_code_is_an_rpc_error_not_a_hang(node, make_client):
    async def odd(body: Any) -> tuple[int, Any]:
        return 200, [{"jsonrpc": "2.0", "id": c["id"], "error": {"code": "oops",
                                                                 "message": "bad"}}
                     for c in body]
    node.handler = odd
    client = await make_client()
    with pytest.raises(RpcError) as error:
        await bounded(client.request("eth_chainId", []))
    assert error.value.code == 0 and error.value.message == "bad"
    assert client.outstanding_calls == 0


async def test_an_unexpected_exception_while_delivering_settles_every_caller(node, make_client):
    client = await make_client()

    def broken(method: str, answer: dict[str, Any]) -> Any:
        raise KeyError("surprise")
    client._result = broken  # type: ignore[method-assign]  # noqa: SLF001 - inject a bug
    first = asyncio.ensure_future(client.request_many([("a", [1]), ("b", [2])]))
    second = asyncio.ensure_future(client.request("c", [3]))
    for caller in (first, second):
        with pytest.raises(RpcUnavailable, match="malformed answer"):
            await bounded(caller)
    assert client.outstanding_calls == 0


async def test_garbage_is_unavailable_after_bounded_retries(node, make_client):
    async def garbage(body: Any) -> tuple[int, Any]:
        return 200, b"this is not JSON"
    node.handler = garbage
    client = await make_client(retries=2)
    with pytest.raises(RpcUnavailable):
        await bounded(client.request("eth_blockNumber", []))
    assert len(node.bodies) == 3


async def test_close_during_a_retry_backoff_fails_the_waiting_caller(node, make_client):
    async def busy(body: Any) -> tuple[int, Any]:
        return 503, {"error": "busy"}
    node.handler = busy
    client = await make_client(retries=50)
    caller = asyncio.ensure_future(client.request("eth_blockNumber", []))
    while not node.bodies:
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(RpcUnavailable, match="closed"):
        await bounded(caller, 1.0)
    with pytest.raises(RpcUnavailable, match="closed"):
        await client.request("eth_blockNumber", [])


async def test_a_large_group_is_split_into_max_batch_requests_answered_in_order(node,
                                                                               make_client):
    client = await make_client(max_batch=100)
    answers = await bounded(client.request_many([("eth_getBlockByNumber", [i])
                                                 for i in range(250)]))
    assert answers == [[i] for i in range(250)]
    assert sorted(len(b) for b in node.bodies) == [50, 100, 100]
    assert all(len(b) <= 100 for b in node.bodies)


async def test_groups_share_a_request_only_within_max_batch(node, make_client):
    client = await make_client(max_batch=100)
    first, second = await bounded(asyncio.gather(
        client.request_many([("a", [i]) for i in range(60)]),
        client.request_many([("b", [i]) for i in range(60)])))
    assert first == [[i] for i in range(60)] and second == [[i] for i in range(60)]
    assert [len(b) for b in node.bodies] == [60, 60]


async def test_a_missing_answer_retries_only_its_group_and_keeps_others_aligned(node,
                                                                               make_client):
    dropped: list[bool] = []

    async def drop_first(body: Any) -> tuple[int, Any]:
        answers = (await FakeNode.echo(body))[1]
        if not dropped:
            dropped.append(True)
            answers = [a for a in answers if a["id"] != 0]
        return 200, answers
    node.handler = drop_first
    client = await make_client()
    first, second = await bounded(asyncio.gather(
        client.request_many([("a", ["a0"]), ("a", ["a1"])]),
        client.request_many([("b", ["b0"]), ("b", ["b1"])])))
    assert first == [["a0"], ["a1"]] and second == [["b0"], ["b1"]]


async def test_the_queue_bound_counts_calls_in_flight(node, make_client):
    release = asyncio.Event()

    async def slow(body: Any) -> tuple[int, Any]:
        await release.wait()
        return await FakeNode.echo(body)
    node.handler = slow
    client = await make_client(max_queued_calls=10, max_concurrent_requests=1, timeout_s=10)
    in_flight = asyncio.ensure_future(client.request_many([("a", [i]) for i in range(8)]))
    while not node.bodies:
        await asyncio.sleep(0.01)
    assert client.outstanding_calls == 8
    with pytest.raises(RpcUnavailable, match="queue full"):
        await client.request_many([("b", [i]) for i in range(5)])
    release.set()
    assert await bounded(in_flight) == [[i] for i in range(8)]
    assert client.outstanding_calls == 0
    assert await bounded(client.request_many([("b", [i]) for i in range(5)])) \
        == [[i] for i in range(5)]


async def test_waiting_for_a_connection_slot_is_bounded_by_the_timeout(node, make_client):
    async def stuck(body: Any) -> tuple[int, Any]:
        await node.stopping.wait()
        return await FakeNode.echo(body)
    node.handler = stuck
    client = await make_client(max_concurrent_requests=1, timeout_s=0.3, retries=0, max_batch=1)
    started = time.monotonic()
    results = await bounded(asyncio.gather(
        *(client.request("eth_blockNumber", [i]) for i in range(5)), return_exceptions=True))
    elapsed = time.monotonic() - started
    assert all(isinstance(r, RpcUnavailable) for r in results)
    assert elapsed < 1.2, f"five waits in line took {elapsed:.2f} s; each is bounded by 0.3 s"
    assert client.outstanding_calls == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
async def test_http_refusals_other_than_429_are_not_retried(node, make_client, status):
    async def refuse(body: Any) -> tuple[int, Any]:
        return status, {"error": "no"}
    node.handler = refuse
    client = await make_client(retries=3)
    with pytest.raises(RpcUnavailable, match=f"HTTP {status}"):
        await bounded(client.request("eth_blockNumber", []))
    assert len(node.bodies) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_http_429_and_5xx_are_retried_then_answered(node, make_client, status):
    async def flaky(body: Any) -> tuple[int, Any]:
        if len(node.bodies) < 3:
            return status, {"error": "later"}
        return await FakeNode.echo(body)
    node.handler = flaky
    client = await make_client(retries=3)
    assert await bounded(client.request("eth_blockNumber", ["x"])) == ["x"]
    assert len(node.bodies) == 3


async def test_a_whole_batch_error_object_is_unavailable_for_every_caller(node, make_client):
    async def rejected(body: Any) -> tuple[int, Any]:
        return 200, {"jsonrpc": "2.0", "id": None, "error": {"code": -32600,
                                                              "message": "batch too large"}}
    node.handler = rejected
    client = await make_client(retries=1)
    results = await bounded(asyncio.gather(client.request("a", []), client.request("b", []),
                                           return_exceptions=True))
    assert all(isinstance(r, RpcUnavailable) for r in results)
    assert client.outstanding_calls == 0

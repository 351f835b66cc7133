"""A thin, batching JSON-RPC client on aiohttp.

Why not web3.py here: it spends milliseconds of CPU per call, and /verify makes several calls.
Calls issued in the same event-loop iteration are coalesced into one HTTP batch, so 300
concurrent verifies cost a handful of HTTP requests, not 1,200.

Guarantees:
- `RpcError` means the node answered with an error (deterministic: a revert, "nonce too low");
  `RpcUnavailable` means no answer was obtained (timeout, refused, HTTP 429/5xx, garbage) and the
  outcome of a write is unknown. Callers never see a third kind of exception from here.
- Every wait is bounded: per-request timeout, bounded retries with jittered backoff (only for calls
  marked retryable), bounded concurrent HTTP requests, bounded queue.
- Error messages never contain the endpoint URL (it may embed an API key); endpoints are named
  `rpc0`, `rpc1`, ... in messages and metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from facilitator.adapters.metrics import Metrics
from facilitator.ports import RpcError, RpcUnavailable
from facilitator.invariant import invariant

RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})


@dataclass(slots=True)
class _Group:
    """The calls of one `request_many`: they travel together and resolve one future."""

    calls: Sequence[tuple[str, list[Any]]]
    retryable: bool
    future: asyncio.Future[list[Any]] = field(repr=False)
    attempts: int = 0


class JsonRpcClient:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        chain: str,
        metrics: Metrics,
        timeout_s: float = 5.0,
        max_batch: int = 100,
        max_concurrent_requests: int = 16,
        max_queued_calls: int = 20_000,
        retries: int = 3,
    ) -> None:
        invariant(urls, "at least one RPC URL")
        self._urls = list(urls)
        self._chain = chain
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._max_queued = max_queued_calls
        self._retries = retries
        self._queue: deque[_Group] = deque()
        self._queued_calls = 0
        self._flush_scheduled = False
        self._preferred = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, params: list[Any], *, retryable: bool = True) -> Any:
        """One call; raises `RpcError` or `RpcUnavailable`."""
        result = (await self.request_many([(method, params)], retryable=retryable))[0]
        if isinstance(result, RpcError):
            raise result
        return result

    async def request_many(
        self, calls: Sequence[tuple[str, list[Any]]], *, retryable: bool = True
    ) -> list[Any]:
        """Several calls in one round trip (with whatever else is asked in this loop iteration).
        Node errors are returned in place as `RpcError`; `RpcUnavailable` is raised when any
        call got no answer."""
        if self._queued_calls + len(calls) > self._max_queued:
            raise RpcUnavailable(f"{self._chain}: JSON-RPC queue full")
        loop = asyncio.get_running_loop()
        group = _Group(calls, retryable, loop.create_future())
        self._enqueue([group])
        return await group.future

    def _enqueue(self, groups: list[_Group]) -> None:
        self._queue.extend(groups)
        self._queued_calls += sum(len(g.calls) for g in groups)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue:
            batch: list[_Group] = []
            size = 0
            while self._queue and (
                    not batch or size + len(self._queue[0].calls) <= self._max_batch):
                group = self._queue.popleft()
                batch.append(group)
                size += len(group.calls)
            self._queued_calls -= size
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Group]) -> None:
        try:
            async with self._slots:
                answers = await self._post(batch)
        except RpcUnavailable as exc:
            self._retry_or_fail(batch, exc)
            return
        except asyncio.CancelledError:
            for group in batch:
                if not group.future.done():
                    group.future.set_exception(RpcUnavailable("client closed"))
            raise
        self._deliver(batch, answers)

    async def _post(self, batch: list[_Group]) -> dict[int, Any]:
        invariant(self._session is not None, "start() first")
        index = self._preferred
        body = [{"jsonrpc": "2.0", "id": n, "method": method, "params": params}
                for n, (method, params) in enumerate(c for g in batch for c in g.calls)]
        started = asyncio.get_running_loop().time()
        try:
            async with self._session.post(
                self._urls[index], data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise RpcUnavailable(f"{self._chain} rpc{index}: HTTP {resp.status}")
                payload = orjson.loads(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, OSError) as exc:
            self._rotate(index)
            raise RpcUnavailable(f"{self._chain} rpc{index}: {type(exc).__name__}") from None
        except RpcUnavailable:
            self._rotate(index)
            raise
        self._observe(body, asyncio.get_running_loop().time() - started)
        return self._index_answers(payload, index)

    def _index_answers(self, payload: Any, index: int) -> dict[int, Any]:
        if isinstance(payload, dict):  # some nodes answer a whole batch with one error object
            raise RpcUnavailable(f"{self._chain} rpc{index}: batch rejected: "
                                 f"{str(payload.get('error'))[:200]}")
        if not isinstance(payload, list):
            raise RpcUnavailable(f"{self._chain} rpc{index}: malformed batch answer")
        return {a["id"]: a for a in payload if isinstance(a, dict) and isinstance(a.get("id"), int)}

    def _deliver(self, batch: list[_Group], answers: dict[int, Any]) -> None:
        position = 0
        missing: list[_Group] = []
        for group in batch:
            results: list[Any] = []
            for method, _ in group.calls:
                answer = answers.get(position)
                position += 1
                if answer is None:
                    break
                results.append(self._result(method, answer))
            if len(results) != len(group.calls):
                missing.append(group)
            elif not group.future.done():
                group.future.set_result(results)
        if missing:
            self._retry_or_fail(missing, RpcUnavailable(
                f"{self._chain}: answer missing from batch"))

    def _result(self, method: str, answer: dict[str, Any]) -> Any:
        error = answer.get("error")
        if error is None:
            return answer.get("result")
        self._metrics.rpc_errors.labels(self._chain, method, "node_error").inc()
        if not isinstance(error, dict):
            return RpcError(0, str(error)[:1000])
        return RpcError(int(error.get("code", 0)), str(error.get("message", ""))[:1000],
                        error.get("data"))

    def _retry_or_fail(self, groups: list[_Group], error: RpcUnavailable) -> None:
        retry = []
        for group in groups:
            for method, _ in group.calls:
                self._metrics.rpc_errors.labels(self._chain, method, "transport").inc()
            group.attempts += 1
            if group.retryable and group.attempts <= self._retries:
                retry.append(group)
            elif not group.future.done():
                group.future.set_exception(error)
        if retry:
            delay = 0.05 * (2 ** (retry[0].attempts - 1)) * (0.5 + random.random())
            asyncio.get_running_loop().call_later(delay, self._requeue, retry)

    def _requeue(self, groups: list[_Group]) -> None:
        self._enqueue([g for g in groups if not g.future.done()])

    def _rotate(self, failed_index: int) -> None:
        if self._preferred == failed_index:
            self._preferred = (failed_index + 1) % len(self._urls)

    def _observe(self, body: list[dict[str, Any]], elapsed: float) -> None:
        self._metrics.rpc_batch_size.labels(self._chain).observe(len(body))
        for call in body:
            self._metrics.rpc_seconds.labels(self._chain, call["method"]).observe(elapsed)

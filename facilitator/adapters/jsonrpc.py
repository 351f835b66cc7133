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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from facilitator.adapters.metrics import Metrics
from facilitator.ports import RpcError, RpcUnavailable

RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})


@dataclass(slots=True)
class _Call:
    method: str
    params: list[Any]
    retryable: bool
    future: asyncio.Future[Any] = field(repr=False)
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
        assert urls, "at least one RPC URL"
        self._urls = list(urls)
        self._chain = chain
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._max_queued = max_queued_calls
        self._retries = retries
        self._queue: list[_Call] = []
        self._flush_scheduled = False
        self._preferred = 0
        self._next_id = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode())

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
        """Several calls in one round trip where possible. Node errors are returned in place as
        `RpcError` instances; `RpcUnavailable` is raised if any call got no answer."""
        if len(self._queue) + len(calls) > self._max_queued:
            raise RpcUnavailable(f"{self._chain}: JSON-RPC queue full")
        loop = asyncio.get_running_loop()
        pending = [_Call(m, p, retryable, loop.create_future()) for m, p in calls]
        self._queue.extend(pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        results = await asyncio.gather(*(c.future for c in pending), return_exceptions=True)
        for result in results:
            if isinstance(result, RpcUnavailable):
                raise result
            if isinstance(result, BaseException) and not isinstance(result, RpcError):
                raise result
        return results

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            async with self._slots:
                answers = await self._post(batch)
        except RpcUnavailable as exc:
            self._retry_or_fail(batch, exc)
            return
        except asyncio.CancelledError:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(RpcUnavailable("client closed"))
            raise
        self._deliver(batch, answers)

    async def _post(self, batch: list[_Call]) -> dict[int, dict[str, Any]]:
        assert self._session is not None, "start() first"
        index = self._preferred
        ids = {}
        body = []
        for call in batch:
            self._next_id += 1
            ids[self._next_id] = call
            body.append({"jsonrpc": "2.0", "id": self._next_id, "method": call.method,
                         "params": call.params})
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
        elapsed = asyncio.get_running_loop().time() - started
        self._observe(batch, elapsed)
        return self._index_answers(payload, ids, index)

    def _index_answers(self, payload: Any, ids: dict[int, _Call], index: int) -> dict[int, Any]:
        if isinstance(payload, dict):  # some nodes answer a whole batch with one error object
            raise RpcUnavailable(f"{self._chain} rpc{index}: batch rejected: "
                                 f"{str(payload.get('error'))[:200]}")
        if not isinstance(payload, list):
            raise RpcUnavailable(f"{self._chain} rpc{index}: malformed batch answer")
        by_call: dict[int, Any] = {}
        for answer in payload:
            if isinstance(answer, dict) and answer.get("id") in ids:
                by_call[id(ids[answer["id"]])] = answer
        return by_call

    def _deliver(self, batch: list[_Call], answers: dict[int, Any]) -> None:
        missing = []
        for call in batch:
            answer = answers.get(id(call))
            if answer is None:
                missing.append(call)
            elif "error" in answer and answer["error"] is not None:
                err = answer["error"]
                self._metrics.rpc_errors.labels(self._chain, call.method, "node_error").inc()
                if not call.future.done():
                    call.future.set_result(RpcError(int(err.get("code", 0)),
                                                    str(err.get("message", ""))[:1000],
                                                    err.get("data")))
            elif not call.future.done():
                call.future.set_result(answer.get("result"))
        if missing:
            self._retry_or_fail(missing, RpcUnavailable(f"{self._chain}: answer missing from batch"))

    def _retry_or_fail(self, calls: list[_Call], error: RpcUnavailable) -> None:
        retry = []
        for call in calls:
            self._metrics.rpc_errors.labels(self._chain, call.method, "transport").inc()
            call.attempts += 1
            if call.retryable and call.attempts <= self._retries:
                retry.append(call)
            elif not call.future.done():
                call.future.set_exception(error)
        if retry:
            delay = 0.05 * (2 ** (retry[0].attempts - 1)) * (0.5 + random.random())
            asyncio.get_running_loop().call_later(delay, self._requeue, retry)

    def _requeue(self, calls: list[_Call]) -> None:
        self._queue.extend(c for c in calls if not c.future.done())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _rotate(self, failed_index: int) -> None:
        if self._preferred == failed_index:
            self._preferred = (failed_index + 1) % len(self._urls)

    def _observe(self, batch: list[_Call], elapsed: float) -> None:
        self._metrics.rpc_batch_size.labels(self._chain).observe(len(batch))
        for call in batch:
            self._metrics.rpc_seconds.labels(self._chain, call.method).observe(elapsed)

"""A thin, batching JSON-RPC client on aiohttp.

Why not web3.py here: it spends milliseconds of CPU per call, and /verify makes several calls.
Calls issued in the same event-loop iteration are coalesced into one HTTP batch, so 300
concurrent verifies cost a handful of HTTP requests, not 1,200.

Guarantees:
- `RpcError` means the node answered with an error (deterministic: a revert, "nonce too low");
  `RpcUnavailable` means no answer was obtained (timeout, refused, HTTP error, garbage) and the
  outcome of a write is unknown. Callers never see a third kind of exception from here, and no
  caller waits forever: whatever goes wrong while sending (an unexpected answer shape, a bug, a
  retry that fires after `close()`) settles every unsettled caller with `RpcUnavailable`.
- Every wait is bounded: per-request timeout, bounded retries with jittered backoff (only for calls
  marked retryable, and only after no answer, HTTP 429 or 5xx; any other HTTP status is final),
  a wait for a free connection slot no longer than the request timeout, and a bounded number of
  outstanding calls: a call counts from `request_many` until its last send has finished (queued,
  waiting for a slot, in flight or waiting to be retried), and calls beyond `max_queued_calls`
  are refused at once.
- An HTTP request carries at most `max_batch` calls: a larger `request_many` is split into
  chunks of `max_batch` that travel separately (retried separately) and are answered together,
  in the order asked.
- Error messages never contain the endpoint URL (it may embed an API key); endpoints are named
  `rpc0`, `rpc1`, ... in messages and metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from facilitator.adapters.metrics import Metrics
from facilitator.invariant import invariant
from facilitator.ports import RpcError, RpcUnavailable

log = logging.getLogger("facilitator.rpc")

RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})


class _Refused(RpcUnavailable):
    """The endpoint refused the request (an HTTP status other than 429/5xx): repeating it would
    be refused again, so it is not retried."""


@dataclass(slots=True, eq=False)
class _Group:
    """The calls of one `request_many`: answered together through one future."""

    calls: Sequence[tuple[str, list[Any]]]
    retryable: bool
    future: asyncio.Future[list[Any]] = field(repr=False)
    results: list[Any] = field(repr=False)
    unanswered: int


@dataclass(slots=True, eq=False)
class _Chunk:
    """At most `max_batch` consecutive calls of a group: the unit that is sent and retried."""

    group: _Group
    start: int
    calls: Sequence[tuple[str, list[Any]]]
    attempts: int = 0
    finished: bool = False  # answered, failed or dropped; no longer counted as outstanding

    @property
    def size(self) -> int:
        return len(self.calls)


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
        invariant(max_batch >= 1, "max_batch must be at least 1")
        self._urls = list(urls)
        self._chain = chain
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._max_queued = max_queued_calls
        self._retries = retries
        self._queue: deque[_Chunk] = deque()
        self._outstanding = 0  # calls accepted and not finished
        self._flush_scheduled = False
        self._preferred = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._sending: dict[asyncio.Task[None], list[_Chunk]] = {}
        self._retrying: dict[int, tuple[asyncio.TimerHandle, list[_Chunk]]] = {}
        self._timer_ids = itertools.count()

    @property
    def outstanding_calls(self) -> int:
        """Calls accepted and not finished yet (what `max_queued_calls` bounds)."""
        return self._outstanding

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        self._closed = False

    async def close(self) -> None:
        """Stop: every call still waiting (queued, in flight or waiting for a retry) gets
        `RpcUnavailable`; later calls are refused with it."""
        self._closed = True
        closed = RpcUnavailable(f"{self._chain}: client closed")
        for handle, chunks in self._retrying.values():
            handle.cancel()
            self._fail(chunks, closed)
        self._retrying.clear()
        self._fail(list(self._queue), closed)
        self._queue.clear()
        tasks = list(self._sending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for chunks in self._sending.values():  # normally already settled by `_sent`
            self._fail(chunks, closed)
        self._sending.clear()
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
        """Several calls in as few round trips as `max_batch` allows (with whatever else is asked
        in this loop iteration). Node errors are returned in place as `RpcError`;
        `RpcUnavailable` is raised when any call got no answer."""
        if self._closed:
            raise RpcUnavailable(f"{self._chain}: client closed")
        calls = list(calls)
        if not calls:
            return []
        if self._outstanding + len(calls) > self._max_queued:
            raise RpcUnavailable(f"{self._chain}: JSON-RPC queue full")
        loop = asyncio.get_running_loop()
        group = _Group(calls, retryable, loop.create_future(), [None] * len(calls), len(calls))
        self._outstanding += len(calls)
        self._enqueue([_Chunk(group, start, calls[start:start + self._max_batch])
                       for start in range(0, len(calls), self._max_batch)])
        return await group.future

    def _enqueue(self, chunks: list[_Chunk]) -> None:
        self._queue.extend(chunks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue:
            batch: list[_Chunk] = []
            size = 0
            while self._queue and size + self._queue[0].size <= self._max_batch:
                chunk = self._queue.popleft()
                if chunk.group.future.done():  # the caller gave up, or a sibling chunk failed
                    self._finish(chunk)
                    continue
                batch.append(chunk)
                size += chunk.size
            if batch:
                task = asyncio.get_running_loop().create_task(self._send(batch))
                self._sending[task] = batch
                task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        """A send task ended. Normally `_send` has settled its chunks (or scheduled their retry);
        a task cancelled before it ran, or killed by a BaseException, has not."""
        chunks = self._sending.pop(task, None)
        if chunks is None:
            return
        if task.cancelled():
            self._fail(chunks, RpcUnavailable(f"{self._chain}: client closed"))
        elif task.exception() is not None:
            self._fail(chunks, RpcUnavailable(f"{self._chain}: internal error"))

    async def _send(self, batch: list[_Chunk]) -> None:
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                self._fail(batch, RpcUnavailable(
                    f"{self._chain}: no free connection within {self._timeout_s:g} s"))
                return
            try:
                if all(chunk.group.future.done() for chunk in batch):
                    for chunk in batch:  # their callers already have an answer or gave up
                        self._finish(chunk)
                    return
                answers = await self._post(batch)
            finally:
                self._slots.release()
            self._deliver(batch, answers)
        except RpcUnavailable as exc:
            self._retry_or_fail(batch, exc)
        except asyncio.CancelledError:
            self._fail(batch, RpcUnavailable(f"{self._chain}: client closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, no caller may wait forever
            log.exception("%s: unexpected failure while sending a JSON-RPC batch", self._chain)
            self._fail(batch, RpcUnavailable(
                f"{self._chain}: malformed answer ({type(exc).__name__})"))

    async def _post(self, batch: list[_Chunk]) -> dict[int, Any]:
        session = self._session
        if session is None:
            raise RpcUnavailable(f"{self._chain}: client closed")
        index = self._preferred
        body = [{"jsonrpc": "2.0", "id": n, "method": method, "params": params}
                for n, (method, params) in enumerate(c for chunk in batch for c in chunk.calls)]
        started = asyncio.get_running_loop().time()
        try:
            async with session.post(
                self._urls[index], data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    message = f"{self._chain} rpc{index}: HTTP {resp.status}"
                    if resp.status in RETRYABLE_HTTP:
                        raise RpcUnavailable(message)
                    raise _Refused(message)
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

    def _deliver(self, batch: list[_Chunk], answers: dict[int, Any]) -> None:
        offset = 0
        missing: list[_Chunk] = []
        for chunk in batch:
            found = [answers.get(offset + k) for k in range(chunk.size)]
            offset += chunk.size
            if any(answer is None for answer in found):
                missing.append(chunk)
                continue
            self._complete(chunk, [self._result(method, answer)
                                   for (method, _), answer in zip(chunk.calls, found, strict=True)])
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
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = 0  # a node that sends "oops" as a code still answered with an error
        return RpcError(code, str(error.get("message", ""))[:1000], error.get("data"))

    def _complete(self, chunk: _Chunk, results: list[Any]) -> None:
        group = chunk.group
        self._finish(chunk)
        group.results[chunk.start:chunk.start + chunk.size] = results
        group.unanswered -= chunk.size
        if group.unanswered == 0 and not group.future.done():
            group.future.set_result(group.results)

    def _finish(self, chunk: _Chunk) -> None:
        if not chunk.finished:
            chunk.finished = True
            self._outstanding -= chunk.size

    def _fail(self, chunks: list[_Chunk], error: RpcUnavailable) -> None:
        for chunk in chunks:
            if chunk.finished:
                continue
            self._finish(chunk)
            if not chunk.group.future.done():
                chunk.group.future.set_exception(error)

    def _retry_or_fail(self, chunks: list[_Chunk], error: RpcUnavailable) -> None:
        retry = []
        for chunk in chunks:
            if chunk.finished:
                continue
            for method, _ in chunk.calls:
                self._metrics.rpc_errors.labels(self._chain, method, "transport").inc()
            chunk.attempts += 1
            if (chunk.group.retryable and chunk.attempts <= self._retries and not self._closed
                    and not isinstance(error, _Refused) and not chunk.group.future.done()):
                retry.append(chunk)
            else:
                self._fail([chunk], error)
        if retry:
            delay = 0.05 * (2 ** (retry[0].attempts - 1)) * (0.5 + random.random())
            key = next(self._timer_ids)
            handle = asyncio.get_running_loop().call_later(delay, self._requeue, key)
            self._retrying[key] = (handle, retry)

    def _requeue(self, key: int) -> None:
        entry = self._retrying.pop(key, None)
        if entry is None:
            return
        chunks = [c for c in entry[1] if not c.finished]
        if self._closed:
            self._fail(chunks, RpcUnavailable(f"{self._chain}: client closed"))
            return
        for chunk in chunks:
            if chunk.group.future.done():
                self._finish(chunk)
        chunks = [c for c in chunks if not c.finished]
        if chunks:
            self._enqueue(chunks)

    def _rotate(self, failed_index: int) -> None:
        if self._preferred == failed_index:
            self._preferred = (failed_index + 1) % len(self._urls)

    def _observe(self, body: list[dict[str, Any]], elapsed: float) -> None:
        self._metrics.rpc_batch_size.labels(self._chain).observe(len(body))
        for call in body:
            self._metrics.rpc_seconds.labels(self._chain, call["method"]).observe(elapsed)

"""An async client for a Walrus-style blob store: `put` to a publisher, `get` from an aggregator.

Speaks the HTTP API of Walrus (and of `facilitator.devnet.blobstore`): `PUT {publisher}/v1/blobs`
answers `newlyCreated.blobObject.blobId` or `alreadyCertified.blobId`; `GET
{aggregator}/v1/blobs/{blobId}` returns the bytes.

Guarantees:
- Every wait is bounded: per-attempt timeout, bounded retries with jittered backoff, bounded
  blob size in both directions (a larger download is cut off, not buffered).
- Retries only where repeating is harmless: no answer, HTTP 429/5xx. A `put` is content-addressed
  upstream, so a retried upload cannot store two blobs.
- `BlobNotFound` means the store answered 404; `BlobStoreUnavailable` means no usable answer;
  `BlobStoreError` (their base) covers the rest. Messages never contain a URL (it may embed a
  credential); endpoints are named "publisher" and "aggregator", and aiohttp's exceptions are
  not chained, since their text names the URL.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import aiohttp
import orjson

DEFAULT_MAX_BLOB_BYTES = 16 * 1024 * 1024
RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})
BLOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_ANSWER_BYTES = 64 * 1024


class BlobStoreError(Exception):
    """The blob store refused the request or answered something unusable."""


class BlobStoreUnavailable(BlobStoreError):
    """No usable answer (timeout, refused, HTTP 429/5xx) after the bounded retries."""


class BlobNotFound(BlobStoreError):
    """The aggregator does not have the blob (HTTP 404)."""


class _Retry(Exception):
    """One attempt failed in a way worth repeating; carries the message for the final error."""


class BlobStoreClient:
    def __init__(self, publisher_url: str, aggregator_url: str | None = None, *,
                 timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.2,
                 max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES, epochs: int | None = None) -> None:
        self._publisher = publisher_url.rstrip("/")
        self._aggregator = (aggregator_url or publisher_url).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_bytes = max_blob_bytes
        self._epochs = epochs
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> BlobStoreClient:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def put(self, data: bytes) -> str:
        """Store `data`; its blob id (new or already certified)."""
        if not data:
            raise BlobStoreError("refusing to store an empty blob")
        if len(data) > self._max_bytes:
            raise BlobStoreError(f"blob of {len(data)} bytes exceeds {self._max_bytes}")
        params = {"epochs": str(self._epochs)} if self._epochs is not None else None
        answer = await self._with_retries(
            "publisher", lambda s: self._put_once(s, data, params))
        return _blob_id_from(answer)

    async def get(self, blob_id: str) -> bytes:
        """The bytes of `blob_id`; `BlobNotFound` if the aggregator has none."""
        if not isinstance(blob_id, str) or BLOB_ID.fullmatch(blob_id) is None:
            raise BlobStoreError("malformed blob id")
        return await self._with_retries("aggregator", lambda s: self._get_once(s, blob_id))

    async def _put_once(self, session: aiohttp.ClientSession, data: bytes,
                        params: dict[str, str] | None) -> Any:
        async with session.put(f"{self._publisher}/v1/blobs", data=data, params=params,
                               headers={"Content-Type": "application/octet-stream"}) as response:
            body = await _read_bounded(response, _MAX_ANSWER_BYTES, "publisher")
            _check_status(response.status, "publisher")
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                raise BlobStoreError("publisher answered non-JSON") from None

    async def _get_once(self, session: aiohttp.ClientSession, blob_id: str) -> bytes:
        async with session.get(f"{self._aggregator}/v1/blobs/{blob_id}") as response:
            if response.status == 404:
                raise BlobNotFound("aggregator has no such blob")
            _check_status(response.status, "aggregator")
            return await _read_bounded(response, self._max_bytes, "aggregator")

    async def _with_retries(self, endpoint: str, attempt: Any) -> Any:
        if self._session is None:
            raise BlobStoreError("client not started")
        last = f"{endpoint} unavailable"
        for number in range(self._retries + 1):
            if number:
                delay = self._backoff_s * (2 ** (number - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            try:
                return await attempt(self._session)
            except _Retry as exc:
                last = str(exc)
            except TimeoutError:
                last = f"{endpoint} timed out"
            except aiohttp.ClientError as exc:
                # The exception text would name the URL; keep only its kind.
                last = f"{endpoint} unreachable ({type(exc).__name__})"
        raise BlobStoreUnavailable(f"{last} after {self._retries + 1} attempts")


def _check_status(status: int, endpoint: str) -> None:
    if status in RETRYABLE_HTTP:
        raise _Retry(f"{endpoint} answered HTTP {status}")
    if status == 413:
        raise BlobStoreError(f"{endpoint} refused the blob as too large (HTTP 413)")
    if not 200 <= status < 300:
        raise BlobStoreError(f"{endpoint} answered HTTP {status}")


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, endpoint: str) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise BlobStoreError(f"{endpoint} answer exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BlobStoreError(f"{endpoint} answer exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _blob_id_from(answer: Any) -> str:
    blob_id = None
    if isinstance(answer, dict):
        created = answer.get("newlyCreated")
        certified = answer.get("alreadyCertified")
        if isinstance(created, dict) and isinstance(created.get("blobObject"), dict):
            blob_id = created["blobObject"].get("blobId")
        elif isinstance(certified, dict):
            blob_id = certified.get("blobId")
    if not isinstance(blob_id, str) or BLOB_ID.fullmatch(blob_id) is None:
        raise BlobStoreError("publisher answer has no valid blobId")
    return blob_id

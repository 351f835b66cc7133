"""The devnet Walrus-like blob store and the blob store client, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from facilitator.adapters.blobstore import (
    BlobNotFound,
    BlobStoreClient,
    BlobStoreError,
    BlobStoreUnavailable,
)
from facilitator.devnet.anvil import free_port
from facilitator.devnet.blobstore import BlobStoreServer, blob_id_of

MAX_BLOB = 64 * 1024


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BlobStoreServer]:
    async with BlobStoreServer(tmp_path / "blobs", max_blob_bytes=MAX_BLOB) as running:
        yield running


@pytest.fixture
async def client(server: BlobStoreServer) -> AsyncIterator[BlobStoreClient]:
    async with BlobStoreClient(server.url, timeout_s=5, retries=1, backoff_s=0.01,
                               epochs=10) as store:
        yield store


async def test_put_get_round_trip(server: BlobStoreServer, client: BlobStoreClient):
    data = b'{"format":"standard-v1"}' + bytes(range(256))
    blob_id = await client.put(data)
    assert blob_id == blob_id_of(data)
    assert len(blob_id) == 43 and len(base64.urlsafe_b64decode(blob_id + "=")) == 32
    assert base64.urlsafe_b64decode(blob_id + "=") == hashlib.sha256(data).digest()
    assert await client.get(blob_id) == data
    assert (server.directory / blob_id).read_bytes() == data


async def test_repeat_put_is_idempotent(server: BlobStoreServer, client: BlobStoreClient):
    data = b"same bytes"
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{server.url}/v1/blobs?epochs=10", data=data) as first:
            assert first.status == 200
            created = await first.json()
        async with session.put(f"{server.url}/v1/blobs", data=data) as second:
            assert second.status == 200
            repeated = await second.json()
    blob_id = blob_id_of(data)
    assert created == {"newlyCreated": {"blobObject": {"blobId": blob_id, "size": len(data)}}}
    assert repeated == {"alreadyCertified": {"blobId": blob_id}}
    assert await client.put(data) == blob_id  # the client reads either answer
    assert sorted(p.name for p in server.directory.iterdir()) == [blob_id]


async def test_absent_blob_is_404(server: BlobStoreServer, client: BlobStoreClient):
    missing = blob_id_of(b"never stored")
    with pytest.raises(BlobNotFound):
        await client.get(missing)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/blobs/{missing}") as response:
            assert response.status == 404
        async with session.get(f"{server.url}/v1/blobs/..%2F..%2Fetc%2Fpasswd") as response:
            assert response.status in (400, 404)


async def test_oversize_blob_is_refused(server: BlobStoreServer):
    too_big = b"x" * (MAX_BLOB + 1)
    async with aiohttp.ClientSession() as session, \
            session.put(f"{server.url}/v1/blobs", data=too_big) as response:
        assert response.status == 413
    async with BlobStoreClient(server.url, max_blob_bytes=4 * MAX_BLOB, retries=0) as lax:
        with pytest.raises(BlobStoreError, match="413"):
            await lax.put(too_big)
    async with BlobStoreClient(server.url, max_blob_bytes=MAX_BLOB) as strict:
        with pytest.raises(BlobStoreError, match="exceeds"):
            await strict.put(too_big)  # refused before sending
    assert list(server.directory.iterdir()) == []
    assert await strict_round_trip(server, b"x" * MAX_BLOB)  # the bound itself is allowed


async def strict_round_trip(server: BlobStoreServer, data: bytes) -> bool:
    async with BlobStoreClient(server.url, max_blob_bytes=MAX_BLOB) as store:
        return await store.get(await store.put(data)) == data


async def test_client_bounds_downloads(server: BlobStoreServer, client: BlobStoreClient):
    blob_id = await client.put(b"y" * 1000)
    async with BlobStoreClient(server.url, max_blob_bytes=999) as small:
        with pytest.raises(BlobStoreError, match="exceeds"):
            await small.get(blob_id)


async def test_bad_requests(server: BlobStoreServer, client: BlobStoreClient):
    with pytest.raises(BlobStoreError):
        await client.put(b"")
    for bad in ("../x", "a/b", "", "é"):
        with pytest.raises(BlobStoreError, match="malformed"):
            await client.get(bad)
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{server.url}/v1/blobs?epochs=zero", data=b"z") as response:
            assert response.status == 400
        async with session.get(f"{server.url}/v1/blobs/short") as response:
            assert response.status == 400


async def test_unreachable_store_fails_without_naming_the_url():
    port = free_port()
    async with BlobStoreClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01,
                               timeout_s=2) as store:
        for call in (store.put(b"data"), store.get(blob_id_of(b"data"))):
            with pytest.raises(BlobStoreUnavailable) as error:
                await call
            assert "127.0.0.1" not in str(error.value) and str(port) not in str(error.value)
            assert error.value.__cause__ is None and "3 attempts" in str(error.value)


async def test_retries_5xx_then_succeeds(tmp_path: Path):
    """A publisher that fails twice with 503 and then answers: the client gets the id."""
    calls = {"n": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return web.Response(status=503, text="busy http://secret-host/")
        await request.read()
        return web.json_response({"newlyCreated": {"blobObject": {"blobId": "A" * 43,
                                                                  "size": 1}}})

    app = web.Application()
    app.router.add_put("/v1/blobs", flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://{}:{}".format(*runner.addresses[0][:2])
    try:
        async with BlobStoreClient(url, retries=2, backoff_s=0.01) as store:
            assert await store.put(b"d") == "A" * 43
        calls["n"] = -10  # always busy from now on
        async with BlobStoreClient(url, retries=1, backoff_s=0.01) as store:
            with pytest.raises(BlobStoreUnavailable, match="HTTP 503") as error:
                await store.put(b"d")
            assert "secret-host" not in str(error.value)
    finally:
        await runner.cleanup()

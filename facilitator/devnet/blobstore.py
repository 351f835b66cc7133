"""A local stand-in for Walrus (publisher + aggregator HTTP API) that keeps blobs in a directory.

Routes (the subset OpenGradient's facilitator and verifiers use):
- `PUT /v1/blobs[?epochs=N]`, body = the blob: 200 `{"newlyCreated": {"blobObject": {"blobId",
  "size"}}}` the first time, `{"alreadyCertified": {"blobId"}}` for content already stored;
  413 above the size bound, 400 for an empty body or a bad `epochs`.
- `GET /v1/blobs/{blobId}`: 200 with the bytes, 404 when absent, 400 for a malformed id.

Blob ids: Walrus ids are 32 bytes written as unpadded base64url (43 characters). Real ids commit
to the erasure-coded slivers, which a devnet has no use for; here the id is
base64url(sha256(blob)), so it is deterministic, content-addressed and the same on every run.

Guarantees: binds 127.0.0.1 only; bodies are bounded; a stored blob is written to a temporary
file and renamed, so readers never see a partial blob; ids are checked against the base64url
alphabet before touching the filesystem (no path traversal). Devnet only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path

from aiohttp import web

DEFAULT_MAX_BLOB_BYTES = 16 * 1024 * 1024
MAX_EPOCHS = 1000
BLOB_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_EPOCHS = re.compile(r"[1-9][0-9]{0,3}", re.ASCII)  # ASCII digits, bounded length, then int()
_DIRECTORY_KEY = web.AppKey("directory", Path)
_MAX_KEY = web.AppKey("max_blob_bytes", int)
_LOCK_KEY = web.AppKey("lock", asyncio.Lock)


def blob_id_of(data: bytes) -> str:
    """The devnet blob id of `data`: unpadded base64url of its SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


async def _put(request: web.Request) -> web.Response:
    epochs = request.query.get("epochs")
    if epochs is not None and not (_EPOCHS.fullmatch(epochs) and int(epochs) <= MAX_EPOCHS):
        return web.json_response({"error": f"epochs must be an integer in 1..{MAX_EPOCHS}"},
                                 status=400)
    limit = request.app[_MAX_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    data = await request.read()  # bounded by client_max_size
    if not data:
        return web.json_response({"error": "empty blob"}, status=400)
    blob_id = blob_id_of(data)
    path = request.app[_DIRECTORY_KEY] / blob_id
    # One writer at a time, so a repeat always answers alreadyCertified, never a second create.
    async with request.app[_LOCK_KEY]:
        if path.exists():
            return web.json_response({"alreadyCertified": {"blobId": blob_id}})
        await asyncio.to_thread(_write_atomically, path, data)
    return web.json_response({"newlyCreated": {"blobObject": {"blobId": blob_id,
                                                              "size": len(data)}}})


async def _get(request: web.Request) -> web.StreamResponse:
    blob_id = request.match_info["blob_id"]
    if BLOB_ID.fullmatch(blob_id) is None:
        return web.json_response({"error": "malformed blob id"}, status=400)
    path = request.app[_DIRECTORY_KEY] / blob_id
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return web.json_response({"error": "blob not found"}, status=404)
    return web.Response(body=data, content_type="application/octet-stream")


def make_app(directory: Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> web.Application:
    directory.mkdir(parents=True, exist_ok=True)
    app = web.Application(client_max_size=max_blob_bytes)
    app[_DIRECTORY_KEY] = directory
    app[_MAX_KEY] = max_blob_bytes
    app[_LOCK_KEY] = asyncio.Lock()
    app.router.add_put("/v1/blobs", _put)
    app.router.add_get("/v1/blobs/{blob_id}", _get)
    return app


class BlobStoreServer:
    """The blob store on 127.0.0.1 (an OS-chosen port unless given); `url` is the base URL that
    serves both the publisher and the aggregator routes."""

    def __init__(self, directory: Path, *, port: int = 0,
                 max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.directory = directory
        self.max_blob_bytes = max_blob_bytes
        self._port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = make_app(self.directory, max_blob_bytes=self.max_blob_bytes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> BlobStoreServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

"""Appends every /verify and /settle verdict to the `verifications` table, in batches.

Why batches: /verify must answer well over a thousand times a second; one COPY per tick costs
the database far less than one INSERT per request.

Guarantees: the queue is bounded and `record` waits for room (back-pressure, never silent
loss); a failed write is retried a bounded number of times, then counted in
`facilitator_verification_records_failed_total` and logged; `close()` flushes what is queued.
Verification records are an audit trail; payments themselves never depend on this path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from facilitator.adapters.metrics import Metrics
from facilitator.adapters.store import Store

log = logging.getLogger("facilitator.recorder")

MAX_QUEUE = 20_000
MAX_BATCH = 2_000
FLUSH_INTERVAL_S = 0.1
WRITE_ATTEMPTS = 3


class VerificationRecorder:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(maxsize=MAX_QUEUE)

    async def record(self, row: tuple[Any, ...]) -> None:
        await self._queue.put(row)

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(FLUSH_INTERVAL_S)  # gather a tick's worth into one COPY
            await self._write(self._drain(batch))

    def _drain(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                await self._store.record_verifications(batch)
                return
            except Exception as exc:  # noqa: BLE001 - retried, then counted
                log.warning("verification records write failed (attempt %d): %s",
                            attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
        self._metrics.records_dropped.inc(len(batch))
        log.error("dropped %d verification records after %d attempts", len(batch), WRITE_ATTEMPTS)

    async def close(self) -> None:
        while not self._queue.empty():
            await self._write(self._drain([self._queue.get_nowait()]))

"""Where settlement outcomes meet the requests waiting for them, inside one process.

Guarantee: each settlement id has at most one pending future; resolving is idempotent (the
first outcome wins) and waiters time out without cancelling the shared future, so one impatient
caller never hides the outcome from another.
"""

from __future__ import annotations

import asyncio

from facilitator.core.settlement import Outcome


class OutcomeBoard:
    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[Outcome]] = {}

    def expect(self, settlement_id: int) -> asyncio.Future[Outcome]:
        future = self._futures.get(settlement_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._futures[settlement_id] = future
        return future

    def owns(self, settlement_id: int) -> bool:
        future = self._futures.get(settlement_id)
        return future is not None and not future.done()

    def resolve(self, settlement_id: int, outcome: Outcome) -> None:
        future = self._futures.pop(settlement_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def current(self, settlement_id: int) -> asyncio.Future[Outcome] | None:
        return self._futures.get(settlement_id)


async def wait_outcome(future: asyncio.Future[Outcome], timeout_s: float) -> Outcome | None:
    """The outcome, or None when it did not arrive within `timeout_s`."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), max(timeout_s, 0.0))
    except asyncio.TimeoutError:
        return None

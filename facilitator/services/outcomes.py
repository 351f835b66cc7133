"""Where settlement outcomes meet the requests waiting for them, inside one process.

Guarantees: each settlement id has at most one pending future; resolving is idempotent (the
first outcome wins) and waiters time out without cancelling the shared future, so one impatient
caller never hides the outcome from another. While a settlement is unresolved, its
authorization is known to be in flight (`in_flight`), in O(1).
"""

from __future__ import annotations

import asyncio

from facilitator.core.settlement import Outcome

AuthorizationKey = tuple[str, str, bytes]  # (asset, payer, nonce)


class OutcomeBoard:
    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[Outcome]] = {}
        self._settlement_of: dict[AuthorizationKey, int] = {}
        self._key_of: dict[int, AuthorizationKey] = {}

    def expect(self, settlement_id: int, key: AuthorizationKey | None = None
               ) -> asyncio.Future[Outcome]:
        future = self._futures.get(settlement_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._futures[settlement_id] = future
        if key is not None:
            self._settlement_of[key] = settlement_id
            self._key_of[settlement_id] = key
        return future

    def in_flight(self, key: AuthorizationKey) -> bool:
        """Is a settlement of this authorization under way in this process? /verify answers such
        a payment as already used: presenting it again must not buy a second resource."""
        settlement_id = self._settlement_of.get(key)
        return settlement_id is not None and self.owns(settlement_id)

    def owns(self, settlement_id: int) -> bool:
        future = self._futures.get(settlement_id)
        return future is not None and not future.done()

    def unresolved(self) -> set[int]:
        """The settlements whose outcome some task of this process is still producing."""
        return {i for i, future in self._futures.items() if not future.done()}

    def resolve(self, settlement_id: int, outcome: Outcome) -> None:
        key = self._key_of.pop(settlement_id, None)
        if key is not None and self._settlement_of.get(key) == settlement_id:
            del self._settlement_of[key]
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

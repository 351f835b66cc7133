"""The interfaces the schemes and settlement services need from the outside world.

Schemes and services depend on these Protocols, never on aiohttp, asyncpg or web3; adapters
implement them, and tests may pass fakes that honour the same contracts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol



class RpcError(Exception):
    """The node answered with a JSON-RPC error object (deterministic: a revert, "nonce too low")."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"rpc error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcUnavailable(Exception):
    """No usable answer from any endpoint within the retry budget; a write's outcome is unknown."""


class Chain(Protocol):
    """JSON-RPC access to one chain. `request_many` returns node errors in place as `RpcError`
    and raises `RpcUnavailable` when no answer could be obtained."""

    async def request(self, method: str, params: list[Any], *, retryable: bool = True) -> Any: ...

    async def request_many(
        self, calls: Sequence[tuple[str, list[Any]]], *, retryable: bool = True
    ) -> list[Any]: ...

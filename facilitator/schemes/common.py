"""What every scheme shares: the result of the off-chain checks, the on-chain approval, the
Scheme interface the settlement service drives, and small JSON-RPC call helpers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from facilitator.core import abi
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.core.settlement import SettlementIntent
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.networks import Network
from facilitator.protocol.reasons import Reason

ASSET_CODE_TTL_S = 900.0
ASSET_CODE_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Checked:
    """A payment that passed every off-chain check."""

    intent: SettlementIntent
    digest: bytes
    signature_check: SignatureCheck
    payer: str  # checksummed, for responses
    domain: tuple[str, str] = ("", "")  # EIP-3009: the token's EIP-712 (name, version) signed


@dataclass(frozen=True, slots=True)
class ChainApproval:
    gas_estimate: int | None  # set for settlement checks


class Scheme(Protocol):
    """A payment scheme on one network, as the facilitator and settlement services use it."""

    scheme: str
    network: Network
    failure_reason: Reason  # a mined settlement transaction that reverted
    reports_amount: bool  # SettleResponse carries `amount` (upto)

    def check_offchain(self, request: PaymentRequest, *, for_settle: bool = False
                       ) -> Rejection | Checked: ...

    async def check_onchain(self, checked: Checked, *, for_settle: bool
                            ) -> Rejection | ChainApproval: ...


# Settlement checks size the gas limit with eth_createAccessList: one EVM execution that also
# reports gasUsed, where eth_estimateGas binary-searches (five times the node's work on anvil,
# measured). Nodes without it get eth_estimateGas (see `gas_method_missing`).
GAS_METHOD = "eth_createAccessList"
FALLBACK_GAS_METHOD = "eth_estimateGas"


def gas_used(result: Any) -> int:
    """Gas from an eth_createAccessList answer ({gasUsed}) or an eth_estimateGas answer (hex)."""
    if isinstance(result, dict):
        return int(result["gasUsed"], 16)
    return int(result, 16)


def gas_method_missing(error: Any) -> bool:
    text = str(getattr(error, "message", "")).lower()
    return getattr(error, "code", 0) == -32601 or "not supported" in text or \
        "method not found" in text or "does not exist" in text


def eth_call(to: str, data: bytes, sender: str | None = None) -> dict[str, str]:
    call = {"to": to, "data": "0x" + data.hex()}
    if sender is not None:
        call["from"] = sender
    return call


def returns_magic(result: Any) -> bool:
    return isinstance(result, str) and result[2:10].lower() == abi.ERC1271_MAGIC.hex()


def normalised_v(signature: bytes) -> bytes:
    """65-byte signatures with v in {0, 1} as contracts pass them on: v in {27, 28}."""
    if len(signature) == 65 and signature[64] < 27:
        return signature[:64] + bytes([signature[64] + 27])
    return signature


def no_code(code: Any) -> bool:
    return not isinstance(code, str) or code in ("0x", "0x0")


class AssetCodeCache:
    """Positive 'this asset has code' answers, for 15 minutes (as the SDK's asset cache)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[str, float] = {}

    def known(self, asset: str) -> bool:
        seen = self._seen.get(asset)
        return seen is not None and self._clock() - seen < ASSET_CODE_TTL_S

    def remember(self, asset: str) -> None:
        if len(self._seen) >= ASSET_CODE_CACHE_MAX:
            self._seen.clear()
        self._seen[asset] = self._clock()


class CallBatch:
    """Named JSON-RPC calls gathered for one round trip."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.slots: list[str] = []

    def add(self, slot: str, method: str, params: list[Any]) -> None:
        self.slots.append(slot)
        self.calls.append((method, params))

    def answers(self, results: list[Any]) -> dict[str, Any]:
        return dict(zip(self.slots, results, strict=True))

"""What every scheme shares: the result of the off-chain checks, the on-chain approval, the
Scheme interface the settlement service drives, what differs per transfer method (one table),
and the on-chain round trip both EVM schemes make: ERC-1271 and asset-code checks, the
scheme's state checks, then the settlement simulation that also sizes the gas limit.

Guarantees of the simulation (`simulation_error`, `GasProbe`):
- A revert is a revert however the node reports it: a JSON-RPC error (anvil, erigon, code 3) or
  a successful `eth_createAccessList` result carrying an `error` member (geth, op-geth, reth).
  Either way the scheme judges the revert; it never approves a doomed transaction.
- The gas method falls back from eth_createAccessList to eth_estimateGas at most once per scheme
  instance, and only when the node says the method does not exist (JSON-RPC -32601). A revert's
  text never switches it, and the check is never repeated more than once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from facilitator.core import abi
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import Chain, RpcError
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.networks import Network, TransferMethod
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


class FrontRunEvidence(StrEnum):
    """How a settlement consumed by another sender's transaction is recognised on chain."""

    AUTHORIZATION_USED = "authorization_used"  # EIP-3009: the token's AuthorizationUsed event
    EXACT_PROXY_CALL = "exact_proxy_call"  # Permit2 has no nonce event: a call to the proxy


@dataclass(frozen=True, slots=True)
class MethodTraits:
    """How settlements of one scheme and transfer method differ, for the services that only
    hold a row."""

    transfer_method: TransferMethod
    failure_reason: Reason  # a mined settlement transaction that reverted
    expired_reason: Reason  # the authorization expired before any inclusion
    nonce_used_reason: Reason  # the chain says the authorization was consumed
    reports_amount: bool  # SettleResponse carries `amount` (upto)
    front_run: FrontRunEvidence | None  # None: no other sender can consume the authorization
    sessions: bool  # settlements belong to an upto session (usage recorded, 0 settles free)


EIP3009_TRAITS = MethodTraits(
    transfer_method=TransferMethod.EIP3009, failure_reason=Reason.TRANSACTION_FAILED,
    expired_reason=Reason.VALID_BEFORE_EXPIRED, nonce_used_reason=Reason.NONCE_ALREADY_USED,
    reports_amount=False, front_run=FrontRunEvidence.AUTHORIZATION_USED, sessions=False)
# The upto proxy only accepts its witness's facilitator (us): nobody else can consume the permit.
PERMIT2_TRAITS = MethodTraits(
    transfer_method=TransferMethod.PERMIT2, failure_reason=Reason.UPTO_TRANSACTION_FAILED,
    expired_reason=Reason.PERMIT2_DEADLINE_EXPIRED, nonce_used_reason=Reason.PERMIT2_INVALID_NONCE,
    reports_amount=True, front_run=None, sessions=True)
# The exact proxy takes a permit from any sender, always paying witness.to the permitted amount.
EXACT_PERMIT2_TRAITS = MethodTraits(
    transfer_method=TransferMethod.PERMIT2, failure_reason=Reason.TRANSACTION_FAILED,
    expired_reason=Reason.PERMIT2_DEADLINE_EXPIRED, nonce_used_reason=Reason.PERMIT2_INVALID_NONCE,
    reports_amount=False, front_run=FrontRunEvidence.EXACT_PROXY_CALL, sessions=False)
TRAITS: dict[tuple[str, TransferMethod], MethodTraits] = {
    ("exact", TransferMethod.EIP3009): EIP3009_TRAITS,
    ("upto", TransferMethod.PERMIT2): PERMIT2_TRAITS,
    ("exact", TransferMethod.PERMIT2): EXACT_PERMIT2_TRAITS,
}


def traits_of(scheme: str, transfer_method: str) -> MethodTraits:
    """The traits of a stored row's or an intent's scheme and `transfer_method`."""
    return TRAITS[(scheme, TransferMethod(transfer_method))]


SchemeKey = tuple[str, TransferMethod]  # how a network's schemes are registered and routed


class Scheme(Protocol):
    """A payment scheme on one network, as the facilitator and settlement services use it."""

    scheme: str
    network: Network
    traits: MethodTraits  # what differs per transfer method (failure reasons, amount, ...)

    def check_offchain(self, request: PaymentRequest, *, for_settle: bool = False
                       ) -> Rejection | Checked: ...

    def intent(self, request: PaymentRequest) -> SettlementIntent: ...

    async def check_onchain(self, checked: Checked, *, for_settle: bool
                            ) -> Rejection | ChainApproval: ...


# Settlement checks size the gas limit with eth_createAccessList: one EVM execution that also
# reports gasUsed, where eth_estimateGas binary-searches (five times the node's work on anvil,
# measured). Nodes without it get eth_estimateGas (see `GasProbe`).
GAS_METHOD = "eth_createAccessList"
FALLBACK_GAS_METHOD = "eth_estimateGas"
METHOD_NOT_FOUND = -32601  # JSON-RPC 2.0: the method does not exist / is not available
REVERT_CODE = 3  # what geth-family nodes use for "execution reverted" JSON-RPC errors
SIMULATION = "simulation"  # the CallBatch slot of the settlement simulation


def simulation_error(result: Any) -> RpcError | None:
    """The revert in a simulation answer, or None when the call succeeded.

    anvil answers a reverting eth_call / eth_createAccessList with a JSON-RPC error (an
    `RpcError` here). geth, op-geth and reth answer eth_createAccessList with a *result*
    `{"accessList": [...], "gasUsed": "0x...", "error": "execution reverted: ..."}`; that is a
    revert too, with the message as its only evidence (reth may add the revert data)."""
    if isinstance(result, RpcError):
        return result
    if isinstance(result, dict) and result.get("error"):
        data = next((result[k] for k in ("revertData", "data", "output")
                     if isinstance(result.get(k), str)), None)
        return RpcError(REVERT_CODE, str(result["error"]), data)
    return None


def gas_used(result: Any) -> int:
    """Gas from an eth_createAccessList answer ({gasUsed}) or an eth_estimateGas answer (hex)."""
    if isinstance(result, dict):
        return int(result["gasUsed"], 16)
    return int(result, 16)


class GasProbe:
    """Which method sizes a settlement's gas on this node. eth_createAccessList until the node
    says it does not have it (-32601, nothing else), then eth_estimateGas for good."""

    def __init__(self) -> None:
        self.method = GAS_METHOD

    def missing(self, used: str, result: Any) -> bool:
        """Did `result` say that `used`, eth_createAccessList, does not exist on this node? Then
        eth_estimateGas is used from now on. Never true for eth_estimateGas, so a check that
        falls back makes at most one more round trip (also when several ran concurrently)."""
        if used == GAS_METHOD and isinstance(result, RpcError) \
                and result.code == METHOD_NOT_FOUND:
            self.method = FALLBACK_GAS_METHOD
            return True
        return False


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
    """Positive 'this asset has code' answers, for 15 minutes (as the SDK's asset cache). One
    per network, shared by its schemes (the same asset is fetched once)."""

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

    def judge(self, asset: str, answer: dict[str, Any]) -> Rejection | None:
        """The asset-code slot of a round trip (absent when the cache knew the asset)."""
        if "asset_code" not in answer:
            return None
        if no_code(answer["asset_code"]):
            return Rejection(Reason.ASSET_NOT_DEPLOYED,
                             f"no contract at asset {to_checksum(asset)}")
        self.remember(asset)
        return None


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


def add_contract_checks(batch: CallBatch, checked: Checked, cache: AssetCodeCache) -> None:
    """ERC-1271 (only when ECDSA did not match: the payer's code and its isValidSignature) and
    the asset's code (unless cached)."""
    intent = checked.intent
    if checked.signature_check is SignatureCheck.NEEDS_CONTRACT_CHECK:
        batch.add("payer_code", "eth_getCode", [intent.payer, "latest"])
        batch.add("erc1271", "eth_call", [eth_call(intent.payer, abi.is_valid_signature(
            checked.digest, normalised_v(intent.signature))), "latest"])
    if not cache.known(intent.asset):
        batch.add("asset_code", "eth_getCode", [intent.asset, "latest"])


class EvmScheme:
    """The part of a scheme that is the same for `exact` and `upto` on EVM: wiring, the shared
    asset-code cache, and `check_onchain` (one batched round trip, in this precedence: the
    payer's contract signature, the asset's code, the scheme's state checks, the simulation).

    A scheme fills in `_add_state_calls`, `_judge_signature`, `_judge_state` and
    `_judge_revert`."""

    scheme: str  # set by each scheme class
    traits: MethodTraits

    def __init__(self, *, network: Network, chain: Chain, facilitator_address: str,
                 clock: Callable[[], float] = time.time,
                 asset_code: AssetCodeCache | None = None) -> None:
        self.network = network
        self._chain = chain
        self._facilitator = facilitator_address.lower()
        self._clock = clock
        self._asset_code = asset_code if asset_code is not None else AssetCodeCache(clock)
        self._gas = GasProbe()

    async def check_onchain(self, checked: Checked, *, for_settle: bool
                            ) -> Rejection | ChainApproval:
        """One batched round trip (two, once per instance, when the node turns out to lack
        eth_createAccessList). Raises `RpcUnavailable` when the chain cannot be reached."""
        method = self._gas.method if for_settle else "eth_call"
        while True:
            answer = await self._round_trip(checked, method)
            verdict = (self._judge_signature(checked, answer)
                       or self._asset_code.judge(checked.intent.asset, answer)
                       or self._judge_state(checked, answer))
            if verdict is not None:
                return verdict
            result = answer[SIMULATION]
            if not (for_settle and self._gas.missing(method, result)):
                break
            method = self._gas.method  # the fallback, once
        error = simulation_error(result)
        if error is not None:
            return await self._judge_revert(checked, error)
        return ChainApproval(gas_estimate=gas_used(result) if for_settle else None)

    async def _round_trip(self, checked: Checked, simulation: str) -> dict[str, Any]:
        intent = checked.intent
        batch = CallBatch()
        add_contract_checks(batch, checked, self._asset_code)
        self._add_state_calls(batch, checked)
        batch.add(SIMULATION, simulation,
                  [eth_call(intent.call_to, intent.calldata, sender=self._facilitator),
                   "latest"])
        return batch.answers(await self._chain.request_many(batch.calls))

    # -- what each scheme decides --------------------------------------------------------------

    def _add_state_calls(self, batch: CallBatch, checked: Checked) -> None:
        raise NotImplementedError

    def _judge_signature(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        raise NotImplementedError

    def _judge_state(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        raise NotImplementedError

    async def _judge_revert(self, checked: Checked, error: RpcError) -> Rejection:
        raise NotImplementedError

"""The x402 `upto` scheme on EVM: Permit2 `PermitWitnessTransferFrom` signed for a maximum (the
session cap), settled later for the amount actually used through the x402 upto proxy.

This is how OpenGradient's TEE gateway is paid: `/verify` once when a session starts, many
inferences, then `/settle` with the summed cost (<= cap) in the settle-time requirements.

Verification: the pure checks of `facilitator.core.permit2`, then one batched round trip that
answers, in this precedence: ERC-1271 signature (only when ECDSA did not match), asset has
code, the Permit2 nonce is unused (`nonceBitmap`), `allowance(owner, Permit2)` and
`balanceOf(owner)` cover the amount, and a simulation of `proxy.settle(...)` from our signer
succeeds (`eth_createAccessList` when settling, which also sizes the gas limit).

At settle: the amount is the settle-time requirements' amount; it must not exceed the cap
(`invalid_upto_evm_payload_settlement_exceeds_amount`); 0 settles without a transaction.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from facilitator.core import abi
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.core.permit2 import (
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    UptoContext,
    check_offchain,
    check_signature,
    classify_proxy_revert,
    permit_digest,
)
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import Chain, RpcError
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.networks import Network
from facilitator.protocol.permit2 import UptoPayload, parse_upto_payload
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import (
    FALLBACK_GAS_METHOD,
    GAS_METHOD,
    AssetCodeCache,
    CallBatch,
    ChainApproval,
    Checked,
    eth_call,
    gas_method_missing,
    gas_used,
    no_code,
    normalised_v,
    returns_magic,
)


def fingerprint(chain_id: int, payment: UptoPayload, amount: int) -> bytes:
    """Identity of one settlement request: the signed permit and the amount asked for."""
    p = payment.permit
    parts = ["upto", str(chain_id), p.owner, p.token, str(p.cap), p.spender, str(p.nonce),
             str(p.deadline), p.witness.to, p.witness.facilitator, str(p.witness.valid_after),
             normalised_v(payment.signature).hex(), str(amount)]
    return hashlib.sha256("|".join(parts).encode()).digest()


class UptoPermit2Scheme:
    scheme = "upto"
    failure_reason = Reason.UPTO_TRANSACTION_FAILED
    reports_amount = True

    def __init__(self, *, network: Network, chain: Chain, facilitator_address: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.network = network
        self._chain = chain
        self._facilitator = facilitator_address.lower()
        self._clock = clock
        self._asset_code = AssetCodeCache(clock)
        self._gas_method = GAS_METHOD

    def check_offchain(self, request: PaymentRequest, *, for_settle: bool = False
                       ) -> Rejection | Checked:
        """Pure checks and ECDSA. At settle the cap is checked against the permit itself and
        the settle-time amount against the cap. Raises `BadRequest` for a malformed payload."""
        payment = parse_upto_payload(request.payload)
        permit = payment.permit
        checked_request = request
        if for_settle:  # re-verify against the authorized maximum, as the SDK does
            checked_request = _with_amount(request, permit.cap)
        ctx = UptoContext(request=checked_request, payment=payment,
                          facilitators=frozenset({self._facilitator}), now=int(self._clock()))
        rejection = check_offchain(ctx)
        if rejection is not None:
            return rejection
        amount = request.requirements.amount
        if for_settle and amount > permit.cap:
            return Rejection(Reason.UPTO_SETTLEMENT_EXCEEDS_AMOUNT,
                             f"settle amount {amount} exceeds the permitted {permit.cap}")
        digest = permit_digest(self.network.chain_id, permit)
        return Checked(intent=self._intent(request, payment, amount), digest=digest,
                       signature_check=check_signature(digest, payment),
                       payer=to_checksum(permit.owner))

    def _intent(self, request: PaymentRequest, payment: UptoPayload, amount: int
                ) -> SettlementIntent:
        p = payment.permit
        signature = normalised_v(payment.signature)
        return SettlementIntent(
            scheme=self.scheme, x402_version=request.version, network=request.network,
            chain_id=self.network.chain_id, asset=p.token, payer=p.owner, pay_to=p.witness.to,
            amount=amount, nonce=p.nonce.to_bytes(32, "big"), valid_after=p.witness.valid_after,
            valid_before=p.deadline, signature=payment.signature,
            fingerprint=fingerprint(self.network.chain_id, payment, amount),
            call_to=UPTO_PROXY_ADDRESS,
            calldata=abi.upto_proxy_settle(p.token, p.cap, p.nonce, p.deadline, amount, p.owner,
                                           p.witness.to, p.witness.facilitator,
                                           p.witness.valid_after, signature),
            transfer_method="permit2", cap_amount=p.cap)

    async def check_onchain(self, checked: Checked, *, for_settle: bool
                            ) -> Rejection | ChainApproval:
        """One batched round trip. Raises `RpcUnavailable` when the chain cannot be reached."""
        batch = self._onchain_calls(checked, for_settle)
        answer = batch.answers(await self._chain.request_many(batch.calls))
        intent = checked.intent
        verdict = (_judge_signature(answer) or self._judge_asset(intent, answer)
                   or _judge_nonce(intent, answer) or _judge_allowance(intent, answer)
                   or _judge_balance(intent, answer))
        if verdict is not None:
            return verdict
        simulation = answer["settle"]
        if for_settle and isinstance(simulation, RpcError) and gas_method_missing(simulation):
            self._gas_method = FALLBACK_GAS_METHOD  # this node lacks eth_createAccessList
            return await self.check_onchain(checked, for_settle=True)
        if isinstance(simulation, RpcError):
            revert = abi.decode_revert(simulation.data, simulation.message)
            return Rejection(classify_proxy_revert(revert) or Reason.UPTO_TRANSACTION_FAILED,
                             revert)
        return ChainApproval(gas_estimate=gas_used(simulation) if for_settle else None)

    def _onchain_calls(self, checked: Checked, for_settle: bool) -> CallBatch:
        intent = checked.intent
        nonce = int.from_bytes(intent.nonce, "big")
        batch = CallBatch()
        if checked.signature_check is SignatureCheck.NEEDS_CONTRACT_CHECK:
            batch.add("payer_code", "eth_getCode", [intent.payer, "latest"])
            batch.add("erc1271", "eth_call", [eth_call(intent.payer, abi.is_valid_signature(
                checked.digest, normalised_v(intent.signature))), "latest"])
        if not self._asset_code.known(intent.asset):
            batch.add("asset_code", "eth_getCode", [intent.asset, "latest"])
        batch.add("nonce_bitmap", "eth_call",
                  [eth_call(PERMIT2_ADDRESS, abi.nonce_bitmap(intent.payer, nonce >> 8)),
                   "latest"])
        batch.add("allowance", "eth_call",
                  [eth_call(intent.asset, abi.allowance(intent.payer, PERMIT2_ADDRESS)), "latest"])
        batch.add("balance", "eth_call",
                  [eth_call(intent.asset, abi.balance_of(intent.payer)), "latest"])
        settle = eth_call(intent.call_to, intent.calldata, sender=self._facilitator)
        batch.add("settle", self._gas_method if for_settle else "eth_call", [settle, "latest"])
        return batch

    def _judge_asset(self, intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
        if "asset_code" not in answer:
            return None
        if no_code(answer["asset_code"]):
            return Rejection(Reason.ASSET_NOT_DEPLOYED,
                             f"no contract at asset {to_checksum(intent.asset)}")
        self._asset_code.remember(intent.asset)
        return None


def _with_amount(request: PaymentRequest, amount: int) -> PaymentRequest:
    return replace(request, requirements=replace(request.requirements, amount=amount))


def _judge_signature(answer: dict[str, Any]) -> Rejection | None:
    if "payer_code" not in answer:
        return None
    if no_code(answer["payer_code"]) or not returns_magic(answer["erc1271"]):
        return Rejection(Reason.PERMIT2_INVALID_SIGNATURE,
                         "the permit signature does not recover to the owner")
    return None


def _judge_nonce(intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
    bitmap = answer["nonce_bitmap"]
    if isinstance(bitmap, RpcError):
        return None  # left to the simulation, which names the cause
    bit = int.from_bytes(intent.nonce, "big") & 0xFF
    if (abi.decode_uint(bitmap) >> bit) & 1:
        return Rejection(Reason.PERMIT2_INVALID_NONCE, "the Permit2 nonce was already used")
    return None


def _judge_allowance(intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
    allowance = answer["allowance"]
    if not isinstance(allowance, RpcError) and abi.decode_uint(allowance) < intent.amount:
        return Rejection(Reason.PERMIT2_ALLOWANCE_REQUIRED,
                         "the owner has not approved Permit2 for this amount")
    return None


def _judge_balance(intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
    balance = answer["balance"]
    if not isinstance(balance, RpcError) and abi.decode_uint(balance) < intent.amount:
        return Rejection(Reason.PERMIT2_INSUFFICIENT_BALANCE,
                         f"owner balance {abi.decode_uint(balance)} < {intent.amount}")
    return None

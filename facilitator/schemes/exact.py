"""The x402 `exact` scheme on EVM, EIP-3009 `transferWithAuthorization` (USDC-like tokens).

Verification is two stages. First the pure checks of `facilitator.core.exact` (no RPC at all
until they pass). Then one batched JSON-RPC round trip that answers, in this precedence:

  1. ERC-1271 signature (only when ECDSA did not match): the payer has code and its
     `isValidSignature(digest, sig)` returns the magic value
  2. the asset has code (positive answers cached, as the SDK does, for 15 minutes)
  3. `authorizationState(payer, nonce)` is callable and false
  4. `balanceOf(payer) >= value`
  5. the transfer itself succeeds: `eth_call` for /verify, `eth_createAccessList` for /settle
     (which also sizes the gas limit). A revert is mapped as the SDK maps it; an unexplained one
     is diagnosed with `name()`/`version()` in a second round trip, as the SDK's multicall does.

Guarantees: the same request gets the same verdict at the same chain state and time; a chain
that cannot be reached yields `unexpected_verify_error`, never a payment-state reason.
"""

from __future__ import annotations

import hashlib
from typing import Any

from facilitator.core import abi
from facilitator.core.exact import (
    ExactContext,
    Rejection,
    SignatureCheck,
    authorization_digest,
    check_offchain,
    check_signature,
    classify_transfer_revert,
)
from facilitator.core.settlement import SettlementIntent
from facilitator.protocol.eip3009 import Eip3009Payload, parse_eip3009_payload
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.reasons import Reason
from facilitator.ports import RpcError
from facilitator.schemes.common import (
    EIP3009_TRAITS,
    CallBatch,
    Checked,
    EvmScheme,
    eth_call,
    no_code,
    normalised_v,
    returns_magic,
)


def fingerprint(chain_id: int, asset: str, payment: Eip3009Payload) -> bytes:
    """Identity of the signed payment: two requests with equal fingerprints are the same payment.
    `v` is normalised so 0/1 and 27/28 encodings of one signature are one payment."""
    auth = payment.authorization
    parts = ["exact", str(chain_id), asset, auth.payer, auth.pay_to, str(auth.value),
             str(auth.valid_after), str(auth.valid_before), auth.nonce.hex(),
             normalised_v(payment.signature).hex()]
    return hashlib.sha256("|".join(parts).encode()).digest()


class ExactEip3009Scheme(EvmScheme):
    scheme = "exact"
    traits = EIP3009_TRAITS

    def check_offchain(self, request: PaymentRequest, *, for_settle: bool = False
                       ) -> Rejection | Checked:
        """Pure checks and ECDSA. Raises `BadRequest` for a malformed payload."""
        payment = parse_eip3009_payload(request.payload)
        ctx = ExactContext(request=request, payment=payment, chain_id=self.network.chain_id,
                           now=int(self._clock()))
        rejection = check_offchain(ctx)
        if rejection is not None:
            return rejection
        digest = authorization_digest(ctx)
        signature_check = check_signature(digest, payment)
        if signature_check is SignatureCheck.COUNTERFACTUAL_WALLET:
            return Rejection(Reason.FACTORY_NOT_ALLOWED,
                             "ERC-6492 wallet deployment is not allowed by this facilitator")
        return Checked(intent=self._intent(request, payment), digest=digest,
                       signature_check=signature_check,
                       payer=to_checksum(payment.authorization.payer),
                       domain=(request.requirements.extra["name"],
                               request.requirements.extra["version"]))

    def intent(self, request: PaymentRequest) -> SettlementIntent:
        """The settlement this request asks for, without any check (raises `BadRequest` for a
        malformed payload)."""
        return self._intent(request, parse_eip3009_payload(request.payload))

    def _intent(self, request: PaymentRequest, payment: Eip3009Payload) -> SettlementIntent:
        auth, asset = payment.authorization, request.requirements.asset
        return SettlementIntent(
            scheme=self.scheme, x402_version=request.version, network=request.network,
            chain_id=self.network.chain_id, asset=asset, payer=auth.payer, pay_to=auth.pay_to,
            amount=auth.value, nonce=auth.nonce, valid_after=auth.valid_after,
            valid_before=auth.valid_before, signature=payment.signature,
            fingerprint=fingerprint(self.network.chain_id, asset, payment), call_to=asset,
            calldata=abi.transfer_with_authorization(
                auth.payer, auth.pay_to, auth.value, auth.valid_after, auth.valid_before,
                auth.nonce, payment.signature),
            transfer_method=self.traits.transfer_method)

    def _add_state_calls(self, batch: CallBatch, checked: Checked) -> None:
        intent = checked.intent
        batch.add("auth_state", "eth_call", [eth_call(
            intent.asset, abi.authorization_state(intent.payer, intent.nonce)), "latest"])
        batch.add("balance", "eth_call",
                  [eth_call(intent.asset, abi.balance_of(intent.payer)), "latest"])

    def _judge_signature(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        if "payer_code" not in answer:
            return None
        code, verdict = answer["payer_code"], answer["erc1271"]
        if no_code(code):
            if len(checked.intent.signature) != 65:  # the SDK: a wallet that is not deployed
                return Rejection(Reason.UNDEPLOYED_SMART_WALLET,
                                 "payer has no code and the signature is not an EOA signature")
            return Rejection(Reason.INVALID_SIGNATURE, "signature does not recover to the payer")
        if not returns_magic(verdict):
            return Rejection(Reason.INVALID_SIGNATURE,
                             "payer contract's isValidSignature rejected the signature")
        return None

    def _judge_state(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        return self._judge_authorization(answer) or self._judge_balance(checked, answer)

    @staticmethod
    def _judge_authorization(answer: dict[str, Any]) -> Rejection | None:
        state = answer["auth_state"]
        if isinstance(state, RpcError):
            return Rejection(Reason.EIP3009_NOT_SUPPORTED,
                             f"authorizationState failed: {state.message}")
        if abi.decode_bool(state):
            return Rejection(Reason.NONCE_ALREADY_USED, "authorization nonce was already used")
        return None

    @staticmethod
    def _judge_balance(checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        balance = answer["balance"]
        if isinstance(balance, RpcError):
            return None  # left to the transfer simulation, which names the real cause
        if abi.decode_uint(balance) < checked.intent.amount:
            return Rejection(Reason.INSUFFICIENT_BALANCE,
                             f"payer balance {abi.decode_uint(balance)} < {checked.intent.amount}")
        return None

    async def _judge_revert(self, checked: Checked, error: RpcError) -> Rejection:
        """v2 maps the revert text first, as the SDK's v2 scheme does; the SDK's v1 scheme goes
        straight to the name/version diagnosis, and so do we for v1."""
        revert = abi.decode_revert(error.data, error.message)
        mapped = classify_transfer_revert(revert) if checked.intent.x402_version == 2 else None
        if mapped is not None:
            return Rejection(mapped, revert)
        return Rejection(await self._diagnose_domain(checked) or Reason.SIMULATION_FAILED, revert)

    async def _diagnose_domain(self, checked: Checked) -> Reason | None:
        """Name/version diagnosis for an unexplained revert (second round trip, rare path).
        Nothing to compare when the signed domain is unknown (a row re-checked at recovery)."""
        if checked.domain == ("", ""):
            return None
        asset = checked.intent.asset
        name, version = await self._chain.request_many([
            ("eth_call", [eth_call(asset, abi.NAME), "latest"]),
            ("eth_call", [eth_call(asset, abi.VERSION), "latest"])])
        return _domain_mismatch(name, version, checked.domain)


def _domain_mismatch(name: Any, version: Any, expected: tuple[str, str]) -> Reason | None:
    """The SDK's diagnosis: the token's own name()/version() differ from what the payer signed."""
    expected_name, expected_version = expected
    try:
        if isinstance(name, str) and abi.decode_string(name) != expected_name:
            return Reason.TOKEN_NAME_MISMATCH
        if isinstance(version, str) and abi.decode_string(version) != expected_version:
            return Reason.TOKEN_VERSION_MISMATCH
    except Exception:  # noqa: BLE001 - a token without these getters tells us nothing more
        return None
    return None

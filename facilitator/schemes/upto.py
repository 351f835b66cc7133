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
from dataclasses import replace

from facilitator.core import abi
from facilitator.core.exact import Rejection
from facilitator.core.permit2 import (
    UPTO_PROXY_ADDRESS,
    UptoContext,
    check_offchain,
    check_signature,
    classify_proxy_revert,
    permit_digest,
)
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import RpcError
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.permit2 import UptoPayload, parse_upto_payload
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import PERMIT2_TRAITS, Checked, normalised_v
from facilitator.schemes.permit2 import Permit2Scheme


def fingerprint(chain_id: int, payment: UptoPayload, amount: int) -> bytes:
    """Identity of one settlement request: the signed permit and the amount asked for."""
    p = payment.permit
    parts = ["upto", str(chain_id), p.owner, p.token, str(p.cap), p.spender, str(p.nonce),
             str(p.deadline), p.witness.to, p.witness.facilitator, str(p.witness.valid_after),
             normalised_v(payment.signature).hex(), str(amount)]
    return hashlib.sha256("|".join(parts).encode()).digest()


class UptoPermit2Scheme(Permit2Scheme):
    scheme = "upto"
    traits = PERMIT2_TRAITS

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

    def intent(self, request: PaymentRequest) -> SettlementIntent:
        """The settlement this request asks for (the requirements' amount), without any check
        (raises `BadRequest` for a malformed payload)."""
        return self._intent(request, parse_upto_payload(request.payload),
                            request.requirements.amount)

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
            transfer_method=self.traits.transfer_method, cap_amount=p.cap)

    async def _judge_revert(self, checked: Checked, error: RpcError) -> Rejection:
        revert = abi.decode_revert(error.data, error.message)
        return Rejection(classify_proxy_revert(revert) or self.traits.failure_reason, revert)


def _with_amount(request: PaymentRequest, amount: int) -> PaymentRequest:
    return replace(request, requirements=replace(request.requirements, amount=amount))

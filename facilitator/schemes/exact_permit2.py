"""The x402 `exact` scheme on EVM over Permit2 (`extra.assetTransferMethod: "permit2"`): the
payer signs a Permit2 `PermitWitnessTransferFrom` for the price with the x402 exact proxy as
spender and the witness `{to: payTo, validAfter}`; we settle it through `proxy.settle(...)`.

Routed here by payload shape (`permit2Authorization` present), as every SDK routes it.

Verification: the pure checks of `facilitator.core.exact_permit2`, then one batched round trip
that answers, in this precedence: ERC-1271 signature (only when ECDSA did not match), asset has
code, the Permit2 nonce is unused (`nonceBitmap`), `allowance(owner, Permit2)` and
`balanceOf(owner)` cover the amount, and a simulation of `proxy.settle(...)` from our signer
succeeds (`eth_createAccessList` when settling, which also sizes the gas limit).

Unlike upto, anyone may submit the permit to the exact proxy: a settlement whose nonce another
sender consumed is found by `services.tracker` (traits `front_run`) and recorded as settled by
that transaction when it paid payer -> payTo the permitted amount.
"""

from __future__ import annotations

import hashlib

from facilitator.core import abi
from facilitator.core.exact import Rejection
from facilitator.core.exact_permit2 import (
    EXACT_PROXY_ADDRESS,
    ExactPermit2Context,
    check_offchain,
    classify_exact_proxy_revert,
    exact_permit_digest,
)
from facilitator.core.permit2 import check_signature
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import RpcError
from facilitator.protocol.fields import to_checksum
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.permit2 import ExactPermit2Payload, parse_exact_permit2_payload
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import EXACT_PERMIT2_TRAITS, Checked, normalised_v
from facilitator.schemes.permit2 import Permit2Scheme


def fingerprint(chain_id: int, payment: ExactPermit2Payload) -> bytes:
    """Identity of the signed payment (the amount is the permit's own)."""
    p = payment.permit
    parts = ["exact-permit2", str(chain_id), p.owner, p.token, str(p.amount), p.spender,
             str(p.nonce), str(p.deadline), p.witness.to, str(p.witness.valid_after),
             normalised_v(payment.signature).hex()]
    return hashlib.sha256("|".join(parts).encode()).digest()


class ExactPermit2Scheme(Permit2Scheme):
    scheme = "exact"
    traits = EXACT_PERMIT2_TRAITS
    balance_reason = Reason.INSUFFICIENT_BALANCE  # the SDK's verify_permit2 answers this one

    def check_offchain(self, request: PaymentRequest, *, for_settle: bool = False
                       ) -> Rejection | Checked:
        """Pure checks and ECDSA (the same at verify and settle: the amount is exact). Raises
        `BadRequest` for a malformed payload."""
        payment = parse_exact_permit2_payload(request.payload)
        ctx = ExactPermit2Context(request=request, payment=payment, now=int(self._clock()))
        rejection = check_offchain(ctx)
        if rejection is not None:
            return rejection
        digest = exact_permit_digest(self.network.chain_id, payment.permit)
        return Checked(intent=self._intent(request, payment), digest=digest,
                       signature_check=check_signature(digest, payment),
                       payer=to_checksum(payment.permit.owner))

    def intent(self, request: PaymentRequest) -> SettlementIntent:
        """The settlement this request asks for, without any check (raises `BadRequest` for a
        malformed payload)."""
        return self._intent(request, parse_exact_permit2_payload(request.payload))

    def _intent(self, request: PaymentRequest, payment: ExactPermit2Payload
                ) -> SettlementIntent:
        p = payment.permit
        settle = abi.ExactProxySettle(token=p.token, amount=p.amount, nonce=p.nonce,
                                      deadline=p.deadline, owner=p.owner, to=p.witness.to,
                                      valid_after=p.witness.valid_after)
        return SettlementIntent(
            scheme=self.scheme, x402_version=request.version, network=request.network,
            chain_id=self.network.chain_id, asset=p.token, payer=p.owner, pay_to=p.witness.to,
            amount=p.amount, nonce=p.nonce.to_bytes(32, "big"),
            valid_after=p.witness.valid_after, valid_before=p.deadline,
            signature=payment.signature, fingerprint=fingerprint(self.network.chain_id, payment),
            call_to=EXACT_PROXY_ADDRESS,
            calldata=abi.exact_proxy_settle(settle, normalised_v(payment.signature)),
            transfer_method=self.traits.transfer_method)

    async def _judge_revert(self, checked: Checked, error: RpcError) -> Rejection:
        revert = abi.decode_revert(error.data, error.message)
        return Rejection(classify_exact_proxy_revert(revert) or self.traits.failure_reason,
                         revert)

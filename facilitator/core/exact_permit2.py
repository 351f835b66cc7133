"""Permit2 `PermitWitnessTransferFrom` with the x402 exact witness `Witness(address to,uint256
validAfter)`: the EIP-712 digest and the pure checks of an `exact` payment whose requirements
say `extra.assetTransferMethod: "permit2"`. Pure.

Precedence (first failure decides), the Python SDK 2.25.0's `verify_permit2`:

  1. scheme        accepted and requirements scheme are "exact"
  2. network       paid on the requirements' network
  3. spender       the x402 exact Permit2 proxy
  4. recipient     witness.to == payTo
  5. deadline      deadline >= now + 6 s
  6. valid_after   witness.validAfter <= now
  7. amount        permitted.amount == the required amount (exact equality)
  8. token         permitted.token == asset
  9. signature     present, and recovers (ECDSA, low-s) to the owner — else the chain decides
                   (ERC-1271)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eth_hash.auto import keccak

from facilitator.core.eip712 import address_word, word
from facilitator.core.exact import Rejection, paid_on_required_network, scheme_is_exact
from facilitator.core.permit2 import (
    DEADLINE_BUFFER_S,
    SignedTransfer,
    permit_witness_typehash,
    witness_transfer_digest,
)
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.permit2 import ExactPermit2Payload, ExactPermitTransfer
from facilitator.protocol.reasons import Reason

EXACT_PROXY_ADDRESS = "0x402085c248eea27d92e8b30b2c58ed07f9e20001"

EXACT_WITNESS_TYPE = b"Witness(address to,uint256 validAfter)"
EXACT_WITNESS_TYPEHASH = keccak(EXACT_WITNESS_TYPE)
EXACT_PERMIT_WITNESS_TYPEHASH = permit_witness_typehash(EXACT_WITNESS_TYPE)


def exact_permit_digest(chain_id: int, permit: ExactPermitTransfer) -> bytes:
    witness = keccak(EXACT_WITNESS_TYPEHASH + address_word(permit.witness.to)
                     + word(permit.witness.valid_after))
    transfer = SignedTransfer(permit.token, permit.amount, permit.spender, permit.nonce,
                              permit.deadline)
    return witness_transfer_digest(chain_id, EXACT_PERMIT_WITNESS_TYPEHASH, transfer, witness)


@dataclass(frozen=True, slots=True)
class ExactPermit2Context:
    request: PaymentRequest
    payment: ExactPermit2Payload
    now: int


def _spender(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.spender != EXACT_PROXY_ADDRESS:
        return Rejection(Reason.PERMIT2_INVALID_SPENDER,
                         "spender must be the x402 exact Permit2 proxy")
    return None


def _recipient(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.witness.to != ctx.request.requirements.pay_to:
        return Rejection(Reason.PERMIT2_RECIPIENT_MISMATCH, "witness.to is not payTo")
    return None


def _deadline(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.deadline < ctx.now + DEADLINE_BUFFER_S:
        return Rejection(Reason.PERMIT2_DEADLINE_EXPIRED,
                         f"deadline must be at least {DEADLINE_BUFFER_S} s in the future")
    return None


def _valid_after(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.witness.valid_after > ctx.now:
        return Rejection(Reason.PERMIT2_NOT_YET_VALID, "witness.validAfter is in the future")
    return None


def _amount(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.amount != ctx.request.requirements.amount:
        return Rejection(Reason.PERMIT2_AMOUNT_MISMATCH,
                         f"permitted amount {ctx.payment.permit.amount} is not the required "
                         f"{ctx.request.requirements.amount}")
    return None


def _token(ctx: ExactPermit2Context) -> Rejection | None:
    if ctx.payment.permit.token != ctx.request.requirements.asset:
        return Rejection(Reason.PERMIT2_TOKEN_MISMATCH, "permitted.token is not the asset")
    return None


def _signature_present(ctx: ExactPermit2Context) -> Rejection | None:
    if not ctx.payment.signature:
        return Rejection(Reason.PERMIT2_INVALID_SIGNATURE, "signature is empty")
    return None


ORDERED_CHECKS: tuple[Callable[[ExactPermit2Context], Rejection | None], ...] = (
    scheme_is_exact, paid_on_required_network, _spender, _recipient, _deadline, _valid_after,
    _amount, _token, _signature_present,
)


def check_offchain(ctx: ExactPermit2Context) -> Rejection | None:
    for check in ORDERED_CHECKS:
        rejection = check(ctx)
        if rejection is not None:
            return rejection
    return None


def classify_exact_proxy_revert(revert: str) -> Reason | None:
    """The SDK's `_map_settle_error` (exact Permit2), over our decoded revert text, in its
    order; anything else (e.g. Permit2's `InvalidSigner`) is the caller's `transaction_failed`."""
    table = (("Permit2612AmountMismatch", Reason.PERMIT2_2612_AMOUNT_MISMATCH),
             ("InvalidAmount", Reason.EXACT_PERMIT2_INVALID_AMOUNT),
             ("InvalidDestination", Reason.EXACT_PERMIT2_INVALID_DESTINATION),
             ("InvalidOwner", Reason.EXACT_PERMIT2_INVALID_OWNER),
             ("PaymentTooEarly", Reason.PERMIT2_PAYMENT_TOO_EARLY),
             ("InvalidSignature", Reason.PERMIT2_INVALID_SIGNATURE),
             ("SignatureExpired", Reason.PERMIT2_INVALID_SIGNATURE),
             ("InvalidNonce", Reason.PERMIT2_INVALID_NONCE))
    return next((reason for name, reason in table if name in revert), None)

"""Permit2 `PermitWitnessTransferFrom` with the x402 upto witness: the EIP-712 digest and the
pure checks of an `upto` payment. Pure.

Precedence (first failure decides), following the Python SDK 2.25.0's `verify_upto_permit2`:

  1. scheme        accepted and requirements scheme are "upto"
  2. network       paid on the requirements' network
  3. spender       the x402 upto Permit2 proxy
  4. recipient     witness.to == payTo
  5. facilitator   witness.facilitator is one of our signers
  6. deadline      deadline >= now + 6 s
  7. valid_after   witness.validAfter <= now
  8. cap           permitted.amount >= the required amount (the SDK demands equality at
                   verify; the session cap may exceed a price, so we accept more, never less)
  9. token         permitted.token == asset
 10. signature     present, and recovers (ECDSA, low-s) to the owner — else the chain decides
                   (ERC-1271)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eth_hash.auto import keccak

from facilitator.core.ecdsa import recover_address
from facilitator.core.eip712 import address_word, typed_digest, word
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.permit2 import (
    ExactPermit2Payload,
    PermitWitnessTransfer,
    UptoPayload,
)
from facilitator.protocol.reasons import Reason

SCHEME = "upto"
PERMIT2_ADDRESS = "0x000000000022d473030f116ddee9f6b43ac78ba3"
UPTO_PROXY_ADDRESS = "0x4020a4f3b7b90cca423b9fabcc0ce57c6c240002"
DEADLINE_BUFFER_S = 6

DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
TOKEN_PERMISSIONS_TYPEHASH = keccak(b"TokenPermissions(address token,uint256 amount)")
WITNESS_TYPE = b"Witness(address to,address facilitator,uint256 validAfter)"
WITNESS_TYPEHASH = keccak(WITNESS_TYPE)


def permit_witness_typehash(witness_type: bytes) -> bytes:
    """The PermitWitnessTransferFrom type Permit2 hashes for a proxy's witness type."""
    return keccak(
        b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
        b"uint256 deadline,Witness witness)TokenPermissions(address token,uint256 amount)"
        + witness_type)


PERMIT_WITNESS_TYPEHASH = permit_witness_typehash(WITNESS_TYPE)


def permit2_domain_separator(chain_id: int) -> bytes:
    return keccak(DOMAIN_TYPEHASH + keccak(b"Permit2") + word(chain_id)
                  + address_word(PERMIT2_ADDRESS))


def witness_hash(permit: PermitWitnessTransfer) -> bytes:
    w = permit.witness
    return keccak(WITNESS_TYPEHASH + address_word(w.to) + address_word(w.facilitator)
                  + word(w.valid_after))


@dataclass(frozen=True, slots=True)
class SignedTransfer:
    """The fields of a PermitWitnessTransferFrom outside the witness, whatever the proxy."""

    token: str
    amount: int
    spender: str
    nonce: int
    deadline: int


def witness_transfer_digest(chain_id: int, typehash: bytes, transfer: SignedTransfer,
                            witness: bytes) -> bytes:
    """The EIP-712 digest of a Permit2 PermitWitnessTransferFrom; `typehash` names the witness
    type (`permit_witness_typehash`) and `witness` is the witness struct's hash."""
    permitted = keccak(TOKEN_PERMISSIONS_TYPEHASH + address_word(transfer.token)
                       + word(transfer.amount))
    struct = keccak(typehash + permitted + address_word(transfer.spender)
                    + word(transfer.nonce) + word(transfer.deadline) + witness)
    return typed_digest(permit2_domain_separator(chain_id), struct)


def permit_digest(chain_id: int, permit: PermitWitnessTransfer) -> bytes:
    transfer = SignedTransfer(permit.token, permit.cap, permit.spender, permit.nonce,
                              permit.deadline)
    return witness_transfer_digest(chain_id, PERMIT_WITNESS_TYPEHASH, transfer,
                                   witness_hash(permit))


@dataclass(frozen=True, slots=True)
class UptoContext:
    request: PaymentRequest
    payment: UptoPayload
    facilitators: frozenset[str]  # our signer addresses, lower-case
    now: int


def _scheme(ctx: UptoContext) -> Rejection | None:
    if ctx.request.scheme != SCHEME or ctx.request.requirements.scheme != SCHEME:
        return Rejection(Reason.UPTO_INVALID_SCHEME, "scheme must be upto")
    return None


def _network(ctx: UptoContext) -> Rejection | None:
    if ctx.request.network != ctx.request.requirements.network:
        return Rejection(Reason.UPTO_NETWORK_MISMATCH, "paid on another network")
    return None


def _spender(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.spender != UPTO_PROXY_ADDRESS:
        return Rejection(Reason.PERMIT2_INVALID_SPENDER,
                         "spender must be the x402 upto Permit2 proxy")
    return None


def _recipient(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.witness.to != ctx.request.requirements.pay_to:
        return Rejection(Reason.PERMIT2_RECIPIENT_MISMATCH, "witness.to is not payTo")
    return None


def _facilitator(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.witness.facilitator not in ctx.facilitators:
        return Rejection(Reason.UPTO_FACILITATOR_MISMATCH,
                         "witness.facilitator is not a signer of this facilitator")
    return None


def _deadline(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.deadline < ctx.now + DEADLINE_BUFFER_S:
        return Rejection(Reason.PERMIT2_DEADLINE_EXPIRED,
                         f"deadline must be at least {DEADLINE_BUFFER_S} s in the future")
    return None


def _valid_after(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.witness.valid_after > ctx.now:
        return Rejection(Reason.PERMIT2_NOT_YET_VALID, "witness.validAfter is in the future")
    return None


def _cap(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.cap < ctx.request.requirements.amount:
        return Rejection(Reason.PERMIT2_AMOUNT_MISMATCH,
                         f"permitted amount {ctx.payment.permit.cap} is below the required "
                         f"{ctx.request.requirements.amount}")
    return None


def _token(ctx: UptoContext) -> Rejection | None:
    if ctx.payment.permit.token != ctx.request.requirements.asset:
        return Rejection(Reason.PERMIT2_TOKEN_MISMATCH, "permitted.token is not the asset")
    return None


def _signature_present(ctx: UptoContext) -> Rejection | None:
    if not ctx.payment.signature:
        return Rejection(Reason.PERMIT2_INVALID_SIGNATURE, "signature is empty")
    return None


ORDERED_CHECKS: tuple[Callable[[UptoContext], Rejection | None], ...] = (
    _scheme, _network, _spender, _recipient, _facilitator, _deadline, _valid_after, _cap,
    _token, _signature_present,
)


def check_offchain(ctx: UptoContext) -> Rejection | None:
    for check in ORDERED_CHECKS:
        rejection = check(ctx)
        if rejection is not None:
            return rejection
    return None


def check_signature(digest: bytes, payment: UptoPayload | ExactPermit2Payload) -> SignatureCheck:
    if recover_address(digest, payment.signature) == payment.permit.owner:
        return SignatureCheck.VALID_EOA
    return SignatureCheck.NEEDS_CONTRACT_CHECK


def classify_proxy_revert(revert: str) -> Reason | None:
    """The SDK's `_map_upto_settle_error`, over our decoded revert text."""
    table = (("Permit2612AmountMismatch", Reason.PERMIT2_2612_AMOUNT_MISMATCH),
             ("AmountExceedsPermitted", Reason.UPTO_AMOUNT_EXCEEDS_PERMITTED),
             ("UnauthorizedFacilitator", Reason.UPTO_UNAUTHORIZED_FACILITATOR),
             ("InvalidDestination", Reason.PERMIT2_INVALID_DESTINATION),
             ("InvalidOwner", Reason.PERMIT2_INVALID_OWNER),
             ("PaymentTooEarly", Reason.PERMIT2_PAYMENT_TOO_EARLY),
             ("InvalidNonce", Reason.PERMIT2_INVALID_NONCE),
             ("InvalidAmount", Reason.PERMIT2_INVALID_AMOUNT),
             ("InvalidSignature", Reason.PERMIT2_INVALID_SIGNATURE),
             ("InvalidSigner", Reason.PERMIT2_INVALID_SIGNATURE),
             ("SignatureExpired", Reason.PERMIT2_INVALID_SIGNATURE))
    return next((reason for name, reason in table if name in revert), None)

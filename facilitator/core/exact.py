"""Pure verification of an `exact` / EIP-3009 payment: the checks that need no chain.

Precedence (first failure decides the reason), following the Python SDK 2.25.0's
`ExactEvmScheme._verify`, with one hardening the SDK lacks (the `accepted` binding):

  1. scheme            accepted/payload scheme and requirements scheme are "exact"
  2. network           the client paid on the requirements' network
  3. accepted binding  v2 `accepted` equals the requirements in asset, payTo and amount
  4. eip712 domain     requirements.extra has string `name` and `version`
  5. recipient         authorization.to == payTo
  6. value             authorization.value == amount (exact equality, as every SDK)
  7. valid_before      validBefore >= now + 6 s (the SDK's safety margin)
  8. valid_after       validAfter <= now
  9. signature         present, and recovers (ECDSA, low-s) to authorization.from

Step 9 may end in "needs a contract check" when ECDSA does not match: the payer may be an
ERC-1271 wallet, which only the chain can answer. Everything here is deterministic given `now`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from facilitator.core.ecdsa import recover_address
from facilitator.core.eip712 import domain_separator, transfer_authorization_digest
from facilitator.protocol.eip3009 import Eip3009Payload
from facilitator.protocol.messages import PaymentRequest
from facilitator.protocol.reasons import Reason

SCHEME = "exact"
VALID_BEFORE_BUFFER_S = 6
ERC6492_MAGIC_SUFFIX = bytes.fromhex("64926492" * 8)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    message: str


class SignatureCheck(Enum):
    VALID_EOA = "valid_eoa"
    NEEDS_CONTRACT_CHECK = "needs_contract_check"  # ERC-1271 (or an invalid EOA signature)
    COUNTERFACTUAL_WALLET = "counterfactual_wallet"  # ERC-6492 wrapped


@dataclass(frozen=True, slots=True)
class ExactContext:
    request: PaymentRequest
    payment: Eip3009Payload
    chain_id: int
    now: int


class _WithRequest(Protocol):
    @property
    def request(self) -> PaymentRequest: ...


# The first two checks of every `exact` payment, whatever its transfer method
# (`core.exact_permit2` runs them too).
def scheme_is_exact(ctx: _WithRequest) -> Rejection | None:
    if ctx.request.scheme != SCHEME or ctx.request.requirements.scheme != SCHEME:
        return Rejection(Reason.UNSUPPORTED_SCHEME, f"scheme {ctx.request.scheme!r} is not exact")
    return None


def paid_on_required_network(ctx: _WithRequest) -> Rejection | None:
    if ctx.request.network != ctx.request.requirements.network:
        return Rejection(Reason.NETWORK_MISMATCH,
                         f"paid on {ctx.request.network}, "
                         f"required {ctx.request.requirements.network}")
    return None


def _accepted_binding(ctx: ExactContext) -> Rejection | None:
    accepted, required = ctx.request.accepted, ctx.request.requirements
    if accepted is None:  # v1 has no `accepted`
        return None
    if accepted.pay_to != required.pay_to:
        return Rejection(Reason.RECIPIENT_MISMATCH, "accepted.payTo differs from the requirements")
    if accepted.amount != required.amount:
        return Rejection(Reason.VALUE_MISMATCH, "accepted.amount differs from the requirements")
    if accepted.asset != required.asset:
        return Rejection(Reason.INVALID_PAYMENT_REQUIREMENTS,
                         "accepted.asset differs from the requirements' asset")
    return None


def _eip712_domain(ctx: ExactContext) -> Rejection | None:
    extra = ctx.request.requirements.extra
    if not isinstance(extra.get("name"), str) or not isinstance(extra.get("version"), str):
        return Rejection(Reason.MISSING_EIP712_DOMAIN,
                         "requirements.extra must carry the token's EIP-712 name and version")
    return None


def _recipient(ctx: ExactContext) -> Rejection | None:
    if ctx.payment.authorization.pay_to != ctx.request.requirements.pay_to:
        return Rejection(Reason.RECIPIENT_MISMATCH,
                         "authorization.to is not the requirements' payTo")
    return None


def _value(ctx: ExactContext) -> Rejection | None:
    if ctx.payment.authorization.value != ctx.request.requirements.amount:
        return Rejection(Reason.VALUE_MISMATCH,
                         f"authorization.value {ctx.payment.authorization.value} != amount "
                         f"{ctx.request.requirements.amount}")
    return None


def _valid_before(ctx: ExactContext) -> Rejection | None:
    if ctx.payment.authorization.valid_before < ctx.now + VALID_BEFORE_BUFFER_S:
        return Rejection(Reason.VALID_BEFORE_EXPIRED,
                         f"validBefore must be at least {VALID_BEFORE_BUFFER_S} s in the future")
    return None


def _valid_after(ctx: ExactContext) -> Rejection | None:
    if ctx.payment.authorization.valid_after > ctx.now:
        return Rejection(Reason.VALID_AFTER_FUTURE, "validAfter is in the future")
    return None


def _signature_present(ctx: ExactContext) -> Rejection | None:
    if not ctx.payment.signature:
        return Rejection(Reason.INVALID_SIGNATURE, "signature is empty")
    return None


ORDERED_CHECKS: tuple[Callable[[ExactContext], Rejection | None], ...] = (
    scheme_is_exact, paid_on_required_network, _accepted_binding, _eip712_domain, _recipient,
    _value, _valid_before, _valid_after, _signature_present,
)


def check_offchain(ctx: ExactContext) -> Rejection | None:
    """Steps 1-8 and the signature-presence part of 9; the first failure wins."""
    for check in ORDERED_CHECKS:
        rejection = check(ctx)
        if rejection is not None:
            return rejection
    return None


def authorization_digest(ctx: ExactContext) -> bytes:
    """The EIP-712 digest the payer signed, under the domain the requirements name."""
    extra = ctx.request.requirements.extra
    separator = domain_separator(extra["name"], extra["version"], ctx.chain_id,
                                 ctx.request.requirements.asset)
    return transfer_authorization_digest(separator, ctx.payment.authorization)


def check_signature(digest: bytes, payment: Eip3009Payload) -> SignatureCheck:
    """ECDSA first (no RPC); anything else needs the chain to decide."""
    signature = payment.signature
    if len(signature) > 32 and signature.endswith(ERC6492_MAGIC_SUFFIX):
        return SignatureCheck.COUNTERFACTUAL_WALLET
    if recover_address(digest, signature) == payment.authorization.payer:
        return SignatureCheck.VALID_EOA
    return SignatureCheck.NEEDS_CONTRACT_CHECK


def classify_transfer_revert(revert: str) -> Reason | None:
    """Map a `transferWithAuthorization` revert to a reason, as the SDK's
    `parse_eip3009_transfer_error` does; None when the revert says nothing specific."""
    text = revert.lower()
    if "authorization is expired" in text or "authorizationexpired" in text:
        return Reason.VALID_BEFORE_EXPIRED
    if "authorization is not yet valid" in text or "authorizationnotyetvalid" in text:
        return Reason.VALID_AFTER_FUTURE
    if any(s in text for s in ("authorization is used", "authorizationalreadyused",
                               "authorizationusedorcanceled")):
        return Reason.NONCE_ALREADY_USED
    if "transfer amount exceeds balance" in text or "erc20insufficientbalance" in text:
        return Reason.INSUFFICIENT_BALANCE
    if any(s in text for s in ("invalid signature", "signermismatch", "invalidsignaturev",
                               "invalidsignatures")):
        return Reason.INVALID_SIGNATURE
    return None

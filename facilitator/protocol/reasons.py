"""x402 reason codes: the strings the official Python SDK (PyPI `x402` 2.25.0) puts in
`invalidReason` / `errorReason`, character for character.

Guarantee: every value here is a string the SDK (or the x402 v2 spec, §9) emits for the same
condition. `tests/unit/test_reasons.py` checks each value against the installed SDK's constants.
Only `settlement_pending` is machine-interpreted by clients (one automatic retry); the rest are
shown to the buyer, so precision matters more than brevity.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Envelope and routing (x402 v2 spec §9 and the SDK mechanisms).
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_PAYMENT_REQUIREMENTS = "invalid_payment_requirements"
    INVALID_X402_VERSION = "invalid_x402_version"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    NETWORK_MISMATCH = "network_mismatch"
    FAILED_TO_GET_NETWORK_CONFIG = "invalid_exact_evm_failed_to_get_network_config"
    UNEXPECTED_VERIFY_ERROR = "unexpected_verify_error"
    UNEXPECTED_SETTLE_ERROR = "unexpected_settle_error"

    # exact / EIP-3009 payload checks (SDK `mechanisms/evm/constants.py`).
    MISSING_EIP712_DOMAIN = "missing_eip712_domain"
    RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
    VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
    VALID_BEFORE_EXPIRED = "invalid_exact_evm_payload_authorization_valid_before"
    VALID_AFTER_FUTURE = "invalid_exact_evm_payload_authorization_valid_after"
    INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
    FAILED_TO_VERIFY_SIGNATURE = "invalid_exact_evm_failed_to_verify_signature"
    UNDEPLOYED_SMART_WALLET = "invalid_exact_evm_payload_undeployed_smart_wallet"
    FACTORY_NOT_ALLOWED = "eip6492_factory_not_allowed"

    # exact / EIP-3009 on-chain checks and simulation diagnosis.
    ASSET_NOT_DEPLOYED = "asset_not_deployed_contract"
    NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"
    INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
    EIP3009_NOT_SUPPORTED = "invalid_exact_evm_eip3009_not_supported"
    TOKEN_NAME_MISMATCH = "invalid_exact_evm_token_name_mismatch"
    TOKEN_VERSION_MISMATCH = "invalid_exact_evm_token_version_mismatch"
    SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"

    # Settlement outcomes.
    TRANSACTION_FAILED = "transaction_failed"
    TRANSFER_EVENT_MISMATCH = "invalid_exact_evm_transfer_event_mismatch"
    SETTLEMENT_PENDING = "settlement_pending"
    INVALID_TRANSACTION_STATE = "invalid_transaction_state"

    # Permit2 (exact with assetTransferMethod "permit2", and upto).
    PERMIT2_INVALID_SPENDER = "invalid_permit2_spender"
    PERMIT2_RECIPIENT_MISMATCH = "invalid_permit2_recipient_mismatch"
    PERMIT2_DEADLINE_EXPIRED = "permit2_deadline_expired"
    PERMIT2_NOT_YET_VALID = "permit2_not_yet_valid"
    PERMIT2_AMOUNT_MISMATCH = "permit2_amount_mismatch"
    PERMIT2_TOKEN_MISMATCH = "permit2_token_mismatch"
    PERMIT2_INVALID_SIGNATURE = "invalid_permit2_signature"
    PERMIT2_ALLOWANCE_REQUIRED = "permit2_allowance_required"
    PERMIT2_INSUFFICIENT_BALANCE = "permit2_insufficient_balance"
    PERMIT2_INVALID_PAYLOAD_FORMAT = "invalid_permit2_payload_format"
    PERMIT2_INVALID_NONCE = "permit2_invalid_nonce"
    PERMIT2_INVALID_AMOUNT = "permit2_invalid_amount"
    PERMIT2_INVALID_DESTINATION = "permit2_invalid_destination"
    PERMIT2_INVALID_OWNER = "permit2_invalid_owner"
    PERMIT2_PAYMENT_TOO_EARLY = "permit2_payment_too_early"
    PERMIT2_2612_AMOUNT_MISMATCH = "permit2_2612_amount_mismatch"
    UNSUPPORTED_PAYLOAD_TYPE = "unsupported_payload_type"
    # exact Permit2 proxy reverts: the SDK's exact `_map_settle_error` spells these three
    # differently from the constants its upto mapper uses.
    EXACT_PERMIT2_INVALID_AMOUNT = "invalid_permit2_amount"
    EXACT_PERMIT2_INVALID_DESTINATION = "invalid_permit2_destination"
    EXACT_PERMIT2_INVALID_OWNER = "invalid_permit2_owner"

    # upto (SDK `mechanisms/evm/constants.py`, upto section).
    UPTO_INVALID_SCHEME = "invalid_upto_evm_scheme"
    UPTO_NETWORK_MISMATCH = "invalid_upto_evm_network_mismatch"
    UPTO_FAILED_TO_GET_NETWORK_CONFIG = "invalid_upto_evm_failed_to_get_network_config"
    UPTO_SETTLEMENT_EXCEEDS_AMOUNT = "invalid_upto_evm_payload_settlement_exceeds_amount"
    UPTO_FACILITATOR_MISMATCH = "upto_facilitator_mismatch"
    UPTO_AMOUNT_EXCEEDS_PERMITTED = "upto_amount_exceeds_permitted"
    UPTO_UNAUTHORIZED_FACILITATOR = "upto_unauthorized_facilitator"
    UPTO_TRANSACTION_FAILED = "invalid_upto_evm_transaction_failed"


# Reasons that come from the x402 v2 specification (§9) rather than from an SDK mechanism's
# constants module; the reason test checks these against the spec list instead.
SPEC_ONLY_REASONS = frozenset({
    Reason.INVALID_PAYLOAD,
    Reason.INVALID_PAYMENT_REQUIREMENTS,
    Reason.INVALID_X402_VERSION,
    Reason.UNEXPECTED_VERIFY_ERROR,
    Reason.UNEXPECTED_SETTLE_ERROR,
    Reason.INVALID_TRANSACTION_STATE,
})

"""Every reason code we emit is one the official SDK emits, or one the x402 v2 spec lists."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import x402
import x402.mechanisms.evm.constants as sdk_constants

from facilitator.protocol.reasons import SPEC_ONLY_REASONS, Reason

# x402 v2 specification §9 (as collected in /work/shared/notes/x402-protocol.md §3.1; the v1
# name `invalid_exact_evm_payload_authorization_value` is kept alongside the v2 one).
SPEC_SECTION_9 = frozenset({
    "insufficient_funds",
    "invalid_exact_evm_payload_authorization_valid_after",
    "invalid_exact_evm_payload_authorization_valid_before",
    "invalid_exact_evm_payload_authorization_value_mismatch",
    "invalid_exact_evm_payload_authorization_value",
    "invalid_exact_evm_payload_signature",
    "invalid_exact_evm_payload_recipient_mismatch",
    "invalid_network",
    "invalid_payload",
    "invalid_payment_requirements",
    "invalid_scheme",
    "unsupported_scheme",
    "invalid_x402_version",
    "invalid_transaction_state",
    "unexpected_verify_error",
    "unexpected_settle_error",
})

_REASON_KEYWORDS = {"invalid_reason", "error_reason", "invalidReason", "errorReason"}


def _sdk_reason_strings() -> set[str]:
    """`ERR_*` constants of the EVM constants module, plus every string constant assigned to an
    `ERR_*` name or passed as `invalid_reason=`/`error_reason=` anywhere in the installed SDK."""
    found = {value for name, value in vars(sdk_constants).items()
             if name.startswith("ERR_") and isinstance(value, str)}
    for path in Path(x402.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                if any(isinstance(t, ast.Name) and (t.id.startswith("ERR_")
                                                    or t.id in _REASON_KEYWORDS)
                       for t in node.targets):  # also `error_reason = "..."` in mappers
                    found.add(node.value.value)
            elif isinstance(node, ast.keyword) and node.arg in _REASON_KEYWORDS \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value in _REASON_KEYWORDS \
                            and isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found.add(value.value)
    return found


SDK_REASONS = _sdk_reason_strings()


def test_sdk_scan_finds_the_known_constants() -> None:
    # Guards the scanner itself: a broken scan would make the next test vacuous.
    assert sdk_constants.ERR_INVALID_SIGNATURE in SDK_REASONS
    assert "invalid_permit2_payload_format" in SDK_REASONS  # only a keyword literal in the SDK
    assert len(SDK_REASONS) > 40


def test_every_reason_is_an_sdk_string_or_declared_spec_only() -> None:
    unknown = {r.value for r in Reason if r.value not in SDK_REASONS and r not in SPEC_ONLY_REASONS}
    assert unknown == set()


def test_spec_only_reasons_are_in_the_spec_list() -> None:
    assert {r.value for r in SPEC_ONLY_REASONS} <= SPEC_SECTION_9


def test_spec_only_reasons_are_reasons() -> None:
    assert all(isinstance(r, Reason) for r in SPEC_ONLY_REASONS)


def test_reason_values_are_unique() -> None:
    counts = Counter(member.value for member in Reason.__members__.values())
    assert [value for value, n in counts.items() if n > 1] == []


def test_reason_values_are_lower_snake_case() -> None:
    assert all(r.value == r.value.lower() and " " not in r.value and r.value for r in Reason)

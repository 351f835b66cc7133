"""`VerifyResponse` and `SettleResponse` exactly as the official SDKs parse them.

Guarantees: field names are the wire's camelCase; optional fields are omitted rather than null
(the SDK serialises with `exclude_none`); a `SettleResponse` always carries `transaction` (""
when nothing was broadcast) and `network`, which the Python SDK requires; messages are cut to
500 characters like the SDK's `truncate_error_message`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from facilitator.protocol.reasons import Reason
from facilitator.invariant import invariant

MAX_MESSAGE_CHARS = 500


def _truncate(message: str | None) -> str | None:
    if message is None or len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class VerifyResponse:
    is_valid: bool
    invalid_reason: Reason | None = None
    invalid_message: str | None = None
    payer: str | None = None

    def __post_init__(self) -> None:
        invariant(self.is_valid == (self.invalid_reason is None),
                  "invalid needs a reason, valid none")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"isValid": self.is_valid}
        if self.invalid_reason is not None:
            body["invalidReason"] = str(self.invalid_reason)
        if self.invalid_message:
            body["invalidMessage"] = _truncate(self.invalid_message)
        if self.payer:
            body["payer"] = self.payer
        return body


@dataclass(frozen=True, slots=True)
class SettleResponse:
    success: bool
    network: str
    transaction: str = ""
    error_reason: Reason | None = None
    error_message: str | None = None
    payer: str | None = None
    amount: str | None = None
    extensions: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        invariant(self.success == (self.error_reason is None),
                  "failure needs a reason, success none")
        invariant(not self.success or self.transaction or self.amount == "0", "success needs a tx")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": self.success}
        if self.error_reason is not None:
            body["errorReason"] = str(self.error_reason)
        if self.error_message:
            body["errorMessage"] = _truncate(self.error_message)
        if self.payer:
            body["payer"] = self.payer
        body["transaction"] = self.transaction
        body["network"] = self.network
        if self.amount is not None:
            body["amount"] = self.amount
        if self.extensions:
            body["extensions"] = dict(self.extensions)
        return body

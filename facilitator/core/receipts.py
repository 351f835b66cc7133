"""What a transaction receipt proves about a payment. Pure.

A receipt with status 1 is not proof of payment (x402 issues #2385/#2727/#3032): we require the
asset contract's own `Transfer(payer, payTo, amount)` log in it. The filters and the call check
here find a payment someone else's transaction settled (front-running).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facilitator.core.abi import (
    AUTHORIZATION_USED_TOPIC,
    TRANSFER_TOPIC,
    decode_exact_proxy_settle,
)
from facilitator.core.exact_permit2 import EXACT_PROXY_ADDRESS


@dataclass(frozen=True, slots=True)
class ExpectedTransfer:
    asset: str  # lower-case hex
    payer: str
    pay_to: str
    amount: int


def _topic_address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


def find_transfer_log(receipt: dict[str, Any], expected: ExpectedTransfer) -> int | None:
    """Log index of the expected Transfer in the receipt, or None."""
    for log in receipt.get("logs") or []:
        topics = log.get("topics") or []
        if (len(topics) == 3 and str(log.get("address", "")).lower() == expected.asset
                and topics[0] == "0x" + TRANSFER_TOPIC.hex()
                and _topic_address(topics[1]) == expected.payer
                and _topic_address(topics[2]) == expected.pay_to
                and int(log.get("data") or "0x0", 16) == expected.amount):
            return int(log["logIndex"], 16)
    return None


def receipt_succeeded(receipt: dict[str, Any]) -> bool:
    return int(receipt.get("status") or "0x0", 16) == 1


def authorization_used_filter(asset: str, payer: str, nonce: bytes, from_block: int
                              ) -> dict[str, Any]:
    """eth_getLogs filter for the EIP-3009 AuthorizationUsed(payer, nonce) event of an asset."""
    return {"address": asset, "fromBlock": hex(max(from_block, 0)), "toBlock": "latest",
            "topics": ["0x" + AUTHORIZATION_USED_TOPIC.hex(), "0x" + "00" * 12 + payer[2:],
                       "0x" + nonce.hex()]}


def transfer_filter(expected: ExpectedTransfer, from_block: int) -> dict[str, Any]:
    """eth_getLogs filter for the asset's Transfer(payer -> payTo) events."""
    return {"address": expected.asset, "fromBlock": hex(max(from_block, 0)), "toBlock": "latest",
            "topics": ["0x" + TRANSFER_TOPIC.hex(), "0x" + "00" * 12 + expected.payer[2:],
                       "0x" + "00" * 12 + expected.pay_to[2:]]}


def settles_exact_permit(tx: Any, expected: ExpectedTransfer, nonce: int) -> bool:
    """Is `tx` (an eth_getTransactionByHash answer) a call of the x402 exact proxy's settle for
    this owner's Permit2 `nonce`, paying payTo the amount of the asset? Permit2 emits no event
    per nonce, so the call itself is the evidence that a Transfer paid this permit."""
    if not isinstance(tx, dict) or str(tx.get("to") or "").lower() != EXACT_PROXY_ADDRESS:
        return False
    data = str(tx.get("input") or "0x")
    try:
        call = decode_exact_proxy_settle(bytes.fromhex(data[2:]))
    except ValueError:
        return False
    return (call is not None and call.owner == expected.payer and call.nonce == nonce
            and call.to == expected.pay_to and call.token == expected.asset
            and call.amount == expected.amount)

"""What both Permit2 schemes (`upto`, and `exact` with `assetTransferMethod: "permit2"`) check
on chain besides their simulation: the payer's ERC-1271 verdict, the Permit2 nonce unused
(`nonceBitmap`), `allowance(owner, Permit2)` and `balanceOf(owner)` covering the amount.

A read that fails (an RpcError for one slot) decides nothing here: the simulation that follows
names the real cause.
"""

from __future__ import annotations

from typing import Any

from facilitator.core import abi
from facilitator.core.exact import Rejection
from facilitator.core.permit2 import PERMIT2_ADDRESS
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import RpcError
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import (
    CallBatch,
    Checked,
    EvmScheme,
    eth_call,
    no_code,
    returns_magic,
)


class Permit2Scheme(EvmScheme):
    """An EvmScheme whose transfer goes through Permit2; subclasses set `balance_reason` (the
    SDKs name an insufficient balance differently per scheme) and judge their proxy's revert."""

    balance_reason = Reason.PERMIT2_INSUFFICIENT_BALANCE

    def _add_state_calls(self, batch: CallBatch, checked: Checked) -> None:
        intent = checked.intent
        nonce = int.from_bytes(intent.nonce, "big")
        batch.add("nonce_bitmap", "eth_call",
                  [eth_call(PERMIT2_ADDRESS, abi.nonce_bitmap(intent.payer, nonce >> 8)),
                   "latest"])
        batch.add("allowance", "eth_call",
                  [eth_call(intent.asset, abi.allowance(intent.payer, PERMIT2_ADDRESS)), "latest"])
        batch.add("balance", "eth_call",
                  [eth_call(intent.asset, abi.balance_of(intent.payer)), "latest"])

    def _judge_signature(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        if "payer_code" not in answer:
            return None
        if no_code(answer["payer_code"]) or not returns_magic(answer["erc1271"]):
            return Rejection(Reason.PERMIT2_INVALID_SIGNATURE,
                             "the permit signature does not recover to the owner")
        return None

    def _judge_state(self, checked: Checked, answer: dict[str, Any]) -> Rejection | None:
        intent = checked.intent
        return (_judge_nonce(intent, answer) or _judge_allowance(intent, answer)
                or _judge_balance(intent, answer, self.balance_reason))


def _judge_nonce(intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
    bitmap = answer["nonce_bitmap"]
    if isinstance(bitmap, RpcError):
        return None  # left to the simulation, which names the cause
    bit = int.from_bytes(intent.nonce, "big") & 0xFF
    if (abi.decode_uint(bitmap) >> bit) & 1:
        return Rejection(Reason.PERMIT2_INVALID_NONCE, "the Permit2 nonce was already used")
    return None


def _judge_allowance(intent: SettlementIntent, answer: dict[str, Any]) -> Rejection | None:
    allowance = answer["allowance"]
    if not isinstance(allowance, RpcError) and abi.decode_uint(allowance) < intent.amount:
        return Rejection(Reason.PERMIT2_ALLOWANCE_REQUIRED,
                         "the owner has not approved Permit2 for this amount")
    return None


def _judge_balance(intent: SettlementIntent, answer: dict[str, Any], reason: Reason
                   ) -> Rejection | None:
    balance = answer["balance"]
    if not isinstance(balance, RpcError) and abi.decode_uint(balance) < intent.amount:
        return Rejection(reason, f"owner balance {abi.decode_uint(balance)} < {intent.amount}")
    return None

"""The EIP-1559 fee rule for the facilitator's own transactions. Pure.

`maxFeePerGas` = 2 x base fee + tip survives six full blocks of base-fee growth (+12.5% each),
and is never above the operator's cap; the tip is never above the max fee. The one rule of the
payment broadcaster (`services/broadcaster.py`: its transactions and nonce fillers) and of the
OpenGradient data relay (`services/datarelay.py`).
"""

from __future__ import annotations


def capped_max_fee(base_fee: int, priority_fee: int, cap: int) -> int:
    """`maxFeePerGas` for a transaction sent now."""
    return min(2 * base_fee + priority_fee, cap)


def capped_priority_fee(priority_fee: int, max_fee: int) -> int:
    """`maxPriorityFeePerGas`: the wanted tip, never above the max fee."""
    return min(priority_fee, max_fee)

"""What a node's refusal of `eth_sendRawTransaction` means, from its error message. Pure.

Node clients word the same condition differently (geth / op-geth, erigon, reth, anvil, besu,
nethermind); these are the wordings the facilitator acts on. The payment broadcaster
(`services/broadcaster.py`), its tracker's re-sends (`services/tracker.py`) and the
OpenGradient data relay (`services/datarelay.py`) all classify through here.
"""

from __future__ import annotations

_ALREADY_KNOWN = ("already known", "known transaction", "already imported")
_NONCE_TAKEN = ("nonce too low", "replacement transaction underpriced",
                "nonce has already been used")
_INSUFFICIENT_FUNDS = ("insufficient funds",)


def already_known(message: str) -> bool:
    """The node already holds these exact bytes: the send succeeded for our purposes."""
    return _mentions(message, _ALREADY_KNOWN)


def nonce_taken(message: str) -> bool:
    """The sender's nonce is used (mined) or held in the pool by a different transaction."""
    return _mentions(message, _NONCE_TAKEN)


def insufficient_funds(message: str) -> bool:
    """The sender cannot pay value + gas x max fee."""
    return _mentions(message, _INSUFFICIENT_FUNDS)


def _mentions(message: str, wordings: tuple[str, ...]) -> bool:
    text = message.lower()
    return any(w in text for w in wordings)

"""The classification of nodes' `eth_sendRawTransaction` refusals (`core.send_errors`), on the
wordings of the clients the facilitator meets: geth / op-geth, erigon, reth, anvil, besu,
nethermind."""

from __future__ import annotations

import pytest

from facilitator.core.send_errors import already_known, insufficient_funds, nonce_taken


@pytest.mark.parametrize("message", [
    "already known", "ALREADY KNOWN", "Known transaction: 0x1234",
    "transaction already imported", "txpool: already known (hash 0xab)"])
def test_already_known(message: str) -> None:
    assert already_known(message)
    assert not nonce_taken(message) and not insufficient_funds(message)


@pytest.mark.parametrize("message", [
    "nonce too low", "nonce too low: next nonce 5, tx nonce 4",
    "Nonce too low. Expected nonce to be 7 but got 3.",
    "replacement transaction underpriced", "Nonce has already been used"])
def test_nonce_taken(message: str) -> None:
    assert nonce_taken(message)
    assert not already_known(message) and not insufficient_funds(message)


@pytest.mark.parametrize("message", [
    "insufficient funds for gas * price + value",
    "Insufficient funds for gas * price + value: balance 0, tx cost 21000"])
def test_insufficient_funds(message: str) -> None:
    assert insufficient_funds(message)
    assert not already_known(message) and not nonce_taken(message)


@pytest.mark.parametrize("message", [
    "", "execution reverted", "intrinsic gas too low", "transaction underpriced",
    "max fee per gas less than block base fee", "nonce too high"])
def test_other_refusals_are_none_of_them(message: str) -> None:
    assert not (already_known(message) or nonce_taken(message) or insufficient_funds(message))

"""Fixtures for the contract tests: one real anvil per test module (automine) with TestUSDC
installed at the canonical Base Sepolia USDC address. Helpers live in contract_helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from contract_helpers import CHAIN_ID, OWNER_KEY
from web3 import AsyncWeb3
from web3.contract import AsyncContract

from facilitator.devnet import contracts
from facilitator.devnet.anvil import Anvil


@pytest.fixture(scope="module")
async def node() -> AsyncIterator[Anvil]:
    async with Anvil(chain_id=CHAIN_ID) as anvil:
        yield anvil


@pytest.fixture(scope="module")
async def w3(node: Anvil) -> AsyncIterator[AsyncWeb3]:
    async with contracts.connect(node.url) as web3:
        yield web3


@pytest.fixture(scope="module")
async def usdc_address(node: Anvil) -> str:
    return await contracts.install_usdc(node.url, OWNER_KEY)


@pytest.fixture(scope="module")
def usdc(w3: AsyncWeb3, usdc_address: str) -> AsyncContract:
    return contracts.contract_at(w3, contracts.load_artifact("TestUSDC"), usdc_address)



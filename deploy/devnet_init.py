"""One-shot initialiser of the compose devnet (profile `devnet`, local use only).

Places the TestUSDC contract at Base Sepolia's canonical USDC address on the anvil service and
mints USDC to anvil's public test accounts 1-5 (the payers of `make run`). The facilitator's
signer is anvil account 9, which anvil funds with ETH. Idempotent: safe to run again.

Runs in the facilitator image (`python /devnet/devnet_init.py`) with the repository's
contracts/artifacts mounted at /devnet/artifacts. DEVNET ONLY: these keys are public.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from eth_account import Account

from facilitator.devnet import contracts

# anvil's default mnemonic accounts 0 (USDC owner) and 1-5 (payers); never real funds.
OWNER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
PAYER_KEYS = (
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
)
PAYER_USDC = 1_000_000 * 10**6


async def main() -> int:
    rpc_url = os.environ.get("DEVNET_RPC_URL", "http://anvil:8545")
    # The package is installed from a wheel, so the committed artifacts are not beside it.
    contracts.ARTIFACTS_DIR = Path(os.environ.get("DEVNET_ARTIFACTS_DIR", "/devnet/artifacts"))
    usdc = await contracts.install_usdc(rpc_url, OWNER_KEY)
    for key in PAYER_KEYS:
        payer = Account.from_key(key).address
        await contracts.mint(rpc_url, OWNER_KEY, usdc, payer, PAYER_USDC)
        print(f"devnet: minted {PAYER_USDC // 10**6} USDC to {payer}", flush=True)
    print(f"devnet ready: USDC at {usdc} on {rpc_url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""The local devnet that `make run` starts: anvil as Base Sepolia (chain 84532) with the USDC
test token at the canonical address, funded payers, a private PostgreSQL (unless DATABASE_URL is
set), and the facilitator on 127.0.0.1:4022.

Guarantees: everything listens on loopback only; `.devnet/manifest.json` describes it all
(devnet keys only — anvil's public test keys, never real funds); stopping tears everything down.
The database is recreated on every start because the chain is new on every start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from eth_account import Account

from facilitator.app import Facilitator
from facilitator.config import load_settings
from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, REPO_ROOT, Anvil
from facilitator.devnet.postgres import PostgresCluster
from facilitator.protocol.networks import BASE_SEPOLIA_CHAIN_ID

log = logging.getLogger("facilitator.devnet")

DEVNET_DIR = REPO_ROOT / ".devnet"
DEVNET_DB = "facilitator_devnet"
OWNER_KEY = DEV_KEYS[0]
PAYER_KEYS = DEV_KEYS[1:6]
SIGNER_KEY = DEV_KEYS[9]
PAYER_USDC = 1_000_000 * 10**6


@dataclass
class Devnet:
    port: int = 4022
    rpc_port: int = 8545
    block_time_s: float | None = None
    directory: Path = DEVNET_DIR
    anvil: Anvil | None = None
    postgres: PostgresCluster | None = None
    facilitator: Facilitator | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> dict[str, Any]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.anvil = await Anvil(chain_id=BASE_SEPOLIA_CHAIN_ID, port=self.rpc_port,
                                 block_time_s=self.block_time_s,
                                 log_path=self.directory / "anvil.log").start()
        usdc = await contracts.install_usdc(self.anvil.url, OWNER_KEY)
        payers = [Account.from_key(k) for k in PAYER_KEYS]
        await asyncio.gather(*(contracts.mint(self.anvil.url, OWNER_KEY, usdc, p.address,
                                              PAYER_USDC) for p in payers))
        dsn = await self._database()
        env = {**os.environ, "DATABASE_URL": dsn, "FACILITATOR_SIGNER_KEY": SIGNER_KEY,
               "FACILITATOR_RPC_URLS": self.anvil.url, "FACILITATOR_PORT": str(self.port),
               "FACILITATOR_HOST": "127.0.0.1"}
        env.pop("FACILITATOR_CONFIG", None)
        self.facilitator = await Facilitator.create(load_settings(env))
        await self.facilitator.start()
        self.manifest = _manifest(self, usdc, payers, dsn)
        (self.directory / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return self.manifest

    async def _database(self) -> str:
        """DATABASE_URL when set (used as is); else a fresh database in our private cluster."""
        if os.environ.get("DATABASE_URL"):
            return os.environ["DATABASE_URL"]
        self.postgres = PostgresCluster(self.directory / "postgres")
        admin_dsn = await self.postgres.start()
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{DEVNET_DB}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{DEVNET_DB}"')
        finally:
            await conn.close()
        return admin_dsn.rsplit("/", 1)[0] + "/" + DEVNET_DB

    async def stop(self) -> None:
        if self.facilitator is not None:
            await self.facilitator.stop()
        if self.anvil is not None:
            await self.anvil.stop()
        if self.postgres is not None:
            await self.postgres.stop()


def _manifest(devnet: Devnet, usdc: str, payers: list[Any], dsn: str) -> dict[str, Any]:
    assert devnet.anvil is not None and devnet.facilitator is not None
    return {
        "note": "devnet only: these keys are anvil's public test keys",
        "chainId": BASE_SEPOLIA_CHAIN_ID,
        "network": f"eip155:{BASE_SEPOLIA_CHAIN_ID}",
        "v1Network": "base-sepolia",
        "rpcUrl": devnet.anvil.url,
        "contracts": {"usdc": {"address": usdc, "name": "USDC", "version": "2", "decimals": 6}},
        "payers": [{"address": p.address, "privateKey": k, "usdc": str(PAYER_USDC)}
                   for p, k in zip(payers, PAYER_KEYS, strict=True)],
        "facilitator": {"url": devnet.facilitator.url,
                        "signer": devnet.facilitator.settings.signer_key.address},
        "databaseUrl": dsn,
    }

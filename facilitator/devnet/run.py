"""The local devnet that `make run` starts:

- anvil as Base Sepolia (chain 84532) with USDC (EIP-3009), OPG, Permit2 and the x402 upto proxy
  at their canonical addresses; the payers hold USDC and OPG and approved Permit2 once;
- a second anvil as the OpenGradient chain (10740) with a TEERegistry and an
  InferenceSettlementRelay (admin: anvil key 0; the facilitator's OG relayer, key 8, holds
  SETTLEMENT_RELAY_ROLE);
- a Walrus-like blob store; a private PostgreSQL (unless a database URL is given: see below);
- the facilitator on 127.0.0.1:4022, configured for both chains, the relay and the blob store;
- a TEE gateway emulator (`devnet/gateway.py`) paid through the facilitator, its key registered
  in the TEERegistry, its payee a fresh address.

Guarantees: everything listens on loopback only; `.devnet/manifest.json` describes it all
(devnet keys only — anvil's public test keys, never real funds); `stop()` tears down whatever
was started, in reverse order, also after a failed `start()` (the gateway settles its open
sessions first while the facilitator still runs).

The database: without a URL, a fresh database in a private cluster under `.devnet/`, recreated
on every start because the chains are new on every start (its DSN has no password and is
written to the manifest as is). A URL given (`database_url`, or DATABASE_URL) is used as is,
NOT recreated: rows and watcher checkpoints of an earlier run stay, and meet new chains — give
an empty database. Its password is never written or printed: the manifest carries the URL with
the password replaced by `***`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from eth_account import Account

from facilitator.app import Facilitator
from facilitator.config import load_settings
from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, REPO_ROOT, Anvil
from facilitator.devnet.blobstore import BlobStoreServer
from facilitator.devnet.gateway import TeeGateway
from facilitator.devnet.postgres import PostgresCluster
from facilitator.protocol.networks import BASE_SEPOLIA_CHAIN_ID

log = logging.getLogger("facilitator.devnet")

DEVNET_DIR = REPO_ROOT / ".devnet"
DEVNET_DB = "facilitator_devnet"
# Identifiers cannot be query parameters: the statements are constant text (no formatting).
_DROP_DEVNET_DB = 'DROP DATABASE IF EXISTS "facilitator_devnet" WITH (FORCE)'
_CREATE_DEVNET_DB = 'CREATE DATABASE "facilitator_devnet"'
OWNER_KEY = DEV_KEYS[0]
PAYER_KEYS = DEV_KEYS[1:6]
OG_ADMIN_KEY = DEV_KEYS[0]     # deploys the OG contracts; TEE operator; relay admin
OG_RELAYER_KEY = DEV_KEYS[8]   # the facilitator's OpenGradient-chain signer (relayer role)
SIGNER_KEY = DEV_KEYS[9]       # the facilitator's Base signer
PAYER_USDC = 1_000_000 * 10**6
PAYER_OPG = 1_000 * 10**18
RELAY_BATCH_SIZE = 10
RELAY_BATCH_AGE_S = 5


@dataclass
class Devnet:
    port: int = 4022
    rpc_port: int = 8545
    og_rpc_port: int = 8546
    blobstore_port: int = 4023
    gateway_port: int = 4024
    block_time_s: float | None = None
    gateway_idle_timeout_s: float = 10.0
    database_url: str | None = None  # default: DATABASE_URL, else a private cluster
    directory: Path = DEVNET_DIR
    anvil: Anvil | None = None
    og_anvil: Anvil | None = None
    blobstore: BlobStoreServer | None = None
    postgres: PostgresCluster | None = None
    facilitator: Facilitator | None = None
    gateway: TeeGateway | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> dict[str, Any]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.anvil = await Anvil(chain_id=BASE_SEPOLIA_CHAIN_ID, port=self.rpc_port,
                                 block_time_s=self.block_time_s,
                                 log_path=self.directory / "anvil.log").start()
        self.og_anvil = await Anvil(chain_id=contracts.OG_CHAIN_ID, port=self.og_rpc_port,
                                    block_time_s=self.block_time_s,
                                    log_path=self.directory / "og-anvil.log").start()
        payers = [Account.from_key(k) for k in PAYER_KEYS]
        base, og = await asyncio.gather(self._base_chain(payers), self._og_chain())
        self.blobstore = BlobStoreServer(self.directory / "blobs", port=self.blobstore_port)
        await self.blobstore.start()
        dsn = await self._database()
        env = {**os.environ, "DATABASE_URL": dsn, "FACILITATOR_SIGNER_KEY": SIGNER_KEY,
               "FACILITATOR_RPC_URLS": self.anvil.url, "FACILITATOR_PORT": str(self.port),
               "FACILITATOR_HOST": "127.0.0.1", **self.og_environment(og)}
        env.pop("FACILITATOR_CONFIG", None)
        self.facilitator = await Facilitator.create(load_settings(env))
        await self.facilitator.start()
        self.gateway = TeeGateway(self.facilitator.url, pay_to=Account.create().address,
                                  port=self.gateway_port,
                                  idle_timeout_s=self.gateway_idle_timeout_s)
        await self.gateway.start()
        tee_id = await self.gateway.register(self.og_anvil.url, OG_ADMIN_KEY, og["registry"])
        self.manifest = _manifest(self, base, og, payers, dsn, tee_id)
        (self.directory / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return self.manifest

    async def _base_chain(self, payers: list[Any]) -> dict[str, str]:
        """USDC, OPG, Permit2 and the upto and exact proxies; payers funded and Permit2-approved."""
        assert self.anvil is not None
        url = self.anvil.url
        usdc = await contracts.install_usdc(url, OWNER_KEY)
        opg = await contracts.install_opg(url, OWNER_KEY)
        permit2 = await contracts.install_permit2(url)
        proxy = await contracts.install_upto_proxy(url)
        exact_proxy = await contracts.install_exact_proxy(url)
        await asyncio.gather(*(contracts.mint(url, OWNER_KEY, usdc, p.address, PAYER_USDC)
                               for p in payers),
                             *(contracts.mint(url, OWNER_KEY, opg, p.address, PAYER_OPG)
                               for p in payers))
        await asyncio.gather(*(contracts.approve_permit2(url, key, opg) for key in PAYER_KEYS))
        return {"usdc": usdc, "opg": opg, "permit2": permit2, "uptoProxy": proxy,
                "exactPermit2Proxy": exact_proxy}

    async def _og_chain(self) -> dict[str, str]:
        """TEERegistry + InferenceSettlementRelay (verifying against the registry); the
        facilitator's OG key gets the relayer role."""
        assert self.og_anvil is not None
        url = self.og_anvil.url
        registry = await contracts.deploy_tee_registry(url, OG_ADMIN_KEY)
        relay = await contracts.deploy_settlement_relay(url, OG_ADMIN_KEY, registry)
        relayer = Account.from_key(OG_RELAYER_KEY).address
        await contracts.add_relayer(url, OG_ADMIN_KEY, relay, relayer)
        return {"registry": registry, "relay": relay, "relayer": relayer}

    def og_environment(self, og: dict[str, str]) -> dict[str, str]:
        """The facilitator's OpenGradient-chain settings (ignored by a facilitator that does not
        know them yet)."""
        assert self.og_anvil is not None and self.blobstore is not None
        return {"FACILITATOR_OG_RPC_URLS": self.og_anvil.url,
                "FACILITATOR_OG_CHAIN_ID": str(contracts.OG_CHAIN_ID),
                "FACILITATOR_TEE_REGISTRY": og["registry"],
                "FACILITATOR_SETTLEMENT_RELAY": og["relay"],
                "FACILITATOR_SETTLEMENT_RELAYER": og["relayer"],
                "FACILITATOR_BLOBSTORE_URL": self.blobstore.url,
                "FACILITATOR_DATA_RELAY": "on",
                "FACILITATOR_OG_SIGNER_KEY": OG_RELAYER_KEY,
                "FACILITATOR_RELAY_BATCH_SIZE": str(RELAY_BATCH_SIZE),
                "FACILITATOR_RELAY_BATCH_AGE_S": str(RELAY_BATCH_AGE_S)}

    async def _database(self) -> str:
        """The given database URL or DATABASE_URL (used as is); else a fresh database in our
        private cluster."""
        given = self.database_url or os.environ.get("DATABASE_URL")
        if given:
            return given
        self.postgres = PostgresCluster(self.directory / "postgres")
        admin_dsn = await self.postgres.start()
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(_DROP_DEVNET_DB)
            await conn.execute(_CREATE_DEVNET_DB)
        finally:
            await conn.close()
        return admin_dsn.rsplit("/", 1)[0] + "/" + DEVNET_DB

    async def stop(self) -> None:
        """Stop whatever runs, newest first; each step runs even if an earlier one failed."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        gateway, facilitator_ = self.gateway, self.facilitator
        if gateway is not None:
            steps.append(("gateway", lambda: gateway.stop(settle=facilitator_ is not None)))
        if facilitator_ is not None:
            steps.append(("facilitator", facilitator_.stop))
        if self.blobstore is not None:
            steps.append(("blob store", self.blobstore.stop))
        for name, node in (("OG anvil", self.og_anvil), ("Base anvil", self.anvil)):
            if node is not None:
                steps.append((name, node.stop))
        if self.postgres is not None:
            steps.append(("postgres", self.postgres.stop))
        for name, step in steps:
            try:
                await step()
            except Exception:
                log.exception("stopping the devnet's %s failed", name)
        self.gateway = self.facilitator = self.blobstore = None
        self.og_anvil = self.anvil = self.postgres = None


def _manifest(devnet: Devnet, base: dict[str, str], og: dict[str, str], payers: list[Any],
              dsn: str, tee_id: str) -> dict[str, Any]:
    assert devnet.anvil is not None and devnet.og_anvil is not None
    assert devnet.facilitator is not None and devnet.gateway is not None
    assert devnet.blobstore is not None
    return {
        "note": "devnet only: these keys are anvil's public test keys",
        "chainId": BASE_SEPOLIA_CHAIN_ID,
        "network": f"eip155:{BASE_SEPOLIA_CHAIN_ID}",
        "v1Network": "base-sepolia",
        "rpcUrl": devnet.anvil.url,
        "contracts": {
            "usdc": {"address": base["usdc"], "name": "USDC", "version": "2", "decimals": 6},
            "opg": {"address": base["opg"], "name": contracts.OPG_NAME,
                    "version": contracts.OPG_VERSION, "decimals": contracts.OPG_DECIMALS},
            "permit2": base["permit2"],
            "uptoProxy": base["uptoProxy"], "exactPermit2Proxy": base["exactPermit2Proxy"]},
        "payers": [{"address": p.address, "privateKey": k, "usdc": str(PAYER_USDC),
                    "opg": str(PAYER_OPG), "permit2Approved": True}
                   for p, k in zip(payers, PAYER_KEYS, strict=True)],
        "facilitator": {"url": devnet.facilitator.url,
                        "signer": devnet.facilitator.settings.signer_key.address,
                        "ogSigner": og["relayer"]},
        "ogChain": {"chainId": contracts.OG_CHAIN_ID,
                    "network": f"eip155:{contracts.OG_CHAIN_ID}",
                    "rpcUrl": devnet.og_anvil.url, "teeRegistry": og["registry"],
                    "settlementRelay": og["relay"], "relayer": og["relayer"],
                    "admin": Account.from_key(OG_ADMIN_KEY).address},
        "blobStore": {"url": devnet.blobstore.url},
        "gateway": {"url": devnet.gateway.url, "teeId": tee_id, "payTo": devnet.gateway.pay_to,
                    "sessionCap": str(devnet.gateway.session_cap),
                    "idleTimeoutS": devnet.gateway.idle_timeout_s},
        "databaseUrl": redacted_dsn(dsn),
    }


def redacted_dsn(dsn: str) -> str:
    """`dsn` with its password (in the userinfo or a `password=` parameter) replaced by `***`;
    a DSN without one is returned unchanged."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + host
    query = "&".join("password=***" if item.split("=", 1)[0].lower() == "password" else item
                     for item in parts.query.split("&")) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return dsn
    return urlunsplit(parts._replace(netloc=netloc, query=query))

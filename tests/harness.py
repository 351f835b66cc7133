"""Shared test harness: a real anvil chain with the USDC test token, a real PostgreSQL database,
a running facilitator, and helpers to sign genuine EIP-3009 payments.

Nothing here is mocked: payments are signed with eth_account, checked by the facilitator over
HTTP, and settled on anvil; the database is a private PostgreSQL cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from prometheus_client.parser import text_string_to_metric_families

from facilitator.app import Facilitator
from facilitator.config import load_settings
from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, Anvil, free_port

CHAIN_ID = 84532
NETWORK = "eip155:84532"
V1_NETWORK = "base-sepolia"
USDC = contracts.CANONICAL_USDC
OPG = contracts.CANONICAL_OPG
PERMIT2 = contracts.PERMIT2_ADDRESS
UPTO_PROXY = contracts.UPTO_PROXY_ADDRESS
EXACT_PROXY = contracts.EXACT_PROXY_ADDRESS
OWNER_KEY = DEV_KEYS[0]
ETHER = 10**18


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0,
                     interval_s: float = 0.05, what: str = "condition",
                     detail: Callable[[], str] | None = None) -> None:
    """Poll an async predicate until true; fail loudly after `timeout_s` (no blind sleeps).
    `detail`, when given, is called on timeout and its text ends the error message (e.g. the
    last value seen)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            message = f"timed out after {timeout_s} s waiting for {what}"
            raise AssertionError(message + (f": {detail()}" if detail is not None else ""))
        await asyncio.sleep(interval_s)


async def db_fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One query on its own connection (for reads in assertions)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` (full sample name: `x_total`, `x_bucket`, `x_count`, a
    gauge's own name) in a Prometheus text exposition whose labels include `labels`; 0 when there
    are none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class DevChain:
    """One anvil (Base Sepolia chain id) with TestUSDC at the canonical address."""

    anvil: Anvil
    usdc: str

    @classmethod
    async def start(cls, **anvil_args: Any) -> DevChain:
        """anvil with USDC (EIP-3009) and OPG + Permit2 + the x402 upto and exact Permit2
        proxies, all at their canonical Base Sepolia addresses."""
        anvil = await Anvil(chain_id=CHAIN_ID, **anvil_args).start()
        usdc = await contracts.install_usdc(anvil.url, OWNER_KEY)
        await contracts.install_opg(anvil.url, OWNER_KEY)
        await contracts.install_permit2(anvil.url)
        await contracts.install_upto_proxy(anvil.url)
        await contracts.install_exact_proxy(anvil.url)
        return cls(anvil, usdc)

    @property
    def url(self) -> str:
        return self.anvil.url

    async def stop(self) -> None:
        await self.anvil.stop()

    async def rpc(self, method: str, params: list[Any]) -> Any:
        return await self.anvil.rpc(method, params)

    async def new_payer(self, usdc_amount: int = 1_000 * 10**6) -> LocalAccount:
        payer = Account.create()
        if usdc_amount:
            await contracts.mint(self.url, OWNER_KEY, self.usdc, payer.address, usdc_amount)
        return payer

    async def new_upto_payer(self, opg: int = 10 * 10**18, *, approve: bool = True
                             ) -> LocalAccount:
        """A payer holding OPG who approved Permit2 once (as OpenGradient's SDK does)."""
        payer = Account.from_key(await self.new_funded_key(1))
        if opg:
            await contracts.mint(self.url, OWNER_KEY, OPG, payer.address, opg)
        if approve:
            await contracts.approve_permit2(self.url, payer.key.hex(), OPG)
        return payer

    async def new_funded_key(self, ether: int = 100) -> str:
        key = "0x" + secrets.token_hex(32)
        address = Account.from_key(key).address
        await self.rpc("anvil_setBalance", [address, hex(ether * ETHER)])
        return key

    async def token_balance(self, holder: str, token: str | None = None) -> int:
        data = "0x70a08231" + "00" * 12 + holder[2:].lower()
        result = await self.rpc("eth_call", [{"to": token or self.usdc, "data": data}, "latest"])
        return int(result, 16)

    async def transfer_logs_to(self, pay_to: str, token: str | None = None) -> list[dict[str, Any]]:
        topic = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
        return await self.rpc("eth_getLogs", [{
            "address": token or self.usdc, "fromBlock": "0x0", "toBlock": "latest",
            "topics": [topic, None, "0x" + "00" * 12 + pay_to[2:].lower()]}])

    async def block_number(self) -> int:
        return int(await self.rpc("eth_blockNumber", []), 16)

    async def mine(self, blocks: int = 1) -> None:
        await self.rpc("anvil_mine", [hex(blocks)])

    async def set_automine(self, enabled: bool) -> None:
        await self.rpc("evm_setAutomine", [enabled])

    @contextlib.asynccontextmanager
    async def manual_mining(self, *, mine_on_exit: bool = False) -> AsyncIterator[None]:
        """Automine off inside the block (transactions wait in the pool until `mine`), back on
        afterwards whatever happens; with `mine_on_exit`, one block is then mined so that what
        is still pooled gets included (turning automine on does not mine the pool)."""
        await self.set_automine(False)
        try:
            yield
        finally:
            await self.set_automine(True)
            if mine_on_exit:
                await self.mine()

    async def tx_count(self, address: str, block: str = "pending") -> int:
        """eth_getTransactionCount: transactions sent by `address` (pooled ones included by
        default)."""
        return int(await self.rpc("eth_getTransactionCount", [address, block]), 16)

    async def chain_time(self) -> int:
        block = await self.rpc("eth_getBlockByNumber", ["latest", False])
        return int(block["timestamp"], 16)


def requirements(pay_to: str, amount: int = 10_000, *, asset: str = USDC,
                 network: str = NETWORK, name: str = "USDC", version: str = "2",
                 max_timeout_s: int = 300) -> dict[str, Any]:
    return {"scheme": "exact", "network": network, "amount": str(amount), "asset": asset,
            "payTo": pay_to, "maxTimeoutSeconds": max_timeout_s,
            "extra": {"name": name, "version": version}}


def requirements_v1(pay_to: str, amount: int = 10_000, *, asset: str = USDC,
                    network: str = V1_NETWORK) -> dict[str, Any]:
    return {"scheme": "exact", "network": network, "maxAmountRequired": str(amount),
            "resource": "http://127.0.0.1/paid", "description": "test resource",
            "mimeType": "application/json", "payTo": pay_to, "maxTimeoutSeconds": 300,
            "asset": asset, "extra": {"name": "USDC", "version": "2"}}


def sign_authorization(payer: LocalAccount, *, to: str, value: int, asset: str = USDC,
                       valid_after: int = 0, valid_before: int | None = None,
                       nonce: bytes | None = None, name: str = "USDC", version: str = "2",
                       chain_id: int = CHAIN_ID, signer: LocalAccount | None = None,
                       from_: str | None = None) -> dict[str, Any]:
    """An EIP-3009 `exact` payload `{signature, authorization}` signed for real."""
    nonce = nonce if nonce is not None else os.urandom(32)
    valid_before = valid_before if valid_before is not None else int(time.time()) + 300
    from_ = from_ or payer.address
    typed = contracts.authorization_typed_data(
        token=asset, chain_id=chain_id, from_=from_, to=to, value=value,
        valid_after=valid_after, valid_before=valid_before, nonce=nonce, name=name,
        version=version)
    signature = (signer or payer).sign_typed_data(full_message=typed).signature
    return {"signature": "0x" + bytes(signature).hex(),
            "authorization": {"from": from_, "to": to, "value": str(value),
                              "validAfter": str(valid_after), "validBefore": str(valid_before),
                              "nonce": "0x" + nonce.hex()}}


def body_v2(payload: dict[str, Any], reqs: dict[str, Any],
            accepted: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"x402Version": 2,
            "paymentPayload": {"x402Version": 2, "accepted": accepted or reqs, "payload": payload,
                               "resource": {"url": "http://127.0.0.1/paid"}},
            "paymentRequirements": reqs}


def upto_requirements(pay_to: str, amount: int, *, facilitator: str, asset: str = OPG,
                      network: str = NETWORK) -> dict[str, Any]:
    """What OpenGradient's gateway asks for: a session cap in OPG over Permit2."""
    return {"scheme": "upto", "network": network, "amount": str(amount), "asset": asset,
            "payTo": pay_to, "maxTimeoutSeconds": 300,
            "extra": {"name": "OPG", "version": "2", "assetTransferMethod": "permit2",
                      "facilitatorAddress": facilitator}}


def sign_upto(payer: LocalAccount, *, pay_to: str, cap: int, facilitator: str,
              token: str = OPG, nonce: int | None = None, deadline: int | None = None,
              valid_after: int | None = None, spender: str = UPTO_PROXY,
              signer: LocalAccount | None = None, owner: str | None = None) -> dict[str, Any]:
    """An upto `{signature, permit2Authorization}` payload signed for real (EIP-712, Permit2)."""
    nonce = nonce if nonce is not None else int.from_bytes(os.urandom(32), "big")
    deadline = deadline if deadline is not None else int(time.time()) + 300
    valid_after = valid_after if valid_after is not None else int(time.time()) - 600
    permit = contracts.sign_upto_permit(
        (signer or payer).key.hex(), chain_id=CHAIN_ID, token=token, cap=cap, nonce=nonce,
        deadline=deadline, to=pay_to, facilitator=facilitator, valid_after=valid_after,
        owner=owner or payer.address, spender=spender)
    return {"signature": "0x" + permit.signature.hex(),
            "permit2Authorization": {
                "from": permit.owner, "permitted": {"token": permit.token, "amount": str(cap)},
                "spender": spender, "nonce": str(nonce), "deadline": str(deadline),
                "witness": {"to": permit.to, "facilitator": permit.facilitator,
                            "validAfter": str(valid_after)}}}


def upto_body(payload: dict[str, Any], cap_requirements: dict[str, Any],
              amount: int | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A /verify body (amount None) or a /settle body for `amount` (settle-time requirements)."""
    reqs = dict(cap_requirements)
    if amount is not None:
        reqs["amount"] = str(amount)
    body = body_v2(payload, reqs, accepted=cap_requirements)
    if usage is not None:
        body["usageMetadata"] = usage
    return body


def body_v1(payload: dict[str, Any], reqs: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 1,
            "paymentPayload": {"x402Version": 1, "scheme": "exact", "network": reqs["network"],
                               "payload": payload},
            "paymentRequirements": reqs}


def pay(payer: LocalAccount, pay_to: str, amount: int = 10_000, **sign_args: Any
        ) -> dict[str, Any]:
    """A complete, valid v2 /verify or /settle body."""
    reqs = requirements(pay_to, amount)
    return body_v2(sign_authorization(payer, to=pay_to, value=amount, **sign_args), reqs)


@dataclass
class RunningFacilitator:
    service: Facilitator
    env: dict[str, str]
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.service.url, timeout=60)

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def signer(self) -> str:
        return self.service.settings.signer_key.address

    async def verify(self, body: Any) -> dict[str, Any]:
        response = await self.http.post("/verify", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def settle(self, body: Any) -> dict[str, Any]:
        response = await self.http.post("/settle", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def stop(self) -> None:
        await self.http.aclose()
        await self.service.stop()


async def start_facilitator(chain: DevChain, database_url: str, signer_key: str | None = None,
                            **env_overrides: str) -> RunningFacilitator:
    """A facilitator configured through its real configuration path (environment variables)."""
    env = {"DATABASE_URL": database_url,
           "FACILITATOR_SIGNER_KEY": signer_key or await chain.new_funded_key(),
           "FACILITATOR_RPC_URLS": chain.url, "FACILITATOR_PORT": str(free_port()),
           "FACILITATOR_HOST": "127.0.0.1", "FACILITATOR_RECEIPT_TIMEOUT_S": "15",
           "FACILITATOR_DB_POOL_SIZE": "10", **env_overrides}
    service = await Facilitator.create(load_settings(env))
    await service.start()
    return RunningFacilitator(service, env)


OG_CHAIN_ID = 10740
OG_ADMIN_KEY = DEV_KEYS[0]
OG_RELAYER_KEY = DEV_KEYS[8]


@dataclass
class OgChain:
    """A second anvil as the OpenGradient chain: TEE registry, settlement relay (the relayer
    key holds the relay role), and a Walrus-like blob store."""

    anvil: Anvil
    registry: str
    relay: str
    relayer: str
    blobs: Any  # facilitator.devnet.blobstore.BlobStoreServer
    blob_url: str

    @classmethod
    async def start(cls, blob_dir: Any) -> OgChain:
        from facilitator.devnet.blobstore import BlobStoreServer

        anvil = await Anvil(chain_id=OG_CHAIN_ID).start()
        registry = await contracts.deploy_tee_registry(anvil.url, OG_ADMIN_KEY)
        relay = await contracts.deploy_settlement_relay(anvil.url, OG_ADMIN_KEY, registry)
        relayer = Account.from_key(OG_RELAYER_KEY).address
        await contracts.add_relayer(anvil.url, OG_ADMIN_KEY, relay, relayer)
        blobs = BlobStoreServer(blob_dir)
        blob_url = await blobs.start()
        return cls(anvil, registry, relay, relayer, blobs, blob_url)

    @property
    def url(self) -> str:
        return self.anvil.url

    def env(self, **overrides: str) -> dict[str, str]:
        """Facilitator settings for this chain (our data relay on, small fast batches)."""
        return {"FACILITATOR_OG_RPC_URLS": self.url, "FACILITATOR_OG_CHAIN_ID": str(OG_CHAIN_ID),
                "FACILITATOR_TEE_REGISTRY": self.registry,
                "FACILITATOR_SETTLEMENT_RELAY": self.relay,
                "FACILITATOR_SETTLEMENT_RELAYER": self.relayer,
                "FACILITATOR_BLOBSTORE_URL": self.blob_url, "FACILITATOR_DATA_RELAY": "on",
                "FACILITATOR_OG_SIGNER_KEY": OG_RELAYER_KEY, "FACILITATOR_RELAY_BATCH_SIZE": "3",
                "FACILITATOR_RELAY_BATCH_AGE_S": "1", **overrides}

    async def register_tee(self, private_key: Any, payment_address: str,
                           endpoint: str = "http://127.0.0.1/tee") -> bytes:
        from facilitator.core.attestation import public_key_der

        tee_id = await contracts.register_tee(
            self.url, OG_ADMIN_KEY, self.registry, public_key_der(private_key),
            endpoint=endpoint, payment_address=payment_address)
        return bytes.fromhex(tee_id[2:])

    async def stop(self) -> None:
        await self.blobs.stop()
        await self.anvil.stop()


def attestation_header(private_key: Any, tee_id: bytes, request: dict[str, Any],
                       content: str, *, timestamp: int | None = None,
                       session: dict[str, Any] | None = None, cost_opg: int | None = None,
                       individual: bool = False, response: dict[str, Any] | None = None) -> str:
    """An `x-settlement-data` value for one really signed inference (as the gateway posts)."""
    import base64
    import json

    from facilitator.core import attestation as att

    ts = timestamp if timestamp is not None else int(time.time())
    in_hash = att.input_hash(att.canonical_chat_request(request))
    out_hash = att.output_hash(content)
    signature = att.sign_attestation(private_key, att.message_hash(in_hash, out_hash, ts))
    data: dict[str, Any] = {"tee_id": "0x" + tee_id.hex(), "input_hash": in_hash.hex(),
                            "output_hash": out_hash.hex(),
                            "tee_signature": base64.b64encode(signature).decode(),
                            "tee_timestamp": ts, "timestamp": ts}
    if individual:
        data.update({"input": request, "eth_address": Account.create().address,
                     "output": response or {"choices": [{"message": {"role": "assistant",
                                                                    "content": content}}]}})
    if session is not None:
        data["session"] = session
    if cost_opg is not None:
        data["cost_opg"] = str(cost_opg)
    return base64.b64encode(json.dumps(data).encode()).decode()

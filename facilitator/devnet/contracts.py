"""Deploy or place the project's test contracts (TestUSDC, SmartWallet) on a local anvil node.

Devnet and test tooling only; `facilitator serve` never imports it. Guarantees:

- Contracts come only from the committed artifacts in `contracts/artifacts/` (output of
  `node contracts/compile.js`); nothing is compiled at run time and no node tooling is needed.
- Every state-changing function signs its transaction locally with the key it is given, sends it
  raw, waits for the receipt and returns only once the transaction is mined with status 1.
  Otherwise it raises `ContractsError` (a transaction that would revert is refused before it is
  sent, with the revert reason in the message).
- Transactions sent through this module from the same key to the same node are serialized while
  their nonce is chosen, so concurrent calls (`asyncio.gather` of several `mint`s) do not collide.
- No blocking I/O on the event loop: artifact files are read once, in a worker thread.
- `place_at` and `install_usdc` use `anvil_setCode`, so they work on anvil only.

TestUSDC is setCode-friendly (no constructor logic, no immutables): placing its runtime code at an
address gives an empty, uninitialized token whose storage `initialize` then fills in. That is how
`install_usdc` puts it at the canonical Base Sepolia USDC address, where the official x402 SDK
client pays it with its default spend controls (name "USDC", version "2").
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError, TimeExhausted
from web3.types import TxParams, TxReceipt

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_ROOT / "contracts" / "artifacts"

# Circle USDC on Base Sepolia; the x402 SDK's default asset for eip155:84532.
CANONICAL_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
USDC_NAME = "USDC"
USDC_SYMBOL = "USDC"
USDC_VERSION = "2"
USDC_DECIMALS = 6

RECEIPT_TIMEOUT_S = 30.0
_RECEIPT_POLL_S = 0.02
_GAS_MARGIN_NUM, _GAS_MARGIN_DEN = 6, 5  # +20 % over anvil's estimate


class ContractsError(RuntimeError):
    """A deployment or contract transaction failed (would revert, reverted, or bad artifact)."""


@dataclass(frozen=True)
class Artifact:
    """One compiled contract. Bytecodes are 0x-prefixed hex; `bytecode` is the creation code."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str


@lru_cache(maxsize=None)
def load_artifact(name: str) -> Artifact:
    """The committed artifact `contracts/artifacts/<name>.json` (cached; reads a file)."""
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractsError(f"no artifact {path}; run `node contracts/compile.js`") from None
    if raw.get("contractName") != name:
        raise ContractsError(f"{path} holds contract {raw.get('contractName')!r}, not {name!r}")
    return Artifact(name=name, abi=raw["abi"], bytecode=raw["bytecode"],
                    deployed_bytecode=raw["deployedBytecode"])


async def _artifact(name: str) -> Artifact:
    return await asyncio.to_thread(load_artifact, name)


@asynccontextmanager
async def connect(rpc_url: str) -> AsyncIterator[AsyncWeb3]:
    """An `AsyncWeb3` on `rpc_url`, disconnected on exit."""
    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
    try:
        yield w3
    finally:
        await w3.provider.disconnect()


def contract_at(w3: AsyncWeb3, artifact: Artifact, address: str) -> AsyncContract:
    """A web3 contract object for `artifact`'s ABI at `address` (no I/O)."""
    return w3.eth.contract(address=to_checksum_address(address), abi=artifact.abi)


# Per event loop, per (node, sender): held from nonce lookup until the node accepted the tx.
_LockTable = dict[tuple[str, str], asyncio.Lock]
_send_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LockTable] = (
    weakref.WeakKeyDictionary())


def _send_lock(rpc_url: str, sender: str) -> asyncio.Lock:
    per_loop = _send_locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((rpc_url, sender), asyncio.Lock())


async def _send(w3: AsyncWeb3, rpc_url: str, account: LocalAccount, tx: TxParams,
                what: str) -> TxReceipt:
    tx = {**tx, "from": account.address}
    async with _send_lock(rpc_url, account.address):
        tx["chainId"] = await w3.eth.chain_id
        tx["nonce"] = await w3.eth.get_transaction_count(account.address, "pending")
        try:
            gas = await w3.eth.estimate_gas(tx)
        except ContractLogicError as exc:
            raise ContractsError(f"{what} would revert: {exc.message or exc}") from exc
        tx["gas"] = gas * _GAS_MARGIN_NUM // _GAS_MARGIN_DEN
        latest = await w3.eth.get_block("latest")
        priority = await w3.eth.max_priority_fee
        tx["maxPriorityFeePerGas"] = priority
        tx["maxFeePerGas"] = 2 * int(latest.get("baseFeePerGas", 0)) + priority
        signed = account.sign_transaction(tx)
        tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    try:
        receipt = await w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=RECEIPT_TIMEOUT_S, poll_latency=_RECEIPT_POLL_S)
    except TimeExhausted as exc:
        raise ContractsError(f"{what}: no receipt for {tx_hash.to_0x_hex()} within "
                             f"{RECEIPT_TIMEOUT_S} s (is the node mining?)") from exc
    if receipt["status"] != 1:
        raise ContractsError(f"{what} reverted in tx {tx_hash.to_0x_hex()}")
    return receipt


async def transact(rpc_url: str, key: str, to: str, data: bytes | str, *, value: int = 0,
                   what: str | None = None) -> TxReceipt:
    """Send `data` to `to` from `key`'s account; returns the successful receipt. `what` names
    the call in error messages."""
    account = Account.from_key(key)
    async with connect(rpc_url) as w3:
        tx: TxParams = {"to": to_checksum_address(to), "data": data, "value": value}
        return await _send(w3, rpc_url, account, tx, what or f"call to {tx['to']}")


async def deploy(rpc_url: str, deployer_key: str, name: str, *ctor_args: Any) -> str:
    """Deploy contract `name` with constructor arguments; returns its checksummed address."""
    artifact = await _artifact(name)
    account = Account.from_key(deployer_key)
    async with connect(rpc_url) as w3:
        factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        data = factory.constructor(*ctor_args).data_in_transaction
        receipt = await _send(w3, rpc_url, account, {"data": data}, f"deployment of {name}")
    address = receipt["contractAddress"]
    if address is None:
        raise ContractsError(f"deployment of {name} produced no contract address")
    return to_checksum_address(address)


async def place_at(rpc_url: str, name: str, address: str) -> None:
    """Install `name`'s runtime code at `address` (anvil_setCode); storage there is untouched."""
    artifact = await _artifact(name)
    target = to_checksum_address(address)
    async with connect(rpc_url) as w3:
        response = await w3.provider.make_request(
            "anvil_setCode", [target, artifact.deployed_bytecode])
        if "error" in response:
            raise ContractsError(f"anvil_setCode({target}) failed: {response['error']}")
        code = await w3.eth.get_code(target)
    if code.to_0x_hex() != artifact.deployed_bytecode.lower():
        raise ContractsError(f"code at {target} is not {name} after anvil_setCode")


async def _initialize_usdc(w3: AsyncWeb3, rpc_url: str, account: LocalAccount, token: str, *,
                           name: str, symbol: str, version: str, decimals: int) -> None:
    usdc = contract_at(w3, await _artifact("TestUSDC"), token)
    if await usdc.functions.initialized().call():
        # Idempotent for the same configuration (e.g. a devnet restarted from saved state).
        actual = (await usdc.functions.name().call(), await usdc.functions.symbol().call(),
                  await usdc.functions.version().call(), await usdc.functions.decimals().call(),
                  await usdc.functions.owner().call())
        wanted = (name, symbol, version, decimals, account.address)
        if actual != wanted:
            raise ContractsError(f"TestUSDC at {token} already initialized as {actual}, "
                                 f"not {wanted}")
        return
    data = usdc.encode_abi("initialize", [name, symbol, version, decimals, account.address])
    await _send(w3, rpc_url, account, {"to": usdc.address, "data": data},
                f"TestUSDC.initialize at {token}")


async def install_usdc(rpc_url: str, owner_key: str, address: str = CANONICAL_USDC,
                       name: str = USDC_NAME, version: str = USDC_VERSION,
                       decimals: int = USDC_DECIMALS, *, symbol: str = USDC_SYMBOL) -> str:
    """Place TestUSDC at `address` (default: canonical Base Sepolia USDC) and initialize it with
    `owner_key`'s account as owner/minter. Idempotent when already initialized identically."""
    account = Account.from_key(owner_key)
    token = to_checksum_address(address)
    await place_at(rpc_url, "TestUSDC", token)
    async with connect(rpc_url) as w3:
        await _initialize_usdc(w3, rpc_url, account, token, name=name, symbol=symbol,
                               version=version, decimals=decimals)
    return token


async def deploy_usdc(rpc_url: str, deployer_key: str, *, name: str = USDC_NAME,
                      version: str = USDC_VERSION, decimals: int = USDC_DECIMALS,
                      symbol: str = USDC_SYMBOL) -> str:
    """Deploy a fresh TestUSDC at a new address and initialize it (owner = deployer); for tests
    that need a second token (asset substitution, other EIP-712 domains)."""
    token = await deploy(rpc_url, deployer_key, "TestUSDC")
    account = Account.from_key(deployer_key)
    async with connect(rpc_url) as w3:
        await _initialize_usdc(w3, rpc_url, account, token, name=name, symbol=symbol,
                               version=version, decimals=decimals)
    return token


async def mint(rpc_url: str, owner_key: str, token: str, to: str, amount: int) -> str:
    """Mint `amount` atomic units of TestUSDC `token` to `to`; returns the tx hash."""
    async with connect(rpc_url) as w3:
        usdc = contract_at(w3, await _artifact("TestUSDC"), token)
        data = usdc.encode_abi("mint", [to_checksum_address(to), amount])
    receipt = await transact(rpc_url, owner_key, token, data, what="TestUSDC.mint")
    return receipt["transactionHash"].to_0x_hex()


async def deploy_smart_wallet(rpc_url: str, deployer_key: str, owner_address: str) -> str:
    """Deploy an ERC-1271 SmartWallet owned by the EOA `owner_address`; returns its address."""
    return await deploy(rpc_url, deployer_key, "SmartWallet", to_checksum_address(owner_address))


async def wallet_execute(rpc_url: str, owner_key: str, wallet: str, target: str,
                         data: bytes | str, *, value: int = 0) -> str:
    """Make SmartWallet `wallet` call `target` with `data` (sent by its owner); returns tx hash."""
    async with connect(rpc_url) as w3:
        sw = contract_at(w3, await _artifact("SmartWallet"), wallet)
        calldata = sw.encode_abi("execute", [to_checksum_address(target), value, data])
    receipt = await transact(rpc_url, owner_key, wallet, calldata, what="SmartWallet.execute")
    return receipt["transactionHash"].to_0x_hex()


def authorization_typed_data(*, token: str, chain_id: int, from_: str, to: str, value: int,
                             valid_after: int, valid_before: int, nonce: bytes,
                             name: str = USDC_NAME, version: str = USDC_VERSION,
                             primary_type: str = "TransferWithAuthorization") -> dict[str, Any]:
    """EIP-712 `full_message` for `Account.sign_typed_data` of an EIP-3009 transfer (or, with
    `primary_type="ReceiveWithAuthorization"`, receive) authorization on TestUSDC."""
    fields = [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
              {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
              {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]
    return _typed_data(token, chain_id, name, version, primary_type, fields, {
        "from": to_checksum_address(from_), "to": to_checksum_address(to), "value": value,
        "validAfter": valid_after, "validBefore": valid_before, "nonce": nonce})


def cancel_typed_data(*, token: str, chain_id: int, authorizer: str, nonce: bytes,
                      name: str = USDC_NAME, version: str = USDC_VERSION) -> dict[str, Any]:
    """EIP-712 `full_message` of an EIP-3009 CancelAuthorization on TestUSDC."""
    fields = [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]
    return _typed_data(token, chain_id, name, version, "CancelAuthorization", fields,
                       {"authorizer": to_checksum_address(authorizer), "nonce": nonce})


def _typed_data(token: str, chain_id: int, name: str, version: str, primary_type: str,
                fields: list[dict[str, str]], message: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"},
                             {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            primary_type: fields,
        },
        "primaryType": primary_type,
        "domain": {"name": name, "version": version, "chainId": chain_id,
                   "verifyingContract": to_checksum_address(token)},
        "message": dict(message),
    }

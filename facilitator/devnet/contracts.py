"""Deploy or place the project's test contracts on a local anvil node: TestUSDC and SmartWallet
(exact/EIP-3009), OPGToken, Permit2, X402UptoPermit2Proxy (OpenGradient `upto` payments on Base
Sepolia) and X402ExactPermit2Proxy (`exact` over Permit2), TEERegistry and
InferenceSettlementRelay (the OpenGradient chain, id 10740).

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
client pays it with its default spend controls (name "USDC", version "2"). OPGToken, Permit2 and
X402UptoPermit2Proxy and X402ExactPermit2Proxy are setCode-friendly in the same way and go to their
canonical addresses (`install_opg`, `install_permit2`, `install_upto_proxy`,
`install_exact_proxy`); the proxies call Permit2 at the canonical address, so install it too.
TEERegistry and InferenceSettlementRelay are ordinary deployments.

Custom-error reverts are reported by name (`decode_revert`), e.g. "would revert: InvalidNonce()".
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

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3, Web3
from web3.contract import AsyncContract, Contract
from web3.exceptions import ContractCustomError, ContractLogicError, TimeExhausted
from web3.types import TxParams, TxReceipt

from facilitator.core import exact_permit2 as core_exact_permit2
from facilitator.core import permit2 as core_permit2
from facilitator.core.attestation import tee_id_of
from facilitator.core.ecdsa import sign_digest
from facilitator.protocol.permit2 import PermitWitnessTransfer, UptoWitness

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


_ENCODER = Web3()  # no provider is ever used: only for ABI encoding


def _encoder(artifact: Artifact) -> Contract:
    return _ENCODER.eth.contract(abi=artifact.abi)


async def call(rpc_url: str, key: str, contract: str, address: str, function: str,
               args: list[Any], what: str | None = None) -> str:
    """Send `contract.function(*args)` at `address` from `key`'s account (encoded locally, one
    connection); returns the transaction hash of the successful receipt."""
    data = _encoder(await _artifact(contract)).encode_abi(function, args)
    receipt = await transact(rpc_url, key, address, data, what=what or f"{contract}.{function}")
    return receipt["transactionHash"].to_0x_hex()


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
        except ContractCustomError as exc:
            reason = await asyncio.to_thread(decode_revert, exc.data)  # may read artifacts
            raise ContractsError(f"{what} would revert: {reason}") from exc
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


async def _initialize_token(rpc_url: str, owner_key: str, token: str, contract: str, *,
                            name: str, symbol: str, version: str, decimals: int) -> None:
    """`initialize(name, symbol, version, decimals, owner)` of TestUSDC / OPGToken, idempotent
    for the same configuration."""
    owner = Account.from_key(owner_key).address
    async with connect(rpc_url) as w3:
        deployed = contract_at(w3, await _artifact(contract), token)
        if await deployed.functions.initialized().call():
            # Idempotent for the same configuration (e.g. a devnet restarted from saved state).
            actual = (await deployed.functions.name().call(),
                      await deployed.functions.symbol().call(),
                      await deployed.functions.version().call(),
                      await deployed.functions.decimals().call(),
                      await deployed.functions.owner().call())
            wanted = (name, symbol, version, decimals, owner)
            if actual != wanted:
                raise ContractsError(f"{contract} at {token} already initialized as {actual}, "
                                     f"not {wanted}")
            return
    await call(rpc_url, owner_key, contract, token, "initialize",
               [name, symbol, version, decimals, owner],
               f"{contract}.initialize at {token}")


async def _install_token(rpc_url: str, owner_key: str, contract: str, address: str, *,
                         name: str, symbol: str, version: str, decimals: int) -> str:
    """Place `contract` (TestUSDC or OPGToken) at `address` and initialize it with
    `owner_key`'s account as owner/minter. Idempotent when already initialized identically."""
    token = to_checksum_address(address)
    await place_at(rpc_url, contract, token)
    await _initialize_token(rpc_url, owner_key, token, contract, name=name, symbol=symbol,
                            version=version, decimals=decimals)
    return token


async def install_usdc(rpc_url: str, owner_key: str, address: str = CANONICAL_USDC,
                       name: str = USDC_NAME, version: str = USDC_VERSION,
                       decimals: int = USDC_DECIMALS, *, symbol: str = USDC_SYMBOL) -> str:
    """TestUSDC at `address` (default: canonical Base Sepolia USDC); see `_install_token`."""
    return await _install_token(rpc_url, owner_key, "TestUSDC", address, name=name,
                                symbol=symbol, version=version, decimals=decimals)


async def deploy_usdc(rpc_url: str, deployer_key: str, *, name: str = USDC_NAME,
                      version: str = USDC_VERSION, decimals: int = USDC_DECIMALS,
                      symbol: str = USDC_SYMBOL) -> str:
    """Deploy a fresh TestUSDC at a new address and initialize it (owner = deployer); for tests
    that need a second token (asset substitution, other EIP-712 domains)."""
    token = await deploy(rpc_url, deployer_key, "TestUSDC")
    await _initialize_token(rpc_url, deployer_key, token, "TestUSDC", name=name, symbol=symbol,
                            version=version, decimals=decimals)
    return token


async def mint(rpc_url: str, owner_key: str, token: str, to: str, amount: int) -> str:
    """Mint `amount` atomic units of `token` to `to`; returns the tx hash. Works for every token
    here with `mint(address,uint256)` (TestUSDC, OPGToken)."""
    return await call(rpc_url, owner_key, "TestUSDC", token, "mint",
                      [to_checksum_address(to), amount], f"mint on {token}")


async def deploy_smart_wallet(rpc_url: str, deployer_key: str, owner_address: str) -> str:
    """Deploy an ERC-1271 SmartWallet owned by the EOA `owner_address`; returns its address."""
    return await deploy(rpc_url, deployer_key, "SmartWallet", to_checksum_address(owner_address))


async def wallet_execute(rpc_url: str, owner_key: str, wallet: str, target: str,
                         data: bytes | str, *, value: int = 0) -> str:
    """Make SmartWallet `wallet` call `target` with `data` (sent by its owner); returns tx hash."""
    return await call(rpc_url, owner_key, "SmartWallet", wallet, "execute",
                      [to_checksum_address(target), value, data])


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


# ---- revert decoding ----

_SOLIDITY_ERROR = bytes.fromhex("08c379a0")   # Error(string)
_SOLIDITY_PANIC = bytes.fromhex("4e487b71")   # Panic(uint256)


def abi_type(param: Mapping[str, Any]) -> str:
    """Canonical type of one ABI parameter, tuples expanded: `((address,uint256),uint256)`."""
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(abi_type(c) for c in param["components"]) + ")" + kind[5:]
    return kind


@lru_cache(maxsize=1)
def _known_errors() -> dict[bytes, tuple[str, list[str]]]:
    """selector -> (error name, argument types) over every committed artifact's ABI."""
    known: dict[bytes, tuple[str, list[str]]] = {}
    for path in sorted(ARTIFACTS_DIR.glob("*.json")):
        try:
            abi = load_artifact(path.stem).abi
        except (ContractsError, ValueError, KeyError):
            continue
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [abi_type(p) for p in item.get("inputs", [])]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            known.setdefault(selector, (item["name"], types))
    return known


def _show_arg(kind: str, value: Any) -> str:
    if kind == "address":
        return to_checksum_address(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def decode_revert(data: bytes | str | None) -> str:
    """Readable form of revert data: `Error(string)` gives the string, a custom error declared by
    one of this project's contracts gives e.g. `SignatureExpired(1700000000)` / `InvalidNonce()`,
    anything else its hex. The first call reads every artifact (blocking; cached after)."""
    raw = b"" if data is None else (
        bytes.fromhex(data.removeprefix("0x")) if isinstance(data, str) else bytes(data))
    if not raw:
        return "execution reverted (no data)"
    selector, body = raw[:4], raw[4:]
    try:
        if selector == _SOLIDITY_ERROR:
            return str(abi_decode(["string"], body)[0])
        if selector == _SOLIDITY_PANIC:
            return f"Panic({abi_decode(['uint256'], body)[0]:#x})"
        if selector in _known_errors():
            name, types = _known_errors()[selector]
            args = abi_decode(types, body) if types else ()
            return f"{name}({', '.join(_show_arg(t, a) for t, a in zip(types, args))})"
    except Exception:  # malformed arguments: fall through to hex
        pass
    return "0x" + raw.hex()


# ---- OpenGradient payments on Base Sepolia: OPG, Permit2, x402 upto proxy ----

# OpenGradient's OPG ERC-20 on Base Sepolia (Base Sepolia-era SDK `BASE_OPG_ADDRESS`); the gateway
# advertises extra {name: "OPG", version: "2"}.
CANONICAL_OPG = "0x240b09731D96979f50B2C649C9CE10FcF9C7987F"
OPG_NAME = "OPG"
OPG_SYMBOL = "OPG"
OPG_VERSION = "2"
OPG_DECIMALS = 18

# Canonical Uniswap Permit2 and the x402 upto proxy (x402 SDK constants.py), as the
# facilitator's core knows them.
PERMIT2_ADDRESS = to_checksum_address(core_permit2.PERMIT2_ADDRESS)
UPTO_PROXY_ADDRESS = to_checksum_address(core_permit2.UPTO_PROXY_ADDRESS)
EXACT_PROXY_ADDRESS = to_checksum_address(core_exact_permit2.EXACT_PROXY_ADDRESS)
MAX_UINT256 = 2**256 - 1

# What Permit2 hashes for a witness transfer: its stub + the proxy's witness type string.
PERMIT_WITNESS_TRANSFER_FROM_STUB = (
    "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
    "uint256 deadline,")
UPTO_WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)"
    "Witness(address to,address facilitator,uint256 validAfter)")


async def install_opg(rpc_url: str, owner_key: str, address: str = CANONICAL_OPG, *,
                      name: str = OPG_NAME, symbol: str = OPG_SYMBOL, version: str = OPG_VERSION,
                      decimals: int = OPG_DECIMALS) -> str:
    """OPGToken at `address` (default: OPG's Base Sepolia address); see `_install_token`."""
    return await _install_token(rpc_url, owner_key, "OPGToken", address, name=name,
                                symbol=symbol, version=version, decimals=decimals)


async def install_permit2(rpc_url: str, address: str = PERMIT2_ADDRESS) -> str:
    """Place Permit2 (SignatureTransfer) at `address` (default: canonical). Needs no
    initialization; its nonce bitmap is whatever storage holds there (empty on a fresh node)."""
    target = to_checksum_address(address)
    await place_at(rpc_url, "Permit2", target)
    return target


async def install_upto_proxy(rpc_url: str, address: str = UPTO_PROXY_ADDRESS) -> str:
    """Place X402UptoPermit2Proxy at `address` (default: the x402 SDK's upto proxy address). It
    calls Permit2 at the canonical address: install that too (`install_permit2`)."""
    target = to_checksum_address(address)
    await place_at(rpc_url, "X402UptoPermit2Proxy", target)
    return target


async def install_exact_proxy(rpc_url: str, address: str = EXACT_PROXY_ADDRESS) -> str:
    """Place X402ExactPermit2Proxy at `address` (default: the x402 SDK's exact Permit2 proxy
    address). It calls Permit2 at the canonical address: install that too."""
    target = to_checksum_address(address)
    await place_at(rpc_url, "X402ExactPermit2Proxy", target)
    return target


async def approve_permit2(rpc_url: str, payer_key: str, token: str,
                          amount: int = MAX_UINT256, *, permit2: str = PERMIT2_ADDRESS) -> str:
    """The payer's one-time ERC-20 `approve(Permit2, amount)` on `token`; returns the tx hash."""
    return await call(rpc_url, payer_key, "OPGToken", token, "approve",
                      [to_checksum_address(permit2), amount], f"approve Permit2 on {token}")


_PERMIT2_DOMAIN_FIELDS = [{"name": "name", "type": "string"},
                          {"name": "chainId", "type": "uint256"},
                          {"name": "verifyingContract", "type": "address"}]
_TOKEN_PERMISSIONS_FIELDS = [{"name": "token", "type": "address"},
                             {"name": "amount", "type": "uint256"}]


def permit2_domain(chain_id: int, permit2: str = PERMIT2_ADDRESS) -> dict[str, Any]:
    """Permit2's EIP-712 domain: name "Permit2", no version."""
    return {"name": "Permit2", "chainId": chain_id,
            "verifyingContract": to_checksum_address(permit2)}


def upto_permit_typed_data(*, chain_id: int, token: str, amount: int, nonce: int, deadline: int,
                           to: str, facilitator: str, valid_after: int,
                           spender: str = UPTO_PROXY_ADDRESS,
                           permit2: str = PERMIT2_ADDRESS) -> dict[str, Any]:
    """EIP-712 `full_message` (for `Account.sign_typed_data`) of the Permit2
    PermitWitnessTransferFrom an x402 `upto` payer signs: cap `amount` of `token`, spender = the
    upto proxy, witness {to, facilitator, validAfter}. Same types as the x402 SDK's
    UPTO_PERMIT2_WITNESS_TYPES."""
    return {
        "types": {
            "EIP712Domain": _PERMIT2_DOMAIN_FIELDS,
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"}],
            "TokenPermissions": _TOKEN_PERMISSIONS_FIELDS,
            "Witness": [{"name": "to", "type": "address"},
                        {"name": "facilitator", "type": "address"},
                        {"name": "validAfter", "type": "uint256"}],
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": permit2_domain(chain_id, permit2),
        "message": {
            "permitted": {"token": to_checksum_address(token), "amount": amount},
            "spender": to_checksum_address(spender), "nonce": nonce, "deadline": deadline,
            "witness": {"to": to_checksum_address(to),
                        "facilitator": to_checksum_address(facilitator),
                        "validAfter": valid_after},
        },
    }


def permit_transfer_typed_data(*, chain_id: int, token: str, amount: int, spender: str,
                               nonce: int, deadline: int,
                               permit2: str = PERMIT2_ADDRESS) -> dict[str, Any]:
    """EIP-712 `full_message` of a plain Permit2 PermitTransferFrom (no witness)."""
    return {
        "types": {
            "EIP712Domain": _PERMIT2_DOMAIN_FIELDS,
            "PermitTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"}],
            "TokenPermissions": _TOKEN_PERMISSIONS_FIELDS,
        },
        "primaryType": "PermitTransferFrom",
        "domain": permit2_domain(chain_id, permit2),
        "message": {"permitted": {"token": to_checksum_address(token), "amount": amount},
                    "spender": to_checksum_address(spender), "nonce": nonce,
                    "deadline": deadline},
    }


def eip2612_permit_typed_data(*, token: str, chain_id: int, owner: str, spender: str, value: int,
                              nonce: int, deadline: int, name: str = OPG_NAME,
                              version: str = OPG_VERSION) -> dict[str, Any]:
    """EIP-712 `full_message` of an EIP-2612 `Permit` on OPGToken (or any EIP-2612 token)."""
    fields = [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
              {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
              {"name": "deadline", "type": "uint256"}]
    return _typed_data(token, chain_id, name, version, "Permit", fields, {
        "owner": to_checksum_address(owner), "spender": to_checksum_address(spender),
        "value": value, "nonce": nonce, "deadline": deadline})


@dataclass(frozen=True)
class UptoPermit:
    """A signed x402 `upto` Permit2 authorization (what the payload's `permit2Authorization` and
    `signature` carry)."""

    owner: str
    token: str
    cap: int            # permitted.amount: the most the facilitator may settle
    nonce: int
    deadline: int
    to: str
    facilitator: str
    valid_after: int
    signature: bytes
    spender: str = UPTO_PROXY_ADDRESS

    def payload(self) -> dict[str, Any]:
        """The x402 `upto` payment payload `{signature, permit2Authorization}` of this permit."""
        return {"signature": "0x" + self.signature.hex(),
                "permit2Authorization": {
                    "from": self.owner,
                    "permitted": {"token": self.token, "amount": str(self.cap)},
                    "spender": self.spender, "nonce": str(self.nonce),
                    "deadline": str(self.deadline),
                    "witness": {"to": self.to, "facilitator": self.facilitator,
                                "validAfter": str(self.valid_after)}}}

    def settle_args(self, amount: int, *, signature: bytes | None = None) -> list[Any]:
        """Arguments of proxy `settle(permit, amount, owner, witness, signature)`."""
        return [((self.token, self.cap), self.nonce, self.deadline), amount, self.owner,
                (self.to, self.facilitator, self.valid_after),
                self.signature if signature is None else signature]


def sign_upto_permit(signer_key: str, *, chain_id: int, token: str, cap: int, nonce: int,
                     deadline: int, to: str, facilitator: str, valid_after: int = 0,
                     owner: str | None = None, spender: str = UPTO_PROXY_ADDRESS) -> UptoPermit:
    """Sign an `upto` permit with `signer_key` (EOA) over the digest the facilitator checks
    (`facilitator.core.permit2.permit_digest`, canonical Permit2). `owner` defaults to the
    signer; pass the wallet address when the key is an ERC-1271 SmartWallet's owner."""
    owner = to_checksum_address(owner or Account.from_key(signer_key).address)
    permit = PermitWitnessTransfer(
        owner=owner.lower(), token=token.lower(), cap=cap, spender=spender.lower(), nonce=nonce,
        deadline=deadline, witness=UptoWitness(to=to.lower(), facilitator=facilitator.lower(),
                                               valid_after=valid_after))
    digest = core_permit2.permit_digest(chain_id, permit)
    signature = sign_digest(bytes.fromhex(signer_key.removeprefix("0x")), digest)
    return UptoPermit(
        owner=owner, token=to_checksum_address(token), cap=cap, nonce=nonce, deadline=deadline,
        to=to_checksum_address(to), facilitator=to_checksum_address(facilitator),
        valid_after=valid_after, signature=signature, spender=to_checksum_address(spender))


async def upto_settle(rpc_url: str, facilitator_key: str, permit: UptoPermit, amount: int, *,
                      proxy: str = UPTO_PROXY_ADDRESS) -> str:
    """The facilitator's `proxy.settle(...)` for `amount` (≤ permit.cap); returns the tx hash.
    Raises ContractsError naming the proxy/Permit2 custom error when it would revert."""
    return await call(rpc_url, facilitator_key, "X402UptoPermit2Proxy", proxy, "settle",
                      permit.settle_args(amount), "upto proxy settle")


# ---- the OpenGradient chain (id 10740): TEERegistry and InferenceSettlementRelay ----

OG_CHAIN_ID = 10740
TEE_TYPE_LLM_PROXY = 0
TEE_TYPE_VALIDATOR = 1
TEE_OPERATOR_ROLE = keccak(text="TEE_OPERATOR")
SETTLEMENT_RELAY_ROLE = keccak(text="SETTLEMENT_RELAY_ROLE")


async def deploy_tee_registry(rpc_url: str, deployer_key: str) -> str:
    """Deploy a TEERegistry; the deployer gets DEFAULT_ADMIN_ROLE and TEE_OPERATOR."""
    return await deploy(rpc_url, deployer_key, "TEERegistry")


async def add_tee_operator(rpc_url: str, admin_key: str, registry: str, operator: str) -> str:
    """Grant TEE_OPERATOR on `registry` to `operator` (admin only); returns the tx hash."""
    return await call(rpc_url, admin_key, "TEERegistry", registry, "grantRole",
                      [TEE_OPERATOR_ROLE, to_checksum_address(operator)])


async def register_tee(rpc_url: str, operator_key: str, registry: str, public_key_der: bytes, *,
                       endpoint: str, payment_address: str, tls_certificate: bytes = b"",
                       tee_type: int = TEE_TYPE_LLM_PROXY,
                       pcr_hash: bytes = b"\x00" * 32) -> str:
    """Register an enabled TEE (owner = the operator) whose signing key is `public_key_der`, an RSA
    SubjectPublicKeyInfo in DER; returns the tee id `0x` + keccak256(DER) hex."""
    await call(rpc_url, operator_key, "TEERegistry", registry, "registerTEE", [
        bytes(public_key_der), bytes(tls_certificate), to_checksum_address(payment_address),
        endpoint, tee_type, bytes(pcr_hash)])
    return "0x" + tee_id_of(bytes(public_key_der)).hex()


async def set_tee_enabled(rpc_url: str, key: str, registry: str, tee_id: bytes | str,
                          enabled: bool) -> str | None:
    """Enable or disable a TEE as its owner-operator or an admin. Returns the tx hash, or None when
    the TEE already is in that state (nothing sent)."""
    tee = bytes.fromhex(tee_id.removeprefix("0x")) if isinstance(tee_id, str) else bytes(tee_id)
    async with connect(rpc_url) as w3:
        contract = contract_at(w3, await _artifact("TEERegistry"), registry)
        if await contract.functions.isTEEEnabled(tee).call() == enabled:
            return None
    return await call(rpc_url, key, "TEERegistry", registry,
                      "enableTEE" if enabled else "disableTEE", [tee])


async def deploy_settlement_relay(rpc_url: str, deployer_key: str,
                                  tee_registry: str | None = None) -> str:
    """Deploy an InferenceSettlementRelay; the deployer gets DEFAULT_ADMIN_ROLE and
    SETTLEMENT_RELAY_ROLE. With `tee_registry`, `settleIndividual` verifies the TEE's RSA-PSS
    signature against it (as OpenGradient's relay does); without, it only emits."""
    registry = to_checksum_address(tee_registry) if tee_registry else "0x" + "00" * 20
    return await deploy(rpc_url, deployer_key, "InferenceSettlementRelay", registry)


async def add_relayer(rpc_url: str, admin_key: str, relay: str, relayer: str) -> str:
    """Grant SETTLEMENT_RELAY_ROLE on `relay` to `relayer` (admin only); returns the tx hash."""
    return await call(rpc_url, admin_key, "InferenceSettlementRelay", relay, "grantRole",
                      [SETTLEMENT_RELAY_ROLE, to_checksum_address(relayer)])

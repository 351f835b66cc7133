"""Payments from an ERC-1271 SmartWallet (`contracts/src/SmartWallet.sol`, owned by one EOA):
`authorization.from` is the wallet, the signature is the owner's EIP-712 signature.

For a 65-byte signature the service calls the (v, r, s) overload of `transferWithAuthorization`
(`facilitator.core.abi.transfer_with_authorization`); the token then asks the wallet's
`isValidSignature` with `r || s || v`, v normalised to 27/28, exactly as FiatToken v2.2 does.

What the token itself says is asked with calldata encoded here, independently of the service:
web3's ABI encoder over the committed TestUSDC artifact, with the overload named explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from harness import NETWORK, OWNER_KEY, USDC, DevChain, body_v2, requirements, sign_authorization
from web3 import Web3

from facilitator.devnet import contracts
from facilitator.devnet.anvil import AnvilError
from facilitator.protocol.fields import to_checksum

AMOUNT = 25_000
VRS_SELECTOR = "0xe3ee160e"  # transferWithAuthorization(...,uint8,bytes32,bytes32)
BYTES_SELECTOR = "0xcf092995"  # transferWithAuthorization(...,bytes)
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
VRS_OVERLOAD = ("transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,"
                "uint8,bytes32,bytes32)")
BYTES_OVERLOAD = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
# Encoding only (no provider, no I/O): the token's ABI as compiled into the committed artifact.
TOKEN = Web3().eth.contract(address=Web3.to_checksum_address(USDC),
                            abi=contracts.load_artifact("TestUSDC").abi)


@dataclass(frozen=True)
class Wallet:
    owner: LocalAccount
    address: str  # checksummed


@pytest.fixture(scope="module")
async def wallet(chain: DevChain) -> Wallet:
    owner = Account.create()
    address = await contracts.deploy_smart_wallet(chain.url, OWNER_KEY, owner.address)
    await contracts.mint(chain.url, OWNER_KEY, USDC, address, 10**9)
    return Wallet(owner, to_checksum(address))


def wallet_payment(wallet: Wallet, pay_to: str, *, signer: LocalAccount | None = None,
                   **sign_args: Any) -> dict[str, Any]:
    payload = sign_authorization(wallet.owner, to=pay_to, value=AMOUNT, from_=wallet.address,
                                 signer=signer, **sign_args)
    return body_v2(payload, requirements(pay_to, AMOUNT))


def set_signature(body: dict[str, Any], signature: bytes) -> dict[str, Any]:
    body["paymentPayload"]["payload"]["signature"] = "0x" + signature.hex()
    return body


def token_calldata(body: dict[str, Any], overload: str, signature: bytes | None = None) -> str:
    """`transferWithAuthorization` calldata for `body`'s authorization through the named
    overload, encoded by web3 from the artifact's ABI. `signature` (default: the payload's) is
    split into (v, r, s) for the VRS overload, passed whole for the `bytes` one."""
    auth = body["paymentPayload"]["payload"]["authorization"]
    if signature is None:
        signature = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
    args: list[Any] = [Web3.to_checksum_address(auth["from"]), Web3.to_checksum_address(auth["to"]),
                       int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
                       bytes.fromhex(auth["nonce"][2:])]
    if overload == VRS_OVERLOAD:
        assert len(signature) == 65
        args += [signature[64], signature[:32], signature[32:64]]
    else:
        args.append(signature)
    TOKEN.get_function_by_signature(overload)  # the artifact has exactly this overload
    return TOKEN.encode_abi(overload, args=args)


async def simulate_on_chain(chain: DevChain, data: str, sender: str) -> Any:
    """What the token itself says about calldata `data` (from `token_calldata`): eth_call from
    `sender`. Returns None on success, the RPC error otherwise."""
    try:
        await chain.rpc("eth_call", [{"from": sender, "to": USDC, "data": data}, "latest"])
    except AnvilError as exc:  # the revert is the answer
        return exc
    return None


async def assert_settled_from_wallet(chain: DevChain, answer: dict[str, Any], wallet: Wallet,
                                     pay_to: str, selector: str,
                                     calldata: str | None = None) -> None:
    assert answer["success"] is True, answer
    assert answer["payer"] == wallet.address
    assert answer["network"] == NETWORK
    tx = await chain.rpc("eth_getTransactionByHash", [answer["transaction"]])
    assert tx["to"].lower() == USDC.lower()
    assert tx["input"][:10] == selector, tx["input"][:10]
    if calldata is not None:
        assert tx["input"] == calldata, "the service sent other calldata than the token's ABI"
    receipt = await chain.rpc("eth_getTransactionReceipt", [answer["transaction"]])
    assert int(receipt["status"], 16) == 1
    transfers = [log for log in receipt["logs"]
                 if log["address"].lower() == USDC.lower() and log["topics"][0] == TRANSFER_TOPIC]
    assert len(transfers) == 1, receipt["logs"]
    log = transfers[0]
    assert log["topics"][1] == "0x" + "00" * 12 + wallet.address[2:].lower()
    assert log["topics"][2] == "0x" + "00" * 12 + pay_to[2:].lower()
    assert int(log["data"], 16) == AMOUNT


async def test_smart_wallet_pays_verify_and_settle(chain, wallet, facilitator):
    pay_to = Account.create().address
    before = await chain.token_balance(wallet.address)
    body = wallet_payment(wallet, pay_to)
    assert len(bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])) == 65
    assert await facilitator.verify(body) == {"isValid": True, "payer": wallet.address}
    settled = await facilitator.settle(body)
    await assert_settled_from_wallet(chain, settled, wallet, pay_to, VRS_SELECTOR,
                                     token_calldata(body, VRS_OVERLOAD))
    assert await chain.token_balance(pay_to) == AMOUNT
    assert await chain.token_balance(wallet.address) == before - AMOUNT
    # Replay: same answer, nothing new on chain; verify now reports the consumed nonce.
    again = await facilitator.settle(body)
    assert again["success"] is True and again["transaction"] == settled["transaction"]
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False
    assert verdict["invalidReason"] == "invalid_exact_evm_nonce_already_used"
    assert verdict["payer"] == wallet.address


async def test_signature_by_non_owner_is_invalid_signature(chain, wallet, facilitator):
    pay_to = Account.create().address
    body = wallet_payment(wallet, pay_to, signer=Account.create())
    for overload in (VRS_OVERLOAD, BYTES_OVERLOAD):  # the token refuses it either way
        assert await simulate_on_chain(chain, token_calldata(body, overload),
                                       facilitator.signer) is not None, overload
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == "invalid_exact_evm_payload_signature"
    assert verdict["payer"] == wallet.address
    sent = await chain.tx_count(facilitator.signer)
    answer = await facilitator.settle(body)
    assert answer["success"] is False, answer
    assert answer["errorReason"] == "invalid_exact_evm_payload_signature"
    assert answer["transaction"] == ""
    assert answer["network"] == NETWORK
    assert answer["payer"] == wallet.address
    assert await chain.tx_count(facilitator.signer) == sent
    assert await chain.transfer_logs_to(pay_to) == []


async def test_owner_signature_for_another_wallet_is_invalid(chain, wallet, facilitator):
    """The owner's signature names `from` = this wallet; presented for a second wallet with the
    same owner it must not verify (the digest binds `from`)."""
    twin = to_checksum(await contracts.deploy_smart_wallet(chain.url, OWNER_KEY,
                                                           wallet.owner.address))
    await contracts.mint(chain.url, OWNER_KEY, USDC, twin, AMOUNT)
    pay_to = Account.create().address
    body = wallet_payment(wallet, pay_to)
    body["paymentPayload"]["payload"]["authorization"]["from"] = twin
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == "invalid_exact_evm_payload_signature"
    assert verdict["payer"] == twin


async def test_malformed_length_wallet_signature_is_invalid_signature(chain, wallet, facilitator):
    """66 bytes (owner signature + one byte): the service takes the `bytes` overload, the wallet
    refuses the length, so does the token."""
    pay_to = Account.create().address
    body = wallet_payment(wallet, pay_to)
    sig = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
    set_signature(body, sig + b"\x00")
    assert await simulate_on_chain(chain, token_calldata(body, BYTES_OVERLOAD),
                                   facilitator.signer) is not None
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == "invalid_exact_evm_payload_signature"
    assert verdict["payer"] == wallet.address


async def test_unfunded_wallet_is_insufficient_balance(chain, facilitator):
    owner = Account.create()
    empty = Wallet(owner, to_checksum(
        await contracts.deploy_smart_wallet(chain.url, OWNER_KEY, owner.address)))
    body = wallet_payment(empty, Account.create().address)
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == "invalid_exact_evm_insufficient_balance"
    assert verdict["payer"] == empty.address


async def test_owner_signature_with_v_0_or_1_is_accepted_like_the_token_accepts_it(
        chain, wallet, facilitator):
    """A 65-byte owner signature encoded with v in {0, 1} (raw recovery id; some signers emit
    it). The service sends it through the (v, r, s) overload with v normalised to 27/28, and the
    token hands the wallet `r || s || 27/28`, which the wallet accepts: the chain takes this
    payment (checked below with eth_call). SDK 2.25.0 agrees: a deployed wallet whose
    `isValidSignature` refuses the raw bytes is deferred to the simulation, which succeeds.
    So /verify must say valid and /settle must settle."""
    pay_to = Account.create().address
    body = wallet_payment(wallet, pay_to, nonce=os.urandom(32))
    sig = bytes.fromhex(body["paymentPayload"]["payload"]["signature"][2:])
    raw = sig[:64] + bytes([sig[64] - 27])
    assert raw[64] in (0, 1)
    set_signature(body, raw)
    # The two encodings a relayer could choose for these 65 bytes: (v + 27, r, s) is taken,
    # the raw bytes (v in {0, 1} handed to the wallet as is) are refused.
    normalised = token_calldata(body, VRS_OVERLOAD, raw[:64] + bytes([raw[64] + 27]))
    assert await simulate_on_chain(chain, normalised, facilitator.signer) is None, \
        "the token accepts this payment through the (v, r, s) overload"
    assert await simulate_on_chain(chain, token_calldata(body, BYTES_OVERLOAD),
                                   facilitator.signer) is not None, \
        "the wallet refuses the raw bytes"
    assert await facilitator.verify(body) == {"isValid": True, "payer": wallet.address}
    settled = await facilitator.settle(body)
    await assert_settled_from_wallet(chain, settled, wallet, pay_to, VRS_SELECTOR, normalised)

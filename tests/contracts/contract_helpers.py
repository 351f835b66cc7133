"""Helpers for the contract tests: actors, signing and submitting EIP-3009 authorizations."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.datastructures import SignedMessage
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError

from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, Anvil

CHAIN_ID = 84532  # Base Sepolia, so the canonical USDC address and the x402 defaults apply

OWNER_KEY = DEV_KEYS[0]    # token owner / minter
PAYER_KEY = DEV_KEYS[1]    # signs authorizations
RELAYER_KEY = DEV_KEYS[2]  # submits them (the facilitator's role)
PAYEE_KEY = DEV_KEYS[3]    # receives
OTHER_KEY = DEV_KEYS[4]    # an unrelated signer
WALLET_OWNER_KEY = DEV_KEYS[5]  # owns the SmartWallet

OWNER, PAYER, RELAYER, PAYEE, OTHER, WALLET_OWNER = (
    Account.from_key(k).address for k in DEV_KEYS[:6])

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_AUTH_FIELDS = "address,address,uint256,uint256,uint256,bytes32"
TWA_VRS = f"transferWithAuthorization({_AUTH_FIELDS},uint8,bytes32,bytes32)"
TWA_BYTES = f"transferWithAuthorization({_AUTH_FIELDS},bytes)"
RWA_VRS = f"receiveWithAuthorization({_AUTH_FIELDS},uint8,bytes32,bytes32)"
RWA_BYTES = f"receiveWithAuthorization({_AUTH_FIELDS},bytes)"
CANCEL_VRS = "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"
CANCEL_BYTES = "cancelAuthorization(address,bytes32,bytes)"


@dataclass(frozen=True)
class Authorization:
    """A signed EIP-3009 authorization and the ways to pass its signature."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signed: SignedMessage

    @property
    def fields(self) -> list[Any]:
        return [self.from_, self.to, self.value, self.valid_after, self.valid_before, self.nonce]

    def vrs_args(self) -> list[Any]:
        return self.fields + [self.signed.v, _b32(self.signed.r), _b32(self.signed.s)]

    def bytes_args(self) -> list[Any]:
        return self.fields + [bytes(self.signed.signature)]


def _b32(x: int) -> bytes:
    return x.to_bytes(32, "big")


async def chain_now(w3: AsyncWeb3) -> int:
    return int((await w3.eth.get_block("latest"))["timestamp"])


async def sign_authorization(
    w3: AsyncWeb3, token: str, signer_key: str, *, from_: str | None = None, to: str = PAYEE,
    value: int = 1_000_000, valid_after: int = 0, valid_before: int | None = None,
    nonce: bytes | None = None, primary_type: str = "TransferWithAuthorization",
    name: str = "USDC", version: str = "2",
) -> Authorization:
    from_ = from_ or Account.from_key(signer_key).address
    valid_before = valid_before if valid_before is not None else await chain_now(w3) + 3600
    nonce = nonce or secrets.token_bytes(32)
    typed = contracts.authorization_typed_data(
        token=token, chain_id=CHAIN_ID, from_=from_, to=to, value=value, valid_after=valid_after,
        valid_before=valid_before, nonce=nonce, name=name, version=version,
        primary_type=primary_type)
    signed = Account.sign_typed_data(signer_key, full_message=typed)
    return Authorization(from_, to, value, valid_after, valid_before, nonce, signed)


def sign_cancel(token: str, signer_key: str, nonce: bytes,
                authorizer: str | None = None) -> SignedMessage:
    authorizer = authorizer or Account.from_key(signer_key).address
    typed = contracts.cancel_typed_data(token=token, chain_id=CHAIN_ID, authorizer=authorizer,
                                        nonce=nonce)
    return Account.sign_typed_data(signer_key, full_message=typed)


def high_s(signed: SignedMessage) -> tuple[int, bytes, bytes]:
    """The malleable twin (n - s, flipped v) of a valid signature: ecrecover accepts it."""
    return (55 - signed.v, _b32(signed.r), _b32(SECP256K1_N - signed.s))


async def revert_reason(call: Any) -> str:
    """The revert string of an awaitable contract call (fails the test when it does not revert)."""
    with pytest.raises(ContractLogicError) as info:
        await call
    message = info.value.message or ""
    prefix = "execution reverted: "
    assert message.startswith(prefix), message
    return message[len(prefix):]


async def submit(node: Anvil, key: str, contract: AsyncContract, signature: str,
                 args: list[Any]) -> Any:
    """Send `signature(args)` to `contract` from `key`; returns the successful receipt."""
    data = contract.encode_abi(signature, args=args)
    return await contracts.transact(node.url, key, contract.address, data, what=signature)

"""Builders shared by the unit tests: genuine EIP-3009 payments signed with eth_account and
x402 v1/v2 request bodies. Nothing here uses the facilitator's own signing or hashing code."""

from __future__ import annotations

import copy
import random
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

CHAIN_ID = 84532
NETWORK = "eip155:84532"
V1_NETWORK = "base-sepolia"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
AMOUNT = 10_000

EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
TRANSFER_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


def typed_transfer(name: str, version: str, chain_id: int, contract: str,
                   auth: dict[str, Any]) -> dict[str, Any]:
    """The full EIP-712 message for eth_account (auth holds wire strings)."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS,
                  "TransferWithAuthorization": TRANSFER_FIELDS},
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": version, "chainId": chain_id,
                   "verifyingContract": contract},
        "message": {"from": auth["from"], "to": auth["to"], "value": int(auth["value"]),
                    "validAfter": int(auth["validAfter"]), "validBefore": int(auth["validBefore"]),
                    "nonce": bytes.fromhex(auth["nonce"][2:])},
    }


def signable(name: str, version: str, chain_id: int, contract: str, auth: dict[str, Any]):
    return encode_typed_data(full_message=typed_transfer(name, version, chain_id, contract, auth))


def sign_auth(account: LocalAccount, auth: dict[str, Any], *, name: str = "USDC",
              version: str = "2", chain_id: int = CHAIN_ID, contract: str = USDC) -> str:
    signed = account.sign_message(signable(name, version, chain_id, contract, auth))
    return "0x" + signed.signature.hex()


def new_account(rng: random.Random) -> LocalAccount:
    return Account.from_key(rng.randbytes(32))


def authorization(payer: str, *, to: str = PAY_TO, value: int = AMOUNT, valid_after: int = 0,
                  valid_before: int = 2_000_000_000, nonce: bytes = b"\x11" * 32) -> dict[str, str]:
    return {"from": payer, "to": to, "value": str(value), "validAfter": str(valid_after),
            "validBefore": str(valid_before), "nonce": "0x" + nonce.hex()}


def requirements_v2(**overrides: Any) -> dict[str, Any]:
    req = {"scheme": "exact", "network": NETWORK, "amount": str(AMOUNT), "asset": USDC,
           "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}}
    req.update(overrides)
    return req


def requirements_v1(**overrides: Any) -> dict[str, Any]:
    req = {"scheme": "exact", "network": V1_NETWORK, "maxAmountRequired": str(AMOUNT),
           "resource": "https://api.example.com/premium-data",
           "description": "Access to premium market data", "mimeType": "application/json",
           "payTo": PAY_TO, "maxTimeoutSeconds": 60, "asset": USDC,
           "extra": {"name": "USDC", "version": "2"}}
    req.update(overrides)
    return req


def body_v2(payload: dict[str, Any], *, requirements: dict[str, Any] | None = None,
            accepted: dict[str, Any] | None = None) -> dict[str, Any]:
    requirements = requirements or requirements_v2()
    return {
        "x402Version": 2,
        "paymentPayload": {"x402Version": 2, "resource": {"url": "https://api.example.com/x"},
                           "accepted": copy.deepcopy(accepted or requirements),
                           "payload": payload},
        "paymentRequirements": copy.deepcopy(requirements),
    }


def body_v1(payload: dict[str, Any], *, requirements: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    return {
        "x402Version": 1,
        "paymentPayload": {"x402Version": 1, "scheme": "exact", "network": V1_NETWORK,
                           "payload": payload},
        "paymentRequirements": copy.deepcopy(requirements or requirements_v1()),
    }


def signed_payload(account: LocalAccount, **auth_overrides: Any) -> dict[str, Any]:
    auth = authorization(account.address, **auth_overrides)
    return {"signature": sign_auth(account, auth), "authorization": auth}

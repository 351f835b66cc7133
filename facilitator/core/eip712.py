"""EIP-712 digests for the authorizations we verify, computed by hand.

Why by hand: `eth_account.messages.encode_typed_data` costs ~100 us per call; these digests are
on the /verify hot path. `tests/unit/test_eip712.py` pins every digest here to eth_account's for
random inputs (a pair check), so speed does not cost correctness.

Guarantee: pure functions of their arguments; domain separators are cached (bounded).
"""

from __future__ import annotations

from functools import lru_cache

from eth_hash.auto import keccak

from facilitator.protocol.eip3009 import TransferAuthorization

EIP712_DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)")


def word(value: int) -> bytes:
    """ABI encoding of a uint256."""
    return value.to_bytes(32, "big")


def address_word(addr: str) -> bytes:
    """ABI encoding of an address given as 0x-hex."""
    return bytes(12) + bytes.fromhex(addr[2:])


@lru_cache(maxsize=1024)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        EIP712_DOMAIN_TYPEHASH + keccak(name.encode()) + keccak(version.encode())
        + word(chain_id) + address_word(verifying_contract.lower()))


def typed_digest(separator: bytes, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + separator + struct_hash)


def transfer_authorization_struct_hash(auth: TransferAuthorization) -> bytes:
    return keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH + address_word(auth.payer) + address_word(auth.pay_to)
        + word(auth.value) + word(auth.valid_after) + word(auth.valid_before) + auth.nonce)


def transfer_authorization_digest(separator: bytes, auth: TransferAuthorization) -> bytes:
    return typed_digest(separator, transfer_authorization_struct_hash(auth))

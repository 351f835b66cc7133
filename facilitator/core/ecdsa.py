"""secp256k1 signature recovery for Ethereum signatures, with coincurve (libsecp256k1).

Guarantee: `recover_address` returns the signer of a 65-byte `r || s || v` signature over a
32-byte digest, or None when the signature is malformed, has a high `s` (EIP-2 malleability,
rejected as FiatToken's ECRecover rejects it) or a `v` outside {0, 1, 27, 28}. It never raises on
bad input.
"""

from __future__ import annotations

import coincurve
from eth_hash.auto import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


def split_signature(signature: bytes) -> tuple[int, bytes, bytes] | None:
    """(v as 27/28, r, s) of a 65-byte signature, or None if `v` is not a valid recovery id."""
    if len(signature) != 65:
        return None
    v = signature[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        return None
    return v, signature[:32], signature[32:64]


def recover_address(digest: bytes, signature: bytes) -> str | None:
    parts = split_signature(signature)
    if parts is None:
        return None
    v, r, s = parts
    s_int = int.from_bytes(s, "big")
    if s_int == 0 or s_int > HALF_N or int.from_bytes(r, "big") == 0:
        return None
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            r + s + bytes([v - 27]), digest, hasher=None)
    except ValueError:
        return None
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


def sign_digest(private_key: bytes | coincurve.PrivateKey, digest: bytes) -> bytes:
    """65-byte `r || s || v` (v = 27/28) signature. Pass a `coincurve.PrivateKey` to avoid
    re-deriving the public key on every call (it costs more than the signature)."""
    key = private_key if isinstance(private_key, coincurve.PrivateKey) else \
        coincurve.PrivateKey(private_key)
    raw = key.sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def address_of(private_key: bytes) -> str:
    public = coincurve.PrivateKey(private_key).public_key.format(compressed=False)
    return "0x" + keccak(public[1:])[-20:].hex()

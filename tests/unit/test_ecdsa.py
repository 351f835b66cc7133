"""`recover_address` against eth_account/eth_keys, and its refusals (malleability, bad v, bad
lengths, zero r/s)."""

from __future__ import annotations

import random

import pytest
from eth_account import Account
from eth_keys import keys

from facilitator.core.ecdsa import (
    HALF_N, SECP256K1_N, address_of, recover_address, sign_digest, split_signature,
)


def _eth_account_sign(key: bytes, digest: bytes) -> bytes:
    return bytes(Account.unsafe_sign_hash(digest, key).signature)  # r || s || v(27/28)


def _oracle_recover(digest: bytes, signature: bytes) -> str:
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    sig = keys.Signature(signature_bytes=signature[:64] + bytes([v]))
    return sig.recover_public_key_from_msg_hash(digest).to_address().lower()


def _keys_and_digests(seed: int, n: int = 60):
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.randbytes(32), rng.randbytes(32)


def test_recovers_eth_account_signatures(seed: int) -> None:
    for key, digest in _keys_and_digests(seed):
        signature = _eth_account_sign(key, digest)
        expected = Account.from_key(key).address.lower()
        assert _oracle_recover(digest, signature) == expected  # oracle sanity
        assert recover_address(digest, signature) == expected


def test_agrees_with_eth_keys_on_arbitrary_low_s_signatures(seed: int) -> None:
    # Random (r, s) pairs: either both recover the same address or ours refuses where eth_keys
    # cannot recover at all.
    rng = random.Random(seed)
    for _ in range(60):
        r = rng.randrange(1, SECP256K1_N)
        s = rng.randrange(1, HALF_N + 1)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([rng.choice([27, 28])])
        digest = rng.randbytes(32)
        try:
            expected = _oracle_recover(digest, signature)
        except Exception:  # noqa: BLE001 - no point on the curve for this r
            expected = None
        assert recover_address(digest, signature) == expected


def test_v_zero_one_and_27_28_are_equivalent(seed: int) -> None:
    for key, digest in _keys_and_digests(seed, 20):
        signature = _eth_account_sign(key, digest)
        low_v = signature[:64] + bytes([signature[64] - 27])
        assert recover_address(digest, low_v) == recover_address(digest, signature) \
            == Account.from_key(key).address.lower()


def test_high_s_is_refused(seed: int) -> None:
    for key, digest in _keys_and_digests(seed, 20):
        signature = _eth_account_sign(key, digest)
        s = int.from_bytes(signature[32:64], "big")
        flipped_v = 55 - signature[64]  # 27 <-> 28
        malleated = signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([flipped_v])
        # eth_keys still recovers the same signer from the malleated form ...
        assert _oracle_recover(digest, malleated) == Account.from_key(key).address.lower()
        # ... but, as FiatToken's ECRecover, we do not.
        assert recover_address(digest, malleated) is None


@pytest.mark.parametrize("v", [2, 3, 26, 29, 30, 35, 36, 127, 255])
def test_v_outside_valid_set_is_refused(seed: int, v: int) -> None:
    key, digest = next(_keys_and_digests(seed, 1))
    signature = _eth_account_sign(key, digest)
    assert recover_address(digest, signature[:64] + bytes([v])) is None
    assert split_signature(signature[:64] + bytes([v])) is None


@pytest.mark.parametrize("length", [0, 1, 64, 66, 130])
def test_wrong_length_is_refused(seed: int, length: int) -> None:
    key, digest = next(_keys_and_digests(seed, 1))
    signature = _eth_account_sign(key, digest)
    candidate = (signature * 3)[:length]
    assert recover_address(digest, candidate) is None


def test_zero_r_or_zero_s_is_refused(seed: int) -> None:
    key, digest = next(_keys_and_digests(seed, 1))
    signature = _eth_account_sign(key, digest)
    assert recover_address(digest, bytes(32) + signature[32:]) is None
    assert recover_address(digest, signature[:32] + bytes(32) + signature[64:]) is None


def test_r_not_below_curve_order_is_refused_without_raising(seed: int) -> None:
    key, digest = next(_keys_and_digests(seed, 1))
    signature = _eth_account_sign(key, digest)
    for r in (SECP256K1_N, 2**256 - 1):
        assert recover_address(digest, r.to_bytes(32, "big") + signature[32:]) is None


def test_sign_digest_is_low_s_and_recoverable(seed: int) -> None:
    for key, digest in _keys_and_digests(seed):
        signature = sign_digest(key, digest)
        assert len(signature) == 65 and signature[64] in (27, 28)
        assert 0 < int.from_bytes(signature[32:64], "big") <= HALF_N
        assert _oracle_recover(digest, signature) == Account.from_key(key).address.lower()


def test_sign_digest_equals_eth_account_signature(seed: int) -> None:
    # Both use RFC 6979 deterministic nonces, so the bytes must be identical.
    for key, digest in _keys_and_digests(seed, 20):
        assert sign_digest(key, digest) == _eth_account_sign(key, digest)


def test_address_of_matches_eth_account(seed: int) -> None:
    for key, _ in _keys_and_digests(seed, 20):
        assert address_of(key) == Account.from_key(key).address.lower()

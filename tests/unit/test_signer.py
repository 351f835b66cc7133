"""`sign_eip1559` equals eth_account byte for byte; `SignerKey` never shows its secret."""

from __future__ import annotations

import copy
import os
import pickle
import random
from pathlib import Path

import pytest
from eth_account import Account
from eth_utils import to_checksum_address

from facilitator.adapters.signer import SignerKey, SignerKeyError, TxFields, sign_eip1559


def _random_fields(rng: random.Random) -> TxFields:
    return TxFields(
        chain_id=rng.choice([1, 8453, 84532, 31337, rng.randrange(1, 2**32)]),
        nonce=rng.choice([0, 1, rng.randrange(2**20), rng.randrange(2**64 - 1)]),
        max_priority_fee_per_gas=rng.choice([0, 1, rng.randrange(10**12)]),
        max_fee_per_gas=rng.choice([1, rng.randrange(10**13)]) + 10**12,
        gas_limit=rng.choice([21_000, rng.randrange(21_000, 30_000_000)]),
        to="0x" + rng.randbytes(20).hex(),
        value=rng.choice([0, rng.randrange(2**128)]),
        data=rng.randbytes(rng.choice([0, 4, 36, 260, rng.randrange(1000)])),
    )


def _eth_account_sign(key: bytes, f: TxFields):
    tx = {"type": 2, "chainId": f.chain_id, "nonce": f.nonce,
          "maxPriorityFeePerGas": f.max_priority_fee_per_gas, "maxFeePerGas": f.max_fee_per_gas,
          "gas": f.gas_limit, "to": to_checksum_address(f.to),
          "value": f.value, "data": f.data, "accessList": []}
    return Account.from_key(key).sign_transaction(tx)


def test_sign_eip1559_equals_eth_account(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        secret, fields = rng.randbytes(32), _random_fields(rng)
        ours = sign_eip1559(SignerKey(secret), fields)
        expected = _eth_account_sign(secret, fields)
        assert ours.raw == bytes(expected.raw_transaction), fields
        assert ours.tx_hash == bytes(expected.hash)
        assert ours.fields == fields


def test_signed_tx_sender_is_the_key_address(seed: int) -> None:
    rng = random.Random(seed)
    key = SignerKey(rng.randbytes(32))
    signed = sign_eip1559(key, _random_fields(rng))
    assert Account.recover_transaction(signed.raw) == key.address


# ---- the key stays secret ------------------------------------------------------------------

SECRET_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def _leaks(text: str) -> bool:
    lowered = text.lower()
    return SECRET_HEX in lowered or SECRET_HEX[:16] in lowered or SECRET_HEX[-16:] in lowered


def test_repr_and_str_show_only_the_address() -> None:
    key = SignerKey.from_hex(SECRET_HEX)
    assert key.address == Account.from_key(bytes.fromhex(SECRET_HEX)).address
    for text in (repr(key), str(key), f"{key}", f"{key!r}", "%s" % key, repr([key]),
                 repr({"k": key})):
        assert not _leaks(text)
        assert key.address in text


def test_key_has_no_instance_dict() -> None:
    key = SignerKey.from_hex(SECRET_HEX)
    with pytest.raises(TypeError):
        vars(key)


@pytest.mark.parametrize("copier", [pickle.dumps, copy.copy, copy.deepcopy],
                         ids=["pickle", "copy", "deepcopy"])
def test_key_cannot_be_pickled_or_copied(copier) -> None:
    key = SignerKey.from_hex(SECRET_HEX)
    with pytest.raises(TypeError) as err:
        copier(key)
    assert not _leaks(str(err.value))


@pytest.mark.parametrize("text", [
    SECRET_HEX[:-1],                     # 63 digits
    SECRET_HEX + "00",                   # 33 bytes
    SECRET_HEX[:-2] + "zz",              # not hex
    "0x" + SECRET_HEX[:-2],              # 31 bytes
    "0x" + "00" * 32,                    # zero key
])
def test_malformed_key_errors_do_not_contain_it(text: str) -> None:
    with pytest.raises(SignerKeyError) as err:
        SignerKey.from_hex(text)
    rendered = str(err.value) + repr(err.value)
    assert text not in rendered and not _leaks(rendered)
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_sign_error_does_not_contain_key() -> None:
    key = SignerKey.from_hex(SECRET_HEX)
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever coincurve raises
        key.sign(b"short digest")
    assert not _leaks(str(err.value) + repr(err.value))


@pytest.mark.parametrize("text", [SECRET_HEX, "0x" + SECRET_HEX, "0X" + SECRET_HEX,
                                  SECRET_HEX.upper(), f"  {SECRET_HEX}\n"])
def test_from_hex_accepts_common_spellings(text: str) -> None:
    assert SignerKey.from_hex(text).address == Account.from_key(bytes.fromhex(SECRET_HEX)).address


# ---- key files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_is_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    path.write_text(SECRET_HEX + "\n")
    os.chmod(path, mode)
    assert SignerKey.from_file(path).address == Account.from_key(bytes.fromhex(SECRET_HEX)).address


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610, 0o601, 0o620, 0o602])
def test_key_file_accessible_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    path.write_text(SECRET_HEX)
    os.chmod(path, mode)
    with pytest.raises(SignerKeyError) as err:
        SignerKey.from_file(path)
    assert not _leaks(str(err.value))

"""The strict scalar parsers: canonical inputs accepted, everything else refused with the field
named."""

from __future__ import annotations

import random

import pytest
from eth_utils import to_checksum_address

from facilitator.protocol import fields as f
from facilitator.protocol.fields import BadRequest

UINT256_MAX = 2**256 - 1


# ---- uint256_decimal -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0", "1", "10", "10000", str(UINT256_MAX), str(2**255)])
def test_uint256_accepts_canonical_decimal(text: str) -> None:
    assert f.uint256_decimal(text, "amount") == int(text)


@pytest.mark.parametrize("value", [
    "+10", "-10", " 10", "10 ", "1_0", "1e3", "010", "00", "", "１０", "10\n", "\n10", "0x10",
    "10.0", "١٠", str(2**256), "9" * 79,
    10, 0, 10.0, None, True, b"10", ["10"],
], ids=repr)
def test_uint256_rejects_non_canonical(value: object) -> None:
    with pytest.raises(BadRequest) as err:
        f.uint256_decimal(value, "paymentRequirements.amount")
    assert err.value.field == "paymentRequirements.amount"


def test_uint256_accepts_random_canonical_values(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randrange(2 ** rng.randrange(1, 257))
        assert f.uint256_decimal(str(n), "v") == n


# ---- address -------------------------------------------------------------------------------

def _random_address(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


def test_address_accepts_lower_upper_and_checksum(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        lower = _random_address(rng)
        assert f.address(lower, "a") == lower
        assert f.address("0x" + lower[2:].upper(), "a") == lower
        assert f.address(to_checksum_address(lower), "a") == lower


def _break_checksum(checksummed: str) -> str | None:
    """The address with the case of one letter flipped, or None if it has no letters."""
    for i, c in enumerate(checksummed[2:], start=2):
        if c.isalpha():
            return checksummed[:i] + c.swapcase() + checksummed[i + 1:]
    return None


def test_address_rejects_mixed_case_with_bad_checksum(seed: int) -> None:
    rng = random.Random(seed)
    tried = 0
    while tried < 100:
        checksummed = to_checksum_address(_random_address(rng))
        broken = _break_checksum(checksummed)
        body = (broken or "")[2:]
        if broken is None or body == body.lower() or body == body.upper():
            continue  # flipping made it single-case, which is legitimately accepted
        tried += 1
        with pytest.raises(BadRequest) as err:
            f.address(broken, "paymentRequirements.payTo")
        assert err.value.field == "paymentRequirements.payTo"


def test_address_checksum_agrees_with_eth_utils(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        addr = _random_address(rng)
        assert f.to_checksum(addr) == to_checksum_address(addr)


@pytest.mark.parametrize("value", [
    "0x" + "ab" * 19, "0x" + "ab" * 21, "ab" * 20, "0X" + "ab" * 20, "0x" + "gg" * 20,
    "0x" + "ab" * 19 + "a", " 0x" + "ab" * 20, "0x" + "ab" * 20 + "\n", "", "0x",
    None, 0, b"\xab" * 20,
], ids=repr)
def test_address_rejects_malformed(value: object) -> None:
    with pytest.raises(BadRequest) as err:
        f.address(value, "paymentPayload.accepted.asset")
    assert err.value.field == "paymentPayload.accepted.asset"


# ---- hex_bytes -----------------------------------------------------------------------------

def test_hex_bytes_exact_length_accepted(seed: int) -> None:
    raw = random.Random(seed).randbytes(32)
    assert f.hex_bytes("0x" + raw.hex(), "nonce", length=32) == raw
    assert f.hex_bytes("0x" + raw.hex().upper(), "nonce", length=32) == raw


@pytest.mark.parametrize("value", [
    "0x" + "11" * 31, "0x" + "11" * 33, "0x", "11" * 32, "0x" + "1" * 63, "0x" + "zz" * 32,
    "0x" + "11" * 31 + " 1", None, 32,
], ids=repr)
def test_hex_bytes_wrong_length_or_shape_rejected(value: object) -> None:
    with pytest.raises(BadRequest) as err:
        f.hex_bytes(value, "paymentPayload.payload.authorization.nonce", length=32)
    assert err.value.field == "paymentPayload.payload.authorization.nonce"


def test_hex_bytes_without_length_accepts_any_even_length() -> None:
    assert f.hex_bytes("0x", "sig") == b""
    assert f.hex_bytes("0x00ff", "sig") == b"\x00\xff"


def test_hex_bytes_enforces_max_length() -> None:
    assert f.hex_bytes("0x" + "00" * 10, "sig", max_length=10) == bytes(10)
    with pytest.raises(BadRequest) as err:
        f.hex_bytes("0x" + "00" * 11, "sig", max_length=10)
    assert err.value.field == "sig"


# ---- integer -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 60, 2**63 - 1])
def test_integer_accepts_json_integers(value: int) -> None:
    assert f.integer(value, "maxTimeoutSeconds") == value


@pytest.mark.parametrize("value", [True, False, 1.0, "60", None, -1, 2**63, [1]], ids=repr)
def test_integer_rejects_bools_floats_strings_and_out_of_range(value: object) -> None:
    with pytest.raises(BadRequest) as err:
        f.integer(value, "maxTimeoutSeconds")
    assert err.value.field == "maxTimeoutSeconds"


def test_integer_honours_bounds() -> None:
    assert f.integer(5, "x", minimum=5, maximum=5) == 5
    for value in (4, 6):
        with pytest.raises(BadRequest):
            f.integer(value, "x", minimum=5, maximum=5)


# ---- object / member / text ----------------------------------------------------------------

def test_member_names_the_full_path_for_missing_and_null() -> None:
    for obj in ({}, {"payTo": None}):
        with pytest.raises(BadRequest) as err:
            f.member(obj, "payTo", "paymentRequirements")
        assert err.value.field == "paymentRequirements.payTo"
    with pytest.raises(BadRequest) as err:
        f.member({}, "paymentPayload", "")
    assert err.value.field == "paymentPayload"


@pytest.mark.parametrize("value", [[], "x", 1, None])
def test_require_object_rejects_non_objects(value: object) -> None:
    with pytest.raises(BadRequest) as err:
        f.require_object(value, "paymentRequirements")
    assert err.value.field == "paymentRequirements"


def test_text_rejects_non_strings_and_overlong() -> None:
    assert f.text("exact", "scheme", max_length=5) == "exact"
    for value in (5, None, "exacts"):
        with pytest.raises(BadRequest) as err:
            f.text(value, "scheme", max_length=5)
        assert err.value.field == "scheme"


def test_bad_request_message_starts_with_field() -> None:
    err = BadRequest("paymentRequirements.amount", "must be digits")
    assert str(err).startswith("paymentRequirements.amount")
    assert err.message == "must be digits"

"""Each hand-rolled encoder in `core/abi.py` equals eth_abi's encoding with the function
selector; revert decoding."""

from __future__ import annotations

import random

import pytest
from eth_abi import encode
from eth_utils import event_signature_to_log_topic, function_signature_to_4byte_selector

from facilitator.core import abi

TWA_VRS = ("transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,"
           "uint8,bytes32,bytes32)")
TWA_BYTES = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"


def _call(signature: str, types: list[str], args: list[object]) -> bytes:
    return function_signature_to_4byte_selector(signature) + encode(types, args)


def _addr(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


def _uint(rng: random.Random) -> int:
    return rng.randrange(2 ** rng.randrange(1, 257))


@pytest.mark.parametrize(("constant", "signature"), [
    (abi.BALANCE_OF, "balanceOf(address)"),
    (abi.ALLOWANCE, "allowance(address,address)"),
    (abi.AUTHORIZATION_STATE, "authorizationState(address,bytes32)"),
    (abi.NAME, "name()"),
    (abi.VERSION, "version()"),
    (abi.IS_VALID_SIGNATURE, "isValidSignature(bytes32,bytes)"),
    (abi.TRANSFER_WITH_AUTHORIZATION_VRS, TWA_VRS),
    (abi.TRANSFER_WITH_AUTHORIZATION_BYTES, TWA_BYTES),
    (abi.ERROR_STRING_SELECTOR, "Error(string)"),
    (abi.PANIC_SELECTOR, "Panic(uint256)"),
])
def test_selectors_match_eth_utils(constant: bytes, signature: str) -> None:
    assert constant == function_signature_to_4byte_selector(signature)


def test_event_topics_match_eth_utils() -> None:
    assert abi.TRANSFER_TOPIC == event_signature_to_log_topic("Transfer(address,address,uint256)")
    assert abi.AUTHORIZATION_USED_TOPIC == event_signature_to_log_topic(
        "AuthorizationUsed(address,bytes32)")


def test_erc1271_magic_is_the_is_valid_signature_selector() -> None:
    assert abi.ERC1271_MAGIC == function_signature_to_4byte_selector(
        "isValidSignature(bytes32,bytes)")


def test_balance_of_and_allowance_match_eth_abi(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        owner, spender = _addr(rng), _addr(rng)
        assert abi.balance_of(owner) == _call("balanceOf(address)", ["address"], [owner])
        assert abi.allowance(owner, spender) == _call(
            "allowance(address,address)", ["address", "address"], [owner, spender])


def test_authorization_state_matches_eth_abi(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        who, nonce = _addr(rng), rng.randbytes(32)
        assert abi.authorization_state(who, nonce) == _call(
            "authorizationState(address,bytes32)", ["address", "bytes32"], [who, nonce])


def test_is_valid_signature_matches_eth_abi(seed: int) -> None:
    rng = random.Random(seed)
    for length in [0, 1, 31, 32, 33, 64, 65, 66, 97, 130, 256, rng.randrange(1000)]:
        digest, signature = rng.randbytes(32), rng.randbytes(length)
        assert abi.is_valid_signature(digest, signature) == _call(
            "isValidSignature(bytes32,bytes)", ["bytes32", "bytes"], [digest, signature])


def _twa_args(rng: random.Random) -> tuple[str, str, int, int, int, bytes]:
    return _addr(rng), _addr(rng), _uint(rng), _uint(rng), _uint(rng), rng.randbytes(32)


@pytest.mark.parametrize("v", [0, 1, 27, 28])
def test_transfer_with_authorization_65_byte_signature_uses_vrs_overload(seed: int, v: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        args = _twa_args(rng)
        r, s = rng.randbytes(32), rng.randbytes(32)
        expected = _call(TWA_VRS, ["address", "address", "uint256", "uint256", "uint256",
                                   "bytes32", "uint8", "bytes32", "bytes32"],
                         [*args, v + 27 if v < 27 else v, r, s])
        assert abi.transfer_with_authorization(*args, r + s + bytes([v])) == expected


@pytest.mark.parametrize("length", [0, 1, 64, 66, 96, 129, 300])
def test_transfer_with_authorization_other_lengths_use_bytes_overload(seed: int,
                                                                      length: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        args, signature = _twa_args(rng), rng.randbytes(length)
        expected = _call(TWA_BYTES, ["address", "address", "uint256", "uint256", "uint256",
                                     "bytes32", "bytes"], [*args, signature])
        assert abi.transfer_with_authorization(*args, signature) == expected


def test_transfer_with_authorization_matches_web3_contract_encoding(seed: int) -> None:
    from web3 import Web3
    fn = {"type": "function", "name": "transferWithAuthorization", "stateMutability": "nonpayable",
          "outputs": [], "inputs": [{"name": n, "type": t} for n, t in [
              ("from", "address"), ("to", "address"), ("value", "uint256"),
              ("validAfter", "uint256"), ("validBefore", "uint256"), ("nonce", "bytes32"),
              ("v", "uint8"), ("r", "bytes32"), ("s", "bytes32")]]}
    contract = Web3().eth.contract(abi=[fn])
    rng = random.Random(seed)
    payer, pay_to, value, after, before, nonce = _twa_args(rng)
    r, s = rng.randbytes(32), rng.randbytes(32)
    expected = contract.encode_abi("transferWithAuthorization", args=[
        Web3.to_checksum_address(payer), Web3.to_checksum_address(pay_to), value, after, before,
        nonce, 28, r, s])
    got = abi.transfer_with_authorization(payer, pay_to, value, after, before, nonce,
                                          r + s + b"\x01")
    assert "0x" + got.hex() == expected


# ---- decoding --------------------------------------------------------------------------------

def test_decode_uint_bool_string_match_eth_abi(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(30):
        n = _uint(rng)
        assert abi.decode_uint("0x" + encode(["uint256"], [n]).hex()) == n
        assert abi.decode_bool("0x" + encode(["bool"], [n % 2 == 1]).hex()) is (n % 2 == 1)
        text = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(80)))
        assert abi.decode_string("0x" + encode(["string"], [text]).hex()) == text


def test_decode_uint_refuses_short_data() -> None:
    with pytest.raises(ValueError):
        abi.decode_uint("0x" + "00" * 31)


def _revert(signature: str, types: list[str], args: list[object]) -> str:
    return "0x" + _call(signature, types, args).hex()


@pytest.mark.parametrize("reason", [
    "FiatTokenV2: authorization is expired", "ERC20: transfer amount exceeds balance", "",
    "x" * 300, "ünïcødé ✓"])
def test_decode_revert_error_string(reason: str) -> None:
    data = _revert("Error(string)", ["string"], [reason])
    assert abi.decode_revert(data, "execution reverted") == reason


@pytest.mark.parametrize("code", [0x01, 0x11, 0x12, 0x32, 0x51])
def test_decode_revert_panic(code: int) -> None:
    data = _revert("Panic(uint256)", ["uint256"], [code])
    assert abi.decode_revert(data, "execution reverted") == f"panic 0x{code:02x}"


def test_decode_revert_names_a_known_custom_error() -> None:
    data = _revert("ERC20InsufficientBalance(address,uint256,uint256)",
                   ["address", "uint256", "uint256"], ["0x" + "11" * 20, 1, 2])
    assert abi.decode_revert(data, "execution reverted") == "ERC20InsufficientBalance"


def test_decode_revert_names_the_selector_of_an_unknown_custom_error() -> None:
    data = _revert("SomethingElse(uint256)", ["uint256"], [7])
    selector = abi.selector("SomethingElse(uint256)").hex()
    assert abi.decode_revert(data, "execution reverted") == f"custom error 0x{selector}"


@pytest.mark.parametrize("data", [None, "", "0x", "0x1234", 42, {"data": "0x"}], ids=repr)
def test_decode_revert_falls_back_to_message(data: object) -> None:
    assert abi.decode_revert(data, "execution reverted: boom") == "execution reverted: boom"


def test_decode_revert_truncated_error_string_falls_back_to_message() -> None:
    """The code's own comment: 'undecodable revert data falls back to the message'. An
    Error(string) selector with a cut-off body must not become 'custom error 0x08c379a0' (which
    throws away a node message such as 'execution reverted: FiatTokenV2: invalid signature')."""
    data = "0x08c379a0" + "00" * 5
    assert abi.decode_revert(data, "execution reverted: FiatTokenV2: invalid signature") == \
        "execution reverted: FiatTokenV2: invalid signature"


@pytest.mark.parametrize("data", ["0x08c379a0zz", "0x08c379a00", "0xnot-hex-at-all"])
def test_decode_revert_never_raises_on_malformed_hex(data: str) -> None:
    """Revert data comes from an RPC node (untrusted input); a malformed string must degrade to
    the message, not raise out of the settlement/simulation path."""
    assert abi.decode_revert(data, "execution reverted") == "execution reverted"

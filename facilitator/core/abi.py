"""ABI encoding of the contract calls we make and decoding of what comes back. Pure.

Hand-rolled for the handful of fixed signatures on the hot path (eth_abi costs tens of
microseconds per call); `tests/unit/test_abi.py` pins each encoder to eth_abi's output.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi import decode as abi_decode
from eth_hash.auto import keccak

from facilitator.core.eip712 import address_word, word


def selector(signature: str) -> bytes:
    return keccak(signature.encode())[:4]


BALANCE_OF = selector("balanceOf(address)")
ALLOWANCE = selector("allowance(address,address)")
AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
NAME = selector("name()")
VERSION = selector("version()")
IS_VALID_SIGNATURE = selector("isValidSignature(bytes32,bytes)")
TRANSFER_WITH_AUTHORIZATION_VRS = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
TRANSFER_WITH_AUTHORIZATION_BYTES = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")

NONCE_BITMAP = selector("nonceBitmap(address,uint256)")
UPTO_PROXY_SETTLE = selector(
    "settle(((address,uint256),uint256,uint256),uint256,address,(address,address,uint256),bytes)")
EXACT_PROXY_SETTLE = selector(
    "settle(((address,uint256),uint256,uint256),address,(address,uint256),bytes)")
# The real proxy's EIP-2612 variant (the SDK's gas-sponsoring extension): a static
# (value, deadline, r, s, v) tuple first, then `settle`'s arguments.
EXACT_PROXY_SETTLE_WITH_PERMIT = selector(
    "settleWithPermit((uint256,uint256,bytes32,bytes32,uint8),"
    "((address,uint256),uint256,uint256),address,(address,uint256),bytes)")

ERC1271_MAGIC = bytes.fromhex("1626ba7e")
TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")
AUTHORIZATION_USED_TOPIC = keccak(b"AuthorizationUsed(address,bytes32)")
ERROR_STRING_SELECTOR = selector("Error(string)")
PANIC_SELECTOR = selector("Panic(uint256)")


def dynamic_bytes(data: bytes) -> bytes:
    """Tail encoding of a `bytes` value: length word, then data padded to 32 bytes."""
    padding = (-len(data)) % 32
    return word(len(data)) + data + bytes(padding)


def balance_of(owner: str) -> bytes:
    return BALANCE_OF + address_word(owner)


def allowance(owner: str, spender: str) -> bytes:
    return ALLOWANCE + address_word(owner) + address_word(spender)


def authorization_state(authorizer: str, nonce: bytes) -> bytes:
    return AUTHORIZATION_STATE + address_word(authorizer) + nonce


def is_valid_signature(digest: bytes, signature: bytes) -> bytes:
    return IS_VALID_SIGNATURE + digest + word(64) + dynamic_bytes(signature)


def transfer_with_authorization(
    payer: str, pay_to: str, value: int, valid_after: int, valid_before: int, nonce: bytes,
    signature: bytes,
) -> bytes:
    """EIP-3009 call data: the (v, r, s) overload for 65-byte EOA signatures (every USDC
    version has it), the `bytes` overload for anything else (ERC-1271 wallets)."""
    head = (address_word(payer) + address_word(pay_to) + word(value) + word(valid_after)
            + word(valid_before) + nonce)
    if len(signature) == 65:
        v = signature[64] + 27 if signature[64] < 27 else signature[64]
        return TRANSFER_WITH_AUTHORIZATION_VRS + head + word(v) + signature[:32] + signature[32:64]
    return TRANSFER_WITH_AUTHORIZATION_BYTES + head + word(7 * 32) + dynamic_bytes(signature)


def nonce_bitmap(owner: str, word_position: int) -> bytes:
    return NONCE_BITMAP + address_word(owner) + word(word_position)


def upto_proxy_settle(token: str, cap: int, nonce: int, deadline: int, amount: int, owner: str,
                      to: str, facilitator: str, valid_after: int, signature: bytes) -> bytes:
    """x402UptoPermit2Proxy.settle(permit, amount, owner, witness, signature): every argument
    but the signature is static, so the head is ten words and the signature follows."""
    head = (address_word(token) + word(cap) + word(nonce) + word(deadline) + word(amount)
            + address_word(owner) + address_word(to) + address_word(facilitator)
            + word(valid_after) + word(10 * 32))
    return UPTO_PROXY_SETTLE + head + dynamic_bytes(signature)


@dataclass(frozen=True, slots=True)
class ExactProxySettle:
    """The static arguments of an x402ExactPermit2Proxy.settle call."""

    token: str
    amount: int
    nonce: int
    deadline: int
    owner: str
    to: str
    valid_after: int


def exact_proxy_settle(settle: ExactProxySettle, signature: bytes) -> bytes:
    """x402ExactPermit2Proxy.settle(permit, owner, witness, signature): every argument but the
    signature is static, so the head is eight words and the signature follows."""
    head = (address_word(settle.token) + word(settle.amount) + word(settle.nonce)
            + word(settle.deadline) + address_word(settle.owner) + address_word(settle.to)
            + word(settle.valid_after) + word(8 * 32))
    return EXACT_PROXY_SETTLE + head + dynamic_bytes(signature)


def decode_exact_proxy_settle(calldata: bytes) -> ExactProxySettle | None:
    """The static arguments of a `settle` or `settleWithPermit` call on the exact proxy, or
    None for any other call. Trailing bytes (a data suffix some senders append) are ignored."""
    skip = {EXACT_PROXY_SETTLE: 0, EXACT_PROXY_SETTLE_WITH_PERMIT: 5}.get(calldata[:4])
    if skip is None or len(calldata) < 4 + (skip + 7) * 32:
        return None
    start = 4 + 32 * skip
    words = [calldata[start + 32 * i:start + 32 * (i + 1)] for i in range(7)]
    number = [int.from_bytes(w, "big") for w in words]
    return ExactProxySettle(token="0x" + words[0][12:].hex(), amount=number[1], nonce=number[2],
                            deadline=number[3], owner="0x" + words[4][12:].hex(),
                            to="0x" + words[5][12:].hex(), valid_after=number[6])


def decode_uint(result: str) -> int:
    raw = bytes.fromhex(result[2:])
    if len(raw) < 32:
        raise ValueError("short uint256 return data")
    return int.from_bytes(raw[:32], "big")


def decode_bool(result: str) -> bool:
    return decode_uint(result) != 0


def decode_string(result: str) -> str:
    return str(abi_decode(["string"], bytes.fromhex(result[2:]))[0])


# Custom errors whose names the revert classifiers look for (OpenZeppelin v5, Permit2, x402 proxy).
KNOWN_CUSTOM_ERRORS = {selector(sig): sig.split("(")[0] for sig in (
    "ERC20InsufficientBalance(address,uint256,uint256)",
    "ERC20InsufficientAllowance(address,uint256,uint256)",
    "InvalidNonce()", "SignatureExpired(uint256)", "InvalidAmount(uint256)", "InvalidSigner()",
    "InvalidSignature()", "InvalidSignatureLength()", "InvalidContractSignature()",
    "AmountExceedsPermitted()", "UnauthorizedFacilitator()", "InvalidAmount()", "InvalidOwner()",
    "InvalidDestination()", "PaymentTooEarly()", "Permit2612AmountMismatch()",
)}


def decode_revert(data: object, message: str) -> str:
    """Human revert reason from an eth_call error's `data` — Error(string), Panic(uint256), a
    known custom error's name — falling back to the node's message. Never raises."""
    if not isinstance(data, str) or not data.startswith("0x") or len(data) < 10:
        return message
    try:
        raw = bytes.fromhex(data[2:])
    except ValueError:
        return message
    head = raw[:4]
    try:
        if head == ERROR_STRING_SELECTOR:
            return str(abi_decode(["string"], raw[4:])[0])
        if head == PANIC_SELECTOR:
            return f"panic 0x{abi_decode(['uint256'], raw[4:])[0]:02x}"
    except Exception:  # noqa: BLE001 - truncated or garbled data: the message says more
        return message
    name = KNOWN_CUSTOM_ERRORS.get(head)
    return name if name is not None else f"custom error 0x{head.hex()}"

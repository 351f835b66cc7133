"""Strict parsers for the scalar fields of x402 messages.

Guarantee: every parser either returns a canonical value or raises `BadRequest` naming the field
(its JSON path) and saying what was expected. Nothing lenient: Python's `int()` accepts "+10",
" 10", "1_0" and full-width digits, which would let two different strings denote one amount; the
x402-conformance suite (F1) rejects facilitators that accept them, and so do we.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from eth_hash.auto import keccak

UINT256_MAX = 2**256 - 1

_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,77})", re.ASCII)
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}", re.ASCII)
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})*", re.ASCII)


class BadRequest(ValueError):
    """A request that is not a well-formed x402 message; answered with HTTP 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def require_object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRequest(field, "must be a JSON object")
    return value


def member(obj: Mapping[str, Any], key: str, path: str) -> Any:
    """The value of a required member; missing members are named by their full path."""
    if key not in obj or obj[key] is None:
        raise BadRequest(f"{path}.{key}" if path else key, "is required")
    return obj[key]


def text(value: Any, field: str, *, max_length: int = 256) -> str:
    if not isinstance(value, str):
        raise BadRequest(field, "must be a string")
    if len(value) > max_length:
        raise BadRequest(field, f"must be at most {max_length} characters")
    return value


def integer(value: Any, field: str, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """A JSON integer (not a bool, not a float, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(field, "must be a JSON integer")
    if not minimum <= value <= maximum:
        raise BadRequest(field, f"must be between {minimum} and {maximum}")
    return value


def uint256_decimal(value: Any, field: str) -> int:
    """An atomic amount or timestamp: a string of ASCII decimal digits, no sign, no leading zero."""
    if not isinstance(value, str):
        raise BadRequest(field, "must be a string of decimal digits")
    if not _DECIMAL.fullmatch(value):
        raise BadRequest(
            field, "must be a decimal integer string without sign, spaces, separators or "
                   "leading zeros")
    number = int(value)
    if number > UINT256_MAX:
        raise BadRequest(field, "must not exceed 2**256 - 1")
    return number


def address(value: Any, field: str) -> str:
    """A 20-byte hex address, returned lower-case. Mixed case must be a valid EIP-55 checksum."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise BadRequest(field, "must be a 0x-prefixed 20-byte hex address")
    body = value[2:]
    if body != body.lower() and body != body.upper() and to_checksum(value) != value:
        raise BadRequest(field, "has an invalid EIP-55 checksum")
    return "0x" + body.lower()


def hex_bytes(value: Any, field: str, *, length: int | None = None,
              max_length: int = 8192) -> bytes:
    """0x-prefixed hex; `length` demands an exact byte length."""
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise BadRequest(field, "must be 0x-prefixed hex with an even number of digits")
    raw = bytes.fromhex(value[2:])
    if length is not None and len(raw) != length:
        raise BadRequest(field, f"must be exactly {length} bytes")
    if len(raw) > max_length:
        raise BadRequest(field, f"must be at most {max_length} bytes")
    return raw


def address_bytes(addr: str) -> bytes:
    """The 20 raw bytes of an 0x-prefixed address (as stored in `bytea` columns). For values
    already validated (`address`); the length is checked, not the checksum."""
    raw = bytes.fromhex(addr[2:])
    if len(raw) != 20:
        raise ValueError(f"not a 20-byte address: {addr!r}")
    return raw


def prefixed_hex(raw: bytes | None) -> str | None:
    """0x-prefixed lower-case hex of stored bytes (None stays None)."""
    return None if raw is None else "0x" + bytes(raw).hex()


@lru_cache(maxsize=65_536)
def to_checksum(addr: str) -> str:
    """EIP-55 checksum form of a 0x-prefixed address (any case). Cached: the same payers, payees
    and assets recur on every request, and this is on the /verify hot path."""
    lower = addr[2:].lower()
    digest = keccak(lower.encode()).hex()
    # A hex digit of the hash >= 8 upper-cases the letter at that position.
    return "0x" + "".join(c.upper() if d > "7" else c for c, d in zip(lower, digest))

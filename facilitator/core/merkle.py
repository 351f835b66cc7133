"""OpenZeppelin `StandardMerkleTree` (npm `@openzeppelin/merkle-tree` 1.0.8), bit for bit.

OpenGradient commits each batch of attestations as such a tree (`BatchSettlement.merkleRoot`) and
uploads `JSON.stringify(tree.dump())` to Walrus; this module rebuilds, proves and checks them.

The construction (`standard.js`, `merkletree.js`, `core.js`, `hashes.js` of the package):
- leaf = keccak256(keccak256(abi.encode(values))) under the tree's `leafEncoding`;
- node = keccak256(sorted(a, b)) (OpenZeppelin `MerkleProof`'s commutative pair hash);
- leaves sorted ascending by hash (stable), laid out as a complete binary tree in an array of
  2n-1 nodes with the root at 0 and the smallest leaf last; value i records its `treeIndex`;
- proof(i) = the siblings from value i's leaf up to the root.

Values are kept exactly as given, as OZ keeps them, so `dump()` reproduces a dump byte for byte.
Python values given to `of()` are rendered the way OpenGradient renders its leaves: `bytes` as
lowercase 0x-hex, `int` as a decimal string. Leaf encodings are limited to elementary ABI types
(address, bool, string, bytes, bytes1..32, (u)int8..256); arrays and tuples are refused.

Guarantees: pure; `load`/`validate` accept a dump only if every node is recomputed from the values
(not trusted), so any changed value, node, layout or root is rejected. They are stricter than OZ's
`load` in documented ways (exactly the four dump keys; canonical lowercase node hex; every leaf
claimed by exactly one value; leaves in the sorted order OZ builds by default, unless
`require_sorted=False`), and refuse value renderings not reproduced exactly here (JSON numbers
beyond 2^53, which JavaScript rounds; number strings other than decimal or 0x-hex).
`tests/unit/test_merkle.py` pins roots, proofs and dumps to the npm package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from eth_hash.auto import keccak

FORMAT = "standard-v1"
MAX_LEAVES = 1 << 16
_JS_SAFE_INTEGER = (1 << 53) - 1
_NODE_HEX = re.compile(r"0x[0-9a-f]{64}")
_BYTES_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_UINT_TYPE = re.compile(r"u?int([0-9]*)")
_FIXED_BYTES_TYPE = re.compile(r"bytes([0-9]{1,2})")
_SIGNED_DECIMAL = re.compile(r"-?[0-9]+")
_HEX_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+")


class InvalidDump(ValueError):
    """A dump that is malformed or does not recompute to itself (or to the expected root)."""


# ---------------------------------------------------------------------------------------------
# ABI encoding of one leaf (elementary types), following @metamask/abi-utils' value parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Type:
    kind: str  # "uint", "int", "bool", "address", "fixed", "bytes", "string"
    size: int = 0  # bits for integers, bytes for fixed bytes


def _parse_type(name: Any) -> _Type:
    if not isinstance(name, str):
        raise ValueError(f"unsupported leaf type {name!r}")
    if name in ("bool", "address", "bytes", "string"):
        return _Type(name)
    match = _UINT_TYPE.fullmatch(name)
    if match:
        bits = int(match.group(1)) if match.group(1) else 256
        if not (8 <= bits <= 256 and bits % 8 == 0):
            raise ValueError(f"unsupported leaf type {name!r}")
        return _Type("uint" if name.startswith("u") else "int", bits)
    match = _FIXED_BYTES_TYPE.fullmatch(name)
    if match and 1 <= int(match.group(1)) <= 32:
        return _Type("fixed", int(match.group(1)))
    raise ValueError(f"unsupported leaf type {name!r} (elementary ABI types only)")


def _hex_bytes(value: Any) -> bytes:
    """abi-utils `createBytes`: bytes as-is, or `0x`-hex (either case, odd length left-padded)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and _BYTES_HEX.fullmatch(value):
        digits = value[2:]
        return bytes.fromhex("0" + digits if len(digits) % 2 else digits)
    raise ValueError(f"expected bytes or 0x-hex, got {value!r}")


def _integer(value: Any) -> int:
    """abi-utils `createBigInt`, restricted to renderings JavaScript reads exactly like Python:
    ints (JSON numbers only up to 2^53), decimal strings, 0x-hex strings."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if _SIGNED_DECIMAL.fullmatch(value):
            return int(value, 10)
        if _HEX_NUMBER.fullmatch(value):
            return int(value[2:], 16)
    raise ValueError(f"expected an integer or an integer string, got {value!r}")


def _static_word(kind: _Type, value: Any) -> bytes:
    if kind.kind in ("uint", "int"):
        number = _integer(value)
        low = -(1 << (kind.size - 1)) if kind.kind == "int" else 0
        high = (1 << (kind.size - (1 if kind.kind == "int" else 0))) - 1
        if not low <= number <= high:
            raise ValueError(f"{number} out of range for {kind.kind}{kind.size}")
        return (number % (1 << 256)).to_bytes(32, "big")
    if kind.kind == "bool":
        if value is True or value == "true":  # abi-utils: a boolean or "true"/"false", not 1/0
            return (1).to_bytes(32, "big")
        if value is False or value == "false":
            return bytes(32)
        raise ValueError(f"expected a boolean, got {value!r}")
    raw = _hex_bytes(value)
    if kind.kind == "address":
        if len(raw) > 20:
            raise ValueError("address longer than 20 bytes")
        return raw.rjust(32, b"\0")
    if len(raw) > kind.size:  # fixed bytesN: shorter values are right-padded, as in abi-utils
        raise ValueError(f"{len(raw)} bytes do not fit bytes{kind.size}")
    return raw.ljust(32, b"\0")


def _dynamic_tail(kind: _Type, value: Any) -> bytes:
    if kind.kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        raw = value.encode("utf-8")
    else:
        raw = _hex_bytes(value)
    padded = raw + bytes(-len(raw) % 32)
    return len(raw).to_bytes(32, "big") + padded


def abi_encode(leaf_encoding: Sequence[str], values: Sequence[Any]) -> bytes:
    """Standard (non-packed) ABI encoding of a tuple of elementary values (`abi.encode`)."""
    return _encode(_types(leaf_encoding), values)


def _encode(types: Sequence[_Type], values: Sequence[Any]) -> bytes:
    if len(types) != len(values):
        raise ValueError(f"expected {len(types)} values, got {len(values)}")
    head: list[bytes] = []
    tail: list[bytes] = []
    offset = 32 * len(types)
    for kind, value in zip(types, values):
        if kind.kind in ("bytes", "string"):
            encoded = _dynamic_tail(kind, value)
            head.append(offset.to_bytes(32, "big"))
            tail.append(encoded)
            offset += len(encoded)
        else:
            head.append(_static_word(kind, value))
    return b"".join(head) + b"".join(tail)


# ---------------------------------------------------------------------------------------------
# Hashing and proofs
# ---------------------------------------------------------------------------------------------


def _types(leaf_encoding: Sequence[str]) -> tuple[_Type, ...]:
    if isinstance(leaf_encoding, str) or not leaf_encoding:
        raise ValueError("leaf encoding must be a non-empty list of ABI types")
    if not all(isinstance(name, str) for name in leaf_encoding):
        raise ValueError("leaf encoding must list ABI type names")
    return _parsed_types(tuple(leaf_encoding))


@lru_cache(maxsize=256)
def _parsed_types(leaf_encoding: tuple[str, ...]) -> tuple[_Type, ...]:
    return tuple(_parse_type(name) for name in leaf_encoding)


def leaf_hash(leaf_encoding: Sequence[str], values: Sequence[Any]) -> bytes:
    """keccak256(bytes.concat(keccak256(abi.encode(values)))): the double hash keeps a 64-byte
    leaf preimage from ever passing as an internal node."""
    return keccak(keccak(_encode(_types(leaf_encoding), values)))


def node_hash(a: bytes, b: bytes) -> bytes:
    return keccak(a + b if a <= b else b + a)


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    node = leaf
    for sibling in proof:
        node = keccak(node + sibling if node <= sibling else sibling + node)
    return node


def verify(root: bytes, leaf_encoding: Sequence[str], values: Sequence[Any],
           proof: Sequence[bytes]) -> bool:
    """`StandardMerkleTree.verify`: `values` are in the tree with root `root`."""
    if len(root) != 32 or any(len(node) != 32 for node in proof):
        return False
    try:
        leaf = leaf_hash(leaf_encoding, values)
    except ValueError:
        return False
    return process_proof(leaf, proof) == root


def verify_leaf(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """OpenZeppelin `MerkleProof.verify` for an already hashed leaf."""
    return len(leaf) == 32 and process_proof(leaf, proof) == root


# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------


def _render(value: Any) -> Any:
    """How a Python value appears in a dump; strings and booleans are kept verbatim."""
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"cannot render leaf value {value!r}")


@dataclass(frozen=True, slots=True)
class StandardMerkleTree:
    """An OZ standard Merkle tree. Build with `of()` or `load()`; never construct directly."""

    leaf_encoding: tuple[str, ...]
    tree: tuple[bytes, ...]
    values: tuple[tuple[Any, ...], ...]  # as rendered in the dump
    tree_indices: tuple[int, ...]

    @classmethod
    def of(cls, values: Sequence[Sequence[Any]], leaf_encoding: Sequence[str]
           ) -> StandardMerkleTree:
        types = _types(leaf_encoding)
        if not values:
            raise ValueError("expected a non-empty list of leaves")
        rendered = tuple(tuple(_render(v) for v in value) for value in values)
        hashes = [keccak(keccak(_encode(types, value))) for value in rendered]
        order = sorted(range(len(hashes)), key=hashes.__getitem__)  # stable, like JS sort
        tree = _build([hashes[i] for i in order])
        indices = [0] * len(values)
        for leaf_position, value_index in enumerate(order):
            indices[value_index] = len(tree) - 1 - leaf_position
        return cls(tuple(leaf_encoding), tree, rendered, tuple(indices))

    @property
    def root(self) -> bytes:
        return self.tree[0]

    def __len__(self) -> int:
        return len(self.values)

    def leaf_hash_at(self, index: int) -> bytes:
        return self.tree[self.tree_indices[index]]

    def proof(self, index: int) -> list[bytes]:
        """Siblings from value `index`'s leaf to the root (OZ `getProof(index)`)."""
        if not 0 <= index < len(self.values):
            raise IndexError("value index out of range")
        node = self.tree_indices[index]
        path = []
        while node > 0:
            path.append(self.tree[node - 1 if node % 2 == 0 else node + 1])
            node = (node - 1) // 2
        return path

    def index_of(self, values: Sequence[Any]) -> int:
        """The index of the first value whose leaf equals `values`' leaf (OZ `leafLookup`)."""
        leaf = leaf_hash(self.leaf_encoding, [_render(v) for v in values])
        for index, tree_index in enumerate(self.tree_indices):
            if self.tree[tree_index] == leaf:
                return index
        raise KeyError("leaf is not in the tree")

    def dump(self) -> dict[str, Any]:
        """The `standard-v1` dump, keys in OZ's order."""
        return {
            "format": FORMAT,
            "leafEncoding": list(self.leaf_encoding),
            "tree": ["0x" + node.hex() for node in self.tree],
            "values": [{"value": list(value), "treeIndex": tree_index}
                       for value, tree_index in zip(self.values, self.tree_indices)],
        }

    def dump_json(self) -> bytes:
        """`JSON.stringify(tree.dump())` as UTF-8: what OpenGradient uploads to Walrus."""
        return json.dumps(self.dump(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def load(cls, dump: Any, *, expected_root: bytes | None = None, require_sorted: bool = True,
             max_leaves: int = MAX_LEAVES) -> StandardMerkleTree:
        """A tree from a dump (dict, or JSON text/bytes), fully re-verified; see `validate`."""
        return validate(dump, expected_root=expected_root, require_sorted=require_sorted,
                        max_leaves=max_leaves)


def _build(leaves: Sequence[bytes]) -> tuple[bytes, ...]:
    """OZ `makeMerkleTree`: leaf i at position len-1-i, parents filled from the back."""
    size = 2 * len(leaves) - 1
    tree: list[bytes] = [b""] * size
    for i, leaf in enumerate(leaves):
        tree[size - 1 - i] = leaf
    for i in range(size - 1 - len(leaves), -1, -1):
        tree[i] = node_hash(tree[2 * i + 1], tree[2 * i + 2])
    return tuple(tree)


def _node(value: Any, position: int) -> bytes:
    if not isinstance(value, str) or _NODE_HEX.fullmatch(value) is None:
        raise InvalidDump(f"tree[{position}] is not a lowercase 0x-prefixed 32-byte hex string")
    return bytes.fromhex(value[2:])


def _tree_index(entry: Any, position: int, types: tuple[_Type, ...]) -> tuple[tuple[Any, ...], int]:
    if not isinstance(entry, dict) or set(entry) != {"value", "treeIndex"}:
        raise InvalidDump(f"values[{position}] must be an object with value and treeIndex")
    value, tree_index = entry["value"], entry["treeIndex"]
    if not isinstance(value, list) or len(value) != len(types):
        raise InvalidDump(f"values[{position}].value must be a list of {len(types)} items")
    if isinstance(tree_index, bool) or not isinstance(tree_index, int):
        raise InvalidDump(f"values[{position}].treeIndex must be an integer")
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > _JS_SAFE_INTEGER:
            # JavaScript would have read this number rounded; its leaf hash would not be ours.
            raise InvalidDump(f"values[{position}] has a JSON number beyond 2^53")
    return tuple(value), tree_index


def _decode(dump: Any) -> Any:
    if isinstance(dump, (str, bytes, bytearray)):
        try:
            return json.loads(dump)
        except (ValueError, RecursionError):
            raise InvalidDump("dump is not JSON") from None
    return dump


def validate(dump: Any, *, expected_root: bytes | None = None, require_sorted: bool = True,
             max_leaves: int = MAX_LEAVES) -> StandardMerkleTree:
    """Recompute a `standard-v1` dump and return its tree, or raise `InvalidDump`.

    Checks: format and leaf encoding; every node canonical hex; array length 2n-1 with n values;
    every internal node the pair hash of its children; every value's leaf hash at its treeIndex,
    each leaf claimed by exactly one value; leaves in OZ's sorted layout (if `require_sorted`);
    the root equal to `expected_root` (if given).
    """
    dump = _decode(dump)
    if not isinstance(dump, dict) or dump.get("format") != FORMAT:
        raise InvalidDump(f"not a {FORMAT} dump")
    if set(dump) != {"format", "leafEncoding", "tree", "values"}:
        raise InvalidDump("dump must have exactly format, leafEncoding, tree and values")
    encoding = dump["leafEncoding"]
    try:
        types = _types(encoding)
    except ValueError as exc:
        raise InvalidDump(f"leafEncoding: {exc}") from None
    raw_tree, raw_values = dump["tree"], dump["values"]
    if not isinstance(raw_tree, list) or not isinstance(raw_values, list) or not raw_values:
        raise InvalidDump("tree and values must be non-empty lists")
    leaves = len(raw_values)
    if leaves > max_leaves:
        raise InvalidDump(f"{leaves} leaves exceed the limit of {max_leaves}")
    if len(raw_tree) != 2 * leaves - 1:
        raise InvalidDump(f"{len(raw_tree)} nodes cannot hold {leaves} leaves")
    tree = tuple(_node(node, i) for i, node in enumerate(raw_tree))
    first_leaf = leaves - 1
    for i in range(first_leaf):
        if tree[i] != node_hash(tree[2 * i + 1], tree[2 * i + 2]):
            raise InvalidDump(f"tree[{i}] is not the hash of its children")
    values, indices = _check_values(raw_values, types, tree, first_leaf)
    if require_sorted and any(tree[i] < tree[i + 1] for i in range(first_leaf, len(tree) - 1)):
        raise InvalidDump("leaves are not in sorted order")
    if expected_root is not None and tree[0] != expected_root:
        raise InvalidDump("root differs from the expected root")
    return StandardMerkleTree(tuple(encoding), tree, values, indices)


def _check_values(raw_values: list[Any], types: tuple[_Type, ...], tree: tuple[bytes, ...],
                  first_leaf: int) -> tuple[tuple[tuple[Any, ...], ...], tuple[int, ...]]:
    values, indices, claimed = [], [], set()
    for position, entry in enumerate(raw_values):
        value, tree_index = _tree_index(entry, position, types)
        if not first_leaf <= tree_index < len(tree) or tree_index in claimed:
            raise InvalidDump(f"values[{position}].treeIndex is not an unclaimed leaf")
        claimed.add(tree_index)
        try:
            leaf = keccak(keccak(_encode(types, value)))
        except ValueError as exc:
            raise InvalidDump(f"values[{position}]: {exc}") from None
        if leaf != tree[tree_index]:
            raise InvalidDump(f"values[{position}] does not hash to tree[{tree_index}]")
        values.append(value)
        indices.append(tree_index)
    return tuple(values), tuple(indices)

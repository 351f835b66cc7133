"""StandardMerkleTree against the npm `@openzeppelin/merkle-tree` package itself (pinned in
package.json, driven through tests/compat/oz_merkle.js): roots, proofs and dumps must be equal
byte for byte, OZ dumps must load, and tampered dumps must be rejected."""

from __future__ import annotations

import copy
import json
import random

import pytest
from compat.oracles import run_oz
from eth_abi import encode as eth_abi_encode
from eth_hash.auto import keccak

from facilitator.core import merkle
from facilitator.core.attestation import LEAF_ENCODING
from facilitator.core.merkle import InvalidDump, StandardMerkleTree

OG = list(LEAF_ENCODING)
GENERIC = ["address", "uint256"]
MIXED = ["string", "bool", "bytes4", "int64", "uint8", "bytes"]


def og_leaf(rng: random.Random) -> list:
    """An OpenGradient batch leaf as its facilitator renders it (notes §9.3)."""
    return [rng.randbytes(32), rng.randbytes(32), rng.randbytes(32),
            rng.randbytes(rng.choice((256, 256, 384, 512))), rng.randrange(1_700_000_000, 1 << 40)]


def generic_leaf(rng: random.Random) -> list:
    return ["0x" + rng.randbytes(20).hex(), rng.randrange(1 << rng.choice((8, 64, 256)))]


def mixed_leaf(rng: random.Random) -> list:
    text = "".join(rng.choice("aé€😀\n\"\\ ") for _ in range(rng.randrange(0, 40)))
    return [text, rng.random() < 0.5, rng.randbytes(4), rng.randrange(-(1 << 63), 1 << 63),
            rng.randrange(256), rng.randbytes(rng.randrange(0, 70))]


def rendered(values: list) -> list:
    return [[merkle._render(v) for v in value] for value in values]  # noqa: SLF001


def leaf_sets(seed: int) -> list[tuple[list[str], list]]:
    rng = random.Random(seed)
    sets = []
    for size in range(1, 21):
        sets.append((OG, [og_leaf(rng) for _ in range(size)]))
    for size in (1, 2, 3, 7, 16):
        sets.append((GENERIC, [generic_leaf(rng) for _ in range(size)]))
        sets.append((MIXED, [mixed_leaf(rng) for _ in range(size)]))
    duplicated = [og_leaf(rng) for _ in range(4)]
    sets.append((OG, duplicated + [duplicated[1], duplicated[3]]))  # OZ keeps duplicates
    return sets


@pytest.fixture(scope="module")
def oz_runs(module_seed: int):
    """(encoding, values, our tree, OZ's answer) for every leaf set, one node process. Module
    scoped: its seed comes from `module_seed`, which every failing user's report shows."""
    sets = leaf_sets(module_seed)
    answers = run_oz([{"op": "build", "encoding": enc, "values": rendered(values)}
                      for enc, values in sets])
    return [(enc, values, StandardMerkleTree.of(values, enc), answer)
            for (enc, values), answer in zip(sets, answers)]


def test_roots_proofs_and_dumps_equal_openzeppelin(oz_runs):
    for encoding, values, tree, oz in oz_runs:
        assert "0x" + tree.root.hex() == oz["root"], (encoding, len(values))
        assert tree.dump() == oz["dump"]
        assert tree.dump_json() == oz["dumpJson"].encode("utf-8")
        assert [["0x" + node.hex() for node in tree.proof(i)] for i in range(len(values))] \
            == oz["proofs"]


def test_our_proofs_verify(oz_runs):
    for encoding, values, tree, _oz in oz_runs:
        for i, value in enumerate(values):
            proof = tree.proof(i)
            assert merkle.verify(tree.root, encoding, value, proof)
            assert merkle.verify(tree.root, encoding, rendered([value])[0], proof)
            assert merkle.verify_leaf(tree.root, tree.leaf_hash_at(i), proof)
            assert tree.index_of(value) == values.index(value)


def test_wrong_value_or_proof_does_not_verify(oz_runs):
    for encoding, values, tree, _oz in oz_runs:
        if encoding != OG or len(values) < 2:
            continue
        proof = tree.proof(0)
        altered = list(values[0])
        altered[4] += 1
        assert not merkle.verify(tree.root, encoding, altered, proof)
        assert not merkle.verify(tree.root, encoding, values[1], proof)
        assert not merkle.verify(tree.root, encoding, values[0], proof[:-1])
        assert not merkle.verify(tree.root, encoding, values[0], [bytes(31)] + proof[1:])


def test_openzeppelin_dumps_load_and_round_trip(oz_runs):
    for _encoding, _values, tree, oz in oz_runs:
        loaded = StandardMerkleTree.load(oz["dumpJson"], expected_root=tree.root)
        assert loaded == tree
        assert loaded.dump_json() == oz["dumpJson"].encode("utf-8")
        assert StandardMerkleTree.load(oz["dump"]) == tree


def test_leaf_hash_matches_eth_abi(seed):
    rng = random.Random(seed)
    for _ in range(50):
        for encoding, make in ((OG, og_leaf), (GENERIC, generic_leaf), (MIXED, mixed_leaf)):
            value = make(rng)
            expected = eth_abi_encode(encoding, value)
            assert merkle.abi_encode(encoding, value) == expected
            assert merkle.leaf_hash(encoding, value) == keccak(keccak(expected))


def test_case_of_hex_values_is_kept_in_the_dump(seed):
    """OpenGradient writes teeId as received (notes §9.3): the dump keeps the case, the leaf
    hash does not depend on it."""
    rng = random.Random(seed)
    value = rendered([og_leaf(rng)])[0]
    upper = ["0x" + value[0][2:].upper()] + value[1:]
    other = rendered([og_leaf(rng)])[0]
    oz = run_oz([{"op": "build", "encoding": OG, "values": [upper, other]}])[0]
    tree = StandardMerkleTree.load(oz["dumpJson"])
    assert tree.values[0][0] == upper[0] and tree.dump_json() == oz["dumpJson"].encode()
    assert StandardMerkleTree.of([upper], OG).root == StandardMerkleTree.of([value], OG).root


# ---- tampering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(oz_runs):
    for encoding, values, tree, oz in oz_runs:
        if encoding == OG and len(values) == 6:
            return tree, oz["dump"]
    raise AssertionError("no 6-leaf OpenGradient tree")


def tampered_dumps(dump: dict) -> dict[str, dict]:
    out = {}

    def variant(name):
        out[name] = copy.deepcopy(dump)
        return out[name]

    timestamp = int(dump["values"][0]["value"][4])
    variant("changed timestamp")["values"][0]["value"][4] = str(timestamp + 1)
    sig = dump["values"][1]["value"][3]
    changed = sig[:-2] + ("00" if sig[-2:] != "00" else "01")
    variant("changed signature")["values"][1]["value"][3] = changed
    d = variant("leaves swapped, treeIndex kept")
    d["tree"][-1], d["tree"][-3] = d["tree"][-3], d["tree"][-1]
    d = variant("changed internal node")
    d["tree"][1] = "0x" + "00" * 32
    d = variant("changed root")
    d["tree"][0] = "0x" + "11" * 32
    d = variant("value dropped")
    d["values"].pop()
    d = variant("leaf claimed twice")
    d["values"][1]["treeIndex"] = d["values"][0]["treeIndex"]
    d["values"][1]["value"] = d["values"][0]["value"]
    d = variant("treeIndex on an internal node")
    d["values"][0]["treeIndex"] = 0
    d = variant("truncated tree")
    d["tree"].pop()
    variant("wrong format")["format"] = "standard-v2"
    variant("wrong encoding")["leafEncoding"] = ["bytes32", "bytes32", "bytes32", "string",
                                                 "uint256"]
    variant("unsupported encoding")["leafEncoding"] = ["bytes32[]"]
    d = variant("extra value item")
    d["values"][0]["value"].append("0")
    d = variant("upper-case node")
    d["tree"][0] = d["tree"][0].upper().replace("0X", "0x")
    d = variant("JSON number beyond 2^53")
    d["values"][0]["value"][4] = 1 << 60
    return out


def test_tampered_dumps_are_rejected(sample):
    tree, dump = sample
    variants = tampered_dumps(dump)
    for name, bad in variants.items():
        with pytest.raises(InvalidDump):
            StandardMerkleTree.load(bad)
            pytest.fail(f"accepted: {name}")
    # The content-changing tampers are rejected by OpenZeppelin too (the stricter ones above are
    # ours alone: upper-case nodes, unclaimed leaves, numbers JavaScript would round).
    oz = run_oz([{"op": "load", "dump": variants[name]} for name in
                 ("changed timestamp", "changed signature", "leaves swapped, treeIndex kept",
                  "changed internal node", "changed root", "truncated tree")])
    assert not any(answer["ok"] for answer in oz)


def test_wrong_root_is_rejected(sample):
    tree, dump = sample
    assert StandardMerkleTree.load(dump, expected_root=tree.root) == tree
    with pytest.raises(InvalidDump, match="expected root"):
        StandardMerkleTree.load(dump, expected_root=keccak(b"another batch"))


def test_sibling_swap_keeps_the_root_but_is_not_the_layout_oz_builds(sample):
    """Sorted-pair hashing makes swapped siblings hash alike; OZ's load accepts such a dump, ours
    only with require_sorted=False (OZ never builds it with its default options)."""
    tree, dump = sample
    bad = copy.deepcopy(dump)
    last = len(bad["tree"]) - 1
    bad["tree"][last], bad["tree"][last - 1] = bad["tree"][last - 1], bad["tree"][last]
    for entry in bad["values"]:
        if entry["treeIndex"] in (last, last - 1):
            entry["treeIndex"] = 2 * last - 1 - entry["treeIndex"]
    assert run_oz([{"op": "load", "dump": bad}])[0]["ok"]
    with pytest.raises(InvalidDump, match="sorted"):
        StandardMerkleTree.load(bad)
    assert StandardMerkleTree.load(bad, require_sorted=False).root == tree.root


def test_reordered_values_list_is_the_same_tree(sample):
    """The root does not commit to the order of `values`; only the leaves matter."""
    tree, dump = sample
    shuffled = copy.deepcopy(dump)
    shuffled["values"].reverse()
    loaded = StandardMerkleTree.load(shuffled, expected_root=tree.root)
    assert sorted(loaded.values) == sorted(tree.values)


def test_garbage_is_rejected():
    for bad in (b"", b"{", "[]", json.dumps({"format": "standard-v1"}), 5, None,
                {"format": "standard-v1", "leafEncoding": ["uint256"], "tree": [], "values": []}):
        with pytest.raises(InvalidDump):
            StandardMerkleTree.load(bad)


def test_limits_and_bad_input():
    with pytest.raises(ValueError):
        StandardMerkleTree.of([], OG)
    with pytest.raises(ValueError):
        StandardMerkleTree.of([[1]], ["uint7"])
    with pytest.raises(ValueError):
        StandardMerkleTree.of([[256]], ["uint8"])
    with pytest.raises(ValueError):
        StandardMerkleTree.of([[b"\0" * 33]], ["bytes32"])
    with pytest.raises(ValueError):
        StandardMerkleTree.of([[1]], ["bool"])  # abi-utils takes booleans or "true"/"false" only
    tree = StandardMerkleTree.of([[i] for i in range(5)], ["uint256"])
    with pytest.raises(InvalidDump, match="limit"):
        StandardMerkleTree.load(tree.dump(), max_leaves=4)
    with pytest.raises(IndexError):
        tree.proof(5)
    with pytest.raises(KeyError):
        tree.index_of([99])


def test_single_leaf_tree_is_its_leaf():
    tree = StandardMerkleTree.of([[7]], ["uint256"])
    assert tree.root == merkle.leaf_hash(["uint256"], [7]) and tree.proof(0) == []
    assert tree.dump()["values"] == [{"value": ["7"], "treeIndex": 0}]

"""Attestation checks per second on one core, timing the code paths the service runs for each
settled inference:

- signature: `AttestationVerifier._verdict` (facilitator/services/attestations.py) looks the TEE
  key up in its `TeeKeyRing` (parsed once per key) and calls `verify_record` (message hash, tee id
  match, RSA-PSS SHA-256/MGF1/salt-32 verification). Timed per attestation, without the database
  reads around it.
- batch inclusion: `OgLogsProcessor._check_dump` (facilitator/services/og_logs.py) re-verifies a
  fetched batch dump by rebuilding the whole tree (`StandardMerkleTree.load`), compares root, size
  and leaf encoding with the on-chain batch, and derives every leaf's stored proof (`_leaves`).
  Timed per 1,024-leaf dump (JSON bytes, as the blob store returns them), without the blob fetch
  and the database write; reported per leaf.

Each settled inference costs one signature check and one leaf of a dump check, so the headline
figure is 1 / (1 / signatures per s + 1 / leaves per s). Nothing verifies single Merkle proofs
(`merkle.verify` has no production caller), so that is not timed.

Method: this process pinned to CPU 0 (when there are two or more). Set-up, untimed: an RSA-2048
TEE key, 1,024 attestation records with real RSA-PSS signatures (`sign_attestation`) and their
OpenGradient batch dump (`StandardMerkleTree` over `LEAF_ENCODING`). Every check must pass.
Repeated for `--seconds` after a warm-up; pycryptodome's PSS verifier is timed for comparison.
Prints one table.

    .venv/bin/python bench/attestations.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facilitator.core import attestation as att  # noqa: E402
from facilitator.core import merkle  # noqa: E402
from facilitator.core.attestation import LEAF_ENCODING, AttestationRecord, TeeKeyRing  # noqa: E402
from facilitator.services.og_logs import _leaves  # noqa: E402  (the dump check's proof step)

LEAVES = 1024


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
        return "pinned to CPU 0"
    return "not pinned"


def build(private_key, tee_id: bytes) -> list[AttestationRecord]:
    records = []
    for i in range(LEAVES):
        in_hash = att.output_hash(f"request {i}")
        out_hash = att.output_hash(f"response {i}")
        timestamp = 1_747_000_000 + i
        msg_hash = att.message_hash(in_hash, out_hash, timestamp)
        signature = att.sign_attestation(private_key, msg_hash)
        records.append(AttestationRecord(tee_id, in_hash, out_hash, signature, timestamp))
    return records


def rate(check: Callable[[int], bool], seconds: float, rounds: int = LEAVES,
         warm_up: int = 200) -> tuple[float, int]:
    """Calls of `check(0..rounds-1)` per second over at least `seconds` (after `warm_up` calls);
    every call must return True."""
    for i in range(warm_up):
        assert check(i % rounds)
    done, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for i in range(rounds):
            if not check(i):
                raise AssertionError(f"check {i} failed")
        done += rounds
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    pinning = pin_to_one_core()

    private_key = att.generate_private_key(2048)
    der = att.public_key_der(private_key)
    key = att.load_public_key(der)
    records = build(private_key, key.tee_id)
    tree = merkle.StandardMerkleTree.of([r.leaf_values() for r in records], LEAF_ENCODING)
    root, dump = tree.root, tree.dump_json()  # the batch's on-chain root; the blob's bytes
    ring = TeeKeyRing()
    ring.add(der)

    def signature(i: int) -> bool:  # AttestationVerifier._verdict's key lookup and check
        record = records[i]
        found = ring.get(record.tee_id) or ring.add(der)
        return att.verify_record(record, found)

    def dump_check(_: int) -> bool:  # OgLogsProcessor._check_dump after the fetch
        loaded = merkle.StandardMerkleTree.load(dump)
        return (loaded.root == root and len(loaded) == LEAVES
                and tuple(loaded.leaf_encoding) == LEAF_ENCODING
                and len(_leaves(loaded)) == LEAVES)

    rows = [("method", f"the service's verification paths, RSA-2048 PSS (pyca/cryptography), "
                       f"{LEAVES}-leaf batch dumps, 1 process {pinning}")]
    seconds = args.seconds / 2
    sig_rate, sig_count = rate(signature, seconds)
    dump_rate, dump_count = rate(dump_check, seconds, rounds=1, warm_up=2)
    leaf_rate = dump_rate * LEAVES
    per_inference = 1 / (1 / sig_rate + 1 / leaf_rate)
    rows.append(("attestations/s (signature + dump leaf)",
                 f"{per_inference:,.0f}  ({1e6 / per_inference:.1f} us each)"))
    rows.append(("  signature checks /s (key ring + verify_record)",
                 f"{sig_rate:,.0f}  ({sig_count:,} checked, {1e6 / sig_rate:.1f} us each)"))
    rows.append(("  batch dump check, leaves /s (load + _leaves)",
                 f"{leaf_rate:,.0f}  ({dump_count:,} dumps of {LEAVES}, "
                 f"{1e3 / dump_rate:.1f} ms each)"))
    rows.append(("  pycryptodome PSS verify /s (not used)", _pycryptodome(key, records, args)))
    rows.append(("target", "5,000 attestations/s (signature + dump leaf): "
                           + ("met" if per_inference >= 5000 else "NOT MET")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _pycryptodome(key: att.TeePublicKey, records: list[AttestationRecord],
                  args: argparse.Namespace) -> str:
    try:
        from Crypto.Hash import SHA256
        from Crypto.PublicKey import RSA
        from Crypto.Signature import pss
    except ImportError:
        return "not installed"
    public = RSA.import_key(key.der)

    def check(i: int) -> bool:
        record = records[i]
        try:
            pss.new(public, salt_bytes=32).verify(SHA256.new(record.message_hash()),
                                                  record.tee_signature)
        except ValueError:
            return False
        return True

    per_second, _ = rate(check, min(args.seconds / 2, 2.0))
    return f"{per_second:,.0f}  ({1e6 / per_second:.1f} us)"


if __name__ == "__main__":
    main()

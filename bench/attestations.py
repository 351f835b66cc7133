"""Attestation checks per second on one core: what the cross-checker does per settled inference.

Method: this process pinned to CPU 0 (when there are two or more). Set-up, untimed: an RSA-2048
TEE key, 1,024 attestation records with real RSA-PSS signatures (`sign_attestation`), their
OpenGradient batch tree (`StandardMerkleTree` over `LEAF_ENCODING`) and one inclusion proof per
record. Timed: for each record in turn, `verify_record` (message hash, tee id match, RSA-PSS
SHA-256/MGF1/salt-32 verification with the key parsed once) and `merkle.verify` (leaf hash of the
5-tuple, 10-step proof to the root); every check must pass. Repeated for `--seconds` after a
warm-up; the components are also timed alone, with pycryptodome's PSS verifier for comparison.
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
from facilitator.core.attestation import LEAF_ENCODING, AttestationRecord  # noqa: E402

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


def rate(check: Callable[[int], bool], seconds: float) -> tuple[float, int]:
    """Checks per second over at least `seconds` (after a short warm-up)."""
    for i in range(200):
        assert check(i % LEAVES)
    done, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for i in range(LEAVES):
            if not check(i):
                raise AssertionError(f"check {i} failed")
        done += LEAVES
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    pinning = pin_to_one_core()

    private_key = att.generate_private_key(2048)
    key = att.load_public_key(att.public_key_der(private_key))
    records = build(private_key, key.tee_id)
    tree = merkle.StandardMerkleTree.of([r.leaf_values() for r in records], LEAF_ENCODING)
    root = tree.root
    proofs = [tree.proof(i) for i in range(LEAVES)]
    leaf_values = [r.leaf_values() for r in records]

    def full(i: int) -> bool:
        return att.verify_record(records[i], key) and merkle.verify(
            root, LEAF_ENCODING, leaf_values[i], proofs[i])

    def rsa_only(i: int) -> bool:
        return att.verify_record(records[i], key)

    def merkle_only(i: int) -> bool:
        return merkle.verify(root, LEAF_ENCODING, leaf_values[i], proofs[i])

    rows = [("method", f"RSA-2048 PSS verify (pyca/cryptography) + Merkle proof, "
                       f"{LEAVES}-leaf tree, 1 process {pinning}")]
    total, count = rate(full, args.seconds)
    rows.append(("attestations/s (signature + inclusion)", f"{total:,.0f}  ({count:,} checked, "
                                                          f"{1e6 / total:.1f} us each)"))
    rsa, _ = rate(rsa_only, args.seconds / 2)
    rows.append(("  signature only /s", f"{rsa:,.0f}  ({1e6 / rsa:.1f} us)"))
    proof, _ = rate(merkle_only, args.seconds / 2)
    rows.append(("  Merkle inclusion only /s", f"{proof:,.0f}  ({1e6 / proof:.1f} us)"))
    rows.append(("  pycryptodome PSS verify /s (not used)", _pycryptodome(key, records, args)))
    rows.append(("target", "5,000/s: " + ("met" if total >= 5000 else "NOT MET")))
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

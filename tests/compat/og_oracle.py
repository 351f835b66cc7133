"""Test oracle run inside `.venv-og` (see setup_og_venv.sh): OpenGradient's own SDK code
(`opengradient==1.1.4`, `opengradient/client/tee_verify.py`) answers questions given as JSON.

stdin: a JSON list of jobs; stdout: a JSON list of results, one per job, in order (with
`--lines`: any number of such lists, one per line, answered line by line). Every result is
`{"ok": true, ...}` or `{"ok": false, "error": "<exception type>: <message>"}`.

  {"op": "canonical", "body": {...}}
      -> {"canonical": {...}, "bytes": "<utf-8 text hashed>", "input_hash": "<hex>"}
  {"op": "output", "response": {...}}
      -> {"text": "<signed output>", "output_hash": "<hex>"}
  {"op": "verify", "canonical": {...}, "response": {...}, "content": "...", "pem": "...",
   "expected_tee_id": "0x..." | null}
      -> {"tee_id", "request_hash", "output_hash", "timestamp"}  (ok false: VerificationError...)
  {"op": "tee_id", "pem": "..."} -> {"tee_id": "0x..."}

Never imported by the test suite: it runs in a subprocess, because the SDK's `og-x402`
dependency installs a top-level `x402` package that clashes with the one in .venv.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from eth_hash.auto import keccak
from opengradient.client import tee_verify


def _canonical(job: dict[str, Any]) -> dict[str, Any]:
    _wire, canonical = tee_verify.build_inner_request(job["body"])
    raw = tee_verify.canonical_request_bytes(canonical)
    return {"canonical": canonical, "bytes": raw.decode("utf-8"), "input_hash": keccak(raw).hex()}


def _output(job: dict[str, Any]) -> dict[str, Any]:
    text = tee_verify.response_content_for_hash(job["response"])
    return {"text": text, "output_hash": keccak(text.encode("utf-8")).hex()}


def _verify(job: dict[str, Any]) -> dict[str, Any]:
    proof = tee_verify.verify_response(
        canonical_request=job["canonical"], response_body=job["response"],
        response_content=job["content"], signing_key_pem=job["pem"],
        expected_tee_id=job.get("expected_tee_id"))
    return {"tee_id": proof.tee_id, "request_hash": proof.request_hash,
            "output_hash": proof.output_hash, "timestamp": proof.timestamp}


def _tee_id(job: dict[str, Any]) -> dict[str, Any]:
    return {"tee_id": tee_verify.tee_id_for_key(job["pem"])}


OPS = {"canonical": _canonical, "output": _output, "verify": _verify, "tee_id": _tee_id}


def run(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": True, **OPS[job["op"]](job)}
    except Exception as exc:  # noqa: BLE001 - every SDK failure is an answer, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    if sys.argv[1:] == ["--lines"]:
        # One JSON list of jobs per input line, one JSON list of results per output line, so a
        # test module pays the SDK's ~2 s import once.
        for line in sys.stdin:
            sys.stdout.write(json.dumps([run(job) for job in json.loads(line)]) + "\n")
            sys.stdout.flush()
        return
    json.dump([run(job) for job in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()

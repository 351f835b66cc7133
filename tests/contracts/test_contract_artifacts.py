"""The committed artifacts in contracts/artifacts are exactly what contracts/src compiles to, and
the drift check itself notices a stale, missing or extra artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from facilitator.devnet.contracts import ARTIFACTS_DIR, REPO_ROOT, load_artifact

COMPILE_JS = REPO_ROOT / "contracts" / "compile.js"
EXPECTED_KEYS = ["contractName", "sourcePath", "abi", "bytecode", "deployedBytecode", "compiler",
                 "sourceSha256"]


def _node() -> str:
    node = shutil.which("node")
    assert node, "node is required to check the contract artifacts (see package.json)"
    return node


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen]]:
    """Both `--check` runs (each a ~2 s solc compile) started at once, one per core."""
    tampered = tmp_path_factory.mktemp("artifacts")
    for file in ARTIFACTS_DIR.glob("*.json"):
        shutil.copy(file, tampered / file.name)
    usdc = json.loads((tampered / "TestUSDC.json").read_text())
    usdc["deployedBytecode"] = usdc["deployedBytecode"][:-2] + "00"
    (tampered / "TestUSDC.json").write_text(json.dumps(usdc, indent=2) + "\n")
    (tampered / "SmartWallet.json").unlink()
    (tampered / "Stale.json").write_text("{}\n")

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([_node(), str(COMPILE_JS), "--check", *extra], cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = {"committed": start(), "tampered": start("--out", str(tampered))}
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_artifacts_match_sources(check_runs: dict[str, subprocess.Popen]) -> None:
    rc, output = _finish(check_runs["committed"])
    assert rc == 0, f"run `node contracts/compile.js` and commit the artifacts:\n{output}"


def test_check_reports_every_drifted_artifact(check_runs: dict[str, subprocess.Popen]) -> None:
    rc, output = _finish(check_runs["tampered"])
    assert rc == 1, output
    assert "TestUSDC.json: differs from sources" in output
    assert "SmartWallet.json: missing" in output
    assert "Stale.json: no contract of that name" in output


@pytest.mark.parametrize("name", ["TestUSDC", "SmartWallet"])
def test_artifact_format(name: str) -> None:
    path = ARTIFACTS_DIR / f"{name}.json"
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text)
    assert list(raw) == EXPECTED_KEYS
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert raw["contractName"] == name and raw["compiler"] == "0.8.37"
    source = REPO_ROOT / raw["sourcePath"]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == raw["sourceSha256"]
    artifact = load_artifact(name)
    assert artifact.bytecode.startswith("0x6") and artifact.deployed_bytecode.startswith("0x6")
    # TestUSDC's runtime code is installed with anvil_setCode, so it must not have a constructor
    # that does anything beyond copying the runtime code.
    if name == "TestUSDC":
        assert not any(e["type"] == "constructor" for e in raw["abi"])
        assert artifact.deployed_bytecode[2:] in artifact.bytecode

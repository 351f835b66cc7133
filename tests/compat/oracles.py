"""Run the compatibility oracles in subprocesses, JSON in and out.

`run_oz(jobs)` drives the pinned npm `@openzeppelin/merkle-tree` (oz_merkle.js); `run_og(jobs)`
drives OpenGradient's SDK inside `.venv-og` (og_oracle.py), creating that venv first if it is
missing. Neither ever skips: a missing tool is a test failure with a message saying what to run.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
OG_VENV = Path(os.environ.get("OG_VENV", REPO_ROOT / ".venv-og"))
OG_PYTHON = OG_VENV / "bin" / "python"
SETUP_SCRIPT = HERE / "setup_og_venv.sh"
SETUP_TIMEOUT_S = float(os.environ.get("OG_VENV_SETUP_TIMEOUT_S", "600"))
RUN_TIMEOUT_S = 120.0


def _run(argv: list[str], jobs: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    try:
        done = subprocess.run(argv, input=json.dumps(jobs).encode(), capture_output=True,
                              timeout=RUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not answer within {RUN_TIMEOUT_S:.0f} s")
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}): {done.stderr.decode()[-2000:]}")
    results = json.loads(done.stdout)
    assert len(results) == len(jobs)
    return results


def run_oz(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; the OpenZeppelin oracle needs it")
    if not (REPO_ROOT / "node_modules/@openzeppelin/merkle-tree/package.json").is_file():
        pytest.fail(f"@openzeppelin/merkle-tree is not installed: run `npm ci` in {REPO_ROOT}")
    return _run([node, str(HERE / "oz_merkle.js")], jobs, "the OpenZeppelin merkle-tree oracle")


@functools.cache
def ensure_og_venv() -> Path:
    """The `.venv-og` python, after running the idempotent setup script (bounded in time)."""
    # Its own process group, so a timeout stops pip too, not only the shell.
    setup = subprocess.Popen(["bash", str(SETUP_SCRIPT)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        _out, err = setup.communicate(timeout=SETUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(setup.pid, signal.SIGKILL)
        setup.communicate()
        pytest.fail(f"creating {OG_VENV} took over {SETUP_TIMEOUT_S:.0f} s; run "
                    f"{SETUP_SCRIPT} by hand (or raise OG_VENV_SETUP_TIMEOUT_S)")
    if setup.returncode != 0 or not OG_PYTHON.is_file():
        pytest.fail(f"could not create {OG_VENV} with {SETUP_SCRIPT} (needs PyPI access): "
                    f"{err.decode()[-2000:]}")
    return OG_PYTHON


def run_og(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One-shot: a fresh oracle process for these jobs."""
    python = ensure_og_venv()
    return _run([str(python), str(HERE / "og_oracle.py")], jobs, "the OpenGradient SDK oracle")


class OgOracle:
    """A long-lived oracle process (`og_oracle.py --lines`): call it with a list of jobs."""

    def __init__(self) -> None:
        python = ensure_og_venv()
        # stderr to a file, not a pipe: an undrained pipe could fill up and stall the oracle.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [str(python), str(HERE / "og_oracle.py"), "--lines"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, encoding="utf-8")

    def __call__(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(jobs) + "\n")
            stdin.flush()
            line = stdout.readline()  # the oracle answers every line; EOF means it died
        except BrokenPipeError:
            line = ""
        if not line:
            self._stderr.seek(0)
            stderr = self._stderr.read().decode(errors="replace")
            self.close()
            pytest.fail(f"the OpenGradient SDK oracle died: {stderr[-2000:]}")
        results = json.loads(line)
        assert len(results) == len(jobs)
        return results

    def close(self) -> None:
        if self._process.stdin and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()

"""A local anvil node as a child process (devnet and tests).

Guarantees: `start()` returns only once the node answers `eth_chainId` with the requested chain id;
`stop()` always reaps the process (terminate, then kill after a bound). Nothing here is used by
`facilitator serve` against a real network.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[2]
ANVIL_RELATIVE = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# anvil's default mnemonic ("test test ... junk") accounts; devnet only, never real funds.
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)


class AnvilError(RuntimeError):
    """The node could not be started or did not answer as expected."""


def anvil_binary() -> Path:
    """The pinned anvil binary from node_modules, or `FACILITATOR_ANVIL_BIN` when set."""
    override = os.environ.get("FACILITATOR_ANVIL_BIN")
    path = Path(override) if override else REPO_ROOT / ANVIL_RELATIVE
    if not path.is_file():
        raise AnvilError(f"anvil not found at {path}; run `npm ci` in {REPO_ROOT}")
    return path


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Anvil:
    """One anvil process bound to 127.0.0.1."""

    def __init__(
        self,
        *,
        chain_id: int,
        port: int | None = None,
        block_time_s: float | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.port = port or free_port()
        self.block_time_s = block_time_s
        self.extra_args = extra_args
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(self.port),
               "--chain-id", str(self.chain_id), "--accounts", str(len(DEV_KEYS))]
        if self.block_time_s is not None:
            cmd += ["--block-time", str(self.block_time_s)]
        return cmd + list(self.extra_args)

    async def start(self) -> Anvil:
        log = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL  # noqa: SIM115
        self._process = await asyncio.create_subprocess_exec(
            *self._command(), stdout=log, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        if self.log_path:
            log.close()  # the child holds its own descriptor
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self._wait_ready()
        return self

    async def _wait_ready(self) -> None:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            if self._process is not None and self._process.returncode is not None:
                raise AnvilError(f"anvil exited with code {self._process.returncode}")
            try:
                chain_id = int(await self.rpc("eth_chainId", []), 16)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                chain_id = None
            if chain_id == self.chain_id:
                return
            if chain_id is not None:
                raise AnvilError(
                    f"port {self.port} answers chain id {chain_id}, not {self.chain_id}")
            if asyncio.get_running_loop().time() > deadline:
                raise AnvilError(f"anvil did not answer within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.02)

    async def rpc(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call (test and devnet control: anvil_*, evm_* ...)."""
        assert self._session is not None, "start() first"
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        async with self._session.post(self.url, json=body) as resp:
            answer = await resp.json(content_type=None)
        if "error" in answer:
            raise AnvilError(f"{method}: {answer['error']}")
        return answer["result"]

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> Anvil:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

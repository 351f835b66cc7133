"""`facilitator watch` apart from `facilitator serve` (README: FACILITATOR_WATCHER=off on the
serving process): the watch wiring confirms what serve settled, runs the OpenGradient watcher
when FACILITATOR_OG_RPC_URLS is set, serves its metrics on FACILITATOR_PORT, and refuses an RPC
that serves another chain — on real anvil chains and a real PostgreSQL, both processes in this
test's event loop."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from eth_account import Account
from harness import OG_CHAIN_ID, OgChain, pay, wait_until

from facilitator.app import WatchService
from facilitator.config import StartupError, load_settings
from facilitator.devnet.anvil import free_port

FAST = {"FACILITATOR_WATCHER_POLL_INTERVAL_S": "0.05",
        "FACILITATOR_RECEIPT_POLL_INTERVAL_S": "0.05", "FACILITATOR_CONFIRMATIONS": "2"}


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the series of `name` with these labels in a Prometheus exposition (None when
    there is none)."""
    values = [float(match.group(2)) for match in
              re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
              if all(f'{k}="{v}"' in match.group(1) for k, v in labels.items())]
    return sum(values) if values else None


@pytest.fixture
async def og_chain(tmp_path) -> AsyncIterator[OgChain]:
    chain = await OgChain.start(tmp_path / "blobs")
    yield chain
    await chain.stop()


@pytest.fixture
async def watch_services() -> AsyncIterator[list[WatchService]]:
    running: list[WatchService] = []
    yield running
    for service in reversed(running):
        await service.stop()


def task_names(facilitator) -> set[str]:
    return {t.get_name() for t in facilitator.service._tasks}


async def test_watch_confirms_what_serve_settles_with_its_watchers_off(
        chain, og_chain, facilitator_factory, watch_services) -> None:
    serve = await facilitator_factory(FACILITATOR_WATCHER="off", **FAST, **og_chain.env())
    assert not {n for n in task_names(serve) if n.startswith("watcher:")}, task_names(serve)
    assert "attestations" in task_names(serve)  # the rest of the OpenGradient side still runs

    watch = await WatchService.create(load_settings(
        {**serve.env, "FACILITATOR_PORT": str(free_port())}))
    watch_services.append(watch)
    await watch.start()
    assert sorted(w.key for w in watch.watchers) == ["base-sepolia", "opengradient"]

    payer, pay_to = await chain.new_payer(), Account.create().address
    answer = await serve.settle(pay(payer, pay_to))
    assert answer["success"], answer
    tx = answer["transaction"]
    await chain.mine(2)

    async def confirmed() -> bool:
        return (await serve.http.get(f"/settle/{tx}")).json()["state"] == "confirmed"
    await wait_until(confirmed, timeout_s=20, what="the watch process to confirm")
    status = (await serve.http.get(f"/settle/{tx}")).json()
    assert status["confirmations"] >= 2
    assert [e["to"] for e in status["timeline"]][-1] == "confirmed"

    # A second settlement stays included (one block, two confirmations wanted): the watch
    # process reports it in the unfinished-settlements gauge (set by the watcher only).
    assert (await serve.settle(pay(payer, pay_to)))["success"]
    async with httpx.AsyncClient(base_url=watch.url, timeout=10) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}

        async def one_unfinished() -> bool:
            text = (await http.get("/metrics")).text
            return metric(text, "facilitator_settlements_unfinished", network="base-sepolia",
                          state="included") == 1
        await wait_until(one_unfinished, timeout_s=20, what="the unfinished-settlements gauge")

        async def og_processed() -> bool:
            text = (await http.get("/metrics")).text
            return (metric(text, "facilitator_watcher_processed_block",
                           network="opengradient") or 0) > 0
        await wait_until(og_processed, timeout_s=20, what="the OpenGradient watcher")
        text = (await http.get("/metrics")).text
    head = await chain.block_number()
    assert metric(text, "facilitator_watcher_processed_block", network="base-sepolia") >= \
        status["blockNumber"]
    assert metric(text, "facilitator_watcher_lag_blocks", network="base-sepolia") is not None
    assert metric(text, "facilitator_chain_head_block", network="base-sepolia") <= head
    rows = await serve.service.store.pool.fetch("SELECT chain_id FROM chain_cursors")
    assert sorted(r["chain_id"] for r in rows) == sorted([84532, OG_CHAIN_ID])


async def test_watch_refuses_an_rpc_serving_another_chain(chain, og_chain, database_url,
                                                         watch_services) -> None:
    env = {"DATABASE_URL": database_url, "FACILITATOR_SIGNER_KEY": "11" * 32,
           "FACILITATOR_RPC_URLS": og_chain.url,  # chain 10740 where Base Sepolia is expected
           "FACILITATOR_PORT": str(free_port())}
    watch = await WatchService.create(load_settings(env))
    watch_services.append(watch)
    with pytest.raises(StartupError, match="serves chain 10740, expected 84532"):
        await watch.start()

    env.update(FACILITATOR_RPC_URLS=chain.url, **og_chain.env(FACILITATOR_OG_CHAIN_ID="777"))
    watch = await WatchService.create(load_settings(env))
    watch_services.append(watch)
    with pytest.raises(StartupError, match="FACILITATOR_OG_RPC_URLS serves chain 10740"):
        await watch.start()


async def test_the_watch_command_exits_with_one_line_on_a_wrong_chain(og_chain,
                                                                     database_url) -> None:
    """`facilitator watch` itself (a subprocess): exit code 1 and a one-line reason, no
    traceback."""
    env = {**os.environ, "DATABASE_URL": database_url, "FACILITATOR_SIGNER_KEY": "11" * 32,
           "FACILITATOR_RPC_URLS": og_chain.url, "FACILITATOR_PORT": str(free_port()),
           "FACILITATOR_EVENT_LOOP": "asyncio"}
    env.pop("FACILITATOR_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "facilitator.cli", "watch", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, stderr.decode()
    assert stderr.decode().strip().splitlines()[-1] == (
        "facilitator: start-up failed: the RPC of base-sepolia serves chain 10740, "
        "expected 84532")
    assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize(("command", "password", "reason"), [
    ("serve", "Pw-not-to-be-shown-42", "database (DATABASE_URL) unreachable: "),
    ("watch", "Pw-not-to-be-shown-42", "database (DATABASE_URL) unreachable: "),
    ("migrate", "Pw-not-to-be-shown-42", "database (DATABASE_URL) unreachable: "),
    ("audit settlements", "Pw-not-to-be-shown-42", "database (DATABASE_URL) unreachable: "),
    ("migrate", "p@ss:w0rdSecret", "DATABASE_URL is malformed"),  # '@' and ':' not encoded
])
async def test_an_unusable_database_url_stops_start_up_with_one_line(
        command: str, password: str, reason: str) -> None:
    """No traceback and no part of the password: the reason, the variable, exit code 1."""
    env = {**os.environ, "DATABASE_URL": f"postgresql://u:{password}@127.0.0.1:{free_port()}/x",
           "FACILITATOR_SIGNER_KEY": "11" * 32, "FACILITATOR_RPC_URLS": "http://127.0.0.1:9",
           "FACILITATOR_EVENT_LOOP": "asyncio"}
    env.pop("FACILITATOR_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "facilitator.cli", *command.split(), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    text = stderr.decode()
    assert process.returncode == 1, text
    assert text.strip().splitlines()[-1].startswith(
        "facilitator: start-up failed: " + reason), text
    assert "Traceback" not in text and password not in text
    assert "w0rd" not in text and "not-to-be-shown" not in text  # nor a part of it

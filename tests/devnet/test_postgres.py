"""The throwaway PostgreSQL cluster against real binaries (Debian's; pgserver's when forced)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from facilitator.devnet.postgres import (
    BACKEND_ENV,
    MAX_CONNECTIONS,
    PostgresCluster,
    PostgresError,
    find_backend,
)


@pytest.fixture(scope="session")
async def template_dir(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A cluster directory initialized once per session; initdb is most of a fresh start."""
    path = tmp_path_factory.mktemp("pg-template") / "pg"
    async with PostgresCluster(path):
        pass
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty cluster directory (start() runs initdb)."""
    path = tmp_path / "pg"
    yield path
    # Each cluster is ~40 MB and pytest keeps the last 3 runs; server.log stays for post-mortems.
    shutil.rmtree(path / "pgdata", ignore_errors=True)


@pytest.fixture
def data_dir(fresh_dir: Path, template_dir: Path) -> Path:
    """An already initialized cluster directory (a copy of the session template)."""
    shutil.copytree(template_dir, fresh_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("server.log"))
    return fresh_dir


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def fetchval(dsn: str, query: str, *args: object) -> object:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def test_start_query_stop_closes_port(fresh_dir: Path) -> None:
    cluster = PostgresCluster(fresh_dir)
    async with cluster:
        assert cluster.dsn == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        await execute(cluster.dsn, "CREATE TABLE t (id int PRIMARY KEY, note text)",
                      "INSERT INTO t VALUES (1, 'hello')")
        assert await fetchval(cluster.dsn, "SELECT note FROM t WHERE id = $1", 1) == "hello"
        port = cluster.port
    assert port is not None and port_is_closed(port)
    assert not cluster.is_running()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_keeps_committed_data_and_dsn(data_dir: Path, mode: str) -> None:
    async with PostgresCluster(data_dir, durable=True) as cluster:
        dsn = cluster.dsn
        await execute(dsn, "CREATE TABLE t (id int)", "INSERT INTO t VALUES (42)")
        assert await cluster.restart(mode) == dsn  # type: ignore[arg-type]
        assert await fetchval(dsn, "SELECT id FROM t") == 42


async def test_kill_then_start_recovers_committed_data(data_dir: Path) -> None:
    async with PostgresCluster(data_dir, durable=True) as cluster:
        await execute(cluster.dsn, "CREATE TABLE t (id int)", "INSERT INTO t VALUES (7)")
        await cluster.kill()
        assert not cluster.is_running() and port_is_closed(cluster.port or 0)
        assert await cluster.start() == cluster.dsn
        assert await fetchval(cluster.dsn, "SELECT id FROM t") == 7


async def test_existing_data_dir_is_reused(fresh_dir: Path) -> None:
    async with PostgresCluster(fresh_dir) as first:
        await execute(first.dsn, "CREATE TABLE survives (id int)",
                      "INSERT INTO survives VALUES (1)")
    initialized_at = (first.pgdata / "PG_VERSION").stat().st_mtime_ns
    async with PostgresCluster(fresh_dir) as second:
        assert await fetchval(second.dsn, "SELECT count(*) FROM survives") == 1
    assert (second.pgdata / "PG_VERSION").stat().st_mtime_ns == initialized_at  # no new initdb


async def test_server_left_running_by_a_lost_owner_is_replaced(data_dir: Path) -> None:
    lost = PostgresCluster(data_dir)
    await lost.start()  # never stopped by its owner, as if that process had died
    async with PostgresCluster(data_dir) as successor:
        assert await fetchval(successor.dsn, "SELECT 1") == 1
        assert port_is_closed(lost.port or 0)
    assert not lost.is_running()


async def test_settings_follow_durability(data_dir: Path) -> None:
    async with PostgresCluster(data_dir) as fast:
        assert await fetchval(fast.dsn, "SHOW fsync") == "off"
        assert await fetchval(fast.dsn, "SHOW synchronous_commit") == "off"
        assert await fetchval(fast.dsn, "SHOW full_page_writes") == "off"
        max_connections = await fetchval(fast.dsn, "SHOW max_connections")
        assert int(str(max_connections)) >= MAX_CONNECTIONS
        assert await fetchval(fast.dsn, "SHOW listen_addresses") == "127.0.0.1"
    async with PostgresCluster(data_dir, durable=True) as durable:  # settings are per start
        assert await fetchval(durable.dsn, "SHOW fsync") == "on"
        assert await fetchval(durable.dsn, "SHOW synchronous_commit") == "on"
        assert await fetchval(durable.dsn, "SHOW full_page_writes") == "on"


async def test_stop_is_idempotent(data_dir: Path) -> None:
    cluster = PostgresCluster(data_dir)
    await cluster.stop()  # never started: nothing to do
    await cluster.start()
    await cluster.stop()
    await cluster.stop()
    assert not cluster.is_running()


async def test_start_failure_reports_server_log_and_leaves_nothing_running(data_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy_port = squatter.getsockname()[1]
        cluster = PostgresCluster(data_dir, port=busy_port)
        with pytest.raises(PostgresError) as failure:
            await cluster.start()
    assert "could not bind" in str(failure.value)  # from the tail of server.log
    assert str(cluster.log_path) in str(failure.value)
    assert not cluster.is_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="parent permissions are only adjusted as root")
async def test_as_root_parents_get_only_o_x(tmp_path: Path, template_dir: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(template_dir, private / "pg", symlinks=True)
    try:
        async with PostgresCluster(private / "pg") as cluster:
            assert await fetchval(cluster.dsn, "SELECT 1") == 1
        assert stat.S_IMODE(private.stat().st_mode) == 0o701
    finally:
        shutil.rmtree(private / "pg" / "pgdata", ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="parent permissions are only adjusted as root")
async def test_server_survives_parents_closing_again(tmp_path: Path, template_dir: Path) -> None:
    """What a concurrent root pytest session does to /tmp/pytest-of-root, in a private dir."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(template_dir, private / "pg", symlinks=True)
    try:
        async with PostgresCluster(private / "pg", durable=True) as cluster:
            await execute(cluster.dsn, "CREATE TABLE t (id int)", "INSERT INTO t VALUES (5)")
            private.chmod(0o700)
            await execute(cluster.dsn, "CHECKPOINT")  # rewrites pg_control
            await cluster.restart()  # shutdown checkpoint while closed; start re-opens
            assert await fetchval(cluster.dsn, "SELECT id FROM t") == 5
        assert "PANIC" not in cluster.log_path.read_text()
    finally:
        shutil.rmtree(private / "pg" / "pgdata", ignore_errors=True)


async def test_pgserver_backend_when_forced(
    fresh_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("pgserver is not installed (pip install 'facilitator[devnet]')")
    monkeypatch.setenv(BACKEND_ENV, "pgserver")
    async with PostgresCluster(fresh_dir, durable=True) as cluster:
        assert cluster.backend.name == "pgserver"
        await execute(cluster.dsn, "CREATE TABLE t (id int)", "INSERT INTO t VALUES (3)")
        version = await fetchval(cluster.dsn, "SHOW server_version")
        await cluster.restart("immediate")
        assert await fetchval(cluster.dsn, "SELECT id FROM t") == 3
    assert str(version).startswith("16")  # the wheel bundles PostgreSQL 16, Debian 12 ships 15


def test_backend_prefers_highest_debian_version() -> None:
    installed = list(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not installed:
        pytest.skip("no Debian PostgreSQL installed")
    highest = max(installed, key=lambda p: tuple(int(x) for x in p.parent.parent.name.split(".")))
    assert find_backend("debian").bin_dir == highest.parent


def test_backend_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PostgresError, match="initdb, pg_ctl, postgres"):
        find_backend("debian", debian_root=tmp_path)
    with pytest.raises(PostgresError, match="expected 'debian' or 'pgserver'"):
        find_backend("mysql")

"""Session-wide fixtures: a private PostgreSQL cluster, a fresh database per test (cloned from a
migrated template), a real anvil chain per test module, and a facilitator factory.

Randomised tests print their seed (see `seed` fixture); set FACILITATOR_TEST_SEED to replay.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from harness import DevChain, RunningFacilitator, start_facilitator

from facilitator.adapters.store import Store
from facilitator.devnet.postgres import PostgresCluster

TEMPLATE_DB = "facilitator_template"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
async def pg_cluster() -> AsyncIterator[PostgresCluster]:
    # Not under pytest's tmp_path: every pytest session re-locks `pytest-of-<user>` to 0700,
    # which would cut the `postgres` user off from a cluster of a concurrently running session.
    directory = Path(tempfile.mkdtemp(prefix="facilitator-test-pg-"))
    cluster = PostgresCluster(directory)
    await cluster.start()
    yield cluster
    await cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _dsn(cluster: PostgresCluster, database: str) -> str:
    return cluster.dsn.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(scope="session")
async def template_db(pg_cluster: PostgresCluster) -> str:
    admin = await asyncpg.connect(pg_cluster.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    store = await Store.connect(_dsn(pg_cluster, TEMPLATE_DB), min_size=1, max_size=2)
    try:
        await store.migrate()
    finally:
        await store.close()
    return TEMPLATE_DB


@pytest.fixture
async def database_url(pg_cluster: PostgresCluster, template_db: str) -> str:
    """A fresh, migrated database for this test alone."""
    name = f"test_{os.getpid()}_{next(_db_counter)}"
    admin = await asyncpg.connect(pg_cluster.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    return _dsn(pg_cluster, name)


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[DevChain]:
    """An automining anvil with the USDC test token, shared by one test module."""
    devchain = await DevChain.start()
    yield devchain
    await devchain.stop()


FacilitatorFactory = Callable[..., Awaitable[RunningFacilitator]]


@pytest.fixture
async def facilitator_factory(chain: DevChain, database_url: str
                              ) -> AsyncIterator[FacilitatorFactory]:
    """Start facilitators on the module chain and this test's database; all stopped at the end.
    Keyword arguments become environment settings (e.g. FACILITATOR_RECEIPT_TIMEOUT_S="1")."""
    running: list[RunningFacilitator] = []

    async def make(*, chain_: DevChain | None = None, signer_key: str | None = None,
                   **env: str) -> RunningFacilitator:
        service = await start_facilitator(chain_ or chain, database_url, signer_key, **env)
        running.append(service)
        return service

    yield make
    for service in reversed(running):
        if service.service._runner is not None:  # noqa: SLF001 - stopped by the test already?
            await service.stop()


@pytest.fixture
async def facilitator(facilitator_factory: FacilitatorFactory) -> RunningFacilitator:
    return await facilitator_factory()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("FACILITATOR_TEST_SEED", random.randrange(2**32)))
    print(f"\n[{request.node.nodeid}] seed={value} (replay: FACILITATOR_TEST_SEED={value})")
    return value


def pytest_report_header(config: Any) -> str:
    return "facilitator tests: real anvil + real PostgreSQL (no mocks of chain or database)"

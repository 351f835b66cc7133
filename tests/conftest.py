"""Session-wide fixtures: a private PostgreSQL cluster, a fresh database per test (cloned from a
migrated template), a real anvil chain per test module, and a facilitator factory.

Randomised tests draw from one session seed, printed in the report header and in the report of
every failing test that used it (fixtures `seed` and `module_seed`); set FACILITATOR_TEST_SEED to
replay a session.
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
from harness import DevChain, OgChain, RunningFacilitator, start_facilitator

from facilitator.adapters.store import Store
from facilitator.devnet.postgres import PostgresCluster

TEMPLATE_DB = "facilitator_template"
_db_counter = itertools.count()

SESSION_SEED = int(os.environ.get("FACILITATOR_TEST_SEED", random.randrange(2**32)))
SEED_REPLAY = f"replay: FACILITATOR_TEST_SEED={SESSION_SEED}"


def derived_seed(scope: str) -> int:
    """A seed of its own for one test or module, fixed by the session seed and the scope's id."""
    return random.Random(f"{SESSION_SEED}/{scope}").randrange(2**32)


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


async def clone_template(pg_cluster: PostgresCluster, template_db: str, name: str) -> str:
    """CREATE DATABASE `name` from the migrated template; returns its DSN."""
    admin = await asyncpg.connect(pg_cluster.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    return _dsn(pg_cluster, name)


@pytest.fixture
async def database_url(pg_cluster: PostgresCluster, template_db: str) -> str:
    """A fresh, migrated database for this test alone."""
    return await clone_template(pg_cluster, template_db,
                                f"test_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[DevChain]:
    """An automining anvil with the USDC test token, shared by one test module (each module
    gets its own: modules that mine, reorg or move the clock need no fixture of their own)."""
    devchain = await DevChain.start()
    yield devchain
    await devchain.stop()


@pytest.fixture(scope="module")
async def og_chain(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OgChain]:
    """The OpenGradient chain (TEE registry, settlement relay, blob store), shared by one test
    module."""
    og = await OgChain.start(tmp_path_factory.mktemp("blobs"))
    yield og
    await og.stop()


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


@pytest.fixture(scope="module")
async def module_facilitator(chain: DevChain, pg_cluster: PostgresCluster, template_db: str,
                             request: pytest.FixtureRequest
                             ) -> AsyncIterator[RunningFacilitator]:
    """One facilitator shared by a whole module, on the module chain and a database of its own
    (for tables of cases that change no state: a database per case would cost more than the
    case itself)."""
    module = request.module.__name__.rsplit(".", 1)[-1][:40]
    name = f"{module}_{os.getpid()}_{next(_db_counter)}"
    service = await start_facilitator(chain, await clone_template(pg_cluster, template_db, name))
    yield service
    await service.stop()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (derived from the session seed and the test id)."""
    value = derived_seed(request.node.nodeid)
    print(f"\n[{request.node.nodeid}] seed={value} ({SEED_REPLAY})")
    return value


@pytest.fixture(scope="module")
def module_seed(request: pytest.FixtureRequest) -> int:
    """A seed for module-scoped randomised fixtures (derived from the session seed and the
    module). Printed output of a module fixture is attached to one test only, so the failure
    report of every test using it carries the seed (`pytest_runtest_makereport`)."""
    return derived_seed(request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and {"seed", "module_seed"} & set(getattr(item, "fixturenames", ())):
        report.sections.append(("random seed", f"session seed {SESSION_SEED} ({SEED_REPLAY})"))
    return report


def pytest_report_header(config: Any) -> list[str]:
    return ["facilitator tests: real anvil + real PostgreSQL (no mocks of chain or database)",
            f"random seed {SESSION_SEED} ({SEED_REPLAY})"]

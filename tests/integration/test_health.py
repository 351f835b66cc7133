"""Liveness and readiness on a real chain and database: `/ready` answers 503 naming what is
missing when the database or a payment chain's RPC goes away (or serves another chain), and
200 again when it is back; `/health` stays 200 throughout. The OpenGradient chain is reported
but does not decide readiness."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from eth_account import Account

from facilitator.devnet.anvil import Anvil

BASE_CHAIN_ID = 84532


async def ready(facilitator) -> tuple[int, dict]:
    response = await facilitator.http.get("/ready")
    return response.status_code, response.json()


async def healthy(facilitator) -> bool:
    response = await facilitator.http.get("/health")
    return response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.fixture
async def private_base() -> AsyncIterator[Anvil]:
    """A chain of our own (the module chain is shared), acting as Base Sepolia."""
    anvil = await Anvil(chain_id=BASE_CHAIN_ID).start()
    yield anvil
    await anvil.stop()


async def test_ready_when_database_and_rpc_answer(facilitator) -> None:
    assert await healthy(facilitator)
    assert await ready(facilitator) == (200, {
        "ready": True, "checks": {"database": "ok", "rpc:base-sepolia": "ok"}})


async def test_rpc_down_or_on_another_chain_is_not_ready(facilitator_factory,
                                                         private_base: Anvil) -> None:
    facilitator = await facilitator_factory(FACILITATOR_RPC_URLS=private_base.url,
                                            FACILITATOR_WATCHER="off")
    assert (await ready(facilitator))[0] == 200

    await private_base.rpc("anvil_setChainId", [1])
    status, body = await ready(facilitator)
    assert status == 503 and body["ready"] is False
    assert body["checks"] == {"database": "ok",
                              "rpc:base-sepolia": f"wrong chain: 1, expected {BASE_CHAIN_ID}"}

    await private_base.rpc("anvil_setChainId", [BASE_CHAIN_ID])
    assert (await ready(facilitator))[0] == 200

    await private_base.stop()
    status, body = await ready(facilitator)
    assert status == 503
    assert body["checks"]["rpc:base-sepolia"].startswith("unavailable: ")
    assert private_base.url not in str(body)  # an RPC URL may carry an API key
    assert await healthy(facilitator)


async def test_database_refusing_connections_is_not_ready(facilitator, database_url: str
                                                          ) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1", name)
        status, body = await ready(facilitator)
        assert status == 503
        assert body["checks"]["database"].startswith("unavailable: ")
        assert body["checks"]["rpc:base-sepolia"] == "ok"
        assert await healthy(facilitator)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert (await ready(facilitator))[0] == 200


async def test_opengradient_chain_is_reported_but_does_not_decide(facilitator_factory) -> None:
    og = await Anvil(chain_id=10740).start()
    try:
        facilitator = await facilitator_factory(
            FACILITATOR_OG_RPC_URLS=og.url, FACILITATOR_TEE_REGISTRY=Account.create().address,
            FACILITATOR_SETTLEMENT_RELAY=Account.create().address,
            FACILITATOR_SETTLEMENT_RELAYER=Account.create().address)
        assert await ready(facilitator) == (200, {"ready": True, "checks": {
            "database": "ok", "rpc:base-sepolia": "ok", "rpc:opengradient": "ok"}})
    finally:
        await og.stop()
    status, body = await ready(facilitator)
    assert status == 200 and body["ready"] is True
    assert body["checks"]["rpc:opengradient"].startswith("unavailable: ")

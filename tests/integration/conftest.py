"""Fixtures shared by the integration modules that work on the database directly (audit API,
findings API, cross-check)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's fresh database."""
    pool_ = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    yield pool_
    await pool_.close()

"""Opening the database from the configured URL, for every command that needs it (`serve`,
`watch`, `migrate`, `audit`, `crosscheck`): one line on failure, never the URL."""

from __future__ import annotations

import asyncio

import asyncpg

from facilitator.adapters.store import Store
from facilitator.config import Secret, StartupError


async def connect_store(database_url: Secret, **pool: int) -> Store:
    """The database, or a `StartupError` that says why without the URL (it may hold a
    password): an unreachable database stops start-up with one line, not a traceback."""
    try:
        return await Store.connect(database_url.reveal(), **pool)
    except ValueError:  # the URL did not parse: its text may hold parts of the password
        raise StartupError("DATABASE_URL is malformed (is the password URL-encoded?)") from None
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        raise StartupError(f"database (DATABASE_URL) unreachable: {type(exc).__name__}: "
                           f"{str(exc).replace(database_url.reveal(), '***')}") from None

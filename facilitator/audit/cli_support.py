"""What the read-only commands (`facilitator audit`, `facilitator crosscheck`) share: the
database pool from DATABASE_URL, and their JSON / table output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from facilitator.config import Secret, database_url_from_env
from facilitator.database import connect_store


async def connect_pool(max_size: int) -> asyncpg.Pool:
    """A pool on DATABASE_URL (ConfigError when unset, StartupError when unreachable), with
    the service's per-statement timeout; the caller closes it."""
    store = await connect_store(Secret(database_url_from_env()), min_size=1, max_size=max_size)
    return store.pool


def json_text(body: Any) -> str:
    return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`columns` of `rows` as aligned text (a header line, then one line per row)."""
    cells = [["" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [list(columns), *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
                     for line in lines)


def render(body: Any, rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """`--format json` prints the whole `body`; `--format table` the `columns` of `rows`."""
    return json_text(body) if fmt == "json" else table(rows, columns)

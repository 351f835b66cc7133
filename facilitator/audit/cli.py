"""`facilitator audit ...`: the audit queries from the command line (read-only; DATABASE_URL).

  facilitator audit settlements [FILTERS] [--limit N] [--cursor C] [--order asc|desc]
                                [--format table|json]
  facilitator audit settlement ID
  facilitator audit totals --by pay_to|payer|day [FILTERS] [--format table|json]
  facilitator audit export --format csv|jsonl [--output FILE] [FILTERS] [--order asc|desc]
  facilitator audit unmatched [--payer A] [--pay-to A] [--asset A] [--tx H] [--from T] [--to T]
                              [--min-amount N] [--max-amount N] [--limit N] [--cursor C]
                              [--order asc|desc] [--format table|json]

FILTERS: --payer --pay-to --asset --network --state --from --to --tx --min-amount --max-amount,
with the meaning and validation of the HTTP parameters (see facilitator.audit.queries): the
CLI and the API share one parser and one set of SQL statements.

Exit codes: 0 done; 1 no such settlement, or an export that did not complete; 2 an invalid
option (the message names it) or a missing DATABASE_URL.

Guarantees: options are validated before connecting to the database. `export --output FILE`
writes FILE.partial and renames it to FILE only after the last row, so FILE never holds a
truncated export; an export to stdout that fails midway exits non-zero. `totals` follows the
pages to the end; `settlements` and `unmatched` print one page and, on stderr, the option that
fetches the next one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import IO, Any

import asyncpg

from facilitator.audit import queries
from facilitator.audit.cli_support import connect_pool, json_text, render
from facilitator.audit.formats import encoder
from facilitator.protocol.fields import BadRequest

# (option, query parameter, help): the CLI spelling of each filter.
_FILTER_OPTIONS = (
    ("--payer", "payer", "payer address"), ("--pay-to", "payTo", "payee (payTo) address"),
    ("--asset", "asset", "token address"),
    ("--network", "network", "network as stored, e.g. eip155:84532"),
    ("--state", "state", "state, or comma-separated states"),
    ("--from", "from", "created at or after (ISO-8601 with timezone)"),
    ("--to", "to", "created before (ISO-8601 with timezone)"),
    ("--tx", "tx", "transaction hash"), ("--min-amount", "min_amount", "minimum atomic amount"),
    ("--max-amount", "max_amount", "maximum atomic amount"))
_OPTION_OF = {param: option for option, param, _ in _FILTER_OPTIONS} | {
    "limit": "--limit", "cursor": "--cursor", "order": "--order", "group_by": "--by",
    "format": "--format", "id": "ID"}
_SETTLEMENT_COLUMNS = ("id", "createdAt", "state", "network", "payer", "payTo", "amount",
                       "transaction")
_TRANSFER_COLUMNS = ("observedAt", "chainId", "blockNumber", "logIndex", "from", "to", "amount",
                     "transaction")
_TOTALS_COLUMNS = ("key", "chainId", "asset", "count", "amount")


def add_audit_parser(subparsers: Any) -> None:
    """Add `audit` and its commands to the `facilitator` argument parser."""
    audit = subparsers.add_parser(
        "audit", help="read-only audit queries over the settlement records (DATABASE_URL)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    listing = commands.add_parser("settlements", help="list settlements, one page")
    _filters(listing, queries.SETTLEMENT_FILTERS)
    _paging(listing)
    _output(listing)

    one = commands.add_parser("settlement", help="one settlement: timeline and chain evidence")
    one.add_argument("id", help="settlement id (uuid)")

    totals = commands.add_parser("totals", help="count and amount per payee, payer or day")
    totals.add_argument("--by", dest="group_by", required=True, metavar="pay_to|payer|day")
    _filters(totals, queries.SETTLEMENT_FILTERS)
    _output(totals)

    export = commands.add_parser("export", help="every matching settlement as CSV or JSON Lines")
    export.add_argument("--format", dest="export_format", required=True, metavar="csv|jsonl")
    export.add_argument("--output", metavar="FILE", help="write to FILE (default: stdout)")
    export.add_argument("--order", metavar="asc|desc")
    _filters(export, queries.SETTLEMENT_FILTERS)

    unmatched = commands.add_parser("unmatched", help="transfers that match no settlement")
    _filters(unmatched, queries.TRANSFER_FILTERS)
    _paging(unmatched)
    _output(unmatched)


def _filters(parser: argparse.ArgumentParser, accepted: Sequence[str]) -> None:
    for option, param, help_ in _FILTER_OPTIONS:
        if param in accepted:
            parser.add_argument(option, dest="q_" + param, metavar="VALUE", help=help_)


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", metavar="N", help=f"rows per page (default "
                                                     f"{queries.DEFAULT_LIMIT})")
    parser.add_argument("--cursor", metavar="C", help="the next page (as printed)")
    parser.add_argument("--order", metavar="asc|desc", help="oldest first (asc, default)")


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table")


def _params(args: argparse.Namespace, *extra: str) -> dict[str, str]:
    """The options given, as the query parameters the shared parser takes."""
    params = {name[2:]: value for name, value in vars(args).items()
              if name.startswith("q_") and value is not None}
    for name in extra:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    return params


# -- commands ----------------------------------------------------------------------------------

Parsed = Any
_PARSERS: dict[str, Callable[[argparse.Namespace], Parsed]] = {
    "settlements": lambda a: queries.parse_settlement_list(_params(a, "limit", "cursor", "order")),
    "settlement": lambda a: queries.parse_public_id(a.id),
    "totals": lambda a: queries.parse_totals(_totals_params(a)),
    "export": lambda a: queries.parse_export(
        {**_params(a, "order"), "format": a.export_format}),
    "unmatched": lambda a: queries.parse_unmatched(_params(a, "limit", "cursor", "order")),
}


async def run_audit(args: argparse.Namespace) -> int:
    """Run `facilitator audit <command>`; returns the exit code."""
    command = args.audit_command
    try:
        parsed = _PARSERS[command](args)
    except BadRequest as exc:
        print(f"facilitator audit {command}: {_OPTION_OF.get(exc.field, exc.field)}: "
              f"{exc.message}", file=sys.stderr)
        return 2
    pool = await connect_pool(max_size=1)
    try:
        return await _RUNNERS[command](pool, parsed, args)
    finally:
        await pool.close()


async def _settlements(pool: asyncpg.Pool, parsed: Parsed, args: argparse.Namespace) -> int:
    page = await queries.list_settlements(pool, *parsed)
    _print_page(page, "settlements", _SETTLEMENT_COLUMNS, args.format)
    return 0


async def _unmatched(pool: asyncpg.Pool, parsed: Parsed, args: argparse.Namespace) -> int:
    page = await queries.list_unmatched(pool, *parsed)
    _print_page(page, "transfers", _TRANSFER_COLUMNS, args.format)
    return 0


async def _settlement(pool: asyncpg.Pool, parsed: Parsed, args: argparse.Namespace) -> int:
    found = await queries.get_settlement(pool, parsed)
    if found is None:
        print(f"facilitator audit settlement: no settlement {parsed}", file=sys.stderr)
        return 1
    print(json_text(found))
    return 0


def _totals_params(args: argparse.Namespace, cursor: str | None = None) -> dict[str, str]:
    params = {**_params(args, "group_by"), "limit": str(queries.MAX_LIMIT)}
    return params if cursor is None else {**params, "cursor": cursor}


async def _totals(pool: asyncpg.Pool, parsed: Parsed, args: argparse.Namespace) -> int:
    result = await queries.totals(pool, parsed)
    groups = list(result["groups"])
    while result["nextCursor"] is not None:  # a summary is only useful whole
        parsed = queries.parse_totals(_totals_params(args, result["nextCursor"]))
        result = await queries.totals(pool, parsed)
        groups += result["groups"]
    body = {"groupBy": result["groupBy"], "states": result["states"], "groups": groups}
    print(render(body, groups, _TOTALS_COLUMNS, args.format))
    return 0


async def _export(pool: asyncpg.Pool, parsed: Parsed, args: argparse.Namespace) -> int:
    request: queries.ExportRequest = parsed
    partial = args.output + ".partial" if args.output else None
    sys.stdout.flush()
    out: IO[bytes] = open(partial, "wb") if partial else sys.stdout.buffer  # noqa: SIM115
    try:
        count = await _write_export(pool, request, out)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more on stdout
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BaseException:
        if partial:
            out.close()
            os.unlink(partial)
        raise
    if partial:
        out.close()
        os.replace(partial, args.output)
    print(f"exported {count} settlement(s)", file=sys.stderr)
    return 0


async def _write_export(pool: asyncpg.Pool, request: queries.ExportRequest, out: IO[bytes]
                        ) -> int:
    encode = encoder(request.format)
    count = 0
    async with queries.open_export(pool, request) as batches:
        out.write(encode.header())
        async for rows in batches:
            out.write(encode.encode(rows))
            count += len(rows)
    out.flush()
    return count


_RUNNERS: dict[str, Callable[[asyncpg.Pool, Parsed, argparse.Namespace], Awaitable[int]]] = {
    "settlements": _settlements, "settlement": _settlement, "totals": _totals,
    "export": _export, "unmatched": _unmatched,
}


# -- output ------------------------------------------------------------------------------------

def _print_page(page: dict[str, Any], key: str, columns: Sequence[str], fmt: str) -> None:
    print(render(page, page[key], columns, fmt))
    if page["nextCursor"] is not None:
        print(f"more rows: add --cursor {page['nextCursor']}", file=sys.stderr)

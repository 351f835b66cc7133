"""`facilitator crosscheck --from ISO --to ISO [--format table|json]`: run the cross-check
rules over a window now (DATABASE_URL), store the findings not stored yet, and print every
finding the rules gave for the window (already stored ones included, marked `new: false`).

`--from` (inclusive) and `--to` (exclusive) are ISO-8601 date-times with a timezone, as in the
audit API. The window selects sessions by settle time, attestations by receipt, OpenGradient
batches by block time and reconciliation windows by overlap (see
`facilitator.core.crosscheck`); each rule still waits for its own timing window as of now, so
a window that ends in the last hour may find more when run again later.

Settings as the service reads them (environment, then FACILITATOR_CONFIG):
FACILITATOR_OG_CHAIN_ID (10740) and FACILITATOR_ATTESTATION_SETTLE_WINDOW_S (3600).

Exit codes: 0 done, whatever was found (findings are data, not errors: see the alert rules);
2 an invalid option (the message names it), an invalid setting or a missing DATABASE_URL.

Guarantees: options are validated before connecting; running it twice stores nothing twice
(the same fingerprints), and a run concurrent with the service's loop is safe.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from facilitator.adapters.metrics import Metrics
from facilitator.audit import queries
from facilitator.audit.cli_support import connect_pool, render
from facilitator.audit.findings_queries import findings_by_fingerprint
from facilitator.config import crosscheck_settings
from facilitator.core.crosscheck import CrossCheckPolicy, iso
from facilitator.protocol.fields import BadRequest
from facilitator.services.crosscheck import CrossChecker

_COLUMNS = ("detectedAt", "kind", "linked", "new", "sessionId", "attestationId", "teeId")
_OPTION_OF = {"from": "--from", "to": "--to"}


def add_crosscheck_parser(subparsers: Any) -> None:
    """Add `crosscheck` to the `facilitator` argument parser."""
    parser = subparsers.add_parser(
        "crosscheck", help="run the attestation cross-check over a window (DATABASE_URL)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="window_from", required=True, metavar="ISO",
                        help="window start, inclusive (ISO-8601 with timezone)")
    parser.add_argument("--to", dest="window_to", required=True, metavar="ISO",
                        help="window end, exclusive (ISO-8601 with timezone)")
    parser.add_argument("--format", choices=("table", "json"), default="table")


async def run_crosscheck(args: argparse.Namespace) -> int:
    """Run `facilitator crosscheck`; returns the exit code."""
    try:
        window_from = queries.parse_timestamp(args.window_from, "from")
        window_to = queries.parse_timestamp(args.window_to, "to")
        queries.check_window(window_from, window_to)
    except BadRequest as exc:
        print(f"facilitator crosscheck: {_OPTION_OF.get(exc.field, exc.field)}: {exc.message}",
              file=sys.stderr)
        return 2
    settings = crosscheck_settings()
    policy = CrossCheckPolicy(settle_window_s=settings.settle_window_s)
    pool = await connect_pool(max_size=2)
    try:
        # A one-shot process: its counters are not scraped, the findings table is the record.
        checker = CrossChecker(pool, Metrics(), policy, og_chain_id=settings.og_chain_id)
        detected = await checker.run_once(window_from, window_to)
        new = {d.finding.fingerprint for d in detected if d.new}
        rows = await findings_by_fingerprint(pool, [d.finding.fingerprint for d in detected])
    finally:
        await pool.close()
    for row in rows:
        row["new"] = bytes.fromhex(row["fingerprint"][2:]) in new
    _print(rows, window_from, window_to, len(new), args.format)
    return 0


def _print(rows: list[dict[str, Any]], window_from: Any, window_to: Any, new: int,
           fmt: str) -> None:
    body = {"window": {"from": iso(window_from), "to": iso(window_to)},
            "found": len(rows), "new": new, "findings": rows}
    print(render(body, rows, _COLUMNS, fmt))
    print(f"{len(rows)} finding(s) for the window, {new} new", file=sys.stderr)

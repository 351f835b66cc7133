"""The cross-checker: runs the rules of `facilitator.core.crosscheck` over a time window, on
demand (`run_once`, the `facilitator crosscheck` command) or continuously (`run`: every
`interval_s`, the window `[now - lookback_s, now)`).

Guarantees:
- Idempotent: a discrepancy found again (by the next pass, another process, or the CLI) is not
  stored again, and `facilitator_findings_total{kind,linked}` counts each stored finding once
  (only the pass that inserted it counts it).
- Every pass counts once in `facilitator_crosscheck_runs_total{result="ok"|"error"}`; a failed
  pass stores nothing of its own (its facts are read before anything is written) and the
  continuous loop goes on with the next one.
- `lookback_s` covers every decision window (`CrossCheckPolicy` refuses a shorter one), so
  anything that becomes decidable later is still inside a later pass's window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from facilitator.adapters.findings import CrossCheckStore
from facilitator.adapters.metrics import Metrics
from facilitator.core.crosscheck import CrossCheckPolicy, Finding, evaluate

log = logging.getLogger("facilitator.crosscheck")


@dataclass(frozen=True, slots=True)
class Detected:
    finding: Finding
    new: bool  # stored by this pass (False: it was already on record)


class CrossChecker:
    def __init__(self, pool: asyncpg.Pool, metrics: Metrics,
                 policy: CrossCheckPolicy | None = None, *, og_chain_id: int | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.policy = policy or CrossCheckPolicy()
        self._store = CrossCheckStore(pool, og_chain_id=og_chain_id)
        self._metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))

    async def run_once(self, window_from: datetime, window_to: datetime) -> list[Detected]:
        """Run every rule over [window_from, window_to) as of now; store what is new."""
        if window_to <= window_from:
            raise ValueError("the window's end must be later than its start")
        try:
            facts = await self._store.facts(window_from, window_to, self._clock(), self.policy)
            findings = evaluate(facts, self.policy)
            inserted = await self._store.insert(findings)
        except Exception:  # a cancelled pass (shutdown) is not an error
            self._metrics.crosscheck_runs.labels("error").inc()
            raise
        self._metrics.crosscheck_runs.labels("ok").inc()
        for f in findings:
            if f.fingerprint in inserted:
                self._metrics.findings.labels(f.kind, "true" if f.linked else "false").inc()
                log.warning("cross-check finding %s (linked=%s, session %s, attestation %s)",
                            f.kind, f.linked, f.session_id, f.attestation_id)
        return [Detected(f, f.fingerprint in inserted) for f in findings]

    async def run(self) -> None:
        """Forever: a pass over the last `lookback_s` every `interval_s`."""
        lookback = timedelta(seconds=self.policy.lookback_s or 0)
        while True:
            now = self._clock()
            try:
                await self.run_once(now - lookback, now)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - counted as an error run; retried next interval
                log.exception("cross-check pass failed")
            await asyncio.sleep(self.policy.interval_s)

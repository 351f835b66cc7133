"""PostgreSQL records of upto sessions and of the usage resource servers report at settlement.

Guarantees: one session row per (chain, owner, Permit2 nonce), created by the first /verify or
/settle that sees the permit; usage is stored once per settlement, as reported by the attempt
that owns the settlement row: a replayed /settle writes nothing (it does not count twice), and a
retry that takes over a failed attempt replaces (or, reporting none, removes) that attempt's
report, so a refused attempt's figures never become those of the payment; `usage_by_day` counts
only settled payments. All SQL is parameterised.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from facilitator.core.settlement import SettlementIntent
from facilitator.protocol.permit2 import UsageMetadata


def _b(hex_value: str) -> bytes:
    return bytes.fromhex(hex_value[2:])


class SessionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record_verified(self, intent: SettlementIntent, facilitator: str) -> None:
        await self.pool.execute("""
            INSERT INTO upto_sessions (chain_id, payer, nonce, asset, pay_to, facilitator, cap,
                deadline, valid_after, verified_at, verifications)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, clock_timestamp(), 1)
            ON CONFLICT (chain_id, payer, nonce) DO UPDATE SET
                verifications = upto_sessions.verifications + 1,
                verified_at = COALESCE(upto_sessions.verified_at, clock_timestamp()),
                updated_at = clock_timestamp()""", *_session_values(intent, facilitator))

    async def record_settled(self, intent: SettlementIntent, facilitator: str,
                             settlement_id: int | None, usage: UsageMetadata | None) -> None:
        """The session's settled amount (0 without a transaction) and its usage report, as
        this /settle asked: what was paid is the settlement's (`settlement_id`), by its state.
        A settlement attempt (a new or reclaimed row: `settlement_id` set) dates the session
        (`settled_at`, the cross-check's window key), so a retry that takes over a refused
        attempt is not dated by it; settling nothing keeps the first date."""
        await self.pool.execute("""
            INSERT INTO upto_sessions (chain_id, payer, nonce, asset, pay_to, facilitator, cap,
                deadline, valid_after, settled_amount, settled_at, settlement_id,
                gateway_session_id, usage)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, clock_timestamp(), $11, $12,
                    $13::jsonb)
            ON CONFLICT (chain_id, payer, nonce) DO UPDATE SET
                settled_amount = $10,
                settled_at = CASE WHEN $11::bigint IS NULL
                    THEN COALESCE(upto_sessions.settled_at, clock_timestamp())
                    ELSE clock_timestamp() END,
                settlement_id = COALESCE($11, upto_sessions.settlement_id),
                gateway_session_id = COALESCE($12, upto_sessions.gateway_session_id),
                usage = COALESCE($13::jsonb, upto_sessions.usage), updated_at = clock_timestamp()
            """, *_session_values(intent, facilitator), intent.amount, settlement_id,
            usage.session_id if usage else None,
            json.dumps(dict(usage.raw)) if usage else None)

    async def record_usage(self, settlement_id: int, usage: UsageMetadata) -> None:
        """The report of the attempt that owns the (pending) settlement row; replaces the report
        of an earlier, failed attempt of the same row."""
        await self.pool.execute("""
            INSERT INTO settlement_usage (settlement_id, session_id, request_count, cost_opg,
                cost_usd, input_tokens, output_tokens, total_tokens, service, model, raw)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)
            ON CONFLICT (settlement_id) DO UPDATE SET session_id = EXCLUDED.session_id,
                request_count = EXCLUDED.request_count, cost_opg = EXCLUDED.cost_opg,
                cost_usd = EXCLUDED.cost_usd, input_tokens = EXCLUDED.input_tokens,
                output_tokens = EXCLUDED.output_tokens, total_tokens = EXCLUDED.total_tokens,
                service = EXCLUDED.service, model = EXCLUDED.model, raw = EXCLUDED.raw,
                recorded_at = clock_timestamp()""",
            settlement_id, usage.session_id, usage.request_count, usage.cost_opg,
            _decimal(usage.cost_usd), usage.input_tokens, usage.output_tokens,
            usage.total_tokens, usage.service, usage.model, json.dumps(dict(usage.raw)))

    async def forget_usage(self, settlement_id: int) -> None:
        """A retry of a failed attempt that reports no usage: the failed attempt's goes."""
        await self.pool.execute("DELETE FROM settlement_usage WHERE settlement_id = $1",
                                settlement_id)

    async def usage_by_day(self, days: int) -> list[dict[str, Any]]:
        """Per day, service and payTo: requests, cost and tokens of settled payments."""
        rows = await self.pool.fetch("""
            SELECT date_trunc('day', u.recorded_at AT TIME ZONE 'UTC')::date AS day,
                   COALESCE(u.service, 'unknown') AS service, s.pay_to,
                   count(*) AS settlements, COALESCE(sum(u.request_count), 0) AS requests,
                   COALESCE(sum(u.cost_opg), 0) AS cost_opg,
                   COALESCE(sum(u.cost_usd), 0) AS cost_usd,
                   COALESCE(sum(u.input_tokens), 0) AS input_tokens,
                   COALESCE(sum(u.output_tokens), 0) AS output_tokens,
                   COALESCE(sum(u.total_tokens), 0) AS total_tokens
            FROM settlement_usage u JOIN settlements s ON s.id = u.settlement_id
            -- UTC days whatever the server's TimeZone: midnight UTC, N-1 days back
            WHERE u.recorded_at >= (date_trunc('day', clock_timestamp() AT TIME ZONE 'UTC')
                                    - make_interval(days => $1 - 1)) AT TIME ZONE 'UTC'
              AND s.state IN ('included', 'confirmed')
            GROUP BY 1, 2, 3 ORDER BY 1 DESC, 2, 3""", days)
        return [dict(r) for r in rows]


def _session_values(intent: SettlementIntent, facilitator: str) -> tuple[Any, ...]:
    return (intent.chain_id, _b(intent.payer), intent.nonce, _b(intent.asset),
            _b(intent.pay_to), _b(facilitator), intent.cap_amount, intent.valid_before,
            intent.valid_after)


def _decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None

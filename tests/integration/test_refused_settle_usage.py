"""The usage a resource server reports at /settle is written after the claim and before the
on-chain checks; a refused attempt's report must not become the figures of the attempt that
settles the same authorization later (`GET /usage`).

Before: `settlement_usage` kept the first report of a settlement row (`ON CONFLICT DO
NOTHING`), so the retry that took over the failed row (`reclaim_failed`) and settled was
reported with the refused attempt's request count and cost.
"""

from __future__ import annotations

from eth_account import Account
from harness import OPG, db_fetch, sign_upto, upto_body, upto_requirements

CAP = 10**17
BALANCE = 50_000


def usage(requests: int, cost: int) -> dict:
    return {"sessionId": "sess-r", "requestCount": requests, "costOpg": str(cost),
            "service": "chat"}


async def refused_then_body(chain, facilitator, first_usage: dict) -> tuple[dict, str]:
    """A settle refused on chain (the amount exceeds the payer's balance) with `first_usage`;
    returns the permit's settle body for BALANCE (without usage) and payTo."""
    payer, pay_to = await chain.new_upto_payer(opg=BALANCE), Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=facilitator.signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=facilitator.signer)
    refused = await facilitator.settle(upto_body(payload, requirements, BALANCE + 1,
                                                 first_usage))
    assert refused["success"] is False, refused
    assert refused["errorReason"] == "permit2_insufficient_balance", refused
    return upto_body(payload, requirements, BALANCE), pay_to


async def usage_rows(facilitator) -> list[dict]:
    return (await facilitator.http.get("/usage?days=1")).json()["usage"]


async def session_row(database_url: str):
    [session] = await db_fetch(database_url, "SELECT settled_amount, settled_at, settlement_id "
                                             "FROM upto_sessions")
    return session


async def test_retry_that_settles_reports_its_own_usage(chain, facilitator, database_url):
    body, pay_to = await refused_then_body(chain, facilitator, usage(7, BALANCE + 1))
    refused = await session_row(database_url)
    body["usageMetadata"] = usage(3, BALANCE)
    settled = await facilitator.settle(body)
    assert settled["success"] is True, settled
    assert await chain.token_balance(pay_to, OPG) == BALANCE
    [row] = await usage_rows(facilitator)
    assert (row["requests"], row["costOpg"]) == (3, str(BALANCE)), row
    session = await session_row(database_url)
    assert int(session["settled_amount"]) == BALANCE
    assert session["settlement_id"] == refused["settlement_id"]  # the row taken over
    # the session is dated by the attempt that settled, not the refused one (the cross-check
    # scopes sessions by this date)
    assert session["settled_at"] > refused["settled_at"]


async def test_retry_without_usage_drops_the_refused_report(chain, facilitator, database_url):
    body, _ = await refused_then_body(chain, facilitator, usage(7, BALANCE + 1))
    settled = await facilitator.settle(body)
    assert settled["success"] is True, settled
    assert await usage_rows(facilitator) == []
    assert await db_fetch(database_url, "SELECT * FROM settlement_usage") == []


async def test_refused_settlement_counts_no_usage(chain, facilitator):
    await refused_then_body(chain, facilitator, usage(7, BALANCE + 1))
    assert await usage_rows(facilitator) == []

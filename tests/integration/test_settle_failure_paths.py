"""Failure paths of /settle and /verify on a real chain and a real PostgreSQL: a failure after the
claim never orphans the row, usage numbers as JSON floats are taken as written, the upto
session record cannot turn a valid /verify into a 500, the upto mismatch reasons are the
SDK's, and a row left `pending` by a previous process is recovered through the scheme's checks.

Database failures are provoked for real: the table a write needs is renamed away for the
duration of one request (nothing is mocked).
"""

from __future__ import annotations

import copy
import time
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from eth_account import Account
from harness import (
    OPG,
    body_v2,
    pay,
    sign_upto,
    upto_body,
    upto_requirements,
    wait_until,
)
from x402.mechanisms.evm.upto.facilitator import UptoEvmScheme
from x402.schemas import PaymentPayload, PaymentRequirements

from facilitator.adapters.store import Store
from facilitator.devnet.anvil import DEV_KEYS
from facilitator.protocol.messages import parse_request
from facilitator.protocol.networks import BASE_SEPOLIA
from facilitator.schemes.exact import ExactEip3009Scheme
from facilitator.schemes.upto import UptoPermit2Scheme

CAP = 10**17


async def sql(database_url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


class TableAway:
    """`ALTER TABLE … RENAME` for the duration of a block: every write to it fails for real."""

    def __init__(self, database_url: str, table: str) -> None:
        self.database_url, self.table = database_url, table

    async def __aenter__(self) -> None:
        await sql(self.database_url, f"ALTER TABLE {self.table} RENAME TO {self.table}_away")

    async def __aexit__(self, *exc: object) -> None:
        await sql(self.database_url, f"ALTER TABLE {self.table}_away RENAME TO {self.table}")


async def upto_session(chain, signer: str) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    payer, pay_to = await chain.new_upto_payer(), Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=signer)
    return payer, pay_to, requirements, payload


# -- services.md 3: nothing between the claim and the broadcaster leaves the row orphaned ------

async def test_failure_after_the_claim_fails_the_row_and_answers(chain, facilitator,
                                                                 database_url):
    """The usage record (written after the claim, before the on-chain checks) fails. Before:
    HTTP 500 and the row stayed `pending` with no owner, so every retry waited and answered
    `settlement_pending` until a restart. Now: a protocol answer, the row `failed` (nothing
    was sent), and the same request settles once the database is back."""
    payer, pay_to, requirements, payload = await upto_session(chain, facilitator.signer)
    body = upto_body(payload, requirements, 5_000, usage={"sessionId": "s-3", "requestCount": 2})
    async with TableAway(database_url, "settlement_usage"):
        answer = await facilitator.settle(body)  # asserts HTTP 200
    assert answer["success"] is False, answer
    assert answer["errorReason"] == "unexpected_settle_error"
    assert answer["transaction"] == "" and answer["payer"] == payer.address
    assert answer["extensions"]["settlement"]["state"] == "failed"
    [row] = await sql(database_url, "SELECT state, reason, tx_hash FROM settlements")
    assert (row["state"], row["reason"], row["tx_hash"]) == (
        "failed", "unexpected_settle_error", None)
    assert await chain.token_balance(pay_to, OPG) == 0

    again = await facilitator.settle(body)
    assert again["success"] is True, again
    assert await chain.token_balance(pay_to, OPG) == 5_000
    [usage] = await sql(database_url, "SELECT request_count FROM settlement_usage")
    assert usage["request_count"] == 2


# -- services.md 6: usage numbers sent as JSON floats ------------------------------------------

async def test_usage_numbers_as_json_floats_are_taken_as_written(chain, facilitator,
                                                                 database_url):
    """Python's json writes 0.00002 as `2e-05`; orjson reads any fraction or exponent as a
    float. Before: HTTP 400 `usageMetadata.costUsd`, and the payment was not settled."""
    _, pay_to, requirements, payload = await upto_session(chain, facilitator.signer)
    usage = {"sessionId": "s-6", "costUsd": 0.00002, "requestCount": 3.0, "inputTokens": 1e3,
             "outputTokens": 12, "totalTokens": 1012}
    answer = await facilitator.settle(upto_body(payload, requirements, 777, usage))
    assert answer["success"] is True, answer
    [row] = await sql(database_url, "SELECT cost_usd, request_count, input_tokens "
                                    "FROM settlement_usage")
    assert row["cost_usd"] == Decimal("0.00002")
    assert (row["request_count"], row["input_tokens"]) == (3, 1000)


async def test_usage_numbers_the_database_cannot_hold_are_400(chain, facilitator):
    _, _, requirements, payload = await upto_session(chain, facilitator.signer)
    for usage, field in (({"requestCount": 2**63}, "usageMetadata.requestCount"),
                         ({"inputTokens": 2.5}, "usageMetadata.inputTokens"),
                         ({"costUsd": 1e30}, "usageMetadata.costUsd")):
        response = await facilitator.http.post(
            "/settle", json=upto_body(payload, requirements, 10, usage))
        assert response.status_code == 400, response.text
        assert response.json()["field"] == field


# -- services.md 14: the upto session record on /verify ----------------------------------------

async def test_upto_verify_stays_valid_when_the_session_record_fails(chain, facilitator,
                                                                     database_url):
    """Before: the synchronous session upsert raised and the valid verdict became HTTP 500."""
    payer, _, requirements, payload = await upto_session(chain, facilitator.signer)
    metrics = facilitator.service.metrics.registry
    before = metrics.get_sample_value("facilitator_verification_records_failed_total") or 0.0
    async with TableAway(database_url, "upto_sessions"):
        verdict = await facilitator.verify(upto_body(payload, requirements))  # HTTP 200
    assert verdict == {"isValid": True, "payer": payer.address}
    assert metrics.get_sample_value("facilitator_verification_records_failed_total") == before + 1
    # With the database back, /verify records the session again (before /verify answers).
    assert (await facilitator.verify(upto_body(payload, requirements)))["isValid"] is True
    [session] = await sql(database_url, "SELECT verifications FROM upto_sessions")
    assert session["verifications"] == 1


# -- services.md 8: an upto payment's scheme and network mismatches, as the SDK answers --------

def sdk_upto_verify(body: dict[str, Any]) -> dict[str, Any]:
    """The official SDK's upto mechanism (2.25.0) on the same body. Its scheme and network
    checks come before anything that needs its signer."""
    verdict = UptoEvmScheme(None).verify(
        PaymentPayload.model_validate(body["paymentPayload"]),
        PaymentRequirements.model_validate(body["paymentRequirements"]))
    return {"isValid": verdict.is_valid, "invalidReason": verdict.invalid_reason,
            "payer": verdict.payer}


MISMATCHES = {
    "requirements-network-unserved": ({"network": "eip155:8453"}, {}),
    "payload-network-unserved": ({}, {"network": "eip155:8453"}),
    "requirements-scheme-exact": ({"scheme": "exact"}, {}),
    "requirements-scheme-unknown": ({"scheme": "upto-x"}, {}),
}


@pytest.mark.parametrize(("requirements_change", "accepted_change"), MISMATCHES.values(),
                         ids=MISMATCHES.keys())
async def test_upto_mismatch_reasons_are_the_sdks(chain, facilitator, requirements_change,
                                                  accepted_change):
    """Before: the router answered `network_mismatch` / `unsupported_scheme` (the generic
    reasons) before the upto scheme could give its own."""
    payer, pay_to, cap_requirements, payload = await upto_session(chain, facilitator.signer)
    requirements = {**copy.deepcopy(cap_requirements), **requirements_change}
    accepted = {**copy.deepcopy(cap_requirements), **accepted_change}
    body = body_v2(payload, requirements, accepted=accepted)
    sdk = sdk_upto_verify(body)
    assert sdk["invalidReason"] in ("invalid_upto_evm_network_mismatch", "invalid_upto_evm_scheme")
    verdict = await facilitator.verify(body)
    assert verdict["isValid"] is False
    assert verdict["invalidReason"] == sdk["invalidReason"], (verdict, sdk)
    assert verdict["payer"] == sdk["payer"] == payer.address
    answer = await facilitator.settle(body)
    assert answer["success"] is False and answer["errorReason"] == sdk["invalidReason"], answer
    assert await chain.token_balance(pay_to, OPG) == 0


# -- services.md 9: a row left pending by a previous process -----------------------------------

async def claim_pending(database_url: str, intent: Any) -> None:
    store = await Store.connect(database_url, min_size=1, max_size=1)
    try:
        assert (await store.claim(intent)).created
    finally:
        await store.close()


async def state_of(database_url: str) -> asyncpg.Record:
    [row] = await sql(database_url, "SELECT state, reason, settled_by FROM settlements")
    return row


async def test_recovered_pending_row_is_checked_and_sent(chain, facilitator_factory,
                                                         database_url):
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    scheme = ExactEip3009Scheme(network=BASE_SEPOLIA, chain=None, facilitator_address=pay_to)
    await claim_pending(database_url, scheme.intent(parse_request(body)))
    await facilitator_factory()  # start-up recovers the pending row

    async def included() -> bool:
        return (await state_of(database_url))["state"] in ("included", "confirmed")
    await wait_until(included, what="the recovered settlement to be included")
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_recovered_pending_row_settled_by_someone_else_is_external(
        chain, facilitator_factory, database_url):
    """Before: eth_estimateGas reverted and the row was marked failed, though the payment was
    made (by another sender's transaction) — the front-run check that /settle makes was
    skipped at recovery."""
    payer, pay_to = await chain.new_payer(), Account.create().address
    body = pay(payer, pay_to)
    scheme = ExactEip3009Scheme(network=BASE_SEPOLIA, chain=None, facilitator_address=pay_to)
    intent = scheme.intent(parse_request(body))
    await claim_pending(database_url, intent)
    other = Account.from_key(DEV_KEYS[5]).address  # someone else submits the authorization
    sent = await chain.rpc("eth_sendTransaction", [{"from": other, "to": intent.call_to,
                                                    "data": "0x" + intent.calldata.hex()}])

    async def mined() -> bool:  # anvil answers on pool entry; its automine may follow later
        return await chain.rpc("eth_getTransactionReceipt", [sent]) is not None
    await wait_until(mined, what="the other sender's transaction to be mined")
    assert len(await chain.transfer_logs_to(pay_to)) == 1
    await facilitator_factory()

    async def settled() -> bool:
        return (await state_of(database_url))["state"] != "pending"
    await wait_until(settled, what="recovery to decide the pending row")
    row = await state_of(database_url)
    assert (row["state"], row["settled_by"]) == ("included", "external"), dict(row)
    assert len(await chain.transfer_logs_to(pay_to)) == 1


async def test_recovered_pending_upto_row_past_its_deadline_expires(chain, facilitator_factory,
                                                                    database_url):
    """Before: eth_estimateGas, the EIP-3009 revert classifier and `transaction_failed` for an
    upto row. Now: `expired` with the upto reason, without a transaction."""
    signer_key = await chain.new_funded_key()
    signer = Account.from_key(signer_key).address
    payer, pay_to = await chain.new_upto_payer(), Account.create().address
    requirements = upto_requirements(pay_to, CAP, facilitator=signer)
    payload = sign_upto(payer, pay_to=pay_to, cap=CAP, facilitator=signer,
                        deadline=int(time.time()) - 5)
    scheme = UptoPermit2Scheme(network=BASE_SEPOLIA, chain=None, facilitator_address=signer)
    await claim_pending(database_url,
                        scheme.intent(parse_request(upto_body(payload, requirements, 1234))))
    await facilitator_factory(signer_key=signer_key)
    row = await state_of(database_url)
    assert (row["state"], row["reason"]) == ("expired", "permit2_deadline_expired"), dict(row)
    assert await chain.token_balance(pay_to, OPG) == 0

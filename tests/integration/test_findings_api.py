"""The auditors' cross-check API on a real PostgreSQL database: bearer tokens, every filter of
`GET /v1/findings` and its keyset pages, strict validation (400 naming the parameter), CSV and
JSON Lines exports (one of 40,000 findings streamed in bounded memory), and the session and
attestation detail shapes with their on-chain evidence.

Findings are produced by the real cross-checker over the planted world of crosscheck_world.py
(same schema constraints and settlement transitions); the app under test carries the
production middleware and the settlement audit routes that install the tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from audit_http import AUDITOR, AUDITOR_TOKEN, OPERATOR, OPERATOR_TOKEN, get_json, sha256_hex
from bulk import stream_export
from crosscheck_world import (
    OG_CHAIN,
    PAY_A,
    PAYERS,
    TEE_A,
    TEE_U,
    WINDOW,
    World,
    at,
    checker_for,
    forged_signature,
    h,
    inference_in_two_sessions,
    late_settlement,
    proof_of,
    seed_honest,
    tampered_dump,
    unlinked_gap,
)

from facilitator.audit.findings_queries import FINDING_FIELD_NAMES
from facilitator.adapters.metrics import Metrics
from facilitator.audit.findings_routes import add_findings_routes
from facilitator.audit.routes import AUDIT_KEY, add_audit_routes
from facilitator.audit.tokens import parse_api_tokens
from facilitator.http.app import METRICS_KEY, request_context

BULK_ROWS = 40_000


def hx(value: bytes) -> str:
    return "0x" + value.hex()


# -- fixtures -------------------------------------------------------------------------------------

def make_app(pool: asyncpg.Pool) -> web.Application:
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    tokens = parse_api_tokens(f"auditor:{sha256_hex(AUDITOR_TOKEN)},"
                              f"operator:{sha256_hex(OPERATOR_TOKEN)}")
    add_audit_routes(app, pool, tokens)
    add_findings_routes(app, pool, og_chain_id=OG_CHAIN)
    return app


@pytest.fixture
async def client(pool: asyncpg.Pool) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(pool), host="127.0.0.1")) as client_:
        yield client_


@pytest.fixture
async def world(pool: asyncpg.Pool) -> World:
    """The honest world with five discrepancies, checked in two passes (so detection times
    differ): forged a1, an inference in two sessions (s1, s3), a late s1, a tampered dump,
    then an unlinked gap."""
    world = await seed_honest(pool)
    async with pool.acquire() as conn, conn.transaction():
        for plant in (forged_signature, inference_in_two_sessions, late_settlement,
                      tampered_dump):
            await plant(world, conn)
    await checker_for(world, Metrics()).run_once(*WINDOW)
    async with pool.acquire() as conn, conn.transaction():
        await unlinked_gap(world, conn)
    await checker_for(world, Metrics()).run_once(*WINDOW)
    return world


async def all_findings(client: TestClient, **params: str) -> list[dict[str, Any]]:
    return (await get_json(client, "/v1/findings", {**params, "limit": "1000"}))["findings"]


# -- authentication -------------------------------------------------------------------------------

PATHS = ["/v1/findings", "/v1/findings/export?format=csv", "/v1/sessions/1",
         f"/v1/attestations/0x{'11' * 32}/0x{'22' * 32}"]


@pytest.mark.parametrize("path", PATHS)
async def test_every_endpoint_needs_a_valid_bearer_token(client: TestClient, path: str) -> None:
    for headers, challenge in (({}, 'Bearer realm="facilitator"'),
                               ({"Authorization": "Bearer wrong-" + AUDITOR_TOKEN},
                                "invalid_token"),
                               ({"Authorization": AUDITOR_TOKEN}, "invalid_token")):
        response = await client.get(path, headers=headers)
        assert response.status == 401, headers
        assert challenge in response.headers["WWW-Authenticate"]
        assert (await response.json())["error"] == "unauthorized"
    leaked = await client.get(path + ("&" if "?" in path else "?") + "access_token=x",
                              headers=AUDITOR)
    assert leaked.status == 401  # a token in a URL is refused even with a valid header
    for headers in (AUDITOR, OPERATOR):
        assert (await client.get(path, headers=headers)).status in (200, 404)


async def test_no_configured_token_means_every_request_is_refused(pool: asyncpg.Pool) -> None:
    app = web.Application(middlewares=[request_context])
    app[METRICS_KEY] = Metrics()
    add_audit_routes(app, pool, ())
    add_findings_routes(app, pool)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client_:
        for path in PATHS:
            assert (await client_.get(path, headers=AUDITOR)).status == 401


async def test_a_role_outside_the_read_roles_is_forbidden(pool: asyncpg.Pool) -> None:
    """Both configured roles may read; the 403 path is `require_role`'s, shown by limiting the
    findings handlers' roles (as a deployment that reserved them for operators would)."""
    from facilitator.audit import findings_routes
    from facilitator.audit.tokens import require_role

    app = make_app(pool)
    app.router.add_get("/v1/findings-operators", require_role("operator")(
        findings_routes.list_findings.__wrapped__))  # type: ignore[attr-defined]
    async with TestClient(TestServer(app, host="127.0.0.1")) as client_:
        response = await client_.get("/v1/findings-operators", headers=AUDITOR)
        assert response.status == 403
        assert (await response.json())["error"] == "forbidden"
        assert (await client_.get("/v1/findings-operators", headers=OPERATOR)).status == 200


# -- listing and filters --------------------------------------------------------------------------

async def test_finding_shape(client: TestClient, world: World) -> None:
    items = await all_findings(client)
    assert sorted(f["kind"] for f in items) == ["batch_dump_invalid", "duplicate",
                                                "invalid_tee_signature", "late_settlement",
                                                "unlinked_reconciliation"]
    for item in items:
        assert list(item) == list(FINDING_FIELD_NAMES)
        assert item["detectedAt"].endswith("Z") and len(item["fingerprint"]) == 66
        assert isinstance(item["evidence"], dict) and isinstance(item["linked"], bool)
    forged = next(f for f in items if f["kind"] == "invalid_tee_signature")
    assert (forged["sessionId"], forged["attestationId"], forged["teeId"], forged["payer"]) == (
        world.sessions["s1"], world.attestations["a1"].id, hx(TEE_A), hx(PAYERS[0]))
    assert forged["evidence"]["attestation"]["inputHash"] == hx(world.attestations["a1"].input_hash)


async def test_each_filter(client: TestClient, world: World, pool: asyncpg.Pool) -> None:
    items = await all_findings(client)

    def kinds(found: list[dict[str, Any]]) -> list[str]:
        return sorted(f["kind"] for f in found)

    assert kinds(await all_findings(client, kind="duplicate")) == ["duplicate"]
    assert kinds(await all_findings(client, kind="late_settlement,duplicate")) == [
        "duplicate", "late_settlement"]
    assert kinds(await all_findings(client, session=str(world.sessions["s1"]))) == [
        "duplicate", "invalid_tee_signature", "late_settlement"]
    assert await all_findings(client, session=str(world.sessions["s3"])) == []  # by column
    assert kinds(await all_findings(client, tee=hx(TEE_A))) == ["duplicate",
                                                                "invalid_tee_signature"]
    assert kinds(await all_findings(client, tee=hx(TEE_U).upper().replace("0X", "0x"))) == [
        "unlinked_reconciliation"]
    assert kinds(await all_findings(client, linked="false")) == ["unlinked_reconciliation"]
    assert len(await all_findings(client, linked="true")) == 4
    # from/to bound detectedAt: the gap was detected in the second pass
    gap = next(f for f in items if f["kind"] == "unlinked_reconciliation")
    assert kinds(await all_findings(client, **{"from": gap["detectedAt"]})) == [
        "unlinked_reconciliation"]
    assert len(await all_findings(client, to=gap["detectedAt"])) == 4
    plus_two = datetime.fromisoformat(gap["detectedAt"]).astimezone(
        timezone(timedelta(hours=2))).isoformat()
    assert kinds(await all_findings(client, **{"from": plus_two})) == ["unlinked_reconciliation"]
    assert kinds(await all_findings(client, linked="true", kind="duplicate,late_settlement",
                                    session=str(world.sessions["s1"]))) == [
        "duplicate", "late_settlement"]
    assert await all_findings(client, **{"from": "2099-01-01T00:00:00Z"}) == []


@pytest.mark.parametrize(("params", "field"), [
    ({"kind": "bogus"}, "kind"), ({"kind": "duplicate,"}, "kind"),
    ({"session": "0"}, "session"), ({"session": "abc"}, "session"),
    ({"session": "99999999999999999999"}, "session"),
    ({"tee": "0x1234"}, "tee"), ({"tee": "11" * 32}, "tee"),
    ({"from": "2025-03-01"}, "from"), ({"to": "2025-03-01T00:00:00"}, "to"),
    ({"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T00:00:00Z"}, "to"),
    ({"linked": "yes"}, "linked"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"order": "up"}, "order"),
    ({"payer": "0x" + "00" * 20}, "payer")])
async def test_invalid_parameters_get_400_naming_them(client: TestClient,
                                                      params: dict[str, str], field: str) -> None:
    body = await get_json(client, "/v1/findings", params, status=400)
    assert (body["error"], body["field"]) == ("invalid_request", field), body


async def test_invalid_export_and_detail_parameters(client: TestClient) -> None:
    for path, params, field in (
            ("/v1/findings/export", {}, "format"),
            ("/v1/findings/export", {"format": "xml"}, "format"),
            ("/v1/findings/export", {"format": "csv", "limit": "5"}, "limit"),
            ("/v1/findings/export", {"format": "csv", "kind": "nope"}, "kind"),
            ("/v1/sessions/abc", {}, "id"), ("/v1/sessions/0", {}, "id"),
            ("/v1/sessions/1", {"verbose": "1"}, "verbose"),
            (f"/v1/attestations/0x{'11' * 31}/0x{'22' * 32}", {}, "tee_id"),
            (f"/v1/attestations/0x{'11' * 32}/{'22' * 32}", {}, "input_hash")):
        body = await get_json(client, path, params, status=400)
        assert body["field"] == field, (path, params, body)


async def test_repeated_parameter_is_refused(client: TestClient) -> None:
    response = await client.get("/v1/findings?kind=duplicate&kind=late_settlement",
                                headers=AUDITOR)
    assert response.status == 400 and (await response.json())["field"] == "kind"


# -- keyset pagination ----------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pages_follow_each_other_without_repeats(client: TestClient, world: World,
                                                       pool: asyncpg.Pool, order: str) -> None:
    everything = await all_findings(client, order=order)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", "order": order} | ({"cursor": cursor} if cursor else {})
        page = await get_json(client, "/v1/findings", params)
        seen += [f["id"] for f in page["findings"]]
        pages += 1
        if pages == 1:  # a finding stored meanwhile: after the cursor (asc) or never (desc)
            await pool.execute("""
                INSERT INTO findings (kind, linked, evidence, fingerprint)
                VALUES ('batch_dump_invalid', true, '{}', $1)""", h("later-finding"))
        cursor = page["nextCursor"]
        if cursor is None:
            break
    expected = [f["id"] for f in everything]
    if order == "asc":
        assert seen[:-1] == expected and len(seen) == len(expected) + 1
    else:
        assert seen == expected
    assert pages == 3
    body = await get_json(client, "/v1/findings", {"limit": "2", "order": "asc"})
    wrong = {"cursor": body["nextCursor"], "order": "desc"}
    assert (await get_json(client, "/v1/findings", wrong, status=400))["field"] == "cursor"
    settlements = await get_json(client, "/v1/settlements", {"limit": "1"})
    other = {"cursor": settlements["nextCursor"]}  # a cursor of another listing is refused
    assert (await get_json(client, "/v1/findings", other, status=400))["field"] == "cursor"


# -- exports --------------------------------------------------------------------------------------

async def test_csv_and_jsonl_exports(client: TestClient, world: World) -> None:
    listed = await all_findings(client)
    response = await client.get("/v1/findings/export", params={"format": "csv"},
                                headers=OPERATOR)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="findings-')
    rows = list(csv.reader(io.StringIO((await response.read()).decode())))
    assert rows[0] == list(FINDING_FIELD_NAMES)
    assert [int(r[0]) for r in rows[1:]] == [f["id"] for f in listed]
    for cells, item in zip(rows[1:], listed):
        record = dict(zip(FINDING_FIELD_NAMES, cells))
        assert orjson.loads(record["evidence"]) == item["evidence"]
        assert record["linked"] == ("true" if item["linked"] else "false")
        assert record["sessionId"] == ("" if item["sessionId"] is None else str(item["sessionId"]))

    response = await client.get("/v1/findings/export",
                                params={"format": "jsonl", "order": "desc", "linked": "true"},
                                headers=AUDITOR)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert lines == list(reversed([f for f in listed if f["linked"]]))


async def test_export_of_40k_findings_streams_in_bounded_memory(client: TestClient,
                                                                pool: asyncpg.Pool) -> None:
    await pool.execute("""
        INSERT INTO findings (kind, linked, tee_id, evidence, fingerprint, detected_at)
        SELECT 'unlinked_reconciliation', false, sha256(int8send(i)),
               jsonb_build_object('gap', 'attested_not_paid', 'i', i,
                                  'note', repeat('x', 300)),
               sha256(int8send(-i)), $1::timestamptz + i * interval '1 second'
        FROM generate_series(1, $2::int) AS i""", datetime(2025, 1, 1, tzinfo=UTC), BULK_ROWS)
    evidence_column = FINDING_FIELD_NAMES.index("evidence")
    for fmt, separator in (("csv", b"\r\n"), ("jsonl", b"\n")):
        state = {"header": fmt == "csv", "next": 1}

        def on_line(line: bytes) -> None:
            if state["header"]:
                assert line.decode() == ",".join(FINDING_FIELD_NAMES)
                state["header"] = False
                return
            if fmt == "csv":
                evidence = orjson.loads(next(csv.reader([line.decode()]))[evidence_column])
            else:
                evidence = orjson.loads(line)["evidence"]
            assert evidence["i"] == state["next"]  # in order: no row twice, none skipped
            state["next"] += 1

        size, peak, seconds = await stream_export(client, "/v1/findings/export", fmt,
                                                  separator, on_line, AUDITOR)
        assert state["next"] - 1 == BULK_ROWS, fmt
        print(f"\n{fmt}: {BULK_ROWS} findings, {size / 2**20:.1f} MiB streamed in "
              f"{seconds:.1f} s; peak heap during the download {peak / 2**20:.2f} MiB")
        assert size > 12 * 2**20 and peak < size / 4, (fmt, size, peak)


async def test_exports_beyond_the_shared_limit_get_429(client: TestClient) -> None:
    limit = client.app[AUDIT_KEY]  # one limit for settlement and finding exports
    limit.exports_running = limit.max_concurrent_exports
    try:
        body = await get_json(client, "/v1/findings/export", {"format": "csv"}, status=429)
        assert body["error"] == "too_many_requests"
    finally:
        limit.exports_running = 0


# -- session and attestation details --------------------------------------------------------------

async def test_session_detail(client: TestClient, world: World) -> None:
    s1 = world.sessions["s1"]
    body = await get_json(client, f"/v1/sessions/{s1}")
    assert (body["id"], body["chainId"], body["payer"], body["nonce"], body["payTo"],
            body["cap"], body["asset"], body["gatewaySessionId"]) == (
        s1, 84532, hx(PAYERS[0]), hx(h("nonce:s1")), hx(PAY_A), "1000", "0x" + "c1" * 20,
        "gw-s1")
    assert body["deadline"] == str(int(at(300).timestamp()))
    payment = body["payment"]
    assert (payment["state"], payment["amount"], payment["transaction"], payment["blockNumber"],
            payment["logIndex"], payment["blockTime"]) == (
        "confirmed", "30", hx(h("tx:s1")), 100, 0, "2025-03-01T12:05:01.000000Z")
    assert payment["blockHash"] == hx(h("block:84532:100"))
    assert payment["transfers"] == [{"transaction": hx(h("tx:s1")), "blockNumber": 100,
                                     "logIndex": 0, "amount": "30"}]

    inferences = {i["id"]: i for i in body["inferences"]}
    a1, a2, a3 = (world.attestations[k] for k in ("a1", "a2", "a3"))
    assert sorted(inferences) == sorted([a1.id, a2.id, a3.id])
    assert inferences[a1.id]["verification"] == "invalid_signature"
    assert inferences[a2.id]["verification"] == "valid"
    assert inferences[a2.id]["verifiedAt"].endswith("Z") and inferences[a2.id]["costOpg"] == "10"
    [leaf] = inferences[a2.id]["records"]["batches"]
    assert (leaf["transaction"], leaf["blockNumber"], leaf["logIndex"], leaf["merkleRoot"],
            leaf["leafIndex"], leaf["proof"], leaf["dumpStatus"], leaf["chainId"]) == (
        hx(h("og-tx:g2")), 501, 1, hx(h("root:g2")), 0, proof_of("g2", 0), "valid", OG_CHAIN)
    assert (leaf["dumpRoot"], leaf["dumpLeafCount"], leaf["dumpError"]) == (
        hx(h("root:g2")), "1", None)
    assert leaf["dumpCheckedAt"].endswith("Z")
    [individual] = inferences[a3.id]["records"]["individual"]
    assert (individual["transaction"], individual["blockNumber"], individual["logIndex"]) == (
        hx(h(f"og-individual-tx:{a3.id}")), 480, 0)
    assert inferences[a3.id]["records"]["batches"] == []

    assert sorted(f["kind"] for f in body["findings"]) == [
        "duplicate", "invalid_tee_signature", "late_settlement"]
    # a duplicate is listed on every session it names, not only the one in its column
    s3 = await get_json(client, f"/v1/sessions/{world.sessions['s3']}")
    assert [f["kind"] for f in s3["findings"]] == ["duplicate"]
    dup = s3["findings"][0]["evidence"]
    assert dup["sessionIds"] == sorted([s1, world.sessions["s3"]])

    missing = await get_json(client, "/v1/sessions/999999", status=404)
    assert missing["error"] == "not_found"


async def test_session_without_payment(client: TestClient, world: World,
                                       pool: asyncpg.Pool) -> None:
    session_id = await pool.fetchval("""
        INSERT INTO upto_sessions (chain_id, payer, nonce, asset, pay_to, facilitator, cap,
            deadline, valid_after) VALUES (84532, $1, $2, $3, $4, $3, 5, 1, 0) RETURNING id""",
        PAYERS[7], h("lonely"), b"\xc1" * 20, PAY_A)
    body = await get_json(client, f"/v1/sessions/{session_id}")
    assert (body["payment"], body["inferences"], body["findings"], body["settledAmount"]) == (
        None, [], [], None)


async def test_attestation_detail(client: TestClient, world: World) -> None:
    a1 = world.attestations["a1"]
    body = await get_json(client, f"/v1/attestations/{hx(TEE_A)}/{hx(a1.input_hash)}")
    assert (body["teeId"], body["inputHash"]) == (hx(TEE_A), hx(a1.input_hash))
    # the same inference posted for s1 and for s3: both, each with its session and records
    copies = body["attestations"]
    assert [c["sessionId"] for c in copies] == [world.sessions["s1"], world.sessions["s3"]]
    assert [c["session"]["id"] for c in copies] == [world.sessions["s1"], world.sessions["s3"]]
    assert [c["verification"] for c in copies] == ["invalid_signature", "valid"]
    for copy in copies:
        assert (copy["outputHash"], copy["teeTimestamp"]) == (hx(a1.output_hash),
                                                              a1.tee_timestamp)
        [leaf] = copy["records"]["batches"]
        assert (leaf["transaction"], leaf["leafIndex"], leaf["proof"]) == (
            hx(h("og-tx:g1")), 0, proof_of("g1", 0))
    assert copies[0]["session"]["payment"]["transaction"] == hx(h("tx:s1"))

    upper = f"/v1/attestations/{hx(TEE_A).upper().replace('0X', '0x')}/{hx(a1.input_hash)}"
    assert len((await get_json(client, upper))["attestations"]) == 2
    unknown = f"/v1/attestations/{hx(TEE_A)}/0x{'ab' * 32}"
    assert (await get_json(client, unknown, status=404))["error"] == "not_found"

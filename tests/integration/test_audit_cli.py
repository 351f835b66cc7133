"""`facilitator audit ...` run in-process (`run_audit` with a parsed namespace) against a real
PostgreSQL database: the same queries, validation and shapes as the HTTP API."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
from harness import db_fetch

from facilitator.audit import cli
from facilitator.audit.cli import add_audit_parser, run_audit
from facilitator.audit.queries import SETTLEMENT_FIELD_NAMES
from facilitator.config import ConfigError

BASE = datetime(2025, 3, 1, tzinfo=UTC)
PAYERS = ["0x" + "a1" * 20, "0x" + "a2" * 20]
PAY_TO = "0x" + "b1" * 20
ASSET = "0x" + "c1" * 20
ROWS = 30  # amount = i, payer = PAYERS[i % 2], state: every 3rd pending, others confirmed


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="facilitator")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["audit", *argv])


@pytest.fixture
async def db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """ROWS settlements, one hour apart; DATABASE_URL points at them."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("""
            INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer,
                pay_to, amount, nonce, valid_after, valid_before, signature, fingerprint,
                call_to, calldata, state, created_at)
            SELECT 'exact', 2, 'eip155:84532', 84532, $1,
                   CASE WHEN i % 2 = 0 THEN $2::bytea ELSE $3::bytea END, $4, i,
                   sha256(int8send(i)), 0, 4102444800, decode(repeat('1b', 65), 'hex'),
                   sha256(int8send(-i)), $1, '\\x'::bytea, 'pending',
                   $5::timestamptz + i * interval '1 hour'
            FROM generate_series(1, $6::int) AS i""",
            bytes.fromhex(ASSET[2:]), bytes.fromhex(PAYERS[0][2:]),
            bytes.fromhex(PAYERS[1][2:]), bytes.fromhex(PAY_TO[2:]), BASE, ROWS)
        await conn.execute("""
            UPDATE settlements SET state = 'included', tx_hash = sha256(int8send(amount::bigint)),
                block_number = 100 + id, block_hash = sha256(int8send(-id)), log_index = 0,
                settled_by = 'facilitator', included_at = clock_timestamp()
            WHERE amount % 3 <> 0""")
        await conn.execute("""UPDATE settlements SET state = 'confirmed',
                              confirmed_at = clock_timestamp() WHERE state = 'included'""")
    finally:
        await conn.close()
    monkeypatch.setenv("DATABASE_URL", database_url)
    return database_url


def tx_of(amount: int) -> str:
    return "0x" + hashlib.sha256(amount.to_bytes(8, "big", signed=True)).hexdigest()


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await run_audit(parse(*argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_settlements_json_and_table(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run(capsys, "settlements", "--payer", PAYERS[1], "--state",
                               "confirmed", "--format", "json", "--limit", "1000")
    assert code == 0, err
    page = orjson.loads(out)
    assert [s["amount"] for s in page["settlements"]] == [
        str(i) for i in range(1, ROWS + 1) if i % 2 == 1 and i % 3 != 0]
    assert list(page["settlements"][0]) == list(SETTLEMENT_FIELD_NAMES)
    assert page["nextCursor"] is None

    code, out, err = await run(capsys, "settlements", "--min-amount", "10", "--max-amount", "12",
                               "--order", "desc")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["id", "createdAt", "state", "network", "payer", "payTo",
                                "amount", "transaction"]
    assert [line.split()[6] for line in lines[1:]] == ["12", "11", "10"]
    assert lines[2].split()[2] == "confirmed" and lines[2].split()[7] == tx_of(11)
    assert lines[1].split()[2] == "pending" and len(lines[1].split()) == 7  # no transaction


async def test_settlements_paging_through_the_cli(db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    argv = ["settlements", "--limit", "7", "--format", "json", "--from", "2025-03-01T05:00:00Z"]
    while True:
        code, out, err = await run(capsys, *argv)
        assert code == 0, err
        page = orjson.loads(out)
        seen += [s["amount"] for s in page["settlements"]]
        if page["nextCursor"] is None:
            assert "--cursor" not in err
            break
        assert f"--cursor {page['nextCursor']}" in err
        argv = [*argv[:5], "--cursor", page["nextCursor"]]
    assert seen == [str(i) for i in range(5, ROWS + 1)]


async def test_settlement_detail(db: str, database_url: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    [settlement] = await db_fetch(database_url, "SELECT public_id::text, block_number "
                                  "FROM settlements WHERE amount = 4")
    public_id, block = settlement["public_id"], settlement["block_number"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("""INSERT INTO chain_cursors (chain_id, network, head_number,
                              head_hash) VALUES (84532, 'eip155:84532', 1000, $1)""", b"\0" * 32)
    finally:
        await conn.close()
    code, out, err = await run(capsys, "settlement", public_id)
    assert code == 0, err
    body = orjson.loads(out)
    assert body["id"] == public_id and body["transaction"] == tx_of(4)
    assert body["confirmations"] == 1000 - block + 1
    assert [e["to"] for e in body["timeline"]] == ["pending", "included", "confirmed"]

    code, out, err = await run(capsys, "settlement", str(uuid.uuid4()))
    assert code == 1 and out == "" and "no settlement" in err
    code, out, err = await run(capsys, "settlement", "42")
    assert code == 2 and "ID: must be a settlement id" in err


async def test_totals(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run(capsys, "totals", "--by", "payer", "--format", "json")
    assert code == 0, err
    body = orjson.loads(out)
    assert body["states"] == ["confirmed", "included"]
    settled = [i for i in range(1, ROWS + 1) if i % 3 != 0]
    assert body["groups"] == [
        {"key": payer, "chainId": 84532, "asset": ASSET,
         "count": len([i for i in settled if PAYERS[i % 2] == payer]),
         "amount": str(sum(i for i in settled if PAYERS[i % 2] == payer))}
        for payer in PAYERS]

    code, out, err = await run(capsys, "totals", "--by", "day", "--state", "pending")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["key", "chainId", "asset", "count", "amount"]
    day1 = [i for i in range(1, 24) if i % 3 == 0]  # hours 1..23 of March 1st
    day2 = [i for i in range(24, ROWS + 1) if i % 3 == 0]
    assert [line.split() for line in lines[1:]] == [
        ["2025-03-01", "84532", ASSET, str(len(day1)), str(sum(day1))],
        ["2025-03-02", "84532", ASSET, str(len(day2)), str(sum(day2))]]


async def test_totals_follow_every_page(db: str, database_url: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    conn = await asyncpg.connect(database_url)
    try:  # 1,205 distinct payers: more than one page of totals
        await conn.execute("""
            INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer,
                pay_to, amount, nonce, valid_after, valid_before, signature, fingerprint,
                call_to, calldata, state)
            SELECT 'exact', 2, 'eip155:84532', 84532, $1, decode(lpad(to_hex(i), 40, '0'),
                   'hex'), $1, 1, sha256(int8send(1000000 + i)), 0, 1, '\\x00'::bytea,
                   sha256(int8send(2000000 + i)), $1, '\\x'::bytea, 'pending'
            FROM generate_series(1, 1205) AS i""", bytes.fromhex(ASSET[2:]))
    finally:
        await conn.close()
    code, out, err = await run(capsys, "totals", "--by", "payer", "--state", "pending",
                               "--format", "json")
    assert code == 0, err
    groups = orjson.loads(out)["groups"]
    assert len(groups) == 1205 + 2  # plus the two seeded payers
    assert len({g["key"] for g in groups}) == len(groups)


async def test_export_to_stdout_and_to_a_file(db: str, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    code, out, err = await run(capsys, "export", "--format", "jsonl", "--state", "confirmed")
    assert code == 0, err
    items = [orjson.loads(line) for line in out.splitlines()]
    assert [int(i["amount"]) for i in items] == [i for i in range(1, ROWS + 1) if i % 3 != 0]
    assert "exported 20 settlement(s)" in err

    code, listed, err = await run(capsys, "settlements", "--state", "confirmed", "--format",
                                  "json")
    assert items == orjson.loads(listed)["settlements"]  # the same shape as the API

    target = tmp_path / "audit.csv"
    code, out, err = await run(capsys, "export", "--format", "csv", "--output", str(target),
                               "--order", "desc")
    assert code == 0 and out == "", err
    assert not (tmp_path / "audit.csv.partial").exists()
    table = list(csv.reader(io.StringIO(target.read_text(), newline="")))
    assert table[0] == list(SETTLEMENT_FIELD_NAMES)
    assert [row[SETTLEMENT_FIELD_NAMES.index("amount")] for row in table[1:]] == [
        str(i) for i in range(ROWS, 0, -1)]


async def test_failed_export_leaves_no_file(db: str, database_url: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fmt: str) -> object:
        class Encoder:
            def header(self) -> bytes:
                return b"header\n"

            def encode(self, rows: object) -> bytes:
                raise RuntimeError("disk full")
        return Encoder()

    monkeypatch.setattr(cli, "encoder", broken)
    target = tmp_path / "audit.jsonl"
    with pytest.raises(RuntimeError):
        await run_audit(parse("export", "--format", "jsonl", "--output", str(target)))
    assert not target.exists() and not (tmp_path / "audit.jsonl.partial").exists()


async def test_unmatched(db: str, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for n in range(3):
            await conn.execute("""
                INSERT INTO chain_transfers (chain_id, block_number, block_hash, tx_hash,
                    log_index, asset, from_address, to_address, amount, observed_at)
                VALUES (84532, $1, $2, $3, 0, $4, $5, $6, $7, $8)""",
                500 + n, bytes([n]) * 32, bytes([n + 1]) * 32, bytes.fromhex(ASSET[2:]),
                bytes.fromhex(PAYERS[n % 2][2:]), bytes.fromhex(PAY_TO[2:]), 7 + n,
                BASE + timedelta(minutes=n))
    finally:
        await conn.close()
    code, out, err = await run(capsys, "unmatched", "--payer", PAYERS[0], "--format", "json")
    assert code == 0, err
    assert [t["amount"] for t in orjson.loads(out)["transfers"]] == ["7", "9"]
    code, out, err = await run(capsys, "unmatched", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3 and "--cursor" in err


@pytest.mark.parametrize(("argv", "option"), [
    (["settlements", "--payer", "0xnope"], "--payer"),
    (["settlements", "--pay-to", "'; DROP TABLE settlements; --"], "--pay-to"),
    (["settlements", "--state", "settled"], "--state"),
    (["settlements", "--from", "2025-03-01"], "--from"),
    (["settlements", "--min-amount", "007"], "--min-amount"),
    (["settlements", "--limit", "5000"], "--limit"),
    (["settlements", "--cursor", "abc"], "--cursor"),
    (["settlements", "--order", "up"], "--order"),
    (["totals", "--by", "asset"], "--by"),
    (["export", "--format", "xlsx"], "--format"),
    (["unmatched", "--tx", "0x00"], "--tx"),
])
async def test_invalid_options_exit_2_naming_them(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  argv: list[str], option: str) -> None:
    # Validation happens before any connection: no database is needed to refuse bad input.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    code, out, err = await run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"facilitator audit {argv[0]}: {option}: "), err


async def test_database_url_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        await run_audit(parse("settlements"))

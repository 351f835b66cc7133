"""The planted world of the attestation cross-check tests (test_crosscheck.py, and the
auditors' findings API in test_findings_api.py): rows written with SQL through the schema's
constraints and the settlement transition trigger (settlements inserted `pending`, then moved
through legal transitions), an honest world (`seed_honest`), and one planter per discrepancy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from facilitator.adapters.metrics import Metrics
from facilitator.core.crosscheck import CrossCheckPolicy
from facilitator.services.crosscheck import CrossChecker

BASE = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = (BASE - timedelta(hours=1), BASE + timedelta(hours=2))
PAY_CHAIN, OG_CHAIN, OTHER_OG_CHAIN = 84532, 10740, 10741
ASSET = bytes.fromhex("c1" * 20)
FACILITATOR = bytes.fromhex("fa" * 20)
SIGNER = bytes.fromhex("5e" * 20)


def h(label: str, size: int = 32) -> bytes:
    return hashlib.sha256(label.encode()).digest()[:size]


def addr(label: str) -> bytes:
    return h("address:" + label, 20)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def unix(seconds: float) -> int:
    return int(at(seconds).timestamp())


TEE_A, TEE_B, TEE_U = h("tee-a"), h("tee-b"), h("tee-u")
PAY_A, PAY_B, PAY_U = addr("pay-a"), addr("pay-b"), addr("pay-u")
PAYERS = [addr(f"payer-{i}") for i in range(8)]


@dataclass(frozen=True)
class Att:
    id: int
    tee_id: bytes
    input_hash: bytes
    output_hash: bytes
    signature: bytes
    tee_timestamp: int


@dataclass
class World:
    pool: asyncpg.Pool
    sessions: dict[str, int] = field(default_factory=dict)
    settlements: dict[str, int] = field(default_factory=dict)
    attestations: dict[str, Att] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)


# -- planting rows --------------------------------------------------------------------------------

async def plant_settlement(conn: asyncpg.Connection, label: str, *, payer: bytes, pay_to: bytes,
                           amount: int, cap: int, deadline: int, state: str = "confirmed",
                           block: int = 100, block_time: datetime = at(150),
                           log_index: int = 0) -> int:
    """A permit2 settlement driven from pending to `state`, its block and its Transfer log."""
    nonce, tx = h("nonce:" + label), h("tx:" + label)
    sid = await conn.fetchval("""
        INSERT INTO settlements (scheme, x402_version, network, chain_id, asset, payer, pay_to,
            amount, nonce, valid_after, valid_before, signature, fingerprint, call_to, calldata,
            state, transfer_method, cap_amount)
        VALUES ('upto', 2, 'eip155:84532', $1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $2,
                '\\x'::bytea, 'pending', 'permit2', $10) RETURNING id""",
        PAY_CHAIN, ASSET, payer, pay_to, amount, nonce, deadline, b"\x1b" * 65,
        h("fingerprint:" + label), cap)
    if state == "failed":
        await conn.execute("""UPDATE settlements SET state = 'failed', reason = 'expired',
                              failed_at = clock_timestamp() WHERE id = $1""", sid)
        return sid
    block_hash = h(f"block:{PAY_CHAIN}:{block}")
    await conn.execute("""
        UPDATE settlements SET state = 'included', tx_hash = $2, block_number = $3,
            block_hash = $4, log_index = $5, settled_by = 'facilitator', included_at = $6
        WHERE id = $1""", sid, tx, block, block_hash, log_index, block_time + timedelta(seconds=2))
    if state == "confirmed":
        await conn.execute("""UPDATE settlements SET state = 'confirmed', confirmed_at = $2
                              WHERE id = $1""", sid, block_time + timedelta(seconds=30))
    await conn.execute("""
        INSERT INTO chain_blocks (chain_id, number, hash, parent_hash, timestamp)
        VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
        PAY_CHAIN, block, block_hash, h(f"block:{PAY_CHAIN}:{block - 1}"), block_time)
    await plant_transfer(conn, sid, tx=tx, block=block, log_index=log_index, payer=payer,
                         pay_to=pay_to, amount=amount)
    return sid


async def plant_transfer(conn: asyncpg.Connection, settlement_id: int, *, tx: bytes, block: int,
                         log_index: int, payer: bytes, pay_to: bytes, amount: int) -> None:
    block_hash = h(f"block:{PAY_CHAIN}:{block}")
    await conn.execute("""
        INSERT INTO chain_transfers (chain_id, block_number, block_hash, tx_hash, log_index, asset,
            from_address, to_address, amount, settlement_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        PAY_CHAIN, block, block_hash, tx, log_index, ASSET, payer, pay_to, amount, settlement_id)


async def plant_session(world: World, conn: asyncpg.Connection, label: str, *, payer: bytes,
                        pay_to: bytes, amount: int | None, cap: int = 1_000,
                        deadline_s: float = 300, created_s: float = 0, state: str = "confirmed",
                        block: int = 100, block_time: datetime = at(150),
                        gateway_session_id: str | None = None) -> int:
    """An upto session; with `amount`, its settlement in `state` (None: never settled)."""
    deadline = unix(deadline_s)
    settlement_id = None
    if amount is not None:
        settlement_id = await plant_settlement(conn, label, payer=payer, pay_to=pay_to,
                                               amount=amount, cap=cap, deadline=deadline,
                                               state=state, block=block, block_time=block_time)
        world.settlements[label] = settlement_id
    session_id = await conn.fetchval("""
        INSERT INTO upto_sessions (chain_id, payer, nonce, asset, pay_to, facilitator, cap,
            deadline, valid_after, gateway_session_id, verified_at, verifications,
            settled_amount, settled_at, settlement_id, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, 1, $11, $12, $13, $10)
        RETURNING id""",
        PAY_CHAIN, payer, h("nonce:" + label), ASSET, pay_to, FACILITATOR, cap, deadline,
        gateway_session_id, at(created_s), amount,
        None if amount is None else block_time - timedelta(seconds=10), settlement_id)
    world.sessions[label] = session_id
    return session_id


async def plant_attestation(world: World, conn: asyncpg.Connection, label: str, *, tee: bytes,
                            mode: str = "batch", session: str | None = None,
                            session_ref: str = "", cost: int | None = 10,
                            verification: str = "valid", tee_s: float = 20,
                            received_s: float = 25, same_as: str | None = None) -> Att:
    """A posted attestation (its hashes and signature derived from `label`, or copied from
    the attestation `same_as`: the same inference posted for another session)."""
    source = world.attestations.get(same_as or "")
    inp = source.input_hash if source else h("in:" + label)
    out = source.output_hash if source else h("out:" + label)
    sig = source.signature if source else h("sig:" + label) * 8
    ts = source.tee_timestamp if source else unix(tee_s)
    session_id = world.sessions[session] if session else None
    ref = session_ref or (f"gw-{session}" if session else "")
    attestation_id = await conn.fetchval("""
        INSERT INTO attestations (mode, tee_id, input_hash, output_hash, tee_signature,
            tee_timestamp, session_ref, session_id, cost_opg, verification, verified_at,
            relay_state, received_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                CASE WHEN $10 = 'pending' THEN NULL ELSE $11::timestamptz + interval '2 s' END,
                'none', $11)
        RETURNING id""",
        mode, tee if not source else source.tee_id, inp, out, sig, ts, ref, session_id, cost,
        verification, at(received_s))
    att = Att(attestation_id, tee if not source else source.tee_id, inp, out, sig, ts)
    world.attestations[label] = att
    return att


async def plant_batch(world: World, conn: asyncpg.Connection, label: str, leaves: list[Att], *,
                      status: str = "valid", chain_id: int = OG_CHAIN, block: int = 500,
                      block_time: datetime = at(600), size: int | None = None) -> int:
    batch_id = await conn.fetchval("""
        INSERT INTO og_batches (chain_id, tx_hash, block_number, block_hash, block_time,
            log_index, merkle_root, batch_size, blob_id, dump_status, dump_checked_at,
            dump_root, dump_leaf_count, dump_error)
        VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id""",
        chain_id, h("og-tx:" + label), block, h(f"og-block:{chain_id}:{block}"), block_time,
        h("root:" + label), size if size is not None else len(leaves), "blob-" + label, status,
        *planted_dump_check(label, status, len(leaves), block_time))
    for index, leaf in enumerate(leaves if status == "valid" else []):
        await conn.execute("""
            INSERT INTO og_batch_leaves (batch_id, leaf_index, tee_id, input_hash, output_hash,
                tee_signature, tee_timestamp, proof)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)""",
            batch_id, index, leaf.tee_id, leaf.input_hash, leaf.output_hash, leaf.signature,
            leaf.tee_timestamp, json.dumps(proof_of(label, index)))
    world.batches[label] = batch_id
    return batch_id


def planted_dump_check(label: str, status: str, leaves: int, block_time: datetime
                       ) -> tuple[datetime | None, bytes | None, int | None, str | None]:
    """(checked at, recomputed root, leaf count, error) as the dump check stores them: the
    root the dump yields is the posted one only for a valid dump."""
    if status == "pending":
        return None, None, None, None
    checked_at = block_time + timedelta(seconds=5)
    if status in ("malformed", "unavailable"):
        return checked_at, None, None, f"{status} dump of {label}"
    root = h(("root:" if status == "valid" else "dump-root:") + label)
    return checked_at, root, leaves, None


def proof_of(batch: str, index: int) -> list[str]:
    return ["0x" + h(f"proof:{batch}:{index}:{i}").hex() for i in range(2)]


async def plant_individual(conn: asyncpg.Connection, att: Att, *, block: int = 480,
                           block_time: datetime = at(60)) -> None:
    await conn.execute("""
        INSERT INTO og_individual_settlements (chain_id, tx_hash, block_number, block_hash,
            block_time, log_index, tee_id, eth_address, input_hash, output_hash, tee_timestamp,
            blob_id, tee_signature)
        VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9, $10, 'blob-individual', $11)""",
        OG_CHAIN, h(f"og-individual-tx:{att.id}"), block, h(f"og-block:{OG_CHAIN}:{block}"),
        block_time, att.tee_id, addr("permit2-proxy"), att.input_hash, att.output_hash,
        att.tee_timestamp, att.signature)


async def plant_tee(conn: asyncpg.Connection, tee: bytes, payment_address: bytes) -> None:
    await conn.execute("""
        INSERT INTO tee_keys (chain_id, tee_id, public_key, owner, payment_address, endpoint,
            registered_block) VALUES ($1, $2, $3, $4, $5, 'https://tee.example', 10)""",
        OG_CHAIN, tee, b"\x30\x82" + tee, addr("owner"), payment_address)
    await conn.execute("""
        INSERT INTO tee_events (chain_id, tee_id, kind, block_number, block_hash, block_time,
            tx_hash, log_index) VALUES ($1, $2, 'registered', 10, $3, $4, $5, 0)""",
        OG_CHAIN, tee, h(f"og-block:{OG_CHAIN}:10:{tee.hex()}"), BASE - timedelta(days=1),
        h("register:" + tee.hex()))


async def plant_og_head(conn: asyncpg.Connection, head_time: datetime) -> None:
    """The OpenGradient watcher has processed the chain up to `head_time`."""
    head_hash = h(f"og-block:{OG_CHAIN}:900")
    await conn.execute("""
        INSERT INTO chain_blocks (chain_id, number, hash, parent_hash, timestamp)
        VALUES ($1, 900, $2, $3, $4)""", OG_CHAIN, head_hash, h("og-parent"), head_time)
    await conn.execute("""
        INSERT INTO chain_cursors (chain_id, network, head_number, head_hash)
        VALUES ($1, 'opengradient', 900, $2)""", OG_CHAIN, head_hash)


async def seed_honest(pool: asyncpg.Pool) -> World:
    """Linked sessions s1 (3 x 10: two batch leaves, one individual record) and s2 (1 x 5,
    payer+nonce reference), both paid exactly; an unlinked payee U (two private attestations
    of 5, one session paying 10, in the same hour); a valid batch; the OG watcher synced."""
    world = World(pool)
    async with pool.acquire() as conn, conn.transaction():
        for tee, pay_to in ((TEE_A, PAY_A), (TEE_B, PAY_B), (TEE_U, PAY_U)):
            await plant_tee(conn, tee, pay_to)
        await plant_og_head(conn, BASE + timedelta(days=1))
        await plant_session(world, conn, "s1", payer=PAYERS[0], pay_to=PAY_A, amount=30,
                            gateway_session_id="gw-s1")
        await plant_session(world, conn, "s2", payer=PAYERS[1], pay_to=PAY_B, amount=5,
                            block=101, block_time=at(160))
        a1 = await plant_attestation(world, conn, "a1", tee=TEE_A, session="s1", tee_s=20)
        a2 = await plant_attestation(world, conn, "a2", tee=TEE_A, session="s1", tee_s=40)
        a3 = await plant_attestation(world, conn, "a3", tee=TEE_A, session="s1", tee_s=60,
                                     mode="individual", received_s=65)
        b1 = await plant_attestation(world, conn, "b1", tee=TEE_B, session="s2", cost=5)
        await plant_batch(world, conn, "g1", [a1, b1])
        await plant_batch(world, conn, "g2", [a2], block=501, block_time=at(620))
        await plant_individual(conn, a3)
        await plant_attestation(world, conn, "u1", tee=TEE_U, mode="private", cost=5,
                                tee_s=600, received_s=605)
        await plant_attestation(world, conn, "u2", tee=TEE_U, mode="private", cost=5,
                                tee_s=700, received_s=705)
        await plant_session(world, conn, "su", payer=PAYERS[2], pay_to=PAY_U, amount=10,
                            created_s=590, deadline_s=900, block=120, block_time=at(820))
    # s2 is linked by payer and nonce, as the gateway may name it (no gateway session id)
    await pool.execute("""UPDATE attestations SET session_ref = '', payer = $2,
                          permit_nonce = $3 WHERE id = $1""",
                       world.attestations["b1"].id, PAYERS[1], h("nonce:s2"))
    return world


# -- the checker over the world -------------------------------------------------------------------

def checker_for(world: World, metrics: Metrics, *, now: datetime | None = None,
                policy: CrossCheckPolicy | None = None) -> CrossChecker:
    clock = (lambda: now) if now is not None else None
    return CrossChecker(world.pool, metrics, policy or CrossCheckPolicy(), og_chain_id=OG_CHAIN,
                        clock=clock)


# -- one planter per discrepancy (test_crosscheck.SCENARIOS) -------------------------------------

Plant = Callable[[World, asyncpg.Connection], Awaitable[None]]


async def forged_signature(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE attestations SET verification = 'invalid_signature' WHERE id = $1",
                       world.attestations["a1"].id)


async def recomputed_hashes_differ(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE attestations SET verification = 'hash_mismatch' WHERE id = $1",
                       world.attestations["a3"].id)


async def unknown_tee(world: World, conn: asyncpg.Connection) -> None:
    att = await plant_attestation(world, conn, "x1", tee=h("tee-nobody"), mode="private",
                                  cost=None)
    await conn.execute("UPDATE attestations SET verification = 'unknown_tee' WHERE id = $1",
                       att.id)


async def disabled_tee(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("""
        INSERT INTO tee_events (chain_id, tee_id, kind, block_number, block_hash, block_time,
            tx_hash, log_index) VALUES ($1, $2, 'disabled', 11, $3, $4, $5, 0)""",
        OG_CHAIN, TEE_A, h("og-block:disable"), BASE, h("disable-tx"))
    await conn.execute("UPDATE attestations SET verification = 'tee_disabled' WHERE id = $1",
                       world.attestations["a2"].id)


async def missing_batch(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM og_batches WHERE id = $1", world.batches["g2"])


async def strangers_batch(world: World, conn: asyncpg.Connection) -> None:
    """The leaf was posted, but only by someone the watcher does not trust: it stored no such
    event on the configured chain (here: the copy sits on another chain's records)."""
    await conn.execute("DELETE FROM og_batches WHERE id = $1", world.batches["g2"])
    await plant_batch(world, conn, "stranger", [world.attestations["a2"]],
                      chain_id=OTHER_OG_CHAIN, block=502)


async def missing_individual_record(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM og_individual_settlements")


async def tampered_dump(world: World, conn: asyncpg.Connection) -> None:
    await plant_batch(world, conn, "tampered", [world.attestations["a1"]],
                      status="root_mismatch", block=503, block_time=at(900), size=7)


def amount(value: int) -> Plant:
    async def plant(world: World, conn: asyncpg.Connection) -> None:
        await conn.execute("UPDATE settlements SET amount = $2 WHERE id = $1",
                           world.settlements["s1"], value)
    return plant


async def over_cap(world: World, conn: asyncpg.Connection) -> None:
    # upto_sessions refuses a settled amount above its cap; the payment on chain is what it is
    await conn.execute("UPDATE upto_sessions SET cap = 25, settled_amount = 25 WHERE id = $1",
                       world.sessions["s1"])


async def payto_mismatch(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE tee_keys SET payment_address = $2 WHERE tee_id = $1", TEE_A,
                       addr("tee-a-registered"))


async def inference_in_two_sessions(world: World, conn: asyncpg.Connection) -> None:
    await plant_session(world, conn, "s3", payer=PAYERS[3], pay_to=PAY_A, amount=10,
                        block=102, block_time=at(170))
    await plant_attestation(world, conn, "a1-again", tee=TEE_A, session="s3", same_as="a1")


async def nonce_settled_twice(world: World, conn: asyncpg.Connection) -> None:
    await plant_transfer(conn, world.settlements["s1"], tx=h("tx:s1:second"), block=104,
                         log_index=5, payer=PAYERS[0], pay_to=PAY_A, amount=30)


async def late_settlement(world: World, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE chain_blocks SET timestamp = $2 WHERE chain_id = $1 AND "
                       "number = 100", PAY_CHAIN, at(301))


async def paid_without_attestation(world: World, conn: asyncpg.Connection) -> None:
    await plant_session(world, conn, "s4", payer=PAYERS[4], pay_to=PAY_A, amount=10,
                        block=105, block_time=at(200))


async def attested_never_paid(world: World, conn: asyncpg.Connection) -> None:
    await plant_session(world, conn, "s5", payer=PAYERS[5], pay_to=PAY_A, amount=None)
    await plant_attestation(world, conn, "a5", tee=TEE_A, session="s5", mode="private")


async def unlinked_gap(world: World, conn: asyncpg.Connection) -> None:
    for i in range(3):
        await plant_attestation(world, conn, f"u-gap-{i}", tee=TEE_U, mode="private", cost=5,
                                tee_s=3600 + 600 + i, received_s=3600 + 605 + i)

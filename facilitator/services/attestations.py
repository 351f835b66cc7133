"""Attestation ingestion (`POST /settle_data`, OpenGradient's facilitator API) and verification.

A TEE gateway posts every inference's signed `(input hash, output hash, timestamp)`; we store
it with its settlement mode and, when the gateway names it, the upto session it was paid by.
A background pass then verifies each one, in this precedence: the TEE is in the registry at
`tee_timestamp` (else `unknown_tee`), the RSA-PSS signature verifies under the registry's key,
whose keccak256 is the tee id (else `invalid_signature`; also when the registry holds a key that
cannot be parsed), the TEE was enabled at `tee_timestamp` (else `tee_disabled`), and — for
individual records that carry the full request and response — the recomputed hashes match (else
`hash_mismatch`): as a chat completion when the request has `messages`, as a text completion
(`/v1/completions`) when it has `prompt`, canonicalised exactly as OpenGradient's gateway does.

Timestamp bound at ingestion: `tee_timestamp` must fit a signed 64-bit integer (what is stored)
and be at most `MAX_FUTURE_S` = `REGISTRATION_SKEW_S` (300 s, the registration skew the
registry check allows) + 1 hour ahead of this server's clock; anything later is refused with
HTTP 400 naming `tee_timestamp`. A record ahead of the OpenGradient chain by less than that
waits (pending) until the chain's history reaches it, which it does within that hour.

Guarantees: bad data is a `BadRequest` naming the field and nothing is stored; a record posted
twice is stored once; a verdict is only given once the registry history covering the record's
timestamp has been read from the chain (until then the record stays `pending`), and records
that wait can never hold back records that can be decided (they are filtered in SQL before the
batch limit); a verification pass reads the registry facts of all its TEEs in two statements
and parses each TEE key once (cached by tee id).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from facilitator.adapters.attestations import (
    REGISTRATION_SKEW_S,
    AttestationStore,
    NewAttestation,
    PendingAttestation,
    TeeHistory,
)
from facilitator.adapters.metrics import Metrics
from facilitator.core.attestation import (
    AttestationFieldError,
    InvalidTeeKey,
    TeeKeyRing,
    TeePublicKey,
    decode_settlement_data,
    parse_settlement_payload,
    signed_hash_candidates,
    verify_record,
)
from facilitator.invariant import invariant
from facilitator.protocol import fields as f
from facilitator.protocol.fields import BadRequest

log = logging.getLogger("facilitator.attestations")

VERIFY_BATCH = 500
UNSYNCED_GRACE_S = 120.0  # without an OpenGradient watcher, decide after this long
MAX_FUTURE_S = REGISTRATION_SKEW_S + 3600  # how far ahead of our clock a tee_timestamp may be
MAX_TIMESTAMP = (1 << 63) - 1  # the column is a bigint


def settlement_type(header: str | None) -> str:
    """OpenGradient's normalisation: case, spaces, '-' and '_' ignored, two known misspellings
    accepted, anything else (or nothing) is batch."""
    text = re.sub(r"[\s_-]", "", (header or "").lower())
    return {"private": "private", "pivate": "private", "individual": "individual",
            "inidvidual": "individual"}.get(text, "batch")


def _decode(header: str | None) -> dict[str, Any]:
    if not header:
        raise BadRequest("x-settlement-data", "header is required (base64 of a JSON object)")
    try:
        return decode_settlement_data(header)
    except AttestationFieldError as exc:
        raise BadRequest(exc.field, exc.reason) from None


def _check_timestamp(tee_timestamp: int, now: float) -> None:
    if tee_timestamp > MAX_TIMESTAMP:
        raise BadRequest("tee_timestamp", "must be at most 2^63-1 (unix seconds)")
    if tee_timestamp > now + MAX_FUTURE_S:
        raise BadRequest("tee_timestamp", f"is more than {MAX_FUTURE_S} s ahead of this "
                                          "server's clock")


def _session_reference(payload: dict[str, Any]) -> tuple[str, bytes | None, bytes | None]:
    """Our extension: `session: {id?, payer?, nonce?}` names the upto payment."""
    ref = payload.get("session")
    if ref is None:
        return "", None, None
    obj = f.require_object(ref, "session")
    session_id = f.text(obj["id"], "session.id", max_length=128) if obj.get("id") else ""
    payer = nonce = None
    if obj.get("payer") is not None or obj.get("nonce") is not None:
        payer = bytes.fromhex(f.address(obj.get("payer"), "session.payer")[2:])
        nonce = f.uint256_decimal(obj.get("nonce"), "session.nonce").to_bytes(32, "big")
    return session_id, payer, nonce


class AttestationService:
    def __init__(self, store: AttestationStore, metrics: Metrics, *,
                 interval_s: float = 1.0) -> None:
        self._store = store
        self._metrics = metrics
        self._interval_s = interval_s
        self._keys = TeeKeyRing()

    async def ingest(self, mode_header: str | None, data_header: str | None) -> dict[str, Any]:
        """Store one posted attestation; the 202 body OpenGradient's facilitator answers."""
        mode = settlement_type(mode_header)
        payload = _decode(data_header)
        if mode == "individual" and not payload.get("eth_address"):
            mode = "batch"  # as OpenGradient's facilitator falls back
        try:
            data = parse_settlement_payload(payload, individual=mode == "individual")
        except AttestationFieldError as exc:
            raise BadRequest(exc.field, exc.reason) from None
        _check_timestamp(data.record.tee_timestamp, time.time())
        session_ref, payer, nonce = _session_reference(payload)
        cost = payload.get("cost_opg")
        new = NewAttestation(
            mode=mode, record=data.record, session_ref=session_ref, payer=payer,
            permit_nonce=nonce,
            cost_opg=None if cost is None else f.uint256_decimal(cost, "cost_opg"),
            eth_address=bytes.fromhex(data.eth_address[2:]) if data.eth_address else None,
            request_body=data.input, response_body=data.output)
        attestation_id, created = await self._store.insert(new)
        if created:
            self._metrics.attestations_received.labels(mode).inc()
        if mode == "private":
            return {"settlementJob": None}
        return {"settlementJob": {"jobId": f"data-{attestation_id}", "status": "queued",
                                  "settlementType": mode}}

    async def run(self) -> None:
        while True:
            try:
                await self._store.link_sessions()
                await self.verify_pending()
            except Exception:  # noqa: BLE001 - retried next pass; state is in the database
                log.exception("attestation verification pass failed")
            await asyncio.sleep(self._interval_s)

    async def verify_pending(self) -> int:
        """Verify what can be decided now; returns how many verdicts were given."""
        batch = await self._store.pending(VERIFY_BATCH, UNSYNCED_GRACE_S)
        if not batch:
            return 0
        tee_ids = {p.record.tee_id for p in batch}
        parsed = {t: key for t in tee_ids if (key := self._keys.get(t)) is not None}
        registry = await self._store.registry(
            tee_ids, known_keys=parsed.keys(),
            until_unix=max(p.record.tee_timestamp for p in batch) + REGISTRATION_SKEW_S)
        results = []
        for pending in batch:
            started = time.perf_counter()
            result = self._verdict(pending, registry.get(pending.record.tee_id), parsed)
            self._metrics.attestation_verify_seconds.observe(time.perf_counter() - started)
            self._metrics.attestations_verified.labels(result).inc()
            results.append((pending.id, result))
        await self._store.set_verification(results)
        return len(results)

    def _verdict(self, pending: PendingAttestation, tee: TeeHistory | None,
                 parsed: dict[bytes, TeePublicKey]) -> str:
        """`parsed`: the keys of this pass by tee id (from the cache, or parsed here once)."""
        record = pending.record
        enabled = None if tee is None else tee.enabled_at(record.tee_timestamp)
        if tee is None or enabled is None:
            return "unknown_tee"
        key = parsed.get(record.tee_id)
        if key is None:
            invariant(tee.public_key is not None, "the registry omits only keys the pass holds")
            try:
                key = parsed[record.tee_id] = self._keys.add(tee.public_key)
            except InvalidTeeKey:
                return "invalid_signature"  # no signature verifies under an unusable key
        if not verify_record(record, key):  # a forgery is reported as such, enabled or not
            return "invalid_signature"
        if not enabled:
            return "tee_disabled"
        if pending.mode == "individual" and not _hashes_match(pending):
            return "hash_mismatch"
        return "valid"


def _hashes_match(pending: PendingAttestation) -> bool:
    """Individual records carry the request and response: recompute both hashes (chat or
    completion, by the request's shape)."""
    try:
        candidates = signed_hash_candidates(pending.request_body, pending.response_body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    signed = (pending.record.input_hash, pending.record.output_hash)
    return any(candidate == signed for candidate in candidates)

"""Attestation ingestion (`POST /settle_data`, OpenGradient's facilitator API) and verification.

A TEE gateway posts every inference's signed `(input hash, output hash, timestamp)`; we store
it with its settlement mode and, when the gateway names it, the upto session it was paid by.
A background pass then verifies each one, in this precedence: the TEE is in the registry at
`tee_timestamp` (else `unknown_tee`), the RSA-PSS signature verifies under the registry's key,
whose keccak256 is the tee id (else `invalid_signature`), the TEE was enabled at `tee_timestamp`
(else `tee_disabled`), and — for individual records that carry the full request and response —
the recomputed hashes match (else `hash_mismatch`).

Guarantees: bad data is a `BadRequest` naming the field and nothing is stored; a record posted
twice is stored once; a verdict is only given once the registry history covering the record's
timestamp has been read from the chain (until then the record stays `pending`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from typing import Any

from facilitator.adapters.attestations import AttestationStore, NewAttestation, PendingAttestation
from facilitator.adapters.metrics import Metrics
from facilitator.core.attestation import (
    AttestationFieldError,
    TeeKeyRing,
    canonical_chat_request,
    chat_output_text,
    input_hash,
    output_hash,
    parse_settlement_payload,
    verify_record,
)
from facilitator.protocol import fields as f
from facilitator.protocol.fields import BadRequest

log = logging.getLogger("facilitator.attestations")

MAX_DATA_BYTES = 4 * 1024 * 1024
VERIFY_BATCH = 500
UNSYNCED_GRACE_S = 120.0  # without an OpenGradient watcher, decide after this long


def settlement_type(header: str | None) -> str:
    """OpenGradient's normalisation: case, spaces, '-' and '_' ignored, two known misspellings
    accepted, anything else (or nothing) is batch."""
    text = re.sub(r"[\s_-]", "", (header or "").lower())
    return {"private": "private", "pivate": "private", "individual": "individual",
            "inidvidual": "individual"}.get(text, "batch")


def _decode(header: str | None) -> dict[str, Any]:
    if not header:
        raise BadRequest("x-settlement-data", "header is required (base64 of a JSON object)")
    if len(header) > MAX_DATA_BYTES:
        raise BadRequest("x-settlement-data", f"must be at most {MAX_DATA_BYTES} bytes")
    try:
        payload = json.loads(base64.b64decode(header, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        raise BadRequest("x-settlement-data", "must be base64 of a JSON object") from None
    return dict(f.require_object(payload, "x-settlement-data"))


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
        synced_to = await self._store.og_processed_time()
        results = []
        for pending in await self._store.pending(VERIFY_BATCH):
            started = time.perf_counter()
            result = await self._verdict(pending, synced_to)
            if result is not None:
                self._metrics.attestation_verify_seconds.observe(time.perf_counter() - started)
                self._metrics.attestations_verified.labels(result).inc()
                results.append((pending.id, result))
        if results:
            await self._store.set_verification(results)
        return len(results)

    async def _verdict(self, pending: PendingAttestation, synced_to: Any) -> str | None:
        record = pending.record
        if not self._history_covers(record.tee_timestamp, pending, synced_to):
            return None
        state = await self._store.tee_state(record.tee_id, record.tee_timestamp)
        if state is None or state.enabled_at_time is None:
            return "unknown_tee"
        key = self._keys.get(record.tee_id) or self._keys.add(state.public_key)
        if not verify_record(record, key):  # a forgery is reported as such, enabled or not
            return "invalid_signature"
        if not state.enabled_at_time:
            return "tee_disabled"
        if pending.mode == "individual" and not _hashes_match(pending):
            return "hash_mismatch"
        return "valid"

    @staticmethod
    def _history_covers(tee_timestamp: int, pending: PendingAttestation, synced_to: Any) -> bool:
        """Has the registry history up to `tee_timestamp` been read from the chain?"""
        if synced_to is not None:
            return synced_to.timestamp() >= tee_timestamp
        return time.time() - pending.received_at.timestamp() > UNSYNCED_GRACE_S


def _hashes_match(pending: PendingAttestation) -> bool:
    """Individual records carry the request and response: recompute both hashes."""
    try:
        request = canonical_chat_request(pending.request_body)
        response = chat_output_text(pending.response_body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    return (input_hash(request) == pending.record.input_hash
            and output_hash(response) == pending.record.output_hash)


"""Our data-settlement relay (optional; on in the devnet), as OpenGradient's facilitator runs
one: batch attestations are collected (N of them, or the oldest T seconds old), an
OpenZeppelin-compatible `StandardMerkleTree` over `(teeId, inputHash, outputHash, teeSignature,
teeTimestamp)` is published to the blob store as its `standard-v1` dump, and `batchSettle(root,
size, blobId)` is sent to the OpenGradient relay contract; individual attestations publish their
request/response record and call `settleIndividual`.

Guarantees (the payment side's rules): a submission row exists before anything is published or
sent; the signed raw transaction is stored before it is sent, and a retry re-sends the same
bytes; an attestation is relayed at most once; one submission is in flight at a time, so the
relayer's nonces never collide; every wait and retry is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from facilitator.adapters.blobstore import BlobStoreClient, BlobStoreError
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.og_relay import RelayItem, RelayStore, Submission
from facilitator.adapters.signer import SignerKey, TxFields, sign_eip1559
from facilitator.core.attestation import LEAF_ENCODING
from facilitator.core.merkle import StandardMerkleTree
from facilitator.core.og_events import batch_settle_call, settle_individual_call
from facilitator.invariant import invariant
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.fields import to_checksum

log = logging.getLogger("facilitator.relay")

GAS_BATCH = 200_000
GAS_INDIVIDUAL = 600_000  # on-chain RSA-PSS verification
RESEND_AFTER_S = 5.0
MAX_SEND_ATTEMPTS = 20


class DataRelay:
    def __init__(self, *, store: RelayStore, chain: Chain, key: SignerKey,
                 blobs: BlobStoreClient, relay_contract: str, chain_id: int, metrics: Metrics,
                 batch_size: int, batch_age_s: float, interval_s: float = 0.5) -> None:
        self._store = store
        self._chain = chain
        self._key = key
        self._blobs = blobs
        self._contract = relay_contract
        self._chain_id = chain_id
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_age_s = batch_age_s
        self._interval_s = interval_s
        self._sent_at: dict[int, float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except (RpcUnavailable, BlobStoreError) as exc:
                log.warning("data relay waiting: %s", exc)
            except Exception:  # noqa: BLE001 - state is in the database; try again next pass
                log.exception("data relay pass failed")
            await asyncio.sleep(self._interval_s)

    async def step(self) -> None:
        await self._store.open_batch(self._batch_size, self._batch_age_s)
        await self._store.open_individuals(self._batch_size)
        for submission in await self._store.unfinished():
            if not await self._advance(submission):
                break  # one transaction in flight at a time

    async def _advance(self, submission: Submission) -> bool:
        """Move one submission as far as it can go now; False while it is in flight."""
        if submission.state == "pending":
            await self._publish(submission)
            return False  # picked up next pass, in order
        if submission.state == "published":
            await self._sign_and_send(submission)
            return False
        return await self._follow(submission)

    async def _publish(self, submission: Submission) -> None:
        items = await self._store.items(submission)
        if submission.kind == "batch":
            tree = StandardMerkleTree.of([_leaf(i) for i in items], LEAF_ENCODING)
            dump = tree.dump_json()
            blob_id = await self._blobs.put(dump)
            calldata = batch_settle_call(tree.root, len(items), blob_id)
            await self._store.published(submission.id, tree.root, dump, blob_id, calldata)
            return
        [item] = items
        record = _individual_record(item)
        blob_id = await self._blobs.put(record)
        calldata = settle_individual_call(
            item.tee_id, item.input_hash, item.output_hash, item.tee_timestamp,
            to_checksum("0x" + (item.eth_address or bytes(20)).hex()), blob_id,
            item.tee_signature)
        await self._store.published(submission.id, None, record, blob_id, calldata)

    async def _sign_and_send(self, submission: Submission) -> None:
        """Write-ahead: the signed bytes are stored, then sent."""
        invariant(submission.calldata is not None, "a published submission has call data")
        address = self._key.address.lower()
        nonce_hex, block = await asyncio.gather(
            self._chain.request("eth_getTransactionCount", [address, "pending"]),
            self._chain.request("eth_getBlockByNumber", ["latest", False]))
        base_fee = int(block.get("baseFeePerGas") or "0x0", 16)
        tip = 10**9
        tx = sign_eip1559(self._key, TxFields(
            chain_id=self._chain_id, nonce=int(nonce_hex, 16), max_priority_fee_per_gas=tip,
            max_fee_per_gas=2 * base_fee + tip,
            gas_limit=GAS_BATCH if submission.kind == "batch" else GAS_INDIVIDUAL,
            to=self._contract, value=0, data=submission.calldata))
        await self._store.signed(submission.id, int(nonce_hex, 16), tx.raw, tx.tx_hash)
        await self._send(submission.id, tx.raw)

    async def _send(self, submission_id: int, raw: bytes) -> None:
        self._sent_at[submission_id] = time.monotonic()
        try:
            await self._chain.request("eth_sendRawTransaction", ["0x" + raw.hex()])
        except RpcError as exc:
            if "already known" not in exc.message.lower():
                log.warning("relay submission %d refused: %s", submission_id, exc.message)
                return
        await self._store.advance(submission_id, "broadcast")

    async def _follow(self, submission: Submission) -> bool:
        invariant(submission.tx_hash is not None and submission.raw_tx is not None,
                  "a sent submission has its bytes stored")
        receipt = await self._chain.request("eth_getTransactionReceipt",
                                            ["0x" + (submission.tx_hash or b"").hex()])
        if isinstance(receipt, dict):
            return await self._finish(submission, receipt)
        if time.monotonic() - self._sent_at.get(submission.id, 0.0) > RESEND_AFTER_S:
            if submission.attempts >= MAX_SEND_ATTEMPTS:
                await self._store.advance(submission.id, "failed", error="never mined")
                self._metrics.relay_submissions.labels(submission.kind, "failed").inc()
                return True
            await self._resend(submission)
        return False

    async def _resend(self, submission: Submission) -> None:
        """The same bytes again; a nonce taken by another transaction needs new bytes."""
        try:
            await self._chain.request("eth_sendRawTransaction",
                                      ["0x" + (submission.raw_tx or b"").hex()])
            self._sent_at[submission.id] = time.monotonic()
        except RpcError as exc:
            text = exc.message.lower()
            if "nonce too low" in text:
                await self._sign_and_send(submission)
            elif "already known" not in text:
                log.warning("relay re-send %d refused: %s", submission.id, exc.message)

    async def _finish(self, submission: Submission, receipt: dict) -> bool:
        ok = int(receipt.get("status") or "0x0", 16) == 1
        await self._store.advance(submission.id, "included" if ok else "failed",
                                  block_number=int(receipt["blockNumber"], 16),
                                  error=None if ok else "reverted")
        self._metrics.relay_submissions.labels(
            submission.kind, "included" if ok else "failed").inc()
        if not ok:
            log.warning("relay submission %d reverted on the OpenGradient chain", submission.id)
        return True


def _leaf(item: RelayItem) -> tuple[str, str, str, str, str]:
    """The leaf as OpenGradient's facilitator writes it: 0x-hex bytes, decimal timestamp."""
    return ("0x" + item.tee_id.hex(), "0x" + item.input_hash.hex(), "0x" + item.output_hash.hex(),
            "0x" + item.tee_signature.hex(), str(item.tee_timestamp))


def _individual_record(item: RelayItem) -> bytes:
    """The individual blob OpenGradient publishes: the request, the response, the proof."""
    return json.dumps({
        "input": item.request_body, "output": item.response_body,
        "teeSignature": base64.b64encode(item.tee_signature).decode(),
        "teeId": "0x" + item.tee_id.hex(), "timestamp": str(item.tee_timestamp),
        "ethAddress": to_checksum("0x" + (item.eth_address or bytes(20)).hex()),
    }, separators=(",", ":")).encode()

"""Our data-settlement relay (optional; on in the devnet), as OpenGradient's facilitator runs
one: batch attestations are collected (N of them, or the oldest T seconds old), an
OpenZeppelin-compatible `StandardMerkleTree` over `(teeId, inputHash, outputHash, teeSignature,
teeTimestamp)` is published to the blob store as its `standard-v1` dump, and `batchSettle(root,
size, blobId)` is sent to the OpenGradient relay contract; individual attestations publish their
request/response record and call `settleIndividual`.

Guarantees (the payment side's rules):
- A submission row exists before anything is published or sent; the signed raw transaction is
  stored before it is sent, and a retry re-sends the same bytes; an attestation is relayed at
  most once; one submission is in flight at a time, so the relayer's nonces never collide.
- Every state change names the state it expects (`RelayStore`), and new bytes are sent only if
  they were stored.
- A submission is never sent twice: when a node says our nonce is taken, the stored
  transaction's receipt and the node's knowledge of it are checked first; if either shows it,
  it is ours (mined, or about to be) and it is followed, not replaced. Only a nonce taken by
  another transaction leads to a new signature, at most `max_send_attempts` times.
- Every wait and retry is bounded: the same bytes are re-sent every `resend_after_s` at most
  `max_resends` times (counted in the row, across restarts); then the submission is `failed`
  ("not mined after N re-sends"), `facilitator_relay_submissions_total{result="failed"}` counts
  it, and the relay moves on. (The given-up transaction may still be mined later; the chain
  watcher then indexes its event like any other.)
- Fees: `maxFeePerGas` = 2 x base fee + tip, capped at `max_fee_per_gas_cap_wei`
  (`core.fees`, the payment broadcaster's rule).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

from facilitator.adapters.blobstore import BlobStoreClient, BlobStoreError
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.og_relay import RelayItem, RelayStore, Submission
from facilitator.adapters.signer import SignerKey, TxFields, sign_eip1559
from facilitator.core.attestation import LEAF_ENCODING
from facilitator.core.fees import capped_max_fee, capped_priority_fee
from facilitator.core.merkle import StandardMerkleTree
from facilitator.core.og_events import batch_settle_call, settle_individual_call
from facilitator.core.receipts import receipt_succeeded
from facilitator.core.send_errors import already_known, nonce_taken
from facilitator.invariant import invariant
from facilitator.ports import Chain, RpcError, RpcUnavailable
from facilitator.protocol.fields import to_checksum

log = logging.getLogger("facilitator.relay")

GAS_BATCH = 200_000
GAS_INDIVIDUAL = 600_000  # on-chain RSA-PSS verification
RESEND_AFTER_S = 5.0
MAX_RESENDS = 60           # 5 minutes of re-sending the same bytes
MAX_SEND_ATTEMPTS = 20     # signatures of one submission (a new one only when the nonce is taken)
MAX_FEE_CAP_WEI = 50 * 10**9
PRIORITY_FEE_WEI = 10**9
UNFINISHED_PER_PASS = 8


class DataRelay:
    def __init__(self, *, store: RelayStore, chain: Chain, key: SignerKey,
                 blobs: BlobStoreClient, relay_contract: str, chain_id: int, metrics: Metrics,
                 batch_size: int, batch_age_s: float, interval_s: float = 0.5,
                 max_fee_per_gas_cap_wei: int = MAX_FEE_CAP_WEI,
                 priority_fee_wei: int = PRIORITY_FEE_WEI,
                 resend_after_s: float = RESEND_AFTER_S, max_resends: int = MAX_RESENDS,
                 max_send_attempts: int = MAX_SEND_ATTEMPTS) -> None:
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
        self._max_fee_cap = max_fee_per_gas_cap_wei
        self._priority_fee = priority_fee_wei
        self._resend_after_s = resend_after_s
        self._max_resends = max_resends
        self._max_send_attempts = max_send_attempts

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
        for submission in await self._store.unfinished(UNFINISHED_PER_PASS):
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

    async def _sign_and_send(self, submission: Submission, *, replacing: bytes | None = None
                             ) -> None:
        """Write-ahead: the signed bytes are stored (only if the row is still in the state this
        pass saw), then sent. `replacing`: the stored transaction whose nonce was taken."""
        invariant(submission.calldata is not None, "a published submission has call data")
        if submission.attempts >= self._max_send_attempts:
            await self._give_up(submission, f"not placed after {submission.attempts} signatures")
            return
        address = self._key.address.lower()
        nonce_hex, block = await self._chain.request_many([
            ("eth_getTransactionCount", [address, "pending"]),
            ("eth_getBlockByNumber", ["latest", False])])
        for answer in (nonce_hex, block):
            if isinstance(answer, RpcError):
                raise RpcUnavailable(f"relay chain view failed: {answer.message}")
        max_fee = capped_max_fee(int(block.get("baseFeePerGas") or "0x0", 16),
                                 self._priority_fee, self._max_fee_cap)
        nonce = int(nonce_hex, 16)
        tx = sign_eip1559(self._key, TxFields(
            chain_id=self._chain_id, nonce=nonce,
            max_priority_fee_per_gas=capped_priority_fee(self._priority_fee, max_fee),
            max_fee_per_gas=max_fee,
            gas_limit=GAS_BATCH if submission.kind == "batch" else GAS_INDIVIDUAL,
            to=self._contract, value=0, data=submission.calldata or b""))
        if not await self._store.signed(submission.id, nonce, tx.raw, tx.tx_hash,
                                        replacing=replacing):
            log.warning("relay submission %d changed under us; new transaction not sent",
                        submission.id)
            return
        refusal = await self._send(submission.id, tx.raw, tx.tx_hash)
        if refusal is not None:
            log.warning("relay submission %d refused: %s", submission.id, refusal.message)

    async def _send(self, submission_id: int, raw: bytes, tx_hash: bytes) -> RpcError | None:
        """Send the stored bytes; a node that took them (or already has them) makes the row
        `broadcast`. The node's refusal is returned."""
        try:
            await self._chain.request("eth_sendRawTransaction", ["0x" + raw.hex()])
        except RpcError as exc:
            if not already_known(exc.message):
                return exc
        await self._store.broadcast(submission_id, tx_hash)
        return None

    async def _follow(self, submission: Submission) -> bool:
        invariant(submission.tx_hash is not None and submission.raw_tx is not None,
                  "a sent submission has its bytes stored")
        tx_hash = submission.tx_hash or b""
        receipt = await self._chain.request("eth_getTransactionReceipt", ["0x" + tx_hash.hex()])
        if isinstance(receipt, dict):
            return await self._finish(submission, receipt)
        if submission.idle_s < self._resend_after_s:
            return False
        if submission.resends >= self._max_resends:
            await self._give_up(submission, f"not mined after {submission.resends} re-sends")
            return True
        await self._resend(submission)
        return False

    async def _resend(self, submission: Submission) -> None:
        """The same bytes again (counted first); a nonce taken by another transaction needs new
        bytes, but only once our own transaction is shown not to have taken it."""
        tx_hash = submission.tx_hash or b""
        if not await self._store.resent(submission.id, tx_hash):
            return  # moved on meanwhile
        refusal = await self._send(submission.id, submission.raw_tx or b"", tx_hash)
        if refusal is None:
            return
        if nonce_taken(refusal.message):
            await self._nonce_taken(submission)
        else:
            log.warning("relay re-send %d refused: %s", submission.id, refusal.message)

    async def _nonce_taken(self, submission: Submission) -> None:
        """Our nonce was consumed: by this very transaction (its receipt, or the node knowing
        it, shows that; a lagging endpoint may not have the receipt yet) or by another one.
        Only in the second case is the submission signed again, with a fresh nonce."""
        tx_hash = "0x" + (submission.tx_hash or b"").hex()
        receipt, known = await self._chain.request_many([
            ("eth_getTransactionReceipt", [tx_hash]), ("eth_getTransactionByHash", [tx_hash])])
        if isinstance(receipt, dict):
            await self._finish(submission, receipt)
            return
        if isinstance(known, dict) or isinstance(receipt, RpcError) \
                or isinstance(known, RpcError):
            return  # ours (or undecided): follow it, never send the submission twice
        log.warning("relay submission %d: nonce taken by another transaction; signing again",
                    submission.id)
        await self._sign_and_send(submission, replacing=submission.tx_hash)

    async def _finish(self, submission: Submission, receipt: dict) -> bool:
        ok = receipt_succeeded(receipt)
        moved = await self._store.finished(
            submission.id, submission.tx_hash or b"", included=ok,
            block_number=int(receipt["blockNumber"], 16), error=None if ok else "reverted")
        if moved:
            self._metrics.relay_submissions.labels(
                submission.kind, "included" if ok else "failed").inc()
            if not ok:
                log.warning("relay submission %d reverted on the OpenGradient chain",
                            submission.id)
        return True

    async def _give_up(self, submission: Submission, reason: str) -> None:
        if await self._store.failed(submission.id, submission.state, reason):
            self._metrics.relay_submissions.labels(submission.kind, "failed").inc()
            log.error("relay submission %d given up: %s", submission.id, reason)


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

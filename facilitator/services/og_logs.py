"""What the OpenGradient chain's logs mean: TEE registry facts and inference settlements.

Only the configured registry's events count, and settlement events only from the configured
relay contract AND sent by the configured relayer (anyone can deploy a look-alike relay, or call
an open one). For each batch settlement the published dump is fetched from the blob store and
checked: its root must equal `merkleRoot` and its size `batchSize`; its leaves are indexed with
their proofs, so an attestation can be shown on chain with a leaf index and a proof.

Guarantees: a TEE's key is read from the registry at the registration's block (the record the
chain had then); a dump that cannot be fetched is retried, one that does not match is recorded
with the reason (a finding), never silently skipped; a dump is parsed, verified and indexed in a
worker thread, one at a time, so a large dump never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg

from facilitator.adapters.blobstore import (
    BlobNotFound,
    BlobStoreClient,
    BlobStoreError,
    BlobStoreUnavailable,
)
from facilitator.adapters.chainstate import Block
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.og_chain import Leaf, OgChainState, PendingBatch, TeeEvent
from facilitator.core.attestation import LEAF_ENCODING
from facilitator.core.merkle import InvalidDump, StandardMerkleTree
from facilitator.core.og_events import (
    BATCH_SETTLEMENT,
    INDIVIDUAL_SETTLEMENT,
    REGISTRY_TOPICS,
    RELAY_TOPICS,
    TEE_DISABLED,
    TEE_ENABLED,
    TEE_REGISTERED,
    decode_batch,
    decode_individual,
    decode_tee_info,
    get_tee_call,
    place_of,
)
from facilitator.invariant import invariant
from facilitator.ports import Chain
from facilitator.services.watcher import Derive

log = logging.getLogger("facilitator.og")

DUMPS_PER_PASS = 10
TEE_KINDS = {TEE_REGISTERED: "registered", TEE_ENABLED: "enabled", TEE_DISABLED: "disabled"}


class OgLogs:
    def __init__(self, *, chain: Chain, state: OgChainState, metrics: Metrics, registry: str,
                 relay: str, relayer: str, blobs: BlobStoreClient | None) -> None:
        self._chain = chain
        self._state = state
        self._metrics = metrics
        self._registry = registry.lower()
        self._relay = relay.lower()
        self._relayer = relayer.lower()
        self._blobs = blobs
        self._dump_slot = asyncio.Lock()

    def log_filter(self) -> dict[str, Any]:
        return {"address": [self._registry, self._relay],
                "topics": [[*REGISTRY_TOPICS, *RELAY_TOPICS]]}

    async def prepare(self, blocks: list[Block], logs: list[dict[str, Any]]) -> Derive:
        times = {b.number: b.timestamp for b in blocks}
        registry = [e for e in logs if e["address"].lower() == self._registry
                    and e["topics"][0] in TEE_KINDS]
        relay = await self._from_relayer([e for e in logs if e["address"].lower() == self._relay
                                          and e["topics"][0] in RELAY_TOPICS])
        tees = [await self._tee_event(e, times) for e in registry]
        batches = [(decode_batch(e), times[int(e["blockNumber"], 16)]) for e in relay
                   if e["topics"][0] == BATCH_SETTLEMENT]
        individuals = [(decode_individual(e), times[int(e["blockNumber"], 16)]) for e in relay
                       if e["topics"][0] == INDIVIDUAL_SETTLEMENT]

        async def derive(conn: asyncpg.Connection) -> None:
            await self._state.derive(conn, tees, batches, individuals)
        return derive

    async def _from_relayer(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Only settlement events whose transaction was sent by the configured relayer."""
        if not entries:
            return []
        hashes = sorted({e["transactionHash"] for e in entries})
        txs = await self._chain.request_many(
            [("eth_getTransactionByHash", [h]) for h in hashes])
        senders = {h: str(tx.get("from", "")).lower() for h, tx in zip(hashes, txs, strict=True)
                   if isinstance(tx, dict)}
        kept = [e for e in entries if senders.get(e["transactionHash"]) == self._relayer]
        if len(kept) < len(entries):
            log.warning("ignored %d settlement event(s) not sent by the configured relayer",
                        len(entries) - len(kept))
        return kept

    async def _tee_event(self, entry: dict[str, Any], times: dict[int, int]) -> TeeEvent:
        tee_id = bytes.fromhex(entry["topics"][1][2:])
        kind = TEE_KINDS[entry["topics"][0]]
        info = None
        if kind == "registered":  # the key as the registry held it at that block
            result = await self._chain.request("eth_call", [
                {"to": self._registry, "data": "0x" + get_tee_call(tee_id).hex()},
                entry["blockNumber"]])
            info = decode_tee_info(result)
        return TeeEvent(tee_id=tee_id, kind=kind, place=place_of(entry),
                        block_time=times[int(entry["blockNumber"], 16)], info=info)

    async def committed(self, result: Any) -> None:
        return None

    async def undo(self, conn: asyncpg.Connection, ancestor: int, accept: bool) -> list[int]:
        await self._state.undo(conn, ancestor)
        return []

    async def protected_above(self, ancestor: int) -> int:
        return 0

    async def reverted(self, moved: list[int]) -> None:
        return None

    async def report_halted(self) -> None:
        return None

    async def housekeeping(self, processed: int) -> None:
        if self._blobs is None:
            return
        for batch in await self._state.pending_batches(DUMPS_PER_PASS):
            await self._check_dump(batch)

    async def _check_dump(self, batch: PendingBatch) -> None:
        invariant(self._blobs is not None, "dumps are checked only with a blob store")
        try:
            raw = await self._blobs.get(batch.blob_id)  # type: ignore[union-attr]
        except BlobStoreUnavailable as exc:
            log.warning("dump %s of batch %d not fetched yet: %s", batch.blob_id, batch.id, exc)
            return None  # retried next pass
        except (BlobNotFound, BlobStoreError) as exc:  # the store answered: no such blob
            return await self._record(batch, "unavailable", error=str(exc)[:200])
        async with self._dump_slot:  # one dump at a time off the loop: bounded CPU and memory
            try:
                tree, leaves = await asyncio.to_thread(_load_dump, raw)
            except (InvalidDump, ValueError) as exc:
                return await self._record(batch, "malformed", error=str(exc)[:200])
        facts = {"dump_root": tree.root, "leaf_count": len(tree)}
        if tree.root != batch.merkle_root:
            return await self._record(batch, "root_mismatch", **facts)
        if len(tree) != batch.batch_size or tuple(tree.leaf_encoding) != LEAF_ENCODING:
            return await self._record(batch, "size_mismatch", **facts)
        return await self._record(batch, "valid", leaves, **facts)

    async def _record(self, batch: PendingBatch, status: str, leaves: list[Leaf] | None = None,
                      *, dump_root: bytes | None = None, leaf_count: int | None = None,
                      error: str | None = None) -> None:
        await self._state.record_dump(batch.id, status, leaves or [], dump_root=dump_root,
                                      leaf_count=leaf_count, error=error)
        self._metrics.og_batches_checked.labels(status).inc()
        if status != "valid":
            log.warning("batch %d (root 0x%s) dump check: %s", batch.id,
                        batch.merkle_root.hex(), status)


def _load_dump(raw: bytes) -> tuple[StandardMerkleTree, list[Leaf]]:
    """Parse and verify a dump and index its leaves with their proofs (CPU-bound: up to seconds
    for a 65,536-leaf dump, so it runs in a worker thread). Leaves are only used when the dump
    matches its batch; building them here keeps all the per-leaf work off the event loop."""
    tree = StandardMerkleTree.load(raw)
    leaves = _leaves(tree) if tuple(tree.leaf_encoding) == LEAF_ENCODING else []
    return tree, leaves


def _leaves(tree: StandardMerkleTree) -> list[Leaf]:
    leaves = []
    for index, value in enumerate(tree.values):
        tee_id, input_hash, output_hash, signature, timestamp = value
        leaves.append(Leaf(index=index, tee_id=_b(tee_id), input_hash=_b(input_hash),
                           output_hash=_b(output_hash), tee_signature=_b(signature),
                           tee_timestamp=int(timestamp),
                           proof_json=json.dumps(["0x" + p.hex() for p in tree.proof(index)])))
    return leaves


def _b(hex_value: str) -> bytes:
    return bytes.fromhex(hex_value[2:])


"""OpenGradient chain events and calls, decoded. Pure.

Event signatures are OpenGradient's (og-evm TEERegistry and InferenceSettlementRelay); the
topic0 values are pinned by tests against the notes' table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from facilitator.core.abi import selector

TEE_REGISTERED = "0x" + keccak(b"TEERegistered(bytes32,address,uint8)").hex()
TEE_ENABLED = "0x" + keccak(b"TEEEnabled(bytes32)").hex()
TEE_DISABLED = "0x" + keccak(b"TEEDisabled(bytes32)").hex()
BATCH_SETTLEMENT = "0x" + keccak(b"BatchSettlement(bytes32,uint256,bytes)").hex()
INDIVIDUAL_SETTLEMENT = "0x" + keccak(
    b"IndividualSettlement(bytes32,address,bytes32,bytes32,uint256,bytes,bytes)").hex()
REGISTRY_TOPICS = (TEE_REGISTERED, TEE_ENABLED, TEE_DISABLED)
RELAY_TOPICS = (BATCH_SETTLEMENT, INDIVIDUAL_SETTLEMENT)

GET_TEE = selector("getTEE(bytes32)")
TEE_INFO = "(address,address,string,bytes,bytes,bytes32,uint8,bool,uint256,uint256)"
BATCH_SETTLE = selector("batchSettle(bytes32,uint256,bytes)")
SETTLE_INDIVIDUAL = selector(
    "settleIndividual(bytes32,bytes32,bytes32,uint256,address,bytes,bytes)")


@dataclass(frozen=True, slots=True)
class LogPlace:
    """Where a log sits: the evidence every derived record carries."""

    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int


@dataclass(frozen=True, slots=True)
class TeeInfo:
    owner: bytes
    payment_address: bytes
    endpoint: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class BatchEvent:
    place: LogPlace
    merkle_root: bytes
    batch_size: int
    blob_id: str


@dataclass(frozen=True, slots=True)
class IndividualEvent:
    place: LogPlace
    tee_id: bytes
    eth_address: bytes
    input_hash: bytes
    output_hash: bytes
    timestamp: int
    blob_id: str
    signature: bytes


def place_of(entry: dict[str, Any]) -> LogPlace:
    return LogPlace(block_number=int(entry["blockNumber"], 16),
                    block_hash=bytes.fromhex(entry["blockHash"][2:]),
                    tx_hash=bytes.fromhex(entry["transactionHash"][2:]),
                    log_index=int(entry["logIndex"], 16))


def _data(entry: dict[str, Any]) -> bytes:
    return bytes.fromhex((entry.get("data") or "0x")[2:])


def decode_batch(entry: dict[str, Any]) -> BatchEvent:
    size, blob = abi_decode(["uint256", "bytes"], _data(entry))
    return BatchEvent(place=place_of(entry), merkle_root=bytes.fromhex(entry["topics"][1][2:]),
                      batch_size=int(size), blob_id=bytes(blob).decode("utf-8", "replace"))


def decode_individual(entry: dict[str, Any]) -> IndividualEvent:
    inp, out, ts, blob, sig = abi_decode(["bytes32", "bytes32", "uint256", "bytes", "bytes"],
                                         _data(entry))
    return IndividualEvent(place=place_of(entry), tee_id=bytes.fromhex(entry["topics"][1][2:]),
                           eth_address=bytes.fromhex(entry["topics"][2][-40:]),
                           input_hash=bytes(inp), output_hash=bytes(out), timestamp=int(ts),
                           blob_id=bytes(blob).decode("utf-8", "replace"), signature=bytes(sig))


def get_tee_call(tee_id: bytes) -> bytes:
    return GET_TEE + tee_id


def decode_tee_info(result: str) -> TeeInfo:
    [info] = abi_decode([TEE_INFO], bytes.fromhex(result[2:]))
    owner, payment, endpoint, public_key = info[0], info[1], info[2], info[3]
    return TeeInfo(owner=bytes.fromhex(owner[2:]), payment_address=bytes.fromhex(payment[2:]),
                   endpoint=str(endpoint), public_key=bytes(public_key))


def batch_settle_call(merkle_root: bytes, batch_size: int, blob_id: str) -> bytes:
    return BATCH_SETTLE + abi_encode(["bytes32", "uint256", "bytes"],
                                     [merkle_root, batch_size, blob_id.encode()])


def settle_individual_call(tee_id: bytes, input_hash: bytes, output_hash: bytes,
                           timestamp: int, eth_address: str, blob_id: str,
                           signature: bytes) -> bytes:
    return SETTLE_INDIVIDUAL + abi_encode(
        ["bytes32", "bytes32", "bytes32", "uint256", "address", "bytes", "bytes"],
        [tee_id, input_hash, output_hash, timestamp, eth_address, blob_id.encode(), signature])

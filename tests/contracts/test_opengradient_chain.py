"""The OpenGradient chain on its own anvil (chain id 10740): TEERegistry keyed by keccak256 of a
real RSA-2048 SubjectPublicKeyInfo, its enable/disable/heartbeat lifecycle and access control, and
InferenceSettlementRelay's batch and individual settlement events (topic0 values from the notes)
with RSA-PSS signatures made the way OpenGradient TEEs make them (PSS, SHA-256, MGF1, salt 32)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pss
from contract_helpers import OTHER, OTHER_KEY, OWNER, OWNER_KEY, PAYEE, RELAYER, RELAYER_KEY
from eth_abi import decode, encode
from eth_utils import keccak
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractCustomError, ContractLogicError

from facilitator.devnet import contracts
from facilitator.devnet.anvil import Anvil

OG_CHAIN_ID = contracts.OG_CHAIN_ID

# topic0 values as listed in the notes (opengradient.md §3.2, §3.4)
TOPIC_TEE_REGISTERED = "97d0af70a4d2c616e9c1093d5f57c8b31b3a7d824f1d335e5d5416402ec14931"
TOPIC_HEARTBEAT = "3cf0bf7708060bf073b6ddb921eef0485b3eb9da828e0ed751fa6582ef337f57"
TOPIC_BATCH = "c2aff8d8a10a4543baabf39bd9ff45e7fc3881d19098df350a3b7f339e911127"
TOPIC_INDIVIDUAL = "74e71a1981c03bd0c36f3b1227f3ee2a34dca5d6fef25c4b2787e033ab60b782"
TOPIC_TEE_DISABLED_PREFIX, TOPIC_TEE_DISABLED_SUFFIX = "01c23533", "36b6"
TOPIC_TEE_ENABLED_PREFIX, TOPIC_TEE_ENABLED_SUFFIX = "cfe7e61b", "5ca6"

ENDPOINT = "https://tee-1.devnet.example:443"
TLS_CERT = b"\x30\x82devnet-tls-certificate-der"
PCR_HASH = keccak(b"pcr0" + b"pcr1" + b"pcr2")


# ---- fixtures ----

@pytest.fixture(scope="module")
async def og_node() -> AsyncIterator[Anvil]:
    async with Anvil(chain_id=OG_CHAIN_ID) as anvil:
        yield anvil


@pytest.fixture(scope="module")
async def og_w3(og_node: Anvil) -> AsyncIterator[AsyncWeb3]:
    async with contracts.connect(og_node.url) as web3:
        yield web3


@pytest.fixture(scope="module")
async def tee_key() -> RSA.RsaKey:
    return await asyncio.to_thread(RSA.generate, 2048)


@pytest.fixture(scope="module")
def tee_der(tee_key: RSA.RsaKey) -> bytes:
    """SubjectPublicKeyInfo DER, what the TEE gateway hashes into its tee_id."""
    return tee_key.publickey().export_key(format="DER")


@pytest.fixture(scope="module")
async def registry(og_node: Anvil, og_w3: AsyncWeb3) -> AsyncContract:
    address = await contracts.deploy_tee_registry(og_node.url, OWNER_KEY)
    return contracts.contract_at(og_w3, contracts.load_artifact("TEERegistry"), address)


@pytest.fixture(scope="module")
async def tee_id(og_node: Anvil, registry: AsyncContract, tee_der: bytes) -> bytes:
    hex_id = await contracts.register_tee(
        og_node.url, OWNER_KEY, registry.address, tee_der, endpoint=ENDPOINT,
        payment_address=PAYEE, tls_certificate=TLS_CERT, pcr_hash=PCR_HASH)
    return bytes.fromhex(hex_id[2:])


@pytest.fixture(scope="module")
async def relay(og_node: Anvil, og_w3: AsyncWeb3, registry: AsyncContract) -> AsyncContract:
    address = await contracts.deploy_settlement_relay(og_node.url, OWNER_KEY, registry.address)
    return contracts.contract_at(og_w3, contracts.load_artifact("InferenceSettlementRelay"),
                                 address)


# ---- helpers ----

def tee_sign(key: RSA.RsaKey, message_hash: bytes) -> bytes:
    """RSASSA-PSS over SHA-256(message_hash), MGF1-SHA-256, 32-byte salt (the TEE gateway's
    `sign_data`)."""
    return pss.new(key, salt_bytes=32).sign(SHA256.new(message_hash))


async def reverts_with(call: Any) -> str:
    with pytest.raises(ContractLogicError) as info:
        await call
    if isinstance(info.value, ContractCustomError):
        return contracts.decode_revert(info.value.data)
    return (info.value.message or "").removeprefix("execution reverted: ")


async def now(w3: AsyncWeb3) -> int:
    return int((await w3.eth.get_block("latest"))["timestamp"])


async def send(node: Anvil, key: str, contract: AsyncContract, function: str,
               args: list[Any]) -> Any:
    data = contract.encode_abi(function, args)
    return await contracts.transact(node.url, key, contract.address, data, what=function)


def logs_of(receipt: Any, address: str) -> list[Any]:
    return [log for log in receipt["logs"] if log["address"] == address]


def topic_address(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


# ---- TEERegistry ----

async def test_chain_and_key_format(og_w3: AsyncWeb3, tee_der: bytes) -> None:
    assert await og_w3.eth.chain_id == 10740
    # RSA-2048 SubjectPublicKeyInfo: SEQUENCE { rsaEncryption, NULL }, BIT STRING { n, e }
    assert tee_der.startswith(bytes.fromhex("30820122300d06092a864886f70d0101010500"))
    assert len(tee_der) == 294


async def test_register_tee_and_getters(og_node: Anvil, og_w3: AsyncWeb3,
                                        registry: AsyncContract, tee_der: bytes,
                                        tee_id: bytes) -> None:
    f = registry.functions
    assert tee_id == keccak(tee_der)
    assert await f.computeTEEId(tee_der).call() == tee_id
    info = await f.getTEE(tee_id).call()
    registered_at = info[8]
    assert info == (OWNER, PAYEE, ENDPOINT, tee_der, TLS_CERT, PCR_HASH, 0, True,
                    registered_at, registered_at)
    assert registered_at > 0
    assert await f.getTEEPublicKey(tee_id).call() == tee_der
    assert await f.isTEEEnabled(tee_id).call() is True
    assert await f.isTEEActive(tee_id).call() is True
    assert await f.getEnabledTEEs(0).call() == [tee_id]
    assert await f.getTEEsByType(0).call() == [tee_id]
    assert await f.getTEEsByOwner(OWNER).call() == [tee_id]
    assert [t[3] for t in await f.getActiveTEEs(0).call()] == [tee_der]
    # unknown ids
    unknown = b"\x01" * 32
    assert await reverts_with(f.getTEE(unknown).call()) == "TEENotFound()"
    assert await f.getTEEPublicKey(unknown).call() == b""
    assert await f.isTEEEnabled(unknown).call() is False

    # the TEERegistered log, checked raw against the notes' topic0
    registered = await og_w3.eth.get_logs({"address": registry.address, "fromBlock": 0,
                                           "topics": ["0x" + TOPIC_TEE_REGISTERED]})
    assert len(registered) == 1
    assert registered[0]["topics"][0] == keccak(text="TEERegistered(bytes32,address,uint8)")
    assert registered[0]["topics"][1:] == [tee_id, topic_address(OWNER)]
    assert decode(["uint8"], registered[0]["data"]) == (0,)


async def test_registration_is_checked(og_node: Anvil, registry: AsyncContract, tee_der: bytes,
                                       tee_id: bytes) -> None:
    f = registry.functions
    args = [TLS_CERT, PAYEE, ENDPOINT, 0, PCR_HASH]
    assert await reverts_with(f.registerTEE(tee_der, *args).call({"from": OWNER})) == \
        "TEEAlreadyExists()"
    operator_role = await f.TEE_OPERATOR().call()
    assert operator_role == keccak(text="TEE_OPERATOR") == contracts.TEE_OPERATOR_ROLE
    other_key = (await asyncio.to_thread(RSA.generate, 1024)).publickey().export_key("DER")
    assert await reverts_with(f.registerTEE(other_key, *args).call({"from": OTHER})) == \
        f"AccessControlUnauthorizedAccount({OTHER}, 0x{operator_role.hex()})"
    # only RSA SubjectPublicKeyInfo keys of 2048..8192 bits
    assert await reverts_with(f.registerTEE(other_key, *args).call({"from": OWNER})) == \
        "InvalidPublicKey()"
    for junk in (b"", b"\x30\x00", tee_der[:-1], tee_der + b"\x00",
                 tee_der.replace(bytes.fromhex("2a864886f70d010101"), bytes(9))):
        assert await reverts_with(f.registerTEE(junk, *args).call({"from": OWNER})) == \
            "InvalidPublicKey()"


async def test_disable_enable_events_and_access_control(
        og_node: Anvil, og_w3: AsyncWeb3, registry: AsyncContract, tee_id: bytes) -> None:
    f = registry.functions
    assert await reverts_with(f.disableTEE(tee_id).call({"from": OTHER})) == "NotTEEOwner()"
    assert await reverts_with(f.disableTEE(b"\x02" * 32).call({"from": OWNER})) == "TEENotFound()"

    tx = await contracts.set_tee_enabled(og_node.url, OWNER_KEY, registry.address, tee_id, False)
    receipt = await og_w3.eth.get_transaction_receipt(tx)
    (log,) = logs_of(receipt, registry.address)
    topic = log["topics"][0].hex()
    assert topic == keccak(text="TEEDisabled(bytes32)").hex()
    assert topic.startswith(TOPIC_TEE_DISABLED_PREFIX) and topic.endswith(TOPIC_TEE_DISABLED_SUFFIX)
    assert log["topics"][1] == tee_id and log["data"] == b""
    assert await f.isTEEEnabled(tee_id).call() is False
    assert await f.isTEEActive(tee_id).call() is False
    assert await f.getEnabledTEEs(0).call() == []
    assert (await f.getTEE(tee_id).call())[7] is False
    assert await reverts_with(f.disableTEE(tee_id).call({"from": OWNER})) == "TEENotEnabled()"
    assert await contracts.set_tee_enabled(
        og_node.url, OWNER_KEY, registry.address, tee_id, False) is None   # nothing to do

    assert await reverts_with(f.enableTEE(tee_id).call({"from": OTHER})) == "NotTEEOwner()"
    tx = await contracts.set_tee_enabled(og_node.url, OWNER_KEY, registry.address,
                                         "0x" + tee_id.hex(), True)
    (log,) = logs_of(await og_w3.eth.get_transaction_receipt(tx), registry.address)
    topic = log["topics"][0].hex()
    assert topic == keccak(text="TEEEnabled(bytes32)").hex()
    assert topic.startswith(TOPIC_TEE_ENABLED_PREFIX) and topic.endswith(TOPIC_TEE_ENABLED_SUFFIX)
    assert await f.isTEEEnabled(tee_id).call() is True
    assert await f.getEnabledTEEs(0).call() == [tee_id]


async def test_operators_manage_only_their_own_tees(og_node: Anvil, registry: AsyncContract,
                                                    tee_key: RSA.RsaKey, tee_id: bytes) -> None:
    f = registry.functions
    await contracts.add_tee_operator(og_node.url, OWNER_KEY, registry.address, OTHER)
    assert await f.hasRole(contracts.TEE_OPERATOR_ROLE, OTHER).call() is True
    # another well-formed public key without generating one: same modulus, exponent 3
    key = RSA.construct((tee_key.n, 3)).export_key("DER")
    other_id = await contracts.register_tee(
        og_node.url, OTHER_KEY, registry.address, key, endpoint="https://tee-2",
        payment_address=OTHER, tee_type=contracts.TEE_TYPE_VALIDATOR)
    other_id_b = bytes.fromhex(other_id[2:])
    assert (await f.getTEE(other_id_b).call())[0] == OTHER
    assert await f.getTEEsByType(1).call() == [other_id_b]
    # the operator can switch its own TEE but not the admin's; the admin can switch any
    assert await reverts_with(f.disableTEE(tee_id).call({"from": OTHER})) == "NotTEEOwner()"
    await contracts.set_tee_enabled(og_node.url, OTHER_KEY, registry.address, other_id, False)
    await contracts.set_tee_enabled(og_node.url, OWNER_KEY, registry.address, other_id, True)
    # an owner who lost TEE_OPERATOR loses control of its TEE
    await send(og_node, OWNER_KEY, registry, "revokeRole", [contracts.TEE_OPERATOR_ROLE, OTHER])
    assert await reverts_with(f.disableTEE(other_id_b).call({"from": OTHER})) == "NotTEEOwner()"
    # roles are admin-managed
    assert (await reverts_with(f.grantRole(contracts.TEE_OPERATOR_ROLE, OTHER).call(
        {"from": OTHER}))).startswith(f"AccessControlUnauthorizedAccount({OTHER}, ")


async def test_heartbeat(og_node: Anvil, og_w3: AsyncWeb3, registry: AsyncContract,
                         tee_key: RSA.RsaKey, tee_id: bytes) -> None:
    f = registry.functions
    ts = await now(og_w3) - 300   # the gateway's clock-drift buffer
    signature = tee_sign(tee_key, keccak(tee_id + ts.to_bytes(32, "big")))
    assert len(signature) == 256
    receipt = await send(og_node, RELAYER_KEY, registry, "heartbeat", [tee_id, ts, signature])
    (log,) = logs_of(receipt, registry.address)
    assert log["topics"][0].hex() == TOPIC_HEARTBEAT
    assert log["topics"][1] == tee_id and decode(["uint256"], log["data"]) == (ts,)
    block = await og_w3.eth.get_block(receipt["blockNumber"])
    assert (await f.getTEE(tee_id).call())[9] == block["timestamp"]

    bad = bytes([signature[0] ^ 1]) + signature[1:]
    assert await reverts_with(f.heartbeat(tee_id, ts, bad).call()) == "HeartbeatSignatureInvalid()"
    assert await reverts_with(f.heartbeat(tee_id, ts + 1, signature).call()) == \
        "HeartbeatSignatureInvalid()"
    future = await now(og_w3) + 600
    assert await reverts_with(f.heartbeat(tee_id, future, tee_sign(
        tee_key, keccak(tee_id + future.to_bytes(32, "big")))).call()) == \
        "HeartbeatTimestampInFuture()"
    old = await now(og_w3) - 1801 - 5
    assert await reverts_with(f.heartbeat(tee_id, old, tee_sign(
        tee_key, keccak(tee_id + old.to_bytes(32, "big")))).call()) == "HeartbeatTimestampTooOld()"


# ---- InferenceSettlementRelay ----

async def test_relay_interface_and_roles(relay: AsyncContract) -> None:
    abi = {item["name"]: item for item in contracts.load_artifact("InferenceSettlementRelay").abi
           if item["type"] in ("function", "event")}
    def signature(name: str) -> str:
        return f"{name}({','.join(contracts.abi_type(p) for p in abi[name]['inputs'])})"

    selector = {name: keccak(text=signature(name))
                for name in ("batchSettle", "settleIndividual", "BatchSettlement",
                             "IndividualSettlement")}
    assert selector["batchSettle"][:4].hex() == "1b243ae6"
    assert selector["settleIndividual"][:4].hex() == "90480ad1"
    assert selector["BatchSettlement"].hex() == TOPIC_BATCH
    assert selector["IndividualSettlement"].hex() == TOPIC_INDIVIDUAL
    assert [(p["name"], p["indexed"]) for p in abi["IndividualSettlement"]["inputs"]] == [
        ("teeId", True), ("ethAddress", True), ("inputHash", False), ("outputHash", False),
        ("timestamp", False), ("walrusBlobId", False), ("signature", False)]
    assert [(p["name"], p["indexed"]) for p in abi["BatchSettlement"]["inputs"]] == [
        ("merkleRoot", True), ("batchSize", False), ("walrusBlobId", False)]
    f = relay.functions
    role = await f.SETTLEMENT_RELAY_ROLE().call()
    assert role == keccak(text="SETTLEMENT_RELAY_ROLE") == contracts.SETTLEMENT_RELAY_ROLE
    assert await f.hasRole(role, OWNER).call() is True
    assert await f.hasRole(b"\x00" * 32, OWNER).call() is True


async def test_batch_settle(og_node: Anvil, relay: AsyncContract) -> None:
    root, blob = keccak(b"batch root"), b"Pj2ZS8nXhXZ6Do8lnn2Wc1ztEPxoGDRXg-HlQYaEcu4"
    receipt = await send(og_node, OWNER_KEY, relay, "batchSettle", [root, 20, blob])
    (log,) = logs_of(receipt, relay.address)
    assert log["topics"][0].hex() == TOPIC_BATCH
    assert log["topics"][1] == root
    assert decode(["uint256", "bytes"], log["data"]) == (20, blob)
    events = relay.events.BatchSettlement().process_receipt(receipt)
    assert [(e.args.merkleRoot, e.args.batchSize, e.args.walrusBlobId) for e in events] == \
        [(root, 20, blob)]


async def test_non_relayer_is_refused_until_granted(og_node: Anvil, relay: AsyncContract) -> None:
    f = relay.functions
    role = contracts.SETTLEMENT_RELAY_ROLE
    refused = f"AccessControlUnauthorizedAccount({RELAYER}, 0x{role.hex()})"
    assert await reverts_with(f.batchSettle(b"\x01" * 32, 1, b"x").call({"from": RELAYER})) == \
        refused
    assert await reverts_with(f.settleIndividual(
        b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 1, OTHER, b"x", b"y").call(
        {"from": RELAYER})) == refused
    # only the admin grants the role
    assert (await reverts_with(f.grantRole(role, RELAYER).call({"from": OTHER}))).startswith(
        f"AccessControlUnauthorizedAccount({OTHER}, ")
    await contracts.add_relayer(og_node.url, OWNER_KEY, relay.address, RELAYER)
    assert await f.hasRole(role, RELAYER).call() is True
    await send(og_node, RELAYER_KEY, relay, "batchSettle", [b"\x01" * 32, 1, b"x"])


async def test_settle_individual_verifies_the_tee_signature(
        og_node: Anvil, og_w3: AsyncWeb3, registry: AsyncContract, relay: AsyncContract,
        tee_key: RSA.RsaKey, tee_id: bytes) -> None:
    f = relay.functions
    input_hash, output_hash = keccak(b"canonical request"), keccak(b"assistant text")
    ts = await now(og_w3)
    message = keccak(input_hash + output_hash + ts.to_bytes(32, "big"))
    assert await f.computeMessageHash(input_hash, output_hash, ts).call() == message
    signature = tee_sign(tee_key, message)
    blob = b"walrus-blob-id-base64url"
    args = [tee_id, input_hash, output_hash, ts, PAYEE, blob, signature]
    assert await f.verifySignature(tee_id, input_hash, output_hash, ts, signature).call() is True

    receipt = await send(og_node, OWNER_KEY, relay, "settleIndividual", args)
    (log,) = logs_of(receipt, relay.address)
    assert log["topics"][0].hex() == TOPIC_INDIVIDUAL
    assert log["topics"][1:] == [tee_id, topic_address(PAYEE)]
    assert decode(["bytes32", "bytes32", "uint256", "bytes", "bytes"], log["data"]) == \
        (input_hash, output_hash, ts, blob, signature)

    def with_(**changes: Any) -> list[Any]:
        names = ["tee", "inp", "out", "ts", "eth", "blob", "sig"]
        return [changes.get(n, a) for n, a in zip(names, args)]

    bad = bytes([signature[-1] ^ 1])
    for wrong in (with_(sig=signature[:-1] + bad), with_(sig=signature[:-1]),
                  with_(inp=output_hash), with_(ts=ts + 1), with_(sig=b"")):
        assert await reverts_with(f.settleIndividual(*wrong).call({"from": OWNER})) == \
            "Invalid signature"
    # time window [now - 1 h, now + 5 min] on the signed timestamp
    for stale in (ts - 3700, ts + 400):
        sig = tee_sign(tee_key, keccak(input_hash + output_hash + stale.to_bytes(32, "big")))
        assert await reverts_with(f.settleIndividual(*with_(ts=stale, sig=sig)).call(
            {"from": OWNER})) == "Invalid signature"
    # a disabled TEE's signatures do not settle
    await contracts.set_tee_enabled(og_node.url, OWNER_KEY, registry.address, tee_id, False)
    try:
        assert await reverts_with(f.settleIndividual(*args).call({"from": OWNER})) == \
            "Invalid signature"
    finally:
        await contracts.set_tee_enabled(og_node.url, OWNER_KEY, registry.address, tee_id, True)
    await f.settleIndividual(*args).call({"from": OWNER})


async def test_emit_only_relay_and_merkle_proofs(og_node: Anvil, og_w3: AsyncWeb3) -> None:
    address = await contracts.deploy_settlement_relay(og_node.url, OWNER_KEY)
    relay = contracts.contract_at(og_w3, contracts.load_artifact("InferenceSettlementRelay"),
                                  address)
    assert await relay.functions.TEE_REGISTRY().call() == "0x" + "00" * 20
    args = [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 5, OTHER, b"blob", b"not-rsa"]
    receipt = await send(og_node, OWNER_KEY, relay, "settleIndividual", args)
    (log,) = logs_of(receipt, address)
    assert log["topics"][0].hex() == TOPIC_INDIVIDUAL

    # OpenZeppelin StandardMerkleTree leaves (double keccak of the abi-encoded tuple) and
    # sorted-pair hashing, as the facilitator's batch trees are built
    def leaf(i: int) -> bytes:
        values = [bytes([i]) * 32, keccak(b"in%d" % i), keccak(b"out%d" % i), b"sig%d" % i,
                  1000 + i]
        return keccak(keccak(encode(["bytes32", "bytes32", "bytes32", "bytes", "uint256"], values)))

    def pair(a: bytes, b: bytes) -> bytes:
        return keccak(min(a, b) + max(a, b))

    leaves = [leaf(i) for i in range(4)]
    left, right = pair(leaves[0], leaves[1]), pair(leaves[2], leaves[3])
    root = pair(left, right)
    verify = relay.functions.verifyProof
    assert await verify([leaves[1], right], root, leaves[0]).call() is True
    assert await verify([leaves[2], left], root, leaves[3]).call() is True
    assert await verify([leaves[0], right], root, leaves[0]).call() is False
    assert await verify([], leaves[2], leaves[2]).call() is True

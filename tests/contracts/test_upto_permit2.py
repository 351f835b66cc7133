"""OpenGradient-style `upto` payments on the Base Sepolia devnet: OPGToken (EIP-2612), Permit2
(SignatureTransfer) and X402UptoPermit2Proxy installed at their canonical addresses, exercised with
signatures made by eth_account and by the official x402 SDK (client and facilitator)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Any

import pytest
from contract_helpers import (
    CHAIN_ID, OTHER, OTHER_KEY, OWNER, OWNER_KEY, PAYEE, PAYER, PAYER_KEY, RELAYER, RELAYER_KEY,
    SECP256K1_N, WALLET_OWNER, WALLET_OWNER_KEY, chain_now,
)
from eth_abi import encode
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD

from facilitator.devnet import contracts
from facilitator.devnet.anvil import DEV_KEYS, Anvil

FACILITATOR, FACILITATOR_KEY = RELAYER, RELAYER_KEY   # witness.facilitator, calls proxy.settle
CAP = 10**17                                          # 0.1 OPG, OpenGradient's session cap
ONE_OPG = 10**18
FRESH_PAYER_KEY = DEV_KEYS[6]                         # never approves Permit2 itself
FRESH_PAYER = Account.from_key(FRESH_PAYER_KEY).address


# ---- fixtures ----

@pytest.fixture(scope="module")
async def opg(node: Anvil, w3: AsyncWeb3) -> AsyncContract:
    token = await contracts.install_opg(node.url, OWNER_KEY)
    await contracts.install_permit2(node.url)
    await contracts.install_upto_proxy(node.url)
    await contracts.mint(node.url, OWNER_KEY, token, PAYER, 100 * ONE_OPG)
    await contracts.approve_permit2(node.url, PAYER_KEY, token)
    return contracts.contract_at(w3, contracts.load_artifact("OPGToken"), token)


@pytest.fixture(scope="module")
def permit2(w3: AsyncWeb3, opg: AsyncContract) -> AsyncContract:
    return contracts.contract_at(w3, contracts.load_artifact("Permit2"), contracts.PERMIT2_ADDRESS)


@pytest.fixture(scope="module")
def proxy(w3: AsyncWeb3, opg: AsyncContract) -> AsyncContract:
    return contracts.contract_at(w3, contracts.load_artifact("X402UptoPermit2Proxy"),
                                 contracts.UPTO_PROXY_ADDRESS)


# ---- helpers ----

async def reverts_with(call: Any) -> str:
    """The revert of an awaitable contract call: custom errors by name and arguments
    (`InvalidNonce()`), Error(string) reverts by their string."""
    with pytest.raises(ContractLogicError) as info:
        await call
    if isinstance(info.value, ContractCustomError):
        return contracts.decode_revert(info.value.data)
    return (info.value.message or "").removeprefix("execution reverted: ")


async def sign_upto(w3: AsyncWeb3, key: str = PAYER_KEY, *, cap: int = CAP,
                    deadline: int | None = None, valid_after: int | None = None,
                    to: str = PAYEE, facilitator: str = FACILITATOR, owner: str | None = None,
                    spender: str = contracts.UPTO_PROXY_ADDRESS,
                    nonce: int | None = None) -> contracts.UptoPermit:
    now = await chain_now(w3)
    return contracts.sign_upto_permit(
        key, chain_id=CHAIN_ID, token=contracts.CANONICAL_OPG, cap=cap,
        nonce=secrets.randbits(256) if nonce is None else nonce,
        deadline=now + 300 if deadline is None else deadline,
        to=to, facilitator=facilitator,
        valid_after=now - 600 if valid_after is None else valid_after,
        owner=owner, spender=spender)


def settle_call(proxy: AsyncContract, permit: contracts.UptoPermit, amount: int, *,
                sender: str = FACILITATOR, signature: bytes | None = None) -> Any:
    return proxy.functions.settle(*permit.settle_args(amount, signature=signature)).call(
        {"from": sender})


def nonce_used(bitmap: int, nonce: int) -> bool:
    return bool(bitmap >> (nonce & 0xFF) & 1)


def compact(signature: bytes) -> bytes:
    """EIP-2098 64-byte form r || (yParity << 255 | s) of a 65-byte r || s || v signature."""
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    return r + ((v - 27) << 255 | s).to_bytes(32, "big")


# ---- installation, metadata, type strings ----

async def test_installed_at_canonical_addresses(w3: AsyncWeb3, opg: AsyncContract,
                                                proxy: AsyncContract) -> None:
    for name, address in (("OPGToken", contracts.CANONICAL_OPG),
                          ("Permit2", contracts.PERMIT2_ADDRESS),
                          ("X402UptoPermit2Proxy", contracts.UPTO_PROXY_ADDRESS)):
        artifact = contracts.load_artifact(name)
        assert (await w3.eth.get_code(address)).to_0x_hex() == artifact.deployed_bytecode
        # setCode-friendly: no constructor that could have been skipped
        assert not any(item["type"] == "constructor" for item in artifact.abi)
        assert artifact.deployed_bytecode[2:] in artifact.bytecode
    f = opg.functions
    assert (await f.name().call(), await f.symbol().call(), await f.decimals().call(),
            await f.version().call(), await f.owner().call()) == ("OPG", "OPG", 18, "2", OWNER)
    assert await f.eip712Domain().call() == \
        [b"\x0f", "OPG", "2", CHAIN_ID, contracts.CANONICAL_OPG, b"\x00" * 32, []]
    assert await proxy.functions.PERMIT2().call() == contracts.PERMIT2_ADDRESS


async def test_opg_install_is_idempotent_and_initialize_once(node: Anvil,
                                                             opg: AsyncContract) -> None:
    assert await contracts.install_opg(node.url, OWNER_KEY) == contracts.CANONICAL_OPG
    with pytest.raises(contracts.ContractsError, match="already initialized"):
        await contracts.install_opg(node.url, OWNER_KEY, version="1")
    assert await reverts_with(opg.functions.initialize("X", "X", "1", 6, OTHER).call(
        {"from": OTHER})) == "InvalidInitialization()"
    assert await reverts_with(opg.functions.mint(OTHER, 1).call({"from": OTHER})) == \
        f"UnauthorizedMinter({OTHER})"


async def test_type_strings_match_the_sdk_and_permit2_digest_is_pinned(
        w3: AsyncWeb3, permit2: AsyncContract, proxy: AsyncContract) -> None:
    from eth_account._utils.encode_typed_data.encoding_and_hashing import encode_type
    from x402.mechanisms.evm.constants import UPTO_PERMIT2_WITNESS_TYPES

    # Permit2's domain: name "Permit2", no version, chain id and address read at call time.
    domain_typehash = keccak(
        text="EIP712Domain(string name,uint256 chainId,address verifyingContract)")
    separator = keccak(encode(["bytes32", "bytes32", "uint256", "address"],
                              [domain_typehash, keccak(text="Permit2"), CHAIN_ID,
                               contracts.PERMIT2_ADDRESS]))
    assert await permit2.functions.DOMAIN_SEPARATOR().call() == separator

    # The proxy's witness strings are what the SDK's types encode to.
    witness_type = "Witness(address to,address facilitator,uint256 validAfter)"
    full_type = contracts.PERMIT_WITNESS_TRANSFER_FROM_STUB + contracts.UPTO_WITNESS_TYPE_STRING
    assert encode_type("PermitWitnessTransferFrom", UPTO_PERMIT2_WITNESS_TYPES) == full_type
    assert await proxy.functions.WITNESS_TYPE_STRING().call() == contracts.UPTO_WITNESS_TYPE_STRING
    assert await proxy.functions.WITNESS_TYPEHASH().call() == keccak(text=witness_type)

    # The digest eth_account signs for our typed data == the one built by hand from the contract's
    # separator and the canonical type strings == the one for the SDK's own type table.
    nonce, deadline, valid_after, token = 12345, 1_900_000_000, 7, contracts.CANONICAL_OPG
    typed = contracts.upto_permit_typed_data(
        chain_id=CHAIN_ID, token=token, amount=CAP, nonce=nonce, deadline=deadline, to=PAYEE,
        facilitator=FACILITATOR, valid_after=valid_after)
    ours = _hash_eip191_message(encode_typed_data(full_message=typed))
    sdk_typed = {**typed, "types": {"EIP712Domain": typed["types"]["EIP712Domain"],
                                    **UPTO_PERMIT2_WITNESS_TYPES}}
    assert _hash_eip191_message(encode_typed_data(full_message=sdk_typed)) == ours

    token_permissions = keccak(encode(
        ["bytes32", "address", "uint256"],
        [keccak(text="TokenPermissions(address token,uint256 amount)"), token, CAP]))
    witness = keccak(encode(["bytes32", "address", "address", "uint256"],
                            [keccak(text=witness_type), PAYEE, FACILITATOR, valid_after]))
    struct = keccak(encode(
        ["bytes32", "bytes32", "address", "uint256", "uint256", "bytes32"],
        [keccak(text=full_type), token_permissions, contracts.UPTO_PROXY_ADDRESS, nonce, deadline,
         witness]))
    assert keccak(b"\x19\x01" + separator + struct) == ours


async def test_proxy_settle_selector_and_events_match_the_sdk() -> None:
    from x402.mechanisms.evm.constants import X402_UPTO_PERMIT2_PROXY_ABI

    sdk_settle = X402_UPTO_PERMIT2_PROXY_ABI[0]
    ours = next(i for i in contracts.load_artifact("X402UptoPermit2Proxy").abi
                if i.get("name") == "settle")
    assert [contracts.abi_type(p) for p in ours["inputs"]] == \
        [contracts.abi_type(p) for p in sdk_settle["inputs"]]
    assert keccak(text="settle(((address,uint256),uint256,uint256),uint256,address,"
                       "(address,address,uint256),bytes)")[:4].hex() == "ff11e7b4"


# ---- OPG EIP-2612 permit ----

async def test_opg_permit(node: Anvil, w3: AsyncWeb3, opg: AsyncContract) -> None:
    f = opg.functions
    nonce = await f.nonces(PAYER).call()
    deadline = await chain_now(w3) + 600
    typed = contracts.eip2612_permit_typed_data(
        token=opg.address, chain_id=CHAIN_ID, owner=PAYER, spender=OTHER, value=777,
        nonce=nonce, deadline=deadline)
    signed = Account.sign_typed_data(PAYER_KEY, full_message=typed)
    r, s = signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")
    args = [PAYER, OTHER, 777, deadline, signed.v, r, s]

    # the malleable twin and a signature by someone else are refused
    high_s = (SECP256K1_N - signed.s).to_bytes(32, "big")
    assert await reverts_with(
        f.permit(PAYER, OTHER, 777, deadline, 55 - signed.v, r, high_s).call(
            {"from": RELAYER})) == f"ECDSAInvalidSignatureS(0x{high_s.hex()})"
    forged = Account.sign_typed_data(OTHER_KEY, full_message=typed)
    assert await reverts_with(f.permit(
        PAYER, OTHER, 777, deadline, forged.v, forged.r.to_bytes(32, "big"),
        forged.s.to_bytes(32, "big")).call({"from": RELAYER})) == \
        f"ERC2612InvalidSigner({OTHER}, {PAYER})"

    data = opg.encode_abi("permit", args)
    receipt = await contracts.transact(node.url, RELAYER_KEY, opg.address, data, what="permit")
    assert await f.allowance(PAYER, OTHER).call() == 777
    assert await f.nonces(PAYER).call() == nonce + 1
    approvals = opg.events.Approval().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.owner, e.args.spender, e.args.value) for e in approvals] == \
        [(PAYER, OTHER, 777)]
    # replay: the nonce moved on, so the same signature now recovers to some other address
    assert (await reverts_with(f.permit(*args).call({"from": RELAYER}))).startswith(
        "ERC2612InvalidSigner(")
    expired = await chain_now(w3) - 100
    assert await reverts_with(f.permit(PAYER, OTHER, 1, expired, signed.v, r, s).call(
        {"from": RELAYER})) == f"ERC2612ExpiredSignature({expired})"


# ---- the upto flow through the proxy ----

async def test_upto_settle_moves_exactly_amount_once(
        node: Anvil, w3: AsyncWeb3, opg: AsyncContract, permit2: AsyncContract,
        proxy: AsyncContract) -> None:
    permit = await sign_upto(w3)
    amount = 3 * 10**16   # 0.03 OPG of a 0.1 OPG cap
    f = opg.functions
    before = {a: await f.balanceOf(a).call() for a in (PAYER, PAYEE, FACILITATOR, proxy.address)}
    word = permit.nonce >> 8
    assert not nonce_used(await permit2.functions.nonceBitmap(PAYER, word).call(), permit.nonce)

    tx = await contracts.upto_settle(node.url, FACILITATOR_KEY, permit, amount)

    after = {a: await f.balanceOf(a).call() for a in before}
    assert after[PAYER] == before[PAYER] - amount
    assert after[PAYEE] == before[PAYEE] + amount
    assert after[FACILITATOR] == before[FACILITATOR]
    assert after[proxy.address] == before[proxy.address] == 0
    assert nonce_used(await permit2.functions.nonceBitmap(PAYER, word).call(), permit.nonce)
    assert await f.allowance(PAYER, contracts.PERMIT2_ADDRESS).call() == contracts.MAX_UINT256

    receipt = await w3.eth.get_transaction_receipt(tx)
    transfers = opg.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e.args["from"], e.args.to, e.args.value) for e in transfers] == \
        [(PAYER, PAYEE, amount)]
    settled = [log for log in receipt["logs"] if log["address"] == proxy.address]
    assert [log["topics"][0] for log in settled] == [keccak(text="Settled()")]
    assert settled[0]["topics"][0].hex() == \
        "97088ec3606cfe8cc112180570d03fcde05f9b8e1bfef8e27784eaf5dd5691b6"

    # the permit is spent: neither the rest of the cap nor a replay can be settled
    assert await reverts_with(settle_call(proxy, permit, 1)) == "InvalidNonce()"
    with pytest.raises(contracts.ContractsError, match=r"would revert: InvalidNonce\(\)"):
        await contracts.upto_settle(node.url, FACILITATOR_KEY, permit, amount)


async def test_settle_the_whole_cap(node: Anvil, w3: AsyncWeb3, opg: AsyncContract) -> None:
    permit = await sign_upto(w3)
    before = await opg.functions.balanceOf(PAYEE).call()
    await contracts.upto_settle(node.url, FACILITATOR_KEY, permit, CAP)
    assert await opg.functions.balanceOf(PAYEE).call() == before + CAP


async def test_amount_must_be_within_cap_and_nonzero(w3: AsyncWeb3,
                                                     proxy: AsyncContract) -> None:
    permit = await sign_upto(w3)
    assert await reverts_with(settle_call(proxy, permit, CAP + 1)) == "AmountExceedsPermitted()"
    assert await reverts_with(settle_call(proxy, permit, 0)) == "InvalidAmount()"
    await settle_call(proxy, permit, CAP)   # the same permit is fine within bounds


async def test_only_the_witness_facilitator_may_settle(w3: AsyncWeb3,
                                                       proxy: AsyncContract) -> None:
    permit = await sign_upto(w3)
    for caller in (OTHER, PAYER, PAYEE):
        assert await reverts_with(settle_call(proxy, permit, 1, sender=caller)) == \
            "UnauthorizedFacilitator()"
    # naming another facilitator in the call does not help: the witness is signed
    forged = dataclasses.replace(permit, facilitator=OTHER)
    assert await reverts_with(settle_call(proxy, forged, 1, sender=OTHER)) == "InvalidSigner()"


async def test_expired_deadline(w3: AsyncWeb3, proxy: AsyncContract) -> None:
    deadline = await chain_now(w3) - 100
    permit = await sign_upto(w3, deadline=deadline)
    assert await reverts_with(settle_call(proxy, permit, 1)) == f"SignatureExpired({deadline})"


async def test_valid_after_in_the_future(w3: AsyncWeb3, proxy: AsyncContract) -> None:
    now = await chain_now(w3)
    permit = await sign_upto(w3, valid_after=now + 3600, deadline=now + 7200)
    assert await reverts_with(settle_call(proxy, permit, 1)) == "PaymentTooEarly()"
    # validAfter is inclusive: a permit valid from the current block's time settles
    await settle_call(proxy, await sign_upto(w3, valid_after=now), 1)


async def test_wrong_signer_and_tampering_are_refused(w3: AsyncWeb3,
                                                      proxy: AsyncContract) -> None:
    by_other = await sign_upto(w3, OTHER_KEY, owner=PAYER)
    assert await reverts_with(settle_call(proxy, by_other, 1)) == "InvalidSigner()"
    permit = await sign_upto(w3)
    for field, value in (("to", OTHER), ("cap", CAP * 10), ("deadline", permit.deadline + 1),
                         ("valid_after", permit.valid_after - 1), ("nonce", permit.nonce + 1)):
        tampered = dataclasses.replace(permit, **{field: value})
        assert await reverts_with(settle_call(proxy, tampered, 1)) == "InvalidSigner()", field
    # signed for another spender: Permit2 hashes msg.sender (the proxy) as spender
    other_spender = await sign_upto(w3, spender=OTHER)
    assert await reverts_with(settle_call(proxy, other_spender, 1)) == "InvalidSigner()"
    # malformed signatures
    assert await reverts_with(settle_call(proxy, permit, 1, signature=permit.signature[:63])) == \
        "InvalidSignatureLength()"
    zero_r = b"\x00" * 32 + permit.signature[32:]
    assert await reverts_with(settle_call(proxy, permit, 1, signature=zero_r)) == \
        "InvalidSignature()"
    # the EIP-2098 compact form of the right signature is accepted
    await settle_call(proxy, permit, 1, signature=compact(permit.signature))


async def test_destination_and_owner_must_be_set(w3: AsyncWeb3, proxy: AsyncContract) -> None:
    zero = "0x" + "00" * 20
    permit = await sign_upto(w3, to=zero)
    assert await reverts_with(settle_call(proxy, permit, 1)) == "InvalidDestination()"
    permit = await sign_upto(w3)
    no_owner = dataclasses.replace(permit, owner=zero)
    assert await reverts_with(settle_call(proxy, no_owner, 1)) == "InvalidOwner()"


async def test_payer_can_invalidate_a_nonce(node: Anvil, w3: AsyncWeb3, permit2: AsyncContract,
                                            proxy: AsyncContract) -> None:
    permit = await sign_upto(w3)
    word, bit = permit.nonce >> 8, 1 << (permit.nonce & 0xFF)
    data = permit2.encode_abi("invalidateUnorderedNonces", [word, bit])
    receipt = await contracts.transact(node.url, PAYER_KEY, permit2.address, data)
    events = permit2.events.UnorderedNonceInvalidation().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.owner, e.args.word, e.args.mask) for e in events] == [(PAYER, word, bit)]
    assert await reverts_with(settle_call(proxy, permit, 1)) == "InvalidNonce()"


async def test_balance_and_approval_failures(node: Anvil, w3: AsyncWeb3, opg: AsyncContract,
                                             proxy: AsyncContract) -> None:
    # Permit2 turns any token failure into solmate's "TRANSFER_FROM_FAILED"
    no_approval = await sign_upto(w3, FRESH_PAYER_KEY)
    await contracts.mint(node.url, OWNER_KEY, opg.address, FRESH_PAYER, ONE_OPG)
    assert await reverts_with(settle_call(proxy, no_approval, 1)) == "TRANSFER_FROM_FAILED"
    balance = await opg.functions.balanceOf(PAYER).call()
    too_much = await sign_upto(w3, cap=balance + 1)
    assert await reverts_with(settle_call(proxy, too_much, balance + 1)) == "TRANSFER_FROM_FAILED"


async def test_smart_wallet_owner_signs_via_erc1271(node: Anvil, w3: AsyncWeb3,
                                                    opg: AsyncContract,
                                                    proxy: AsyncContract) -> None:
    wallet = await contracts.deploy_smart_wallet(node.url, OWNER_KEY, WALLET_OWNER)
    await contracts.mint(node.url, OWNER_KEY, opg.address, wallet, ONE_OPG)
    approve = opg.encode_abi("approve", [contracts.PERMIT2_ADDRESS, contracts.MAX_UINT256])
    await contracts.wallet_execute(node.url, WALLET_OWNER_KEY, wallet, opg.address, approve)

    forged = await sign_upto(w3, OTHER_KEY, owner=wallet)
    assert await reverts_with(settle_call(proxy, forged, 1)) == "InvalidContractSignature()"

    permit = await sign_upto(w3, WALLET_OWNER_KEY, owner=wallet)
    payee_before = await opg.functions.balanceOf(PAYEE).call()
    await contracts.upto_settle(node.url, FACILITATOR_KEY, permit, 4 * 10**16)
    assert await opg.functions.balanceOf(wallet).call() == ONE_OPG - 4 * 10**16
    assert await opg.functions.balanceOf(PAYEE).call() == payee_before + 4 * 10**16


async def test_settle_with_permit_approves_permit2_in_the_same_call(
        node: Anvil, w3: AsyncWeb3, opg: AsyncContract, proxy: AsyncContract) -> None:
    key, payer = DEV_KEYS[7], Account.from_key(DEV_KEYS[7]).address
    await contracts.mint(node.url, OWNER_KEY, opg.address, payer, ONE_OPG)
    permit = await sign_upto(w3, key)
    typed = contracts.eip2612_permit_typed_data(
        token=opg.address, chain_id=CHAIN_ID, owner=payer, spender=contracts.PERMIT2_ADDRESS,
        value=CAP, nonce=await opg.functions.nonces(payer).call(), deadline=permit.deadline)
    signed = Account.sign_typed_data(key, full_message=typed)
    p2612 = (CAP, permit.deadline, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"),
             signed.v)
    wrong_value = (CAP - 1, *p2612[1:])
    assert await reverts_with(proxy.functions.settleWithPermit(
        wrong_value, *permit.settle_args(1)).call({"from": FACILITATOR})) == \
        "Permit2612AmountMismatch()"

    data = proxy.encode_abi("settleWithPermit", [p2612, *permit.settle_args(2 * 10**16)])
    receipt = await contracts.transact(node.url, FACILITATOR_KEY, proxy.address, data)
    assert [log["topics"][0] for log in receipt["logs"] if log["address"] == proxy.address] == \
        [keccak(text="SettledWithPermit()")]
    assert await opg.functions.allowance(payer, contracts.PERMIT2_ADDRESS).call() == \
        CAP - 2 * 10**16
    assert await opg.functions.balanceOf(payer).call() == ONE_OPG - 2 * 10**16

    # a second permit with the spent EIP-2612 signature fails inside the token; that failure is
    # only logged and the settlement still goes through on the existing Permit2 allowance
    again = await sign_upto(w3, key, cap=CAP)
    data = proxy.encode_abi("settleWithPermit", [p2612, *again.settle_args(10**16)])
    receipt = await contracts.transact(node.url, FACILITATOR_KEY, proxy.address, data)
    failed = proxy.events.EIP2612PermitFailedWithData().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.token, e.args.owner, e.args.data[:4]) for e in failed] == \
        [(opg.address, payer, keccak(text="ERC2612InvalidSigner(address,address)")[:4])]
    assert await opg.functions.balanceOf(payer).call() == ONE_OPG - 3 * 10**16


# ---- Permit2 on its own ----

async def test_permit2_plain_permit_transfer_from(node: Anvil, w3: AsyncWeb3,
                                                  opg: AsyncContract,
                                                  permit2: AsyncContract) -> None:
    """A plain PermitTransferFrom: the spender (here an EOA) must be msg.sender, and may take
    any requested amount up to the signed one, to any address it chooses."""
    nonce, deadline = secrets.randbits(256), await chain_now(w3) + 300
    typed = contracts.permit_transfer_typed_data(
        chain_id=CHAIN_ID, token=opg.address, amount=500, spender=OTHER, nonce=nonce,
        deadline=deadline)
    signature = bytes(Account.sign_typed_data(PAYER_KEY, full_message=typed).signature)
    permit = ((opg.address, 500), nonce, deadline)
    fn = permit2.get_function_by_signature(
        "permitTransferFrom(((address,uint256),uint256,uint256),(address,uint256),address,bytes)")
    assert await reverts_with(fn(permit, (PAYEE, 100), PAYER, signature).call(
        {"from": RELAYER})) == "InvalidSigner()"
    assert await reverts_with(fn(permit, (PAYEE, 501), PAYER, signature).call(
        {"from": OTHER})) == "InvalidAmount(500)"
    before = await opg.functions.balanceOf(PAYEE).call()
    data = permit2.encode_abi(
        "permitTransferFrom(((address,uint256),uint256,uint256),(address,uint256),address,bytes)",
        [permit, (PAYEE, 123), PAYER, signature])
    await contracts.transact(node.url, OTHER_KEY, permit2.address, data)
    assert await opg.functions.balanceOf(PAYEE).call() == before + 123
    # a witness transfer with the same nonce is refused: nonces are shared
    witness_fn = permit2.get_function_by_signature(
        "permitWitnessTransferFrom(((address,uint256),uint256,uint256),(address,uint256),address,"
        "bytes32,string,bytes)")
    assert await reverts_with(witness_fn(permit, (PAYEE, 1), PAYER, b"\x00" * 32, "", signature)
                              .call({"from": OTHER})) == "InvalidNonce()"


async def test_permit2_batch_transfer(node: Anvil, w3: AsyncWeb3, opg: AsyncContract,
                                      permit2: AsyncContract) -> None:
    usdc = await contracts.deploy_usdc(node.url, OWNER_KEY)
    await contracts.mint(node.url, OWNER_KEY, usdc, PAYER, 10**6)
    await contracts.approve_permit2(node.url, PAYER_KEY, usdc)
    nonce, deadline = secrets.randbits(256), await chain_now(w3) + 300
    typed = {
        "types": {"EIP712Domain": [{"name": "name", "type": "string"},
                                   {"name": "chainId", "type": "uint256"},
                                   {"name": "verifyingContract", "type": "address"}],
                  "PermitBatchTransferFrom": [
                      {"name": "permitted", "type": "TokenPermissions[]"},
                      {"name": "spender", "type": "address"},
                      {"name": "nonce", "type": "uint256"},
                      {"name": "deadline", "type": "uint256"}],
                  "TokenPermissions": [{"name": "token", "type": "address"},
                                       {"name": "amount", "type": "uint256"}]},
        "primaryType": "PermitBatchTransferFrom",
        "domain": contracts.permit2_domain(CHAIN_ID),
        "message": {"permitted": [{"token": opg.address, "amount": 50},
                                  {"token": usdc, "amount": 60}],
                    "spender": OTHER, "nonce": nonce, "deadline": deadline},
    }
    signature = bytes(Account.sign_typed_data(PAYER_KEY, full_message=typed).signature)
    signature_fn = ("permitTransferFrom(((address,uint256)[],uint256,uint256),(address,uint256)[],"
                    "address,bytes)")
    permit = ([(opg.address, 50), (usdc, 60)], nonce, deadline)
    fn = permit2.get_function_by_signature(signature_fn)
    assert await reverts_with(fn(permit, [(PAYEE, 1)], PAYER, signature).call(
        {"from": OTHER})) == "LengthMismatch()"
    assert await reverts_with(fn(permit, [(PAYEE, 1), (PAYEE, 61)], PAYER, signature).call(
        {"from": OTHER})) == "InvalidAmount(60)"
    usdc_contract = contracts.contract_at(w3, contracts.load_artifact("TestUSDC"), usdc)
    before = (await opg.functions.balanceOf(PAYEE).call(),
              await usdc_contract.functions.balanceOf(OTHER).call())
    data = permit2.encode_abi(signature_fn, [permit, [(PAYEE, 0), (OTHER, 60)], PAYER, signature])
    await contracts.transact(node.url, OTHER_KEY, permit2.address, data)
    assert (await opg.functions.balanceOf(PAYEE).call(),
            await usdc_contract.functions.balanceOf(OTHER).call()) == (before[0], before[1] + 60)


# ---- the official x402 SDK: its client signs, its facilitator code verifies and settles ----

async def test_x402_sdk_upto_client_and_facilitator_against_the_devnet(
        node: Anvil, opg: AsyncContract) -> None:
    """Oracle check with x402 2.25.0. The SDK's public facilitator entry points import
    `x402.extensions` (needs jsonschema, not a dependency here) on their allowance/extension paths,
    so the same steps are called one level down: signature verification with
    `verify_upto_permit2(simulate=False)`, the eth_call of `proxy.settle` the SDK simulates, and
    the SDK's direct settle path."""
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.types import UptoPermit2Payload
    from x402.mechanisms.evm.upto import UptoEvmClientScheme
    from x402.mechanisms.evm.upto.permit2_utils import (
        _settle_upto_direct, _simulate_upto_settle, verify_upto_permit2,
    )
    from x402.schemas import PaymentPayload, PaymentRequirements

    requirements = PaymentRequirements(
        scheme="upto", network=f"eip155:{CHAIN_ID}", asset=contracts.CANONICAL_OPG,
        amount=str(CAP), pay_to=PAYEE, max_timeout_seconds=300,
        extra={"name": "OPG", "version": "2", "assetTransferMethod": "permit2",
               "facilitatorAddress": FACILITATOR})
    inner = UptoEvmClientScheme(Account.from_key(PAYER_KEY)).create_payment_payload(requirements)
    assert to_checksum_address(inner["permit2Authorization"]["spender"]) == \
        contracts.UPTO_PROXY_ADDRESS
    payload = PaymentPayload(x402_version=2, accepted=requirements, payload=inner)
    permit2_payload = UptoPermit2Payload.from_dict(inner)
    signer = FacilitatorWeb3Signer(FACILITATOR_KEY, node.url)
    amount = 25 * 10**15

    verified = await asyncio.to_thread(verify_upto_permit2, signer, payload, requirements, None,
                                       False)
    assert verified.is_valid, verified
    assert await asyncio.to_thread(_simulate_upto_settle, signer, permit2_payload, amount)
    assert not await asyncio.to_thread(_simulate_upto_settle, signer, permit2_payload, CAP + 1)
    other_signer = FacilitatorWeb3Signer(OTHER_KEY, node.url)   # not witness.facilitator
    assert not await asyncio.to_thread(_simulate_upto_settle, other_signer, permit2_payload, 1)

    payee_before = await opg.functions.balanceOf(PAYEE).call()
    settled = await asyncio.to_thread(_settle_upto_direct, signer, payload, permit2_payload, amount)
    assert settled.success, settled
    assert settled.amount == str(amount)
    assert await opg.functions.balanceOf(PAYEE).call() == payee_before + amount
    # spent: the SDK's own simulation now fails
    assert not await asyncio.to_thread(_simulate_upto_settle, signer, permit2_payload, 1)

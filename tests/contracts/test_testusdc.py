"""TestUSDC installed with anvil_setCode at the canonical Base Sepolia USDC address: ERC-20,
EIP-712 domain, and EIP-3009 in both overloads with FiatToken v2.2 revert strings."""

from __future__ import annotations

import pytest
from contract_helpers import (
    CANCEL_BYTES, CANCEL_VRS, CHAIN_ID, OTHER, OTHER_KEY, OWNER, OWNER_KEY, PAYEE, PAYEE_KEY,
    PAYER, PAYER_KEY, RELAYER, RELAYER_KEY, RWA_BYTES, RWA_VRS, TWA_BYTES, TWA_VRS,
    chain_now, high_s, revert_reason, sign_authorization, sign_cancel, submit,
)
from eth_abi import encode
from eth_utils import keccak
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.logs import DISCARD

from facilitator.devnet import contracts
from facilitator.devnet.anvil import Anvil

TWA_OVERLOADS = [pytest.param(TWA_VRS, id="vrs"), pytest.param(TWA_BYTES, id="bytes")]


@pytest.fixture(scope="module", autouse=True)
async def funded(node: Anvil, usdc_address: str) -> None:
    await contracts.mint(node.url, OWNER_KEY, usdc_address, PAYER, 1_000 * 10**6)


def args_for(signature: str, auth) -> list:
    return auth.vrs_args() if "uint8" in signature else auth.bytes_args()


# ---- installation / metadata ----

async def test_runtime_code_is_the_artifact_at_the_canonical_address(
        w3: AsyncWeb3, usdc_address: str) -> None:
    assert usdc_address == contracts.CANONICAL_USDC
    code = await w3.eth.get_code(usdc_address)
    assert code.to_0x_hex() == contracts.load_artifact("TestUSDC").deployed_bytecode


async def test_metadata_and_eip712_domain(usdc: AsyncContract, usdc_address: str) -> None:
    f = usdc.functions
    assert (await f.name().call(), await f.symbol().call(), await f.decimals().call(),
            await f.version().call(), await f.owner().call()) == ("USDC", "USDC", 6, "2", OWNER)
    domain_typehash = keccak(text="EIP712Domain(string name,string version,uint256 chainId,"
                                  "address verifyingContract)")
    expected = keccak(encode(
        ["bytes32", "bytes32", "bytes32", "uint256", "address"],
        [domain_typehash, keccak(text="USDC"), keccak(text="2"), CHAIN_ID, usdc_address]))
    assert await f.DOMAIN_SEPARATOR().call() == expected
    assert await f.eip712Domain().call() == \
        [b"\x0f", "USDC", "2", CHAIN_ID, usdc_address, b"\x00" * 32, []]


async def test_typehashes_are_eip3009s(usdc: AsyncContract) -> None:
    f = usdc.functions
    assert (await f.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call()).hex() == \
        "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267"
    assert (await f.RECEIVE_WITH_AUTHORIZATION_TYPEHASH().call()).hex() == \
        "d099cc98ef71107a616c4f0f941f04c322d8e254fe26b3c6668db87aae413de8"
    assert (await f.CANCEL_AUTHORIZATION_TYPEHASH().call()).hex() == \
        "158b0a9edf7a828aad02f63cd515c68ef2f50ba807396f6d12842833a1597429"


async def test_initialize_only_once(node: Anvil, usdc: AsyncContract) -> None:
    reason = await revert_reason(
        usdc.functions.initialize("Evil", "EVL", "9", 18, OTHER).call({"from": OTHER}))
    assert reason == "FiatToken: contract is already initialized"
    # install_usdc is idempotent for the same configuration and refuses a different one
    assert await contracts.install_usdc(node.url, OWNER_KEY) == contracts.CANONICAL_USDC
    with pytest.raises(contracts.ContractsError, match="already initialized"):
        await contracts.install_usdc(node.url, OWNER_KEY, version="1")


async def test_fresh_deployment_is_a_separate_domain(node: Anvil, w3: AsyncWeb3) -> None:
    other = await contracts.deploy_usdc(node.url, OWNER_KEY, name="Other USD", version="7")
    token = contracts.contract_at(w3, contracts.load_artifact("TestUSDC"), other)
    assert other != contracts.CANONICAL_USDC
    assert (await token.functions.eip712Domain().call())[1:5] == ["Other USD", "7", CHAIN_ID, other]


# ---- minting and ERC-20 ----

async def test_mint_is_owner_or_minter_only(node: Anvil, usdc: AsyncContract) -> None:
    reason = await revert_reason(usdc.functions.mint(OTHER, 1).call({"from": OTHER}))
    assert reason == "FiatToken: caller is not a minter"
    await submit(node, OWNER_KEY, usdc, "configureMinter", [OTHER, True])
    before = await usdc.functions.totalSupply().call()
    await contracts.mint(node.url, OTHER_KEY, usdc.address, OTHER, 5)
    assert await usdc.functions.totalSupply().call() == before + 5
    await submit(node, OWNER_KEY, usdc, "configureMinter", [OTHER, False])
    assert await revert_reason(usdc.functions.mint(OTHER, 1).call({"from": OTHER})) == \
        "FiatToken: caller is not a minter"


async def test_erc20_transfer_approve_transfer_from(node: Anvil, usdc: AsyncContract) -> None:
    f = usdc.functions
    payee_before = await f.balanceOf(PAYEE).call()
    await submit(node, PAYER_KEY, usdc, "transfer", [PAYEE, 10])
    assert await f.balanceOf(PAYEE).call() == payee_before + 10

    await submit(node, PAYER_KEY, usdc, "approve", [RELAYER, 7])
    assert await f.allowance(PAYER, RELAYER).call() == 7
    assert await revert_reason(f.transferFrom(PAYER, PAYEE, 8).call({"from": RELAYER})) == \
        "ERC20: transfer amount exceeds allowance"
    await submit(node, RELAYER_KEY, usdc, "transferFrom", [PAYER, PAYEE, 7])
    assert await f.allowance(PAYER, RELAYER).call() == 0
    assert await f.balanceOf(PAYEE).call() == payee_before + 17

    balance = await f.balanceOf(PAYER).call()
    assert await revert_reason(f.transfer(PAYEE, balance + 1).call({"from": PAYER})) == \
        "ERC20: transfer amount exceeds balance"
    assert await revert_reason(f.transfer("0x" + "00" * 20, 1).call({"from": PAYER})) == \
        "ERC20: transfer to the zero address"
    assert await revert_reason(f.approve("0x" + "00" * 20, 1).call({"from": PAYER})) == \
        "ERC20: approve to the zero address"


# ---- EIP-3009 transferWithAuthorization ----

@pytest.mark.parametrize("signature", TWA_OVERLOADS)
async def test_transfer_with_authorization_settles_once(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, signature: str) -> None:
    f = usdc.functions
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY, value=1_500_000)
    payer_before, payee_before = await f.balanceOf(PAYER).call(), await f.balanceOf(PAYEE).call()
    assert await f.authorizationState(PAYER, auth.nonce).call() is False

    receipt = await submit(node, RELAYER_KEY, usdc, signature, args_for(signature, auth))

    assert await f.balanceOf(PAYER).call() == payer_before - 1_500_000
    assert await f.balanceOf(PAYEE).call() == payee_before + 1_500_000
    assert await f.authorizationState(PAYER, auth.nonce).call() is True
    used = usdc.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    transfer = usdc.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.authorizer, e.args.nonce) for e in used] == [(PAYER, auth.nonce)]
    assert [(e.args["from"], e.args.to, e.args.value) for e in transfer] == \
        [(PAYER, PAYEE, 1_500_000)]

    for replay in (TWA_VRS, TWA_BYTES):  # the nonce is spent for both overloads
        reason = await revert_reason(
            usdc.get_function_by_signature(replay)(*args_for(replay, auth)).call({"from": RELAYER}))
        assert reason == "FiatTokenV2: authorization is used or canceled"


@pytest.mark.parametrize("signature", TWA_OVERLOADS)
async def test_transfer_with_authorization_time_window(
        w3: AsyncWeb3, usdc: AsyncContract, signature: str) -> None:
    now = await chain_now(w3)
    fn = usdc.get_function_by_signature(signature)
    expired = await sign_authorization(w3, usdc.address, PAYER_KEY, valid_before=now - 1)
    assert await revert_reason(fn(*args_for(signature, expired)).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is expired"
    early = await sign_authorization(w3, usdc.address, PAYER_KEY, valid_after=now + 3600,
                                     valid_before=now + 7200)
    assert await revert_reason(fn(*args_for(signature, early)).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is not yet valid"


@pytest.mark.parametrize("signature", TWA_OVERLOADS)
async def test_transfer_with_authorization_refuses_bad_signatures(
        w3: AsyncWeb3, usdc: AsyncContract, signature: str) -> None:
    fn = usdc.get_function_by_signature(signature)

    async def reason_for(sig_v: int, r: bytes, s: bytes, auth) -> str:
        tail = [sig_v, r, s] if "uint8" in signature else [r + s + bytes([sig_v])]
        return await revert_reason(fn(*auth.fields, *tail).call({"from": RELAYER}))

    # Signed by someone else on the payer's behalf.
    forged = await sign_authorization(w3, usdc.address, OTHER_KEY, from_=PAYER)
    assert await revert_reason(fn(*args_for(signature, forged)).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"
    # Signed by the payer, then the amount is changed.
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY, value=1_000)
    tampered = auth.fields
    tampered[2] = 1_001
    tail = auth.vrs_args()[6:] if "uint8" in signature else auth.bytes_args()[6:]
    assert await revert_reason(fn(*tampered, *tail).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"
    # The malleable high-s twin recovers the payer but is refused like FiatToken's ECRecover.
    assert await reason_for(*high_s(auth.signed), auth) == "ECRecover: invalid signature 's' value"
    # v must be 27 or 28.
    r, s = auth.signed.r.to_bytes(32, "big"), auth.signed.s.to_bytes(32, "big")
    assert await reason_for(auth.signed.v - 27, r, s, auth) == \
        "ECRecover: invalid signature 'v' value"
    # A signature for another EIP-712 domain (wrong version) does not verify.
    other_domain = await sign_authorization(w3, usdc.address, PAYER_KEY, version="1")
    assert await revert_reason(fn(*args_for(signature, other_domain)).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"
    # The untouched authorization would settle.
    await fn(*args_for(signature, auth)).call({"from": RELAYER})


async def test_bytes_overload_refuses_wrong_length(w3: AsyncWeb3, usdc: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY)
    fn = usdc.get_function_by_signature(TWA_BYTES)
    sig = bytes(auth.signed.signature)
    assert await revert_reason(fn(*auth.fields, sig + b"\x00").call({"from": RELAYER})) == \
        "ECRecover: invalid signature length"
    assert await revert_reason(fn(*auth.fields, sig[:64]).call({"from": RELAYER})) == \
        "ECRecover: invalid signature length"


async def test_transfer_with_authorization_insufficient_balance(
        w3: AsyncWeb3, usdc: AsyncContract) -> None:
    balance = await usdc.functions.balanceOf(PAYER).call()
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY, value=balance + 1)
    for signature in (TWA_VRS, TWA_BYTES):
        fn = usdc.get_function_by_signature(signature)
        assert await revert_reason(fn(*args_for(signature, auth)).call({"from": RELAYER})) == \
            "ERC20: transfer amount exceeds balance"


# ---- receiveWithAuthorization ----

@pytest.mark.parametrize("signature", [pytest.param(RWA_VRS, id="vrs"),
                                       pytest.param(RWA_BYTES, id="bytes")])
async def test_receive_with_authorization_only_by_payee(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, signature: str) -> None:
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY, value=42,
                                    primary_type="ReceiveWithAuthorization")
    fn = usdc.get_function_by_signature(signature)
    assert await revert_reason(fn(*args_for(signature, auth)).call({"from": RELAYER})) == \
        "FiatTokenV2: caller must be the payee"
    # A TransferWithAuthorization signature is not a ReceiveWithAuthorization one.
    transfer_auth = await sign_authorization(w3, usdc.address, PAYER_KEY, value=42)
    assert await revert_reason(fn(*args_for(signature, transfer_auth)).call({"from": PAYEE})) == \
        "FiatTokenV2: invalid signature"

    payee_before = await usdc.functions.balanceOf(PAYEE).call()
    await submit(node, PAYEE_KEY, usdc, signature, args_for(signature, auth))
    assert await usdc.functions.balanceOf(PAYEE).call() == payee_before + 42
    assert await usdc.functions.authorizationState(PAYER, auth.nonce).call() is True
    assert await revert_reason(fn(*args_for(signature, auth)).call({"from": PAYEE})) == \
        "FiatTokenV2: authorization is used or canceled"


# ---- cancelAuthorization ----

@pytest.mark.parametrize("signature", [pytest.param(CANCEL_VRS, id="vrs"),
                                       pytest.param(CANCEL_BYTES, id="bytes")])
async def test_cancel_authorization(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, signature: str) -> None:
    auth = await sign_authorization(w3, usdc.address, PAYER_KEY)
    fn = usdc.get_function_by_signature(signature)

    def cancel_args(signed) -> list:
        if "uint8" in signature:
            r, s = signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")
            return [PAYER, auth.nonce, signed.v, r, s]
        return [PAYER, auth.nonce, bytes(signed.signature)]

    forged = sign_cancel(usdc.address, OTHER_KEY, auth.nonce, authorizer=PAYER)
    assert await revert_reason(fn(*cancel_args(forged)).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"

    signed = sign_cancel(usdc.address, PAYER_KEY, auth.nonce)
    receipt = await submit(node, RELAYER_KEY, usdc, signature, cancel_args(signed))
    events = usdc.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.authorizer, e.args.nonce) for e in events] == [(PAYER, auth.nonce)]
    assert await usdc.functions.authorizationState(PAYER, auth.nonce).call() is True

    assert await revert_reason(fn(*cancel_args(signed)).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is used or canceled"
    for twa in (TWA_VRS, TWA_BYTES):
        reason = await revert_reason(
            usdc.get_function_by_signature(twa)(*args_for(twa, auth)).call({"from": RELAYER}))
        assert reason == "FiatTokenV2: authorization is used or canceled"


# ---- the official x402 SDK client pays the placed token unchanged ----

async def test_x402_sdk_client_payment_settles(node: Anvil, usdc: AsyncContract) -> None:
    from eth_account import Account
    from x402 import x402Client
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.schemas import PaymentRequired, PaymentRequirements

    client = x402Client()  # default spend controls: only known assets such as this address
    register_exact_evm_client(client, Account.from_key(PAYER_KEY), networks=f"eip155:{CHAIN_ID}")
    requirements = PaymentRequirements(
        scheme="exact", network=f"eip155:{CHAIN_ID}", asset=contracts.CANONICAL_USDC,
        amount="10000", pay_to=PAYEE, max_timeout_seconds=300,
        extra={"name": "USDC", "version": "2"})
    payload = await client.create_payment_payload(PaymentRequired(accepts=[requirements]))
    a = payload.payload["authorization"]
    signature = bytes.fromhex(payload.payload["signature"].removeprefix("0x"))
    fields = [AsyncWeb3.to_checksum_address(a["from"]), AsyncWeb3.to_checksum_address(a["to"]),
              int(a["value"]), int(a["validAfter"]), int(a["validBefore"]),
              bytes.fromhex(a["nonce"].removeprefix("0x"))]
    v, r, s = signature[64], signature[:32], signature[32:64]
    await usdc.get_function_by_signature(TWA_VRS)(*fields, v, r, s).call({"from": RELAYER})

    payee_before = await usdc.functions.balanceOf(PAYEE).call()
    await submit(node, RELAYER_KEY, usdc, TWA_BYTES, [*fields, signature])
    assert await usdc.functions.balanceOf(PAYEE).call() == payee_before + 10_000

"""SmartWallet (ERC-1271) as an EIP-3009 payer: like FiatToken v2.2, both overloads of TestUSDC
(bytes signature, and (v, r, s) packed as r || s || v) accept the wallet owner's EIP-712 signature
for a payment *from the wallet*; nothing else does."""

from __future__ import annotations

import pytest
from contract_helpers import (
    CANCEL_BYTES, CANCEL_VRS, OTHER, OTHER_KEY, OWNER_KEY, PAYEE, PAYEE_KEY, RELAYER, RELAYER_KEY,
    RWA_VRS, TWA_BYTES, TWA_VRS, WALLET_OWNER, WALLET_OWNER_KEY, high_s, revert_reason,
    sign_authorization, sign_cancel, submit,
)
from eth_account import Account
from web3 import AsyncWeb3
from web3.contract import AsyncContract

from facilitator.devnet import contracts
from facilitator.devnet.anvil import Anvil

MAGIC = bytes.fromhex("1626ba7e")
INVALID = bytes.fromhex("ffffffff")


@pytest.fixture(scope="module")
async def wallet(node: Anvil, w3: AsyncWeb3, usdc_address: str) -> AsyncContract:
    address = await contracts.deploy_smart_wallet(node.url, OWNER_KEY, WALLET_OWNER)
    await contracts.mint(node.url, OWNER_KEY, usdc_address, address, 100 * 10**6)
    return contracts.contract_at(w3, contracts.load_artifact("SmartWallet"), address)


async def test_owner_and_is_valid_signature(wallet: AsyncContract) -> None:
    assert await wallet.functions.owner().call() == WALLET_OWNER
    digest = b"\x11" * 32
    by_owner = Account.unsafe_sign_hash(digest, WALLET_OWNER_KEY)
    by_other = Account.unsafe_sign_hash(digest, OTHER_KEY)
    check = wallet.functions.isValidSignature
    assert await check(digest, bytes(by_owner.signature)).call() == MAGIC
    assert await check(b"\x22" * 32, bytes(by_owner.signature)).call() == INVALID
    assert await check(digest, bytes(by_other.signature)).call() == INVALID
    v, r, s = high_s(by_owner)
    assert await check(digest, r + s + bytes([v])).call() == INVALID   # low-s enforced
    assert await check(digest, bytes(by_owner.signature)[:64]).call() == INVALID  # never reverts
    assert await check(digest, b"").call() == INVALID


async def test_payment_from_wallet_settles_via_bytes_overload(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address,
                                    value=2_500_000)
    # FiatToken v2.2 packs (v, r, s) as r || s || v and asks the wallet too: the v,r,s overload
    # would settle the same authorization.
    await usdc.get_function_by_signature(TWA_VRS)(*auth.vrs_args()).call({"from": RELAYER})

    f = usdc.functions
    wallet_before = await f.balanceOf(wallet.address).call()
    payee_before = await f.balanceOf(PAYEE).call()
    await submit(node, RELAYER_KEY, usdc, TWA_BYTES, auth.bytes_args())
    assert await f.balanceOf(wallet.address).call() == wallet_before - 2_500_000
    assert await f.balanceOf(PAYEE).call() == payee_before + 2_500_000
    assert await f.authorizationState(wallet.address, auth.nonce).call() is True
    assert await revert_reason(
        usdc.get_function_by_signature(TWA_BYTES)(*auth.bytes_args()).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is used or canceled"


async def test_payment_from_wallet_settles_via_vrs_overload(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address,
                                    value=1_250_000)
    f = usdc.functions
    wallet_before = await f.balanceOf(wallet.address).call()
    await submit(node, RELAYER_KEY, usdc, TWA_VRS, auth.vrs_args())
    assert await f.balanceOf(wallet.address).call() == wallet_before - 1_250_000
    assert await f.authorizationState(wallet.address, auth.nonce).call() is True
    assert await revert_reason(
        usdc.get_function_by_signature(TWA_VRS)(*auth.vrs_args()).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is used or canceled"
    # receiveWithAuthorization's v,r,s overload asks the wallet as well
    receive = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address,
                                       value=7, primary_type="ReceiveWithAuthorization")
    payee_before = await f.balanceOf(PAYEE).call()
    await submit(node, PAYEE_KEY, usdc, RWA_VRS, receive.vrs_args())
    assert await f.balanceOf(PAYEE).call() == payee_before + 7


async def test_payment_from_wallet_signed_by_another_key_is_refused(
        w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, OTHER_KEY, from_=wallet.address)
    for signature in (TWA_BYTES, TWA_VRS):
        fn = usdc.get_function_by_signature(signature)
        args = auth.bytes_args() if signature == TWA_BYTES else auth.vrs_args()
        assert await revert_reason(fn(*args).call({"from": RELAYER})) == \
            "FiatTokenV2: invalid signature"
    # For a contract signer no ECDSA rules apply at the token either: the high-s twin of the
    # owner's signature is just "not valid" according to the wallet (no ECRecover revert string).
    owners = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address)
    assert await revert_reason(
        usdc.get_function_by_signature(TWA_VRS)(*owners.fields, *high_s(owners.signed))
        .call({"from": RELAYER})) == "FiatTokenV2: invalid signature"
    fn = usdc.get_function_by_signature(TWA_BYTES)
    # For a contract signer no ECDSA rules apply at the token: a malformed signature is just
    # "not valid" according to the wallet.
    assert await revert_reason(fn(*auth.fields, b"\x01\x02").call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"


async def test_wallet_can_cancel_an_authorization(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address)
    signed = sign_cancel(usdc.address, WALLET_OWNER_KEY, auth.nonce, authorizer=wallet.address)
    await submit(node, RELAYER_KEY, usdc, CANCEL_BYTES,
                 [wallet.address, auth.nonce, bytes(signed.signature)])
    assert await revert_reason(
        usdc.get_function_by_signature(TWA_BYTES)(*auth.bytes_args()).call({"from": RELAYER})) == \
        "FiatTokenV2: authorization is used or canceled"
    # and via the v,r,s overload of cancelAuthorization
    other = await sign_authorization(w3, usdc.address, WALLET_OWNER_KEY, from_=wallet.address)
    signed = sign_cancel(usdc.address, WALLET_OWNER_KEY, other.nonce, authorizer=wallet.address)
    await submit(node, RELAYER_KEY, usdc, CANCEL_VRS, [
        wallet.address, other.nonce, signed.v, signed.r.to_bytes(32, "big"),
        signed.s.to_bytes(32, "big")])
    assert await usdc.functions.authorizationState(wallet.address, other.nonce).call() is True


async def test_execute_is_owner_only_and_lets_the_wallet_approve(
        node: Anvil, w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    approve = usdc.encode_abi("approve", args=[OTHER, 123])
    assert await revert_reason(
        wallet.functions.execute(usdc.address, 0, approve).call({"from": OTHER})) == \
        "SmartWallet: caller is not the owner"
    await contracts.wallet_execute(node.url, WALLET_OWNER_KEY, wallet.address, usdc.address,
                                   approve)
    assert await usdc.functions.allowance(wallet.address, OTHER).call() == 123
    # the target's revert reason comes back unchanged
    too_much = usdc.encode_abi("transfer", args=[OTHER, 10**30])
    assert await revert_reason(
        wallet.functions.execute(usdc.address, 0, too_much).call({"from": WALLET_OWNER})) == \
        "ERC20: transfer amount exceeds balance"
    with pytest.raises(contracts.ContractsError, match="ERC20: transfer amount exceeds balance"):
        await contracts.wallet_execute(node.url, WALLET_OWNER_KEY, wallet.address, usdc.address,
                                       too_much)


async def test_wallet_receives_eth(node: Anvil, w3: AsyncWeb3, wallet: AsyncContract) -> None:
    before = await w3.eth.get_balance(wallet.address)
    await contracts.transact(node.url, OTHER_KEY, wallet.address, b"", value=10**15)
    assert await w3.eth.get_balance(wallet.address) == before + 10**15

"""SmartWallet (ERC-1271) as an EIP-3009 payer: the bytes-signature overload of TestUSDC accepts
the wallet owner's EIP-712 signature for a payment *from the wallet*; nothing else does."""

from __future__ import annotations

import pytest
from contract_helpers import (
    CANCEL_BYTES, OTHER, OTHER_KEY, OWNER_KEY, PAYEE, RELAYER, RELAYER_KEY, TWA_BYTES, TWA_VRS,
    WALLET_OWNER, WALLET_OWNER_KEY, high_s, revert_reason, sign_authorization, sign_cancel, submit,
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
    # TestUSDC's v,r,s overload is ECDSA-only (real FiatToken v2.2 would ask the wallet here too):
    # the owner's key is not the wallet's address.
    assert await revert_reason(
        usdc.get_function_by_signature(TWA_VRS)(*auth.vrs_args()).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"

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


async def test_payment_from_wallet_signed_by_another_key_is_refused(
        w3: AsyncWeb3, usdc: AsyncContract, wallet: AsyncContract) -> None:
    auth = await sign_authorization(w3, usdc.address, OTHER_KEY, from_=wallet.address)
    fn = usdc.get_function_by_signature(TWA_BYTES)
    assert await revert_reason(fn(*auth.bytes_args()).call({"from": RELAYER})) == \
        "FiatTokenV2: invalid signature"
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

"""The settlement simulation both schemes share (schemes/common.py): a revert is a revert in
either shape nodes report it, and the gas-method fallback happens at most once, only on -32601.

Pure code fed with literal JSON-RPC answers, in the shapes the nodes send them:
- anvil 1.7 answers a reverting eth_createAccessList / eth_call with a JSON-RPC error
  `{"code": 3, "message": "execution reverted: ...", "data": "0x08c379a0..."}` (an `RpcError`);
- geth, op-geth and reth answer a reverting eth_createAccessList with a *result*
  `{"accessList": [...], "gasUsed": "0x...", "error": "execution reverted: ..."}`.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from unit.builders import CHAIN_ID, NETWORK, USDC, body_v2, new_account, signed_payload

from facilitator.core import abi
from facilitator.core.exact import Rejection, SignatureCheck
from facilitator.core.permit2 import UPTO_PROXY_ADDRESS
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import RpcError
from facilitator.protocol.messages import parse_request
from facilitator.protocol.networks import BASE_SEPOLIA
from facilitator.protocol.reasons import Reason
from facilitator.schemes.common import (
    FALLBACK_GAS_METHOD,
    GAS_METHOD,
    ChainApproval,
    Checked,
    simulation_error,
)
from facilitator.schemes.exact import ExactEip3009Scheme
from facilitator.schemes.upto import UptoPermit2Scheme

NOW = 1_700_000_000
SIGNER = "0xa0ee7a142d267c1f36714e4a8f75612f20a79720"
ACCESS_LIST = [{"address": USDC.lower(),
                "storageKeys": ["0x" + "00" * 31 + "01", "0x" + "00" * 31 + "02"]}]
GETH_REVERT = {"accessList": ACCESS_LIST, "gasUsed": "0xb0f4",
               "error": "execution reverted: FiatTokenV2: authorization is used or canceled"}
GETH_BARE_REVERT = {"accessList": ACCESS_LIST, "gasUsed": "0x6b6c",
                    "error": "execution reverted"}
GETH_OK = {"accessList": ACCESS_LIST, "gasUsed": "0x11d28"}
ANVIL_OK = {"accessList": [], "gasUsed": "0x11d28"}
ANVIL_REVERT = RpcError(3, "execution reverted: FiatTokenV2: authorization is expired", None)
METHOD_MISSING = RpcError(-32601, "the method eth_createAccessList does not exist/is not "
                                  "available")


# -- the helper, on literal answers ------------------------------------------------------------

def test_geth_result_with_error_is_a_revert() -> None:
    error = simulation_error(GETH_REVERT)
    assert isinstance(error, RpcError) and error.code == 3
    assert error.message == "execution reverted: FiatTokenV2: authorization is used or canceled"
    assert abi.decode_revert(error.data, error.message) == error.message


def test_geth_bare_revert_and_reth_revert_data() -> None:
    assert simulation_error(GETH_BARE_REVERT).message == "execution reverted"
    reth = {**GETH_BARE_REVERT, "revertData": "0x756688fe"}  # reth may add the revert bytes
    assert simulation_error(reth).data == "0x756688fe"


def test_successful_answers_are_not_reverts() -> None:
    for ok in (GETH_OK, ANVIL_OK, {**GETH_OK, "error": ""}, {**GETH_OK, "error": None},
               "0x11d28", "0x" + "00" * 32):
        assert simulation_error(ok) is None, ok


def test_anvil_error_is_the_revert_itself() -> None:
    assert simulation_error(ANVIL_REVERT) is ANVIL_REVERT


# -- both schemes over a scripted node ----------------------------------------------------------

class ScriptedNode:
    """A node that answers with literal JSON-RPC results; the settlement simulation's answers
    come from `simulation` in order (the last one repeats). `simulated` records the JSON-RPC
    method of every simulation, `round_trips` counts the batches."""

    def __init__(self, *simulation: Any) -> None:
        self.simulation = list(simulation)
        self.simulated: list[str] = []
        self.round_trips = 0

    async def request_many(self, calls: list[tuple[str, list[Any]]], *, retryable: bool = False
                           ) -> list[Any]:
        self.round_trips += 1
        answers = [self._answer(method, params) for method, params in calls]
        await asyncio.sleep(0)  # a round trip: concurrent checks interleave here
        return answers

    async def request(self, method: str, params: list[Any]) -> Any:
        return (await self.request_many([(method, params)]))[0]

    def _answer(self, method: str, params: list[Any]) -> Any:
        if method == "eth_getCode":
            return "0x6080604052"
        call = params[0]
        if call.get("from") == SIGNER:  # the settlement simulation
            self.simulated.append(method)
            return self.simulation[0] if len(self.simulation) == 1 else self.simulation.pop(0)
        selector = call["data"][2:10]
        if selector == "70a08231":  # balanceOf
            return "0x" + (10**12).to_bytes(32, "big").hex()
        if selector == "dd62ed3e":  # allowance
            return "0x" + (2**255).to_bytes(32, "big").hex()
        return "0x" + "00" * 32  # authorizationState false, nonceBitmap 0


def exact_checked(scheme: ExactEip3009Scheme) -> Checked:
    payer = new_account(random.Random(7))
    request = parse_request(body_v2(signed_payload(payer)))
    checked = scheme.check_offchain(request, for_settle=True)
    assert isinstance(checked, Checked), checked
    return checked


def exact(node: ScriptedNode) -> ExactEip3009Scheme:
    return ExactEip3009Scheme(network=BASE_SEPOLIA, chain=node, facilitator_address=SIGNER,
                              clock=lambda: NOW)


def upto_checked() -> Checked:
    """check_onchain only reads the intent (the permit's signature was checked off chain)."""
    payer = new_account(random.Random(8)).address.lower()
    intent = SettlementIntent(
        scheme="upto", x402_version=2, network=NETWORK, chain_id=CHAIN_ID,
        asset="0x240b09731d96979f50b2c649c9ce10fcf9c7987f", payer=payer,
        pay_to="0x209693bc6afc0c5328ba36faf03c514ef312287c", amount=1000,
        nonce=(12345).to_bytes(32, "big"), valid_after=0, valid_before=NOW + 300,
        signature=b"\x01" * 65, fingerprint=b"\x02" * 32, call_to=UPTO_PROXY_ADDRESS,
        calldata=b"\x03" * 4, transfer_method="permit2", cap_amount=10**17)
    return Checked(intent=intent, digest=b"\x00" * 32, signature_check=SignatureCheck.VALID_EOA,
                   payer=payer)


async def test_exact_settle_refuses_a_geth_reported_revert() -> None:
    """Before: the geth shape was read as approval (gasUsed) and broadcast anyway."""
    scheme = exact(ScriptedNode(GETH_REVERT))
    verdict = await scheme.check_onchain(exact_checked(scheme), for_settle=True)
    assert isinstance(verdict, Rejection)
    assert verdict.reason is Reason.NONCE_ALREADY_USED
    assert "authorization is used or canceled" in verdict.message


async def test_exact_settle_refuses_an_anvil_reported_revert() -> None:
    node = ScriptedNode(ANVIL_REVERT)
    scheme = exact(node)
    verdict = await scheme.check_onchain(exact_checked(scheme), for_settle=True)
    assert isinstance(verdict, Rejection) and verdict.reason is Reason.VALID_BEFORE_EXPIRED


@pytest.mark.parametrize("ok", [GETH_OK, ANVIL_OK], ids=["geth", "anvil"])
async def test_exact_settle_approves_with_the_gas_used(ok: dict[str, Any]) -> None:
    node = ScriptedNode(ok)
    scheme = exact(node)
    verdict = await scheme.check_onchain(exact_checked(scheme), for_settle=True)
    assert verdict == ChainApproval(gas_estimate=0x11d28)
    assert node.simulated == [GAS_METHOD] and node.round_trips == 1


async def test_upto_settle_refuses_a_geth_reported_revert() -> None:
    node = ScriptedNode(GETH_BARE_REVERT)
    scheme = UptoPermit2Scheme(network=BASE_SEPOLIA, chain=node, facilitator_address=SIGNER,
                               clock=lambda: NOW)
    verdict = await scheme.check_onchain(upto_checked(), for_settle=True)
    assert isinstance(verdict, Rejection)
    assert verdict.reason is Reason.UPTO_TRANSACTION_FAILED
    named = ScriptedNode({**GETH_BARE_REVERT, "error": "execution reverted: InvalidNonce()"})
    scheme = UptoPermit2Scheme(network=BASE_SEPOLIA, chain=named, facilitator_address=SIGNER,
                               clock=lambda: NOW)
    verdict = await scheme.check_onchain(upto_checked(), for_settle=True)
    assert isinstance(verdict, Rejection) and verdict.reason is Reason.PERMIT2_INVALID_NONCE


# -- the gas-method fallback --------------------------------------------------------------------

async def test_missing_method_falls_back_once_and_stays() -> None:
    node = ScriptedNode(METHOD_MISSING, "0xc350")
    scheme = exact(node)
    checked = exact_checked(scheme)
    assert await scheme.check_onchain(checked, for_settle=True) == ChainApproval(0xc350)
    assert node.simulated == [GAS_METHOD, FALLBACK_GAS_METHOD]
    assert await scheme.check_onchain(checked, for_settle=True) == ChainApproval(0xc350)
    assert node.simulated == [GAS_METHOD, FALLBACK_GAS_METHOD, FALLBACK_GAS_METHOD]


async def test_concurrent_checks_that_meet_the_missing_method_all_fall_back() -> None:
    """The switch happens once, but every check that used eth_createAccessList and got -32601
    retries once with eth_estimateGas (none is refused for the node's missing method)."""
    node = ScriptedNode(METHOD_MISSING, METHOD_MISSING, "0xc350")
    scheme = exact(node)
    checked = exact_checked(scheme)
    verdicts = await asyncio.gather(scheme.check_onchain(checked, for_settle=True),
                                    scheme.check_onchain(checked, for_settle=True))
    assert verdicts == [ChainApproval(0xc350), ChainApproval(0xc350)]
    assert node.simulated == [GAS_METHOD, GAS_METHOD, FALLBACK_GAS_METHOD, FALLBACK_GAS_METHOD]


async def test_fallback_method_missing_too_is_not_retried_again() -> None:
    """Before: recursion, one round trip per level until RecursionError."""
    node = ScriptedNode(METHOD_MISSING)  # eth_estimateGas is restricted as well
    scheme = exact(node)
    verdict = await scheme.check_onchain(exact_checked(scheme), for_settle=True)
    assert isinstance(verdict, Rejection)
    assert node.simulated == [GAS_METHOD, FALLBACK_GAS_METHOD]


@pytest.mark.parametrize("revert", [
    RpcError(3, "execution reverted: method not found", None),
    RpcError(3, "execution reverted: operation not supported", None),
    RpcError(-32000, "execution reverted: wallet does not exist", None),
    {**GETH_BARE_REVERT, "error": "execution reverted: method not found"},
], ids=["code3-method-not-found", "code3-not-supported", "32000-does-not-exist", "geth-text"])
async def test_revert_text_never_switches_the_gas_method(revert: Any) -> None:
    """A payer's wallet chooses its revert text: it must not switch the shared instance."""
    node = ScriptedNode(revert, GETH_OK)
    scheme = exact(node)
    checked = exact_checked(scheme)
    assert isinstance(await scheme.check_onchain(checked, for_settle=True), Rejection)
    assert await scheme.check_onchain(checked, for_settle=True) == ChainApproval(0x11d28)
    assert node.simulated == [GAS_METHOD, GAS_METHOD]


async def test_verify_never_switches_the_gas_method() -> None:
    node = ScriptedNode(METHOD_MISSING, GETH_OK)
    scheme = exact(node)
    checked = exact_checked(scheme)
    assert isinstance(await scheme.check_onchain(checked, for_settle=False), Rejection)
    assert await scheme.check_onchain(checked, for_settle=True) == ChainApproval(0x11d28)
    assert node.simulated == ["eth_call", GAS_METHOD]

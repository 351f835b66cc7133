"""End to end with the official x402 SDK (PyPI `x402==2.25.0`) as the independent party.

The SDK is the PAYING CLIENT (`x402Client` + `x402HttpxClient`, default spend controls, an
eth_account key) and the RESOURCE SERVER (its FastAPI middleware, or its `x402ResourceServer` for
v1) talking to our facilitator over HTTP through its `HTTPFacilitatorClient`. The chain is a real
anvil with USDC at the canonical Base Sepolia address; the database is a real PostgreSQL.

What the SDK can and cannot do for x402 v1 on the server side (read in the installed wheel):
- `x402/mechanisms/evm/exact/register.py:79` — `register_exact_evm_server` is "V2 only (no
  server-side for V1)".
- `x402/http/x402_http_server_base.py:904-917` — `_extract_payment` reads only `PAYMENT-SIGNATURE`
  ("V2 only"); the `X-PAYMENT` header the FastAPI adapter copies into
  `HTTPRequestContext.payment_header` (`x402/http/middleware/fastapi.py:275-277`) is never read,
  so a v1 payment is treated as no payment at all.
- `x402/server_base.py:768` (and `:868`) — the 402 is always a v2 `PaymentRequired`
  (`x402_version=2`), sent in the `PAYMENT-REQUIRED` header with an empty JSON body
  (`x402/http/x402_http_server_base.py:925-967`); the receipt header is always `PAYMENT-RESPONSE`
  (`:969-977`), never `X-PAYMENT-RESPONSE`.
- `x402/server_base.py:1153-1174` — `find_matching_requirements` reads `payload.accepted`, which
  `PaymentPayloadV1` does not have.
- What does work for v1: `x402ResourceServer.verify_payment` / `settle_payment`
  (`x402/server.py:179`, `:247`) accept `PaymentPayloadV1` + `PaymentRequirementsV1` and skip the
  v2-only payment-flow lookup for v1 requirements (`x402/server_base.py:1411-1417`); the
  facilitator client is looked up by the payload's v1 network name, indexed from our
  `/supported` kinds by `initialize()` (`x402/server_base.py:597-629`); `HTTPFacilitatorClient`
  posts `x402Version` 1 bodies (`x402/http/facilitator_client.py:155-201`); and
  `decode_payment_signature_header` (`x402/http/utils.py:33-44`) decodes v1 payloads.
So the v1 tests use a small FastAPI v1 transport (`sdk_parties.v1_app`) around those SDK pieces,
while the SDK client pays v1 on its own (`x402/http/clients/httpx.py:130-160` reads the v1 402
body and retries with `X-PAYMENT`).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from eth_account import Account
from harness import NETWORK, USDC, V1_NETWORK
from sdk_parties import (
    PAID_BODY,
    PRICE_ATOMIC,
    assert_paid_once_on_chain,
    assert_status_shows,
    receipt_of,
    resource_server,
    sdk_client,
    sdk_payload,
    signed_payment_header,
    v1_app,
)
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.schemas.v1 import PaymentRequiredV1

INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"


# -- 1. v2 through the stock SDK middleware -------------------------------------------------------

async def test_v2_sdk_client_pays_sdk_middleware_through_our_facilitator(chain, facilitator, serve):
    api, pay_to = await resource_server(serve, facilitator)
    payer = await chain.new_payer()
    payer_before = await chain.token_balance(payer.address)

    async with httpx.AsyncClient(timeout=60) as plain:
        unpaid = await plain.get(f"{api.url}/paid")
        free = await plain.get(f"{api.url}/free")
    assert free.status_code == 200
    assert unpaid.status_code == 402
    required = decode_payment_required_header(unpaid.headers["PAYMENT-REQUIRED"])
    assert required.x402_version == 2
    (offer,) = required.accepts
    # "$0.001" on eip155:84532 resolves to the canonical USDC and its EIP-712 domain.
    assert (offer.scheme, offer.network, offer.amount) == ("exact", NETWORK, str(PRICE_ATOMIC))
    assert offer.asset.lower() == USDC.lower()
    assert offer.pay_to.lower() == pay_to.lower()
    assert offer.extra["name"] == "USDC" and offer.extra["version"] == "2"

    async with x402HttpxClient(sdk_client(payer), timeout=60) as http:
        paid = await http.get(f"{api.url}/paid")
    assert paid.status_code == 200, (paid.text, dict(paid.headers))
    assert paid.json() == PAID_BODY
    receipt = receipt_of(paid, "PAYMENT-RESPONSE")
    assert receipt.success is True, receipt
    assert receipt.network == NETWORK
    assert receipt.payer == payer.address
    assert receipt.transaction.startswith("0x") and len(receipt.transaction) == 66

    await assert_paid_once_on_chain(chain, payer.address, pay_to, receipt.transaction)
    assert await chain.token_balance(payer.address) == payer_before - PRICE_ATOMIC
    await assert_status_shows(facilitator, receipt.transaction, payer=payer.address,
                              pay_to=pay_to, network=NETWORK)


# -- 2. v1: the SDK client against a v1 transport built from SDK parts -----------------------------

async def test_v1_sdk_client_pays_v1_resource_server_through_our_facilitator(chain, facilitator,
                                                                              serve):
    api, pay_to = await resource_server(serve, facilitator, v1_app)
    payer = await chain.new_payer()
    payer_before = await chain.token_balance(payer.address)

    async with httpx.AsyncClient(timeout=60) as plain:
        unpaid = await plain.get(f"{api.url}/paid")
    assert unpaid.status_code == 402
    assert "PAYMENT-REQUIRED" not in unpaid.headers
    required = PaymentRequiredV1.model_validate(unpaid.json())
    assert required.accepts[0].network == V1_NETWORK

    async with x402HttpxClient(sdk_client(payer), timeout=60) as http:
        paid = await http.get(f"{api.url}/paid")
    assert paid.status_code == 200, (paid.text, dict(paid.headers))
    assert paid.json() == PAID_BODY
    receipt = receipt_of(paid, "X-PAYMENT-RESPONSE")
    assert receipt.success is True, receipt
    assert receipt.network == V1_NETWORK  # v1 answers carry the v1 network name
    assert receipt.payer == payer.address
    assert receipt.transaction.startswith("0x") and len(receipt.transaction) == 66

    await assert_paid_once_on_chain(chain, payer.address, pay_to, receipt.transaction)
    assert await chain.token_balance(payer.address) == payer_before - PRICE_ATOMIC
    await assert_status_shows(facilitator, receipt.transaction, payer=payer.address,
                              pay_to=pay_to, network=V1_NETWORK)


async def test_sdk_middleware_ignores_a_v1_x_payment_header(chain, facilitator, serve):
    """Evidence for the v1 finding above: the stock middleware treats a valid v1 `X-PAYMENT`
    as no payment (402, v2 offer again) and nothing reaches the chain."""
    api, pay_to = await resource_server(serve, facilitator)
    payer = await chain.new_payer()
    _, payload = await sdk_payload(payer, pay_to, version=1, resource=f"{api.url}/paid")
    async with httpx.AsyncClient(timeout=60) as plain:
        response = await plain.get(f"{api.url}/paid",
                                   headers={"X-PAYMENT": encode_payment_signature_header(payload)})
    assert response.status_code == 402
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert required.x402_version == 2 and required.error == "Payment required"
    assert await chain.transfer_logs_to(pay_to) == []


# -- 3. an invalid payment through the SDK path ---------------------------------------------------

async def test_v2_unfunded_payer_is_refused_with_our_reason(chain, facilitator, serve):
    api, pay_to = await resource_server(serve, facilitator)
    broke = await chain.new_payer(usdc_amount=0)

    async with x402HttpxClient(sdk_client(broke), timeout=60) as http:
        response = await http.get(f"{api.url}/paid")
    assert response.status_code == 402, response.text
    assert "PAYMENT-RESPONSE" not in response.headers
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert required.error == INSUFFICIENT_BALANCE
    assert await chain.transfer_logs_to(pay_to) == []
    assert await chain.token_balance(broke.address) == 0


async def test_v1_unfunded_payer_is_refused_with_our_reason(chain, facilitator, serve):
    api, pay_to = await resource_server(serve, facilitator, v1_app)
    broke = await chain.new_payer(usdc_amount=0)

    async with x402HttpxClient(sdk_client(broke), timeout=60) as http:
        response = await http.get(f"{api.url}/paid")
    assert response.status_code == 402, response.text
    assert "X-PAYMENT-RESPONSE" not in response.headers
    assert PaymentRequiredV1.model_validate(response.json()).error == INSUFFICIENT_BALANCE
    assert await chain.transfer_logs_to(pay_to) == []


async def test_v2_replayed_payment_header_is_refused(chain, facilitator, serve):
    """A buyer (or an eavesdropper) resending a PAYMENT-SIGNATURE that already paid gets 402 and
    is not served again; the chain still shows one Transfer."""
    api, pay_to = await resource_server(serve, facilitator)
    payer = await chain.new_payer()
    client = sdk_client(payer)

    async with httpx.AsyncClient(timeout=60) as plain:
        header = await signed_payment_header(plain, api.url, client)
        first = await plain.get(f"{api.url}/paid", headers=header)
        assert first.status_code == 200, first.text
        tx = receipt_of(first, "PAYMENT-RESPONSE").transaction
        replay = await plain.get(f"{api.url}/paid", headers=header)

    assert replay.status_code == 402, (replay.text, dict(replay.headers))
    assert replay.json() != PAID_BODY
    refused = decode_payment_required_header(replay.headers["PAYMENT-REQUIRED"])
    assert refused.error == NONCE_ALREADY_USED, refused
    await assert_paid_once_on_chain(chain, payer.address, pay_to, tx)


async def test_v2_one_payment_presented_concurrently_is_served_once_with_reject_policy(
        chain, facilitator_factory, serve):
    """One signed payment sent five times at once (a buyer's double-click, or an eavesdropper
    racing the buyer). All five pass /verify — nothing is settled yet — so the SDK middleware
    relies on /settle: only one request may get `success: true`, or one payment buys five
    resources. With the official SDK facilitator four settles revert and answer 402.

    Our default duplicate policy ("replay", the idempotent answer the foundation issue asks
    for) would serve all five; FACILITATOR_DUPLICATE_SETTLE=reject gives the SDK facilitator's
    at-most-once answer, and this test pins it."""
    facilitator = await facilitator_factory(FACILITATOR_DUPLICATE_SETTLE="reject")
    api, pay_to = await resource_server(serve, facilitator)
    payer = await chain.new_payer()
    client = sdk_client(payer)

    async with httpx.AsyncClient(timeout=60) as plain:
        header = await signed_payment_header(plain, api.url, client)
        responses = await asyncio.gather(
            *(plain.get(f"{api.url}/paid", headers=header) for _ in range(5)))

    served = [r for r in responses if r.status_code == 200]
    assert len(await chain.transfer_logs_to(pay_to)) == 1  # one payment moved on chain ...
    assert len(served) == 1, (  # ... so exactly one request may be served
        f"{len(served)} of 5 requests were served for one payment: "
        f"{[receipt_of(r, 'PAYMENT-RESPONSE').transaction for r in served]}")
    assert all(r.status_code == 402 for r in responses if r is not served[0])
    await assert_paid_once_on_chain(chain, payer.address, pay_to,
                                    receipt_of(served[0], "PAYMENT-RESPONSE").transaction)


async def test_sdk_facilitator_client_second_settle_is_not_a_success_with_reject_policy(
        chain, facilitator_factory):
    """x402-conformance F3 (with FACILITATOR_DUPLICATE_SETTLE=reject): the same payload settled
    twice succeeds at most once. A retry after `settlement_pending` is different: nothing was
    answered successfully yet, and it still gets the final success (see test_sdk_pending.py)."""
    facilitator = await facilitator_factory(FACILITATOR_DUPLICATE_SETTLE="reject")
    payer = await chain.new_payer()
    pay_to = Account.create().address
    requirements, payload = await sdk_payload(payer, pay_to)
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        first = await fac.settle(payload, requirements)
        again = await fac.settle(payload, requirements)
    assert first.success is True, first
    assert again.success is False, f"a settled payload succeeded twice: {again}"
    assert again.error_reason == "invalid_exact_evm_nonce_already_used", again
    assert again.transaction == first.transaction
    await assert_paid_once_on_chain(chain, payer.address, pay_to, first.transaction)


async def test_sdk_facilitator_client_second_settle_replays_the_stored_success_by_default(
        chain, facilitator):
    """The default policy: a repeated /settle of a settled payload returns the stored response
    (success, same transaction) and sends nothing — a resource server that lost our answer
    recovers it instead of refusing a buyer who paid."""
    payer = await chain.new_payer()
    pay_to = Account.create().address
    requirements, payload = await sdk_payload(payer, pay_to)
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        first = await fac.settle(payload, requirements)
        again = await fac.settle(payload, requirements)
        verify_again = await fac.verify(payload, requirements)
    assert first.success and again.success and again.transaction == first.transaction
    assert verify_again.is_valid is False, "a settled payment never verifies again"
    await assert_paid_once_on_chain(chain, payer.address, pay_to, first.transaction)


# -- 4. concurrency -------------------------------------------------------------------------------

async def test_v2_ten_concurrent_paid_requests(chain, facilitator, serve):
    """Ten requests at once, each paid with its own authorization from one payer."""
    api, pay_to = await resource_server(serve, facilitator)
    payer = await chain.new_payer()
    payer_before = await chain.token_balance(payer.address)

    async with x402HttpxClient(sdk_client(payer), timeout=120) as http:
        responses = await asyncio.gather(*(http.get(f"{api.url}/paid") for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    receipts = [receipt_of(r, "PAYMENT-RESPONSE") for r in responses]
    assert all(r.success for r in receipts), receipts
    hashes = {r.transaction.lower() for r in receipts}
    assert len(hashes) == 10

    logs = await chain.transfer_logs_to(pay_to)
    assert len(logs) == 10
    assert {log["transactionHash"].lower() for log in logs} == hashes
    assert all(int(log["data"], 16) == PRICE_ATOMIC for log in logs)
    assert await chain.token_balance(pay_to) == 10 * PRICE_ATOMIC
    assert await chain.token_balance(payer.address) == payer_before - 10 * PRICE_ATOMIC
    for tx in hashes:
        await assert_status_shows(facilitator, tx, payer=payer.address, pay_to=pay_to,
                                  network=NETWORK)


# -- 5. /supported as the SDK reads it ------------------------------------------------------------

async def test_supported_parsed_by_sdk_facilitator_client(facilitator):
    client = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=30))
    # get_supported() is synchronous (x402/http/facilitator_client.py:203): off our loop.
    supported = await asyncio.to_thread(client.get_supported)
    kinds = {(k.x402_version, k.scheme, k.network) for k in supported.kinds}
    assert (2, "exact", NETWORK) in kinds
    assert (1, "exact", V1_NETWORK) in kinds
    signers = [s.lower() for s in supported.signers.get("eip155:*", [])]
    assert facilitator.signer.lower() in signers


# -- 6. the SDK's HTTPFacilitatorClient parses our verify/settle answers ---------------------------

async def test_sdk_facilitator_client_verify_then_settle_v2(chain, facilitator):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    requirements, payload = await sdk_payload(payer, pay_to)
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        verified = await fac.verify(payload, requirements)
        assert verified.is_valid is True, verified
        assert verified.invalid_reason is None
        assert verified.payer == payer.address
        settled = await fac.settle(payload, requirements)
    assert settled.success is True, settled
    assert settled.error_reason is None
    assert settled.network == NETWORK
    assert settled.payer == payer.address
    await assert_paid_once_on_chain(chain, payer.address, pay_to, settled.transaction)


async def test_sdk_facilitator_client_verify_then_settle_v1(chain, facilitator):
    payer = await chain.new_payer()
    pay_to = Account.create().address
    requirements, payload = await sdk_payload(payer, pay_to, version=1)
    assert payload.x402_version == 1
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        verified = await fac.verify(payload, requirements)
        assert verified.is_valid is True, verified
        assert verified.payer == payer.address
        settled = await fac.settle(payload, requirements)
    assert settled.success is True, settled
    assert settled.network == V1_NETWORK
    assert settled.payer == payer.address
    await assert_paid_once_on_chain(chain, payer.address, pay_to, settled.transaction)


@pytest.mark.parametrize("version", [2, 1])
async def test_sdk_facilitator_client_parses_our_refusals(chain, facilitator, version):
    """Failure answers (200 + isValid false / success false) parse into the SDK's models:
    a SettleResponse without `transaction`/`network` would raise FacilitatorResponseError."""
    broke = await chain.new_payer(usdc_amount=0)
    pay_to = Account.create().address
    requirements, payload = await sdk_payload(broke, pay_to, version)
    network = NETWORK if version == 2 else V1_NETWORK
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url, timeout=60)) as fac:
        verified = await fac.verify(payload, requirements)
        settled = await fac.settle(payload, requirements)
    assert verified.is_valid is False
    assert verified.invalid_reason == INSUFFICIENT_BALANCE
    assert verified.payer == broke.address
    assert settled.success is False
    assert settled.error_reason == INSUFFICIENT_BALANCE
    assert settled.transaction == ""
    assert settled.network == network
    assert await chain.transfer_logs_to(pay_to) == []

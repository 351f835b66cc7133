"""The official x402 SDK (PyPI `x402==2.25.0`) as the independent parties of the end-to-end
tests — resource servers that call our facilitator over HTTP through the SDK's own
`HTTPFacilitatorClient`, and the paying client — plus the on-chain and status assertions shared by
the e2e modules.

- `v2_app`: the stock FastAPI integration — `x402.http.middleware.fastapi.payment_middleware`
  around an `x402ResourceServer` with the `exact` EVM server scheme. Nothing hand-written sits
  between the buyer, the SDK middleware and our facilitator.
- `v1_app`: the SDK has no v1 resource-server HTTP layer (see the module docstring of
  `test_sdk_e2e.py` for the references), so this is a minimal FastAPI handler that speaks the v1
  HTTP transport itself (402 JSON body `PaymentRequiredV1`, `X-PAYMENT` in, `X-PAYMENT-RESPONSE`
  out) and delegates every protocol step to the SDK: header decoding
  (`decode_payment_signature_header`), requirement and payload models (`PaymentRequirementsV1`,
  `PaymentPayloadV1`), verification and settlement (`x402ResourceServer.verify_payment` /
  `settle_payment`, which go through `HTTPFacilitatorClient` and include the SDK's single retry on
  `settlement_pending`) and receipt encoding (`encode_payment_response_header`).

Both builders are plain functions returning an ASGI app; they block on `GET /supported`, so the
caller builds them off the facilitator's event loop (see `conftest.ThreadedServer`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from harness import NETWORK, USDC, V1_NETWORK, DevChain, RunningFacilitator
from x402 import x402Client, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    decode_payment_signature_header,
    encode_payment_response_header,
    encode_payment_signature_header,
)
from x402.http.x402_http_server import x402HTTPResourceServer
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_server
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

PAID_BODY = {"content": "the paid resource"}
PRICE_ATOMIC = 1000  # "$0.001" of a 6-decimals USDC
V1_AMOUNT = PRICE_ATOMIC  # the v1 route charges the same
CHAIN_ID = 84532


# -- the paying client ----------------------------------------------------------------------------

def sdk_client(payer: LocalAccount) -> x402Client:
    """The official paying client with its DEFAULT spend controls (default assets, <= $1)."""
    client = x402Client()
    register_exact_evm_client(client, payer)  # a LocalAccount is wrapped in EthAccountSigner
    return client


def receipt_of(response: httpx.Response, header: str) -> SettleResponse:
    """The SettleResponse a resource server returned in `PAYMENT-RESPONSE`/`X-PAYMENT-RESPONSE`."""
    assert header in response.headers, (response.status_code, dict(response.headers))
    return decode_payment_response_header(response.headers[header])


def v2_requirements(pay_to: str, amount: int = PRICE_ATOMIC) -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=NETWORK, asset=USDC, amount=str(amount),
                               pay_to=pay_to, max_timeout_seconds=300,
                               extra={"name": "USDC", "version": "2"})


async def sdk_payload(payer: LocalAccount, pay_to: str, version: int = 2,
                      resource: str = "http://127.0.0.1/paid") -> tuple[Any, Any]:
    """(requirements, payload): the SDK client's payment for one exact requirement of
    `version` (2: `PaymentRequirements` in a `PaymentRequired`; 1: `PaymentRequirementsV1` in a
    `PaymentRequiredV1`), for presenting to a facilitator client or a resource server."""
    required: Any
    if version == 2:
        requirements: Any = v2_requirements(pay_to)
        required = PaymentRequired(resource=ResourceInfo(url=resource), accepts=[requirements])
    else:
        requirements = v1_requirements(resource, pay_to)
        required = PaymentRequiredV1(accepts=[requirements])
    return requirements, await sdk_client(payer).create_payment_payload(required)


async def signed_payment_header(http: httpx.AsyncClient, api_url: str, client: x402Client
                                ) -> dict[str, str]:
    """GET `/paid` unpaid (must be a 402), and the `PAYMENT-SIGNATURE` header that pays the
    offer in its `PAYMENT-REQUIRED`, signed by the SDK `client`."""
    unpaid = await http.get(f"{api_url}/paid")
    assert unpaid.status_code == 402, (unpaid.status_code, unpaid.text)
    required = decode_payment_required_header(unpaid.headers["PAYMENT-REQUIRED"])
    payload = await client.create_payment_payload(required)
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}


# -- assertions on the chain and on our status endpoint -------------------------------------------

async def assert_paid_once_on_chain(chain: DevChain, payer: str, pay_to: str, tx: str,
                                    amount: int = PRICE_ATOMIC) -> None:
    """Exactly one USDC Transfer(payer -> payTo, amount) was mined, in transaction `tx`."""
    logs = await chain.transfer_logs_to(pay_to)
    assert len(logs) == 1, logs
    (log,) = logs
    assert log["transactionHash"].lower() == tx.lower()
    assert int(log["topics"][1], 16) == int(payer, 16)
    assert int(log["data"], 16) == amount
    assert await chain.token_balance(pay_to) == amount
    receipt = await chain.rpc("eth_getTransactionReceipt", [tx])
    assert receipt is not None and int(receipt["status"], 16) == 1


async def assert_status_shows(facilitator: RunningFacilitator, tx: str, *, payer: str,
                              pay_to: str, network: str, amount: int = PRICE_ATOMIC
                              ) -> dict[str, Any]:
    """Our `GET /settle/<tx hash>` knows the settlement the SDK was told about."""
    response = await facilitator.http.get(f"/settle/{tx}")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["transaction"].lower() == tx.lower()
    assert status["state"] in ("included", "confirmed"), status
    assert status["scheme"] == "exact"
    assert status["network"] == network  # the wire name of the request's version
    assert status["chainId"] == CHAIN_ID
    assert status["asset"].lower() == USDC.lower()
    assert status["payer"].lower() == payer.lower()
    assert status["payTo"].lower() == pay_to.lower()
    assert status["amount"] == str(amount)
    assert status["blockNumber"] is not None
    return status


# -- resource servers -----------------------------------------------------------------------------


def _lifespan(facilitator: HTTPFacilitatorClient):
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await facilitator.aclose()  # its httpx.AsyncClient lives on the server's loop

    return lifespan


async def resource_server(serve: Any, facilitator: RunningFacilitator,
                          build: Callable[[str, str], FastAPI] | None = None) -> tuple[Any, str]:
    """(server, payTo): a resource server from `build(facilitator_url, pay_to)` (default
    `v2_app`) for a fresh payee, started with the e2e `serve` fixture (a `ThreadedServer`). The
    facilitator is a parameter because tests run custom ones (reject policy, receipt timeouts)."""
    pay_to = Account.create().address
    builder = build or v2_app
    api = await serve(lambda: builder(facilitator.url, pay_to))
    return api, pay_to


def v2_routes(pay_to: str, price: Any = "$0.001") -> dict[str, Any]:
    return {"GET /paid": {"accepts": {"scheme": "exact", "payTo": pay_to, "price": price,
                                      "network": NETWORK},
                          "description": "a paid test resource",
                          "mimeType": "application/json"}}


def v2_app(facilitator_url: str, pay_to: str, price: Any = "$0.001") -> FastAPI:
    """The stock SDK FastAPI middleware protecting `GET /paid` (`GET /free` is unprotected)."""
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url, timeout=60))
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, NETWORK)
    routes = v2_routes(pay_to, price)
    # Pre-flight: the middleware turns a route/capability mismatch into os._exit(1)
    # (x402/http/background_init.py::handle_background_init_error), which would kill pytest.
    # Initialising once here raises RouteConfigurationError normally instead.
    x402HTTPResourceServer(server, routes).initialize()
    middleware = payment_middleware(routes, server)

    app = FastAPI(lifespan=_lifespan(facilitator))

    @app.middleware("http")
    async def x402_payments(request: Request, call_next: Any) -> Any:
        return await middleware(request, call_next)

    @app.get("/paid")
    async def paid() -> dict[str, str]:
        return PAID_BODY

    @app.get("/free")
    async def free() -> dict[str, str]:
        return {"content": "free"}

    return app


def v1_requirements(resource: str, pay_to: str, amount: int = V1_AMOUNT) -> PaymentRequirementsV1:
    return PaymentRequirementsV1(
        scheme="exact", network=V1_NETWORK, max_amount_required=str(amount), resource=resource,
        description="a paid test resource (x402 v1)", mime_type="application/json",
        pay_to=pay_to, max_timeout_seconds=300, asset=USDC,
        extra={"name": "USDC", "version": "2"})


def v1_app(facilitator_url: str, pay_to: str, amount: int = V1_AMOUNT) -> FastAPI:
    """A v1 resource server: 402 JSON body, `X-PAYMENT` / `X-PAYMENT-RESPONSE` headers."""
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url, timeout=60))
    server = x402ResourceServer(facilitator)
    server.initialize()  # GET /supported: indexes (1, exact, base-sepolia) -> our facilitator

    app = FastAPI(lifespan=_lifespan(facilitator))

    def payment_required(requirements: PaymentRequirementsV1, error: str,
                         headers: dict[str, str] | None = None) -> JSONResponse:
        body = PaymentRequiredV1(error=error, accepts=[requirements])
        return JSONResponse(body.model_dump(by_alias=True, exclude_none=True), 402,
                            headers=headers)

    @app.get("/paid")
    async def paid(request: Request) -> JSONResponse:
        requirements = v1_requirements(str(request.url), pay_to, amount)
        header = request.headers.get("X-PAYMENT")
        if not header:
            return payment_required(requirements, "X-PAYMENT header is required")
        try:
            payload = decode_payment_signature_header(header)
        except Exception as exc:  # noqa: BLE001 - a bad header is the buyer's problem
            return payment_required(requirements, f"invalid X-PAYMENT header: {exc}")
        if (not isinstance(payload, PaymentPayloadV1) or payload.scheme != requirements.scheme
                or payload.network != requirements.network):
            return payment_required(requirements, "No matching payment requirements")
        try:
            verdict = await server.verify_payment(payload, requirements)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-200 answer from the facilitator
            return payment_required(requirements, str(exc))
        if not verdict.is_valid:
            return payment_required(requirements, verdict.invalid_reason or "invalid payment")
        # The resource would be produced here; v1 servers settle before answering.
        try:
            settled = await server.settle_payment(payload, requirements)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"error": str(exc)}, 502)
        receipt = {"X-PAYMENT-RESPONSE": encode_payment_response_header(settled)}
        if not settled.success:
            return payment_required(requirements, settled.error_reason or "settlement failed",
                                    receipt)
        return JSONResponse(PAID_BODY, 200, headers=receipt)

    return app

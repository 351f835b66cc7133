"""The facilitator's three operations — verify, settle, supported — over every configured
network and scheme. HTTP-agnostic: handlers pass parsed JSON in and get response objects back.

Routing (before any scheme check) decides only what needs routing, in this order: x402 version,
a scheme we do not know (or `upto` in v1), a network we do not serve (the SDK's network-config
reason, never a signature error), the payload's shape. A payment is routed by its scheme to the
network of its requirements (or, when we do not serve that one, of its payload), and the scheme's
own ordered checks decide a scheme or network mismatch with the scheme's reason, as the SDK's
mechanisms do (`upto`: `invalid_upto_evm_scheme`, `invalid_upto_evm_network_mismatch`).

Guarantees: a malformed body raises `BadRequest` (HTTP 400); every well-formed request gets a
structured answer with a reason from `Reason`; every answer is recorded for auditors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from facilitator.adapters.metrics import Metrics
from facilitator.core.exact import Rejection
from facilitator.core.settlement import SettlementIntent
from facilitator.ports import RpcUnavailable
from facilitator.protocol.eip3009 import is_permit2_payload
from facilitator.protocol.fields import address, to_checksum
from facilitator.protocol.messages import PaymentRequest, UnsupportedVersion, parse_request
from facilitator.protocol.networks import Network, NetworkRegistry, TransferMethod
from facilitator.protocol.reasons import Reason
from facilitator.protocol.responses import SettleResponse, VerifyResponse
from facilitator.adapters.sessions import SessionStore
from facilitator.protocol import fields as f
from facilitator.protocol.permit2 import parse_usage_metadata
from facilitator.schemes.common import Checked, Scheme, SchemeKey, traits_of
from facilitator.services.recorder import VerificationRecorder
from facilitator.services.settler import Settler

log = logging.getLogger("facilitator.service")

SCHEMES = ("exact", "upto")
EXACT_EIP3009: SchemeKey = ("exact", TransferMethod.EIP3009)


@dataclass(frozen=True, slots=True)
class NetworkServices:
    network: Network
    # ("exact", eip3009), ("exact", permit2), ("upto", permit2): a scheme by its payload shape
    schemes: Mapping[SchemeKey, Scheme]
    settler: Settler
    sessions: SessionStore


@dataclass(frozen=True, slots=True)
class _Routed:
    request: PaymentRequest
    services: NetworkServices
    scheme: Scheme


class FacilitatorService:
    def __init__(self, *, registry: NetworkRegistry, services: dict[str, NetworkServices],
                 recorder: VerificationRecorder, metrics: Metrics, signer_address: str) -> None:
        self._registry = registry
        self._services = services
        self._recorder = recorder
        self._metrics = metrics
        self.signer_address = signer_address

    # -- /supported ---------------------------------------------------------------------------

    def supported(self) -> dict[str, Any]:
        """v2 kinds first, then v1 (as the SDK lists them). `upto` is v2-only and carries the
        address the client must bind in its Permit2 witness."""
        kinds: list[dict[str, Any]] = []
        for svc in self._services.values():
            for name in dict.fromkeys(name for name, _ in svc.schemes):
                kind: dict[str, Any] = {"x402Version": 2, "scheme": name,
                                        "network": svc.network.caip2}
                if name == "upto":
                    kind["extra"] = {"facilitatorAddress": self.signer_address}
                kinds.append(kind)
        for svc in self._services.values():
            if svc.network.v1_name is not None and EXACT_EIP3009 in svc.schemes:
                kinds.append({"x402Version": 1, "scheme": "exact", "network": svc.network.v1_name})
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": [self.signer_address]}}

    # -- /verify ------------------------------------------------------------------------------

    async def verify(self, body: Any, request_id: str = "") -> VerifyResponse:
        started = time.monotonic()
        routed = self._route(body)
        if isinstance(routed, tuple):
            response, request = routed[0], routed[1]
            await self._record("verify", request_id, request, None, response.is_valid,
                               response.invalid_reason)
            self._count_verify(request, None, response, started)
            return response
        checked = routed.scheme.check_offchain(routed.request)
        response = await self._verify_checked(routed, checked)
        if response.is_valid and isinstance(checked, Checked) and routed.scheme.traits.sessions:
            await self._record_session(routed.services, checked)
        intent = checked.intent if isinstance(checked, Checked) else None
        await self._record("verify", request_id, routed.request, intent, response.is_valid,
                           response.invalid_reason)
        self._count_verify(routed.request, routed.services.network, response, started)
        return response

    async def _record_session(self, services: NetworkServices, checked: Checked) -> None:
        """The upto session a valid /verify starts. Written before the answer: an attestation
        the gateway posts right after it links to the session by (payer, Permit2 nonce) when it
        is inserted. Never fatal: the verdict stands, the failure is logged and counted, the
        settle records the session anyway and attestations are linked again later."""
        try:
            await services.sessions.record_verified(checked.intent, self.signer_address)
        except Exception as exc:  # noqa: BLE001 - an audit record must not change the verdict
            self._metrics.records_dropped.inc()
            log.warning("verify: upto session record failed: %s: %s", type(exc).__name__, exc)

    async def _verify_checked(self, routed: _Routed, checked: Rejection | Checked
                              ) -> VerifyResponse:
        if isinstance(checked, Rejection):
            return VerifyResponse(False, checked.reason, checked.message, _payer_of(routed.request))
        intent = checked.intent
        if routed.services.settler.is_in_flight(intent.asset, intent.payer, intent.nonce):
            reason = traits_of(intent.scheme, intent.transfer_method).nonce_used_reason
            return VerifyResponse(False, reason, "this authorization is being settled",
                                  checked.payer)
        try:
            verdict = await routed.scheme.check_onchain(checked, for_settle=False)
        except RpcUnavailable as exc:
            log.warning("verify: chain unavailable: %s", exc)
            return VerifyResponse(False, Reason.UNEXPECTED_VERIFY_ERROR,
                                  "chain RPC unavailable; try again", checked.payer)
        if isinstance(verdict, Rejection):
            return VerifyResponse(False, verdict.reason, verdict.message, checked.payer)
        return VerifyResponse(True, payer=checked.payer)

    # -- /settle ------------------------------------------------------------------------------

    async def settle(self, body: Any, request_id: str = "") -> SettleResponse:
        started = time.monotonic()
        routed = self._route(body)
        if isinstance(routed, tuple):
            verdict, request = routed
            response = SettleResponse(False, network=_wire_network(request),
                                      error_reason=verdict.invalid_reason,
                                      error_message=verdict.invalid_message, payer=verdict.payer)
            await self._record("settle", request_id, request, None, False, response.error_reason)
            self._count_settle(request, None, response, started)
            return response
        usage = parse_usage_metadata(body.get("usageMetadata"))
        checked = routed.scheme.check_offchain(routed.request, for_settle=True)
        wire = routed.request.network
        if isinstance(checked, Rejection):
            response = SettleResponse(
                False, network=wire, error_reason=checked.reason, error_message=checked.message,
                payer=_payer_of(routed.request),
                amount=str(routed.request.requirements.amount)
                if routed.scheme.traits.reports_amount else None)
            intent = None
        else:
            response = await routed.services.settler.settle(routed.scheme, checked, wire, usage)
            intent = checked.intent
        await self._record("settle", request_id, routed.request, intent, response.success,
                           response.error_reason)
        self._count_settle(routed.request, routed.services.network, response, started)
        return response

    # -- routing ------------------------------------------------------------------------------

    def _route(self, body: Any) -> _Routed | tuple[VerifyResponse, PaymentRequest | None]:
        """Parse and route; a tuple is an early answer (unsupported version/scheme/network or
        payload shape)."""
        request = parse_request(body)
        if isinstance(request, UnsupportedVersion):
            return (VerifyResponse(False, Reason.INVALID_X402_VERSION,
                                   f"x402Version {request.version} is not supported"), None)
        unsupported = _unsupported_scheme(request)
        if unsupported is not None:
            return _early(request, Reason.UNSUPPORTED_SCHEME,
                          f"scheme {unsupported!r} is not supported here")
        services = self._served(request)
        if services is None or not any(name == request.scheme for name, _ in services.schemes):
            if request.network != request.requirements.network:  # the mechanism's first answer
                return _early(request, _NETWORK_MISMATCH[request.scheme],
                              f"paid on {request.network}, required "
                              f"{request.requirements.network}")
            return _early(request, _NO_NETWORK_CONFIG[request.scheme],
                          f"network {request.requirements.network!r} is not served by this "
                          "facilitator")
        scheme = services.schemes.get((request.scheme, _transfer_method(request)))
        if scheme is None:
            return _early(request, Reason.UNSUPPORTED_PAYLOAD_TYPE,
                          f"this payload shape is not accepted for scheme {request.scheme!r}")
        return _Routed(request, services, scheme)

    def _served(self, request: PaymentRequest) -> NetworkServices | None:
        """The network of the requirements, else of the payload (its scheme then answers the
        mismatch), if we serve it."""
        for wire in dict.fromkeys((request.requirements.network, request.network)):
            network = self._registry.resolve(request.version, wire)
            services = self._services.get(network.key) if network else None
            if services is not None:
                return services
        return None

    def settlement_intent(self, body: Any) -> SettlementIntent | None:
        """The settlement a /settle body asks for, without checking it (None when it would be
        answered before any settlement is claimed). The settle-job worker uses it to find the
        settlement of a job it is about to give up. Raises `BadRequest` for a malformed body."""
        routed = self._route(body)
        return None if isinstance(routed, tuple) else routed.scheme.intent(routed.request)

    def validate_settle(self, body: Any) -> None:
        """Everything /settle would refuse with HTTP 400, checked before a job is queued."""
        routed = self._route(body)
        parse_usage_metadata(f.require_object(body, "body").get("usageMetadata"))
        if not isinstance(routed, tuple):
            routed.scheme.check_offchain(routed.request, for_settle=True)

    # -- bookkeeping --------------------------------------------------------------------------

    async def _record(self, endpoint: str, request_id: str, request: PaymentRequest | None,
                      intent: SettlementIntent | None, valid: bool, reason: Reason | None) -> None:
        if request is None:
            return
        req = request.requirements
        row = (
            _now_utc(), endpoint, request_id[:64] or None, request.scheme[:64], request.version,
            request.network[:64],
            _bytes(intent.payer) if intent else None, _bytes(req.pay_to), _bytes(req.asset),
            req.amount, intent.nonce if intent else None,
            intent.valid_before if intent else None, intent.fingerprint if intent else None,
            valid, str(reason) if reason else None)
        await self._recorder.record(row)

    def _count_verify(self, request: PaymentRequest | None, network: Network | None,
                      response: VerifyResponse, started: float) -> None:
        scheme, net = _labels(request, network)
        result = "valid" if response.is_valid else "invalid"
        self._metrics.verify_total.labels(
            scheme, net, result, _reason_label(response.invalid_reason)).inc()
        self._metrics.verify_seconds.labels(scheme, net).observe(time.monotonic() - started)

    def _count_settle(self, request: PaymentRequest | None, network: Network | None,
                      response: SettleResponse, started: float) -> None:
        scheme, net = _labels(request, network)
        if response.success:
            result = "success"
        elif response.error_reason is Reason.SETTLEMENT_PENDING:
            result = "pending"
        else:
            result = "failed"
        self._metrics.settle_total.labels(
            scheme, net, result, _reason_label(response.error_reason)).inc()
        self._metrics.settle_seconds.labels(scheme, net).observe(time.monotonic() - started)


_NETWORK_MISMATCH = {"exact": Reason.NETWORK_MISMATCH, "upto": Reason.UPTO_NETWORK_MISMATCH}
_NO_NETWORK_CONFIG = {"exact": Reason.FAILED_TO_GET_NETWORK_CONFIG,
                      "upto": Reason.UPTO_FAILED_TO_GET_NETWORK_CONFIG}


def _unsupported_scheme(request: PaymentRequest) -> str | None:
    """The scheme name we cannot route. `upto` checks the requirements' scheme itself (its
    reason is `invalid_upto_evm_scheme`, as the SDK's upto mechanism answers); for `exact` a
    requirements scheme other than exact is unsupported here, named in the message."""
    if request.scheme not in SCHEMES or (request.version == 1 and request.scheme != "exact"):
        return request.scheme  # upto exists only in x402 v2
    if request.scheme == "exact" and request.requirements.scheme != "exact":
        return request.requirements.scheme
    return None


def _transfer_method(request: PaymentRequest) -> TransferMethod | None:
    """Every SDK routes `exact` by payload shape: `permit2Authorization` means Permit2. x402 v1
    has EIP-3009 only (None: routed nowhere)."""
    if not is_permit2_payload(request.payload):
        return TransferMethod.EIP3009
    return TransferMethod.PERMIT2 if request.version == 2 else None


def _early(request: PaymentRequest, reason: Reason, message: str
           ) -> tuple[VerifyResponse, PaymentRequest]:
    return VerifyResponse(False, reason, message, _payer_of(request)), request


def _labels(request: PaymentRequest | None, network: Network | None) -> tuple[str, str]:
    scheme = request.scheme if request is not None and request.scheme in SCHEMES else "other"
    return scheme, network.key if network is not None else "unknown"


def _reason_label(reason: Reason | None) -> str:
    return str(reason) if reason is not None else "none"


def _wire_network(request: PaymentRequest | None) -> str:
    return request.network if request is not None else ""


def _payer_of(request: PaymentRequest) -> str | None:
    """The payer named in the payload, if it parses (for `payer` in invalid answers)."""
    auth = request.payload.get("authorization") or request.payload.get("permit2Authorization")
    if isinstance(auth, dict):
        try:
            return to_checksum(address(auth.get("from"), "from"))
        except ValueError:
            return None
    return None


def _bytes(hex_address: str) -> bytes:
    return bytes.fromhex(hex_address[2:])


def _now_utc() -> datetime:
    return datetime.now(UTC)

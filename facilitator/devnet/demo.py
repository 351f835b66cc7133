"""`facilitator demo`: a paying client of the devnet's TEE gateway, written with our own signing
(eth_account through `contracts.sign_upto_permit`; the x402 SDK is not used).

What a request does (OpenGradient's og-x402 httpx client behaves the same way):
1. it sends `X-Upto-Session` when it holds a session for that URL;
2. a 402 after sending a session means the session was settled, exhausted or expired: the
   session is dropped and the request is sent again bare (a re-challenge);
3. a 402 carrying `PAYMENT-REQUIRED` is answered with a fresh Permit2 `upto` permit: cap = the
   requirement's `amount`, a random 256-bit nonce, deadline = now + `maxTimeoutSeconds`, witness
   {to: payTo, facilitator: extra.facilitatorAddress, validAfter: now − 600}, sent as
   `PAYMENT-SIGNATURE` = base64 JSON of a v2 PaymentPayload whose `accepted` is the requirement;
4. a 200 carrying `X-Upto-Session` stores that session for later requests.

Every response's TEE attestation is then checked locally against the gateway's `/signing-key`
(the request hash recomputed from what was sent, the output hash from what came back, the
RSA-PSS signature, and the tee id of the key).

Guarantees: no retry loops beyond the one re-challenge and the one paid retry per request; every
HTTP call has a timeout; nothing here needs more than the manifest's devnet keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from eth_account import Account

from facilitator.core import attestation as att
from facilitator.devnet import contracts
from facilitator.devnet.anvil import REPO_ROOT
from facilitator.devnet.gateway import (
    CHAT_PATH,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SESSION_HEADER,
    SETTLEMENT_TYPE_HEADER,
    b64json,
    decode_b64json,
)

DEFAULT_MANIFEST = REPO_ROOT / ".devnet" / "manifest.json"
VALID_AFTER_SKEW_S = 600  # og-x402 signs validAfter = now - 600
DEFAULT_MODEL = "gpt-4.1"


class DemoError(RuntimeError):
    """The demo could not run (no manifest, no gateway, a 402 without requirements...)."""


@dataclass
class ChatResult:
    """One chat request as the client saw it."""

    request: dict[str, Any]
    status: int
    body: Any
    headers: dict[str, str]
    session_id: str | None
    new_permit: bool  # this request signed a new permit (opened a session)


@dataclass
class UptoPayer:
    """An x402 `upto` payer for chat endpoints; `key` is a hex private key."""

    key: str
    http: aiohttp.ClientSession
    settlement_type: str | None = None
    sessions: dict[str, str] = field(default_factory=dict)  # URL -> X-Upto-Session
    permits: list[dict[str, Any]] = field(default_factory=list)  # PaymentPayloads signed

    @property
    def address(self) -> str:
        return Account.from_key(self.key).address

    async def chat(self, url: str, body: dict[str, Any]) -> ChatResult:
        headers = {"Content-Type": "application/json"}
        if self.settlement_type:
            headers[SETTLEMENT_TYPE_HEADER] = self.settlement_type
        session = self.sessions.get(url)
        status, answer, got = await self._post(
            url, body, {**headers, SESSION_HEADER: session} if session else headers)
        if status == 402 and session:
            self.sessions.pop(url, None)  # settled, exhausted or expired: re-challenge
            status, answer, got = await self._post(url, body, headers)
        new_permit = False
        if status == 402:
            required = got.get(PAYMENT_REQUIRED_HEADER)
            if not required:
                raise DemoError(f"402 without {PAYMENT_REQUIRED_HEADER}: {answer}")
            payload = self.sign(decode_b64json(required))
            self.permits.append(payload)
            new_permit = True
            status, answer, got = await self._post(
                url, body, {**headers, PAYMENT_SIGNATURE_HEADER: b64json(payload)})
        session_id = got.get(SESSION_HEADER) if 200 <= status < 300 else None
        if session_id:
            self.sessions[url] = session_id
        return ChatResult(request=body, status=status, body=answer, headers=got,
                          session_id=session_id, new_permit=new_permit)

    def sign(self, payment_required: dict[str, Any]) -> dict[str, Any]:
        """A v2 PaymentPayload for the first `upto` requirement of a PaymentRequired."""
        requirement = next((r for r in payment_required.get("accepts", [])
                            if isinstance(r, dict) and r.get("scheme") == "upto"), None)
        if requirement is None:
            raise DemoError(f"no upto requirement in {payment_required}")
        payload: dict[str, Any] = {"x402Version": 2, "accepted": requirement,
                                   "payload": sign_upto_payload(self.key, requirement)}
        if payment_required.get("resource") is not None:
            payload["resource"] = payment_required["resource"]
        return payload

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]
                    ) -> tuple[int, Any, dict[str, str]]:
        async with self.http.post(url, data=json.dumps(body), headers=headers) as resp:
            text = await resp.text()
            try:
                answer = json.loads(text) if text else None
            except json.JSONDecodeError:
                answer = text
            return resp.status, answer, dict(resp.headers)


def sign_upto_payload(key: str, requirement: dict[str, Any]) -> dict[str, Any]:
    """The `{signature, permit2Authorization}` of an x402 upto payment for `requirement`."""
    now = int(time.time())
    permit = contracts.sign_upto_permit(
        key, chain_id=int(str(requirement["network"]).split(":", 1)[1]),
        token=requirement["asset"], cap=int(requirement["amount"]),
        nonce=int.from_bytes(os.urandom(32), "big"),
        deadline=now + int(requirement.get("maxTimeoutSeconds") or 300),
        to=requirement["payTo"], facilitator=requirement["extra"]["facilitatorAddress"],
        valid_after=now - VALID_AFTER_SKEW_S)
    return permit.payload()


def verify_response(request: dict[str, Any], response: Any, key: att.TeePublicKey) -> str | None:
    """None when `response` carries a valid attestation of `request` by `key`, else why not."""
    if not isinstance(response, dict):
        return "response is not a JSON object"
    try:
        in_hash = att.input_hash(att.canonical_chat_request(request))
        out_hash = att.output_hash(att.chat_output_text(response))
        if response.get("tee_request_hash") != in_hash.hex():
            return "tee_request_hash differs from the request sent"
        if response.get("tee_output_hash") != out_hash.hex():
            return "tee_output_hash differs from the output received"
        if att.parse_hex32(response.get("tee_id"), "tee_id") != key.tee_id:
            return "tee_id is not the signing key's"
        signature = base64.b64decode(response.get("tee_signature", ""), validate=True)
        timestamp = response.get("tee_timestamp")
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            return "tee_timestamp is not an integer"
    except (att.UnsupportedRequest, att.AttestationFieldError, binascii.Error, ValueError,
            TypeError) as exc:
        return f"malformed attestation: {exc}"
    if not att.verify_attestation(key, att.message_hash(in_hash, out_hash, timestamp), signature):
        return "RSA-PSS signature does not verify"
    return None


async def fetch_signing_key(http: aiohttp.ClientSession, gateway_url: str) -> att.TeePublicKey:
    """The gateway's `/signing-key`, checked: its tee id is keccak(DER) of the key it serves."""
    async with http.get(gateway_url.rstrip("/") + "/signing-key") as resp:
        if resp.status != 200:
            raise DemoError(f"{gateway_url}/signing-key answered HTTP {resp.status}")
        info = await resp.json(content_type=None)
    key = att.load_public_key_pem(info["public_key"])
    if info.get("tee_id") != "0x" + key.tee_id.hex():
        raise DemoError("the gateway's tee_id is not keccak256 of its signing key")
    return key


def demo_request(i: int) -> dict[str, Any]:
    """Request `i` of the demo: mostly questions, every seventh one offering a tool."""
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 64,
                            "messages": [{"role": "system", "content": "Answer briefly."},
                                         {"role": "user",
                                          "content": f"Demo request {i + 1}: what is {i} + {i}?"}]}
    if i % 7 == 6:
        body["tools"] = [{"type": "function", "function": {
            "name": "calculator", "description": "Adds numbers",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
    return body


@dataclass
class DemoSummary:
    gateway: str
    payer: str
    tee_id: str
    requests: int
    served: int
    sessions: int
    permits: int
    opg_spent: int  # atomic OPG, the sum of the served responses' costs
    verified: int
    failures: list[str]
    results: list[ChatResult]

    def lines(self) -> list[str]:
        spent = f"{self.opg_spent / 10**18:.18f}".rstrip("0").rstrip(".")
        out = [(f"demo: {self.served}/{self.requests} requests served by {self.gateway} "
                f"(TEE {self.tee_id[:18]}…), paid by {self.payer}"),
               f"  sessions: {self.sessions} (Permit2 permits signed: {self.permits})",
               (f"  OPG spent: {spent} OPG ({self.opg_spent} atomic units); the gateway "
                "settles each session on Base when it is idle or exhausted"),
               f"  attestations verified locally: {self.verified}/{self.served}"]
        out += [f"  problem: {f}" for f in self.failures[:10]]
        return out


def load_manifest(path: Path | str | None = None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoError(f"no devnet manifest at {path}: start the devnet (`make run`)") from None


async def run_demo(*, manifest: dict[str, Any] | None = None, gateway_url: str | None = None,
                   payer_index: int = 0, requests: int = 20,
                   settlement_type: str | None = None,
                   out: Callable[[str], None] | None = print) -> DemoSummary:
    """Send `requests` paid chat requests from the manifest's payer `payer_index`; returns (and
    prints through `out`) a summary."""
    manifest = manifest if manifest is not None else load_manifest()
    gateway_url = gateway_url or manifest["gateway"]["url"]
    payers = manifest["payers"]
    if not 0 <= payer_index < len(payers):
        raise DemoError(f"payer index {payer_index} out of range 0..{len(payers) - 1}")
    payer_key = payers[payer_index]["privateKey"]
    url = gateway_url.rstrip("/") + CHAT_PATH
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            key = await fetch_signing_key(http, gateway_url)
        except aiohttp.ClientError as exc:
            raise DemoError(f"gateway {gateway_url} unreachable: {exc!r}") from exc
        payer = UptoPayer(payer_key, http, settlement_type)
        results, failures, verified, spent = [], [], 0, 0
        for i in range(requests):
            result = await payer.chat(url, demo_request(i))
            results.append(result)
            if result.status != 200:
                failures.append(f"request {i + 1}: HTTP {result.status} {result.body}")
                continue
            problem = verify_response(result.request, result.body, key)
            if problem is None:
                verified += 1
            else:
                failures.append(f"request {i + 1}: {problem}")
            spent += int((result.body.get("opengradient") or {}).get("cost_opg", 0))
    served = sum(1 for r in results if r.status == 200)
    summary = DemoSummary(
        gateway=gateway_url, payer=payer.address, tee_id="0x" + key.tee_id.hex(),
        requests=requests, served=served,
        sessions=len({r.session_id for r in results if r.session_id}),
        permits=len(payer.permits), opg_spent=spent, verified=verified, failures=failures,
        results=results)
    if out is not None:
        for line in summary.lines():
            out(line)
    return summary

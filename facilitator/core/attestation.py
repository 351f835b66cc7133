"""OpenGradient TEE inference attestations: request canonicalisation, the signed hashes, RSA-PSS
signing/verification, and parsing of the `x-settlement-data` records a gateway sends.

What a TEE signs per response (tee-gateway `tee_manager.py`, SDK 1.1.4 `client/tee_verify.py`):
    input_hash  = keccak256(json.dumps(canonical_request, sort_keys=True).encode())  # ", " / ": ",
                                                                                     # ensure_ascii
    output_hash = keccak256(output_text.encode())
    msg_hash    = keccak256(input_hash ‖ output_hash ‖ uint256_be(timestamp))
    signature   = RSASSA-PSS(SHA-256, MGF1-SHA-256, salt 32) over msg_hash (SHA-256 of it signed)
    tee_id      = keccak256(DER SubjectPublicKeyInfo of the RSA key)

Guarantees:
- Pure functions (no I/O). Canonicalisation reproduces the SDK's `build_inner_request` canonical
  dict exactly; `tests/unit/test_og_compat.py` pins bytes and hashes to the SDK's own code.
- `verify_attestation` never raises on a bad signature: it answers False.
- Parsed public keys are cached (bounded) by their DER bytes; `TeeKeyRing` indexes them by tee id.

Verification policy (deliberate; OpenGradient's verifiers differ among themselves, see notes §9):
- Crypto: as strict as the on-chain precompile (Go `rsa.VerifyPSS`, and our `RSAPSS.sol`): RSA keys
  of 2048–8192 bits only, the signature exactly as long as the modulus, salt exactly 32 bytes. The
  SDK's verifier (pyca/cryptography) also accepts a signature with its leading zero byte dropped;
  such a signature would revert on chain, so it is rejected here.
- Records: hashes and tee id as 64 hex digits with or without `0x`, either case (what
  OpenGradient's facilitator accepts and its gateways send; the bytes are the same). Rejected,
  although the SDK verifier lets them through: `0X`, whitespace/sign/underscore/leading-zero
  timestamp strings, base64 with whitespace, missing or extra padding or the URL-safe alphabet,
  and OpenGradient's unverifiable fallbacks (`tee_signature: "0x"`, null timestamps; its SHA-256
  fallback hashes parse, and then fail verification). `eth_address`: lower case or a valid
  EIP-55 checksum, like viem's strict `isAddress` in OpenGradient's facilitator.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from eth_hash.auto import keccak

from facilitator.protocol.fields import to_checksum

SALT_LENGTH = 32
MIN_MODULUS_BITS = 2048
MAX_MODULUS_BITS = 8192
MAX_UINT256 = (1 << 256) - 1
MAX_SETTLEMENT_DATA_BYTES = 4 * 1024 * 1024

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=SALT_LENGTH)
_SHA256 = hashes.SHA256()
_HEX32 = re.compile(r"(?:0x)?([0-9a-fA-F]{64})")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


# ---------------------------------------------------------------------------------------------
# Request canonicalisation (mirrors opengradient 1.1.4 `client/tee_verify.py::build_inner_request`)
# ---------------------------------------------------------------------------------------------


class UnsupportedRequest(ValueError):
    """The body cannot be canonicalised (the SDK raises `UnsupportedRequestError` for these)."""


def canonical_user_content(content: Any) -> Any:
    """User content as hashed: strings unchanged, other non-lists as `str()`, and parts reduced
    to text or `{type[, filename]}` (attachment bytes are never hashed)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)
    return [_canonical_part(part) for part in content]


def _canonical_part(part: Any) -> dict[str, Any]:
    if not isinstance(part, dict):
        return {"type": "text", "text": str(part)}
    if part.get("type") == "text":
        return {"type": "text", "text": part.get("text", "") or ""}
    entry: dict[str, Any] = {"type": part.get("type")}
    file_obj = part.get("file")
    filename = (file_obj.get("filename") if isinstance(file_obj, dict) else None) \
        or part.get("filename")
    if filename:
        entry["filename"] = filename
    return entry


def _canonical_tool_call(call: Any) -> dict[str, Any]:
    # The SDK would crash with AttributeError on these shapes; the gateway could not have
    # signed them either, so they are refused rather than guessed.
    if not isinstance(call, dict):
        raise UnsupportedRequest("tool_calls entries must be JSON objects")
    function = call.get("function", {})
    if not isinstance(function, dict):
        raise UnsupportedRequest("tool_calls[].function must be a JSON object")
    return {
        "id": call.get("id", ""),
        "type": call.get("type", "function"),
        "function": {"name": function.get("name", ""),
                     "arguments": function.get("arguments", "")},
    }


def canonical_message(message: dict[str, Any]) -> dict[str, Any]:
    """One message as the gateway hashes it; `developer` becomes `system` (the SDK does this;
    the gateway itself refuses a developer role)."""
    role = message.get("role")
    if role in ("system", "developer"):
        return {"role": "system", "content": message.get("content")}
    if role == "user":
        return {"role": "user", "content": canonical_user_content(message.get("content"))}
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        tool_calls = message.get("tool_calls")
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise UnsupportedRequest("assistant tool_calls must be a list")
            out["tool_calls"] = [_canonical_tool_call(call) for call in tool_calls]
        return out
    if role == "tool":
        return {"role": "tool", "content": message.get("content"),
                "tool_call_id": message.get("tool_call_id")}
    if role == "function":
        return {"role": "function", "content": message.get("content"), "name": message.get("name")}
    raise UnsupportedRequest(f"unknown message role: {role!r}")


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 0.0
    try:
        return float(value)  # float() like the gateway: 0 -> 0.0, "0.5" -> 0.5
    except (TypeError, ValueError):
        raise UnsupportedRequest("temperature is not a number") from None


def canonical_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The canonical `/v1/chat/completions` request whose JSON the TEE hashes.

    Only model, messages, temperature (always a float, default 0.0), max_tokens (whenever not
    None, so 0 is kept), stop/tools/response_format (when truthy) and web_search (as True) are
    covered; tool_choice, n, top_p, stream, ... are not signed. `body` must be parsed with
    Python `json` semantics (e.g. `1e3` is the float 1000.0). The result shares nested values
    with `body`: do not mutate either.
    """
    if not isinstance(body, dict):
        raise UnsupportedRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UnsupportedRequest("request is missing a 'model'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UnsupportedRequest("request is missing 'messages'")
    if not all(isinstance(m, dict) for m in messages):
        raise UnsupportedRequest("each message must be a JSON object")
    canonical: dict[str, Any] = {
        "model": model,
        "messages": [canonical_message(m) for m in messages],
        "temperature": _temperature(body),
    }
    if body.get("max_tokens") is not None:
        canonical["max_tokens"] = body["max_tokens"]
    if body.get("stop"):
        canonical["stop"] = body["stop"]
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise UnsupportedRequest("'tools' must be a list")
        canonical["tools"] = body["tools"]
    if body.get("response_format"):
        canonical["response_format"] = body["response_format"]
    if body.get("web_search"):
        canonical["web_search"] = True
    return canonical


def canonical_completion_request(body: dict[str, Any]) -> dict[str, Any]:
    """The canonical `/v1/completions` request (tee-gateway `completions_controller.py`):
    model, prompt, temperature (float, default 0.0), max_tokens when not None, stop when truthy."""
    if not isinstance(body, dict):
        raise UnsupportedRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UnsupportedRequest("request is missing a 'model'")
    canonical: dict[str, Any] = {
        "model": model, "prompt": body.get("prompt"), "temperature": _temperature(body)}
    if body.get("max_tokens") is not None:
        canonical["max_tokens"] = body["max_tokens"]
    if body.get("stop"):
        canonical["stop"] = body["stop"]
    return canonical


def canonical_request_bytes(canonical: dict[str, Any]) -> bytes:
    """Exactly what the gateway hashes: Python `json.dumps` defaults plus sort_keys."""
    return json.dumps(canonical, sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# The signed hashes
# ---------------------------------------------------------------------------------------------


def input_hash(canonical: dict[str, Any]) -> bytes:
    return keccak(canonical_request_bytes(canonical))


def output_hash(text: str) -> bytes:
    return keccak(text.encode("utf-8"))


def tool_calls_output_text(tool_calls: list[Any]) -> str:
    """What is signed when finish_reason is "tool_calls": the response's tool_calls as JSON."""
    return json.dumps(tool_calls, sort_keys=True)


def tool_calls_output_hash(tool_calls: list[Any]) -> bytes:
    return output_hash(tool_calls_output_text(tool_calls))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Parts without "text" (images) contribute nothing: generated images are not signed.
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part)
                       for part in content)
    return ""


def chat_output_text(response_body: dict[str, Any]) -> str:
    """The signed output of a chat response (SDK `response_content_for_hash`)."""
    choices = response_body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices \
        and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if not isinstance(message, dict):
        return ""
    if choice.get("finish_reason") == "tool_calls" and isinstance(message.get("tool_calls"), list):
        return tool_calls_output_text(message["tool_calls"])
    return _content_text(message.get("content"))


def completion_output_text(response_body: dict[str, Any]) -> str:
    """The signed output of a `/v1/completions` response: `choices[0].text`."""
    choices = response_body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        text = choices[0].get("text")
        return text if isinstance(text, str) else ""
    return ""


def signed_hash_candidates(request: Any, response: Any) -> list[tuple[bytes, bytes]]:
    """The (input hash, output hash) pairs a TEE could have signed for this full request and
    response: a chat completion when the request has `messages`, a text completion
    (`/v1/completions`: `prompt`, output `choices[0].text`) when it has `prompt` (both, in that
    order, if a body carries both). Raises `UnsupportedRequest` when no form applies."""
    if not isinstance(request, dict):
        raise UnsupportedRequest("request body must be a JSON object")
    if not isinstance(response, dict):
        raise UnsupportedRequest("response body must be a JSON object")
    candidates = []
    if "messages" in request:
        candidates.append((input_hash(canonical_chat_request(request)),
                           output_hash(chat_output_text(response))))
    if "prompt" in request:
        candidates.append((input_hash(canonical_completion_request(request)),
                           output_hash(completion_output_text(response))))
    if not candidates:
        raise UnsupportedRequest("request has neither 'messages' (chat) nor 'prompt' "
                                 "(completion)")
    return candidates


def message_hash(input_hash_: bytes, output_hash_: bytes, timestamp: int) -> bytes:
    """keccak256(abi.encodePacked(bytes32 inputHash, bytes32 outputHash, uint256 timestamp))."""
    if len(input_hash_) != 32 or len(output_hash_) != 32:
        raise ValueError("input and output hashes must be 32 bytes")
    if not 0 <= timestamp <= MAX_UINT256:
        raise ValueError("timestamp out of uint256 range")
    return keccak(input_hash_ + output_hash_ + timestamp.to_bytes(32, "big"))


def tee_id_of(public_key_der: bytes) -> bytes:
    """keccak256 of the DER SubjectPublicKeyInfo, as the gateway and the TEERegistry compute it."""
    return keccak(public_key_der)


# ---------------------------------------------------------------------------------------------
# Keys, signing, verification
# ---------------------------------------------------------------------------------------------


class InvalidTeeKey(ValueError):
    """Not an RSA SubjectPublicKeyInfo of 2048–8192 bits in canonical DER."""


@dataclass(frozen=True, slots=True)
class TeePublicKey:
    """A parsed TEE signing key; `der` is canonical, so `tee_id` is what the registry holds."""

    tee_id: bytes
    der: bytes
    key: rsa.RSAPublicKey
    modulus_bytes: int


@lru_cache(maxsize=1024)
def load_public_key(der: bytes) -> TeePublicKey:
    """Parse (once: cached by DER) an RSA SPKI key. Non-canonical DER is refused, because its
    keccak would differ from the tee id any other party derives from the same key."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidTeeKey("not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidTeeKey("not an RSA key")
    if not MIN_MODULUS_BITS <= key.key_size <= MAX_MODULUS_BITS:
        raise InvalidTeeKey(f"RSA modulus of {key.key_size} bits (2048–8192 accepted)")
    if public_key_der(key) != der:
        raise InvalidTeeKey("DER is not canonical")
    return TeePublicKey(tee_id=tee_id_of(der), der=der, key=key,
                        modulus_bytes=(key.key_size + 7) // 8)


def load_public_key_pem(pem: str | bytes) -> TeePublicKey:
    """A PEM key (as served by a gateway's `/signing-key`), via its canonical DER."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidTeeKey("not a PEM public key") from None
    return load_public_key(public_key_der(key))


def public_key_der(key: rsa.RSAPublicKey | rsa.RSAPrivateKey | Any) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_private_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A TEE-style signing key (e = 65537), for the devnet emulator and tests."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def sign_attestation(private_key: rsa.RSAPrivateKey, msg_hash: bytes) -> bytes:
    """RSA-PSS signature over `msg_hash`, exactly as the gateway's `sign_data` (raw bytes; the
    gateway sends them base64-encoded)."""
    if len(msg_hash) != 32:
        raise ValueError("msg_hash must be 32 bytes")
    return private_key.sign(msg_hash, _PSS, _SHA256)


def verify_attestation(public_key: TeePublicKey | bytes, msg_hash: bytes,
                       signature: bytes) -> bool:
    """True iff `signature` is a valid RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) signature of
    `msg_hash` by `public_key` (a parsed key or its DER as `bytes`), with the on-chain length
    rule. ~30 us for RSA-2048 on one core."""
    try:
        key = public_key if isinstance(public_key, TeePublicKey) else load_public_key(public_key)
    except InvalidTeeKey:
        return False
    if len(msg_hash) != 32 or len(signature) != key.modulus_bytes:
        return False
    try:
        key.key.verify(signature, msg_hash, _PSS, _SHA256)
    except InvalidSignature:
        return False
    return True


class TeeKeyRing:
    """Parsed keys by tee id (bounded, least recently used evicted): parse a registry key once,
    then verify many attestations against it."""

    def __init__(self, max_keys: int = 1024) -> None:
        self._keys: OrderedDict[bytes, TeePublicKey] = OrderedDict()
        self._max = max_keys

    def add(self, der: bytes) -> TeePublicKey:
        key = load_public_key(der)
        self._keys[key.tee_id] = key
        self._keys.move_to_end(key.tee_id)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return key

    def get(self, tee_id: bytes) -> TeePublicKey | None:
        key = self._keys.get(tee_id)
        if key is not None:
            self._keys.move_to_end(tee_id)
        return key

    def __len__(self) -> int:
        return len(self._keys)


# ---------------------------------------------------------------------------------------------
# Attestation records and `x-settlement-data`
# ---------------------------------------------------------------------------------------------


class AttestationFieldError(ValueError):
    """A settlement record field is missing or malformed; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AttestationRecord:
    """One signed inference, as batched into a Merkle leaf."""

    tee_id: bytes
    input_hash: bytes
    output_hash: bytes
    tee_signature: bytes
    tee_timestamp: int

    def message_hash(self) -> bytes:
        return message_hash(self.input_hash, self.output_hash, self.tee_timestamp)

    def leaf_values(self) -> tuple[bytes, bytes, bytes, bytes, int]:
        """Values for the batch leaf encoding `LEAF_ENCODING`."""
        return (self.tee_id, self.input_hash, self.output_hash, self.tee_signature,
                self.tee_timestamp)


# OpenGradient's batch leaf since inference-facilitator 5e9de7b (2026-04-01).
LEAF_ENCODING = ("bytes32", "bytes32", "bytes32", "bytes", "uint256")


def verify_record(record: AttestationRecord, public_key: TeePublicKey) -> bool:
    """The record's signature is by `public_key`, and that key is the record's TEE."""
    return public_key.tee_id == record.tee_id and verify_attestation(
        public_key, record.message_hash(), record.tee_signature)


@dataclass(frozen=True, slots=True)
class SettlementData:
    """A parsed `x-settlement-data` payload. `input`/`output`/`eth_address` only for individual
    settlement (`individual` True); `eth_address` is EIP-55 checksummed."""

    record: AttestationRecord
    timestamp: int
    individual: bool
    input: Any = None
    output: Any = None
    eth_address: str | None = None


def parse_hex32(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationFieldError(field, "expected a hex string")
    match = _HEX32.fullmatch(value)
    if match is None:
        raise AttestationFieldError(field, "expected 32 bytes as 64 hex digits, optional 0x")
    return bytes.fromhex(match.group(1))


def parse_signature(value: Any, field: str = "tee_signature") -> bytes:
    """Standard base64 with padding, decoding to 256–1024 bytes (RSA 2048–8192)."""
    if not isinstance(value, str) or not value:
        raise AttestationFieldError(field, "expected a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationFieldError(field, "not standard padded base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise AttestationFieldError(field, "not canonical base64")
    if not MIN_MODULUS_BITS // 8 <= len(raw) <= MAX_MODULUS_BITS // 8:
        raise AttestationFieldError(field, f"{len(raw)} bytes is not an RSA-2048..8192 signature")
    return raw


def parse_timestamp(value: Any, field: str, *, allow_string: bool = False) -> int:
    if isinstance(value, bool):
        raise AttestationFieldError(field, "expected an integer")
    if isinstance(value, int):
        number = value
    elif allow_string and isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    else:
        raise AttestationFieldError(field, "expected an integer" + (
            " or a decimal string" if allow_string else ""))
    if not 0 <= number <= MAX_UINT256:
        raise AttestationFieldError(field, "out of uint256 range")
    return number


def checksum_address(value: Any, field: str = "eth_address") -> str:
    """EIP-55 form of a 0x address given in lower case or already checksummed (viem's strict
    `isAddress`, which OpenGradient's facilitator applies: an all-upper-case address is refused
    unless it happens to be its own checksum)."""
    if not isinstance(value, str) or _ADDRESS.fullmatch(value) is None:
        raise AttestationFieldError(field, "expected a 0x-prefixed 20-byte hex address")
    checksummed = to_checksum(value)
    if value[2:] != value[2:].lower() and value != checksummed:
        raise AttestationFieldError(field, "bad EIP-55 checksum")
    return checksummed


def parse_settlement_payload(payload: Any, *, individual: bool) -> SettlementData:
    """Validate a decoded settlement-data object (the fields og-x402's middleware sends).
    Unknown extra fields are ignored; `timestamp` must equal `tee_timestamp` (they are one
    value in every OpenGradient producer)."""
    if not isinstance(payload, dict):
        raise AttestationFieldError("x-settlement-data", "expected a JSON object")
    for name in ("tee_id", "input_hash", "output_hash", "tee_signature", "tee_timestamp",
                 "timestamp") + (("input", "output", "eth_address") if individual else ()):
        if name not in payload:
            raise AttestationFieldError(name, "missing")
    record = AttestationRecord(
        tee_id=parse_hex32(payload["tee_id"], "tee_id"),
        input_hash=parse_hex32(payload["input_hash"], "input_hash"),
        output_hash=parse_hex32(payload["output_hash"], "output_hash"),
        tee_signature=parse_signature(payload["tee_signature"]),
        tee_timestamp=parse_timestamp(payload["tee_timestamp"], "tee_timestamp"),
    )
    # og-x402 sends `timestamp` as an int for batch and as str(tee_timestamp) for individual.
    timestamp = parse_timestamp(payload["timestamp"], "timestamp", allow_string=True)
    if timestamp != record.tee_timestamp:
        raise AttestationFieldError("timestamp", "differs from tee_timestamp")
    if not individual:
        return SettlementData(record=record, timestamp=timestamp, individual=False)
    return SettlementData(record=record, timestamp=timestamp, individual=True,
                          input=payload["input"], output=payload["output"],
                          eth_address=checksum_address(payload["eth_address"]))


def decode_settlement_data(header: str | bytes,
                           max_bytes: int = MAX_SETTLEMENT_DATA_BYTES) -> dict[str, Any]:
    """The JSON object inside an `x-settlement-data` header value (base64, standard and padded,
    of a JSON object), not yet validated: the settlement mode can depend on its fields."""
    if len(header) > max_bytes:
        raise AttestationFieldError("x-settlement-data", f"too large (at most {max_bytes} bytes)")
    try:
        raw = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationFieldError("x-settlement-data", "not standard padded base64") from None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AttestationFieldError("x-settlement-data", "not JSON") from None
    if not isinstance(payload, dict):
        raise AttestationFieldError("x-settlement-data", "expected a JSON object")
    return payload


def parse_settlement_data(header: str | bytes, *, individual: bool,
                          max_bytes: int = MAX_SETTLEMENT_DATA_BYTES) -> SettlementData:
    """Decode and validate an `x-settlement-data` header value: base64 (standard, padded) of a
    JSON object."""
    return parse_settlement_payload(decode_settlement_data(header, max_bytes),
                                    individual=individual)


def encode_settlement_data(record: AttestationRecord) -> str:
    """A batch `x-settlement-data` value as og-x402 builds it (compact JSON, base64): hashes as
    bare hex like the gateway returns them, tee id 0x-prefixed, signature base64."""
    payload = {
        "tee_id": "0x" + record.tee_id.hex(),
        "input_hash": record.input_hash.hex(),
        "output_hash": record.output_hash.hex(),
        "tee_signature": base64.b64encode(record.tee_signature).decode("ascii"),
        "tee_timestamp": record.tee_timestamp,
        "timestamp": record.tee_timestamp,
    }
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode("ascii")

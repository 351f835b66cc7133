"""OpenGradient attestation primitives: canonicalisation, hashes, RSA-PSS, record parsing.
(Bit-compatibility with the SDK's own code is pinned separately in test_og_compat.py.)"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from eth_hash.auto import keccak

from facilitator.core import attestation as att
from facilitator.core.attestation import (
    AttestationFieldError,
    AttestationRecord,
    InvalidTeeKey,
    TeeKeyRing,
    UnsupportedRequest,
)


@pytest.fixture(scope="module")
def private_key():
    return att.generate_private_key(2048)


@pytest.fixture(scope="module")
def public_key(private_key) -> att.TeePublicKey:
    return att.load_public_key(att.public_key_der(private_key))


def chat(**fields):
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return att.canonical_chat_request(body)


# ---- canonicalisation ------------------------------------------------------------------------


def test_notes_example_byte_for_byte():
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "H\u00e9llo"}],
            "temperature": 0, "max_tokens": 50, "tool_choice": "auto"}
    canonical = att.canonical_chat_request(body)
    assert att.canonical_request_bytes(canonical) == (
        b'{"max_tokens": 50, "messages": [{"content": "H\\u00e9llo", "role": "user"}], '
        b'"model": "gpt-4.1", "temperature": 0.0}')
    digest = att.input_hash(canonical).hex()
    assert digest.startswith("6f8a4f36") and digest.endswith("76d7")  # notes §9.7


def test_developer_becomes_system_and_system_content_passes_through():
    canonical = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "x"}]},
                               {"role": "system", "content": "s", "name": "ignored"}])
    assert canonical["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "x"}]},
        {"role": "system", "content": "s"}]


def test_unsigned_fields_are_dropped():
    canonical = chat(tool_choice="auto", n=3, top_p=0.5, stream=True, user="u", seed=1)
    assert set(canonical) == {"model", "messages", "temperature"}


@pytest.mark.parametrize(("given", "expected"), [
    (None, 0.0), (0, 0.0), (1, 1.0), (0.7, 0.7), ("0.5", 0.5)])
def test_temperature_is_always_a_float(given, expected):
    fields = {} if given is None else {"temperature": given}
    value = chat(**fields)["temperature"]
    assert type(value) is float and value == expected


def test_temperature_that_is_not_a_number_is_refused():
    with pytest.raises(UnsupportedRequest):
        chat(temperature="warm")


def test_optional_fields():
    assert chat(max_tokens=0)["max_tokens"] == 0  # kept whenever not None
    assert "max_tokens" not in chat(max_tokens=None)
    assert "stop" not in chat(stop=[]) and chat(stop=["\n"])["stop"] == ["\n"]
    assert "response_format" not in chat(response_format={})
    assert chat(response_format={"type": "json_object"})["response_format"] == {
        "type": "json_object"}
    assert chat(web_search="yes")["web_search"] is True and "web_search" not in chat(
        web_search=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chat(tools=tools)["tools"] == tools and "tools" not in chat(tools=[])
    with pytest.raises(UnsupportedRequest):
        chat(tools={"type": "function"})


def test_multimodal_user_content_keeps_text_and_reduces_attachments():
    content = [
        {"type": "text", "text": "look"},
        {"type": "text", "text": None},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}},
        {"type": "input_file", "filename": "b.txt", "file_data": "eA=="},
        {"no_type": True},
        42,
    ]
    canonical = chat(messages=[{"role": "user", "content": content}])
    assert canonical["messages"][0]["content"] == [
        {"type": "text", "text": "look"}, {"type": "text", "text": ""},
        {"type": "image_url"}, {"type": "file", "filename": "a.pdf"},
        {"type": "input_file", "filename": "b.txt"}, {"type": None},
        {"type": "text", "text": "42"}]


def test_non_list_user_content_is_stringified_like_the_sdk():
    assert chat(messages=[{"role": "user", "content": None}])["messages"][0]["content"] == "None"
    assert chat(messages=[{"role": "user", "content": {"a": 1}}])["messages"][0][
        "content"] == "{'a': 1}"


def test_assistant_tool_and_function_messages():
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"},
             "extra": 1},
            {"function": {}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "dropped"},
        {"role": "function", "content": "r", "name": "f"},
        {"role": "assistant", "content": "plain", "tool_calls": []},
    ]
    assert chat(messages=messages)["messages"] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "function", "content": "r", "name": "f"},
        {"role": "assistant", "content": "plain"}]


@pytest.mark.parametrize("body", [
    [],
    {"messages": [{"role": "user", "content": "x"}]},
    {"model": "", "messages": [{"role": "user", "content": "x"}]},
    {"model": "m", "messages": []},
    {"model": "m", "messages": ["hello"]},
    {"model": "m", "messages": [{"role": "critic", "content": "x"}]},
    {"model": "m", "messages": [{"role": "assistant", "tool_calls": ["x"]}]},
    {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": None}]}]},
])
def test_unsupported_requests_are_refused(body):
    with pytest.raises(UnsupportedRequest):
        att.canonical_chat_request(body)


def test_completion_request():
    canonical = att.canonical_completion_request(
        {"model": "m", "prompt": "Once", "temperature": 1, "max_tokens": 0, "stop": [],
         "echo": True})
    assert canonical == {"model": "m", "prompt": "Once", "temperature": 1.0, "max_tokens": 0}
    assert att.canonical_request_bytes(canonical) == (
        b'{"max_tokens": 0, "model": "m", "prompt": "Once", "temperature": 1.0}')


# ---- hashes ----------------------------------------------------------------------------------


def test_output_hashes():
    assert att.output_hash("H\u00e9llo") == keccak("H\u00e9llo".encode())
    calls = [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{}"}}]
    assert att.tool_calls_output_text(calls) == (
        '[{"function": {"arguments": "{}", "name": "f"}, "id": "c1", "type": "function"}]')
    assert att.tool_calls_output_hash(calls) == keccak(att.tool_calls_output_text(calls).encode())


def test_chat_output_text():
    def response(message, finish="stop"):
        return {"choices": [{"message": message, "finish_reason": finish}]}

    assert att.chat_output_text(response({"content": "hi"})) == "hi"
    assert att.chat_output_text(response({"content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, "b"]})) == "ab"
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert att.chat_output_text(response({"content": None, "tool_calls": calls},
                                         "tool_calls")) == att.tool_calls_output_text(calls)
    assert att.chat_output_text(response({"content": None, "tool_calls": calls})) == ""
    assert att.chat_output_text({"choices": []}) == "" and att.chat_output_text({}) == ""
    assert att.completion_output_text({"choices": [{"text": "t"}]}) == "t"


def test_message_hash_is_abi_encode_packed():
    ih, oh = bytes(range(32)), bytes(range(32, 64))
    expected = keccak(ih + oh + (1747000000).to_bytes(32, "big"))
    assert att.message_hash(ih, oh, 1747000000) == expected
    with pytest.raises(ValueError):
        att.message_hash(ih[:31], oh, 1)
    with pytest.raises(ValueError):
        att.message_hash(ih, oh, -1)


# ---- keys, signatures ------------------------------------------------------------------------


def test_tee_id_is_keccak_of_spki_der(private_key, public_key):
    der = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert att.tee_id_of(der) == keccak(der) == public_key.tee_id
    assert der[:4] == b"\x30\x82\x01\x22" and len(der) == 294  # SPKI of an RSA-2048 key
    pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert att.load_public_key_pem(pem.decode()).tee_id == public_key.tee_id
    assert att.load_public_key(der) is public_key  # parsed once


def test_key_checks(public_key):
    with pytest.raises(InvalidTeeKey):
        att.load_public_key(b"\x30\x00")
    small = att.generate_private_key(1024)
    with pytest.raises(InvalidTeeKey, match="1024 bits"):
        att.load_public_key(att.public_key_der(small))
    # Same key, long-form length where DER demands short form: another tee id, so refused.
    der = public_key.der
    stretched = b"\x30\x83\x00" + der[2:]
    with pytest.raises(InvalidTeeKey):
        att.load_public_key(stretched)


def test_sign_verify_round_trip(private_key, public_key):
    msg = att.message_hash(keccak(b"in"), keccak(b"out"), 1747000000)
    signature = att.sign_attestation(private_key, msg)
    assert len(signature) == 256
    assert att.verify_attestation(public_key, msg, signature)
    assert att.verify_attestation(public_key.der, msg, signature)
    assert att.sign_attestation(private_key, msg) != signature  # PSS is salted


def test_altered_signature_message_or_key_fails(private_key, public_key):
    msg = att.message_hash(keccak(b"in"), keccak(b"out"), 1747000000)
    signature = att.sign_attestation(private_key, msg)
    for position in (0, 100, 255):
        forged = bytearray(signature)
        forged[position] ^= 1
        assert not att.verify_attestation(public_key, msg, bytes(forged))
    assert not att.verify_attestation(public_key, keccak(msg), signature)
    assert not att.verify_attestation(public_key, msg, signature[:-1])
    assert not att.verify_attestation(public_key, msg, signature + b"\0")
    assert not att.verify_attestation(public_key, msg, b"")
    assert not att.verify_attestation(public_key, msg[:31], signature)
    other = att.load_public_key(att.public_key_der(att.generate_private_key(2048)))
    assert not att.verify_attestation(other, msg, signature)
    assert not att.verify_attestation(b"not a key", msg, signature)


def test_other_salt_lengths_are_rejected(private_key, public_key):
    msg = keccak(b"m")
    for salt in (0, 20, 64):
        signature = private_key.sign(
            msg, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt), hashes.SHA256())
        assert not att.verify_attestation(public_key, msg, signature)


def test_signature_without_its_leading_zero_byte_is_rejected(private_key, public_key):
    # pyca/cryptography (the SDK's verifier) accepts it; Go's rsa.VerifyPSS on chain does not.
    for attempt in range(4000):
        msg = keccak(attempt.to_bytes(4, "big"))
        signature = att.sign_attestation(private_key, msg)
        if signature[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero byte in 4000 tries")
    assert att.verify_attestation(public_key, msg, signature)
    assert not att.verify_attestation(public_key, msg, signature[1:])


def record_for(private_key, public_key, timestamp=1747000000) -> AttestationRecord:
    ih, oh = keccak(b"request"), keccak(b"response")
    signature = att.sign_attestation(private_key, att.message_hash(ih, oh, timestamp))
    return AttestationRecord(public_key.tee_id, ih, oh, signature, timestamp)


def test_verify_record_binds_every_field(private_key, public_key):
    record = record_for(private_key, public_key)
    assert att.verify_record(record, public_key)
    for change in ({"tee_id": keccak(b"x")}, {"input_hash": keccak(b"x")},
                   {"output_hash": keccak(b"x")}, {"tee_timestamp": record.tee_timestamp + 1}):
        altered = AttestationRecord(**{**record_fields(record), **change})
        assert not att.verify_record(altered, public_key), change


def record_fields(record: AttestationRecord) -> dict:
    return {name: getattr(record, name) for name in
            ("tee_id", "input_hash", "output_hash", "tee_signature", "tee_timestamp")}


def test_key_ring_is_bounded_and_indexed_by_tee_id(public_key):
    ring = TeeKeyRing(max_keys=2)
    keys = [att.public_key_der(att.generate_private_key(2048)) for _ in range(2)]
    first = ring.add(public_key.der)
    ring.add(keys[0])
    assert ring.get(first.tee_id) is first  # refreshed: keys[0] is now the oldest
    ring.add(keys[1])
    assert len(ring) == 2 and ring.get(att.tee_id_of(keys[0])) is None
    assert ring.get(first.tee_id) is first


# ---- x-settlement-data -----------------------------------------------------------------------


def batch_payload(record: AttestationRecord) -> dict:
    # What og-x402 0.0.2.dev2 `_build_settlement_metadata` sends for batch settlement.
    return {"tee_id": "0x" + record.tee_id.hex(), "input_hash": record.input_hash.hex(),
            "output_hash": record.output_hash.hex(),
            "tee_signature": base64.b64encode(record.tee_signature).decode(),
            "tee_timestamp": record.tee_timestamp, "timestamp": record.tee_timestamp}


def header(payload: dict) -> str:
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def test_parse_batch_settlement_data(private_key, public_key):
    record = record_for(private_key, public_key)
    parsed = att.parse_settlement_data(header(batch_payload(record)), individual=False)
    assert parsed.record == record and parsed.timestamp == record.tee_timestamp
    assert not parsed.individual and parsed.eth_address is None
    assert att.parse_settlement_data(att.encode_settlement_data(record), individual=False) == parsed
    # 0x on the hashes, upper-case hex, extra fields: all as OpenGradient's facilitator takes them.
    payload = {**batch_payload(record), "input_hash": "0x" + record.input_hash.hex(),
               "tee_id": record.tee_id.hex().upper(), "something_new": 1}
    assert att.parse_settlement_data(header(payload), individual=False).record == record


def test_parse_individual_settlement_data(private_key, public_key):
    record = record_for(private_key, public_key)
    payload = {**batch_payload(record), "timestamp": str(record.tee_timestamp),
               "input": {"model": "m"}, "output": {"choices": []},
               "eth_address": "0x4020a4f3b7b90cca423b9fabcc0ce57c6c240002"}
    parsed = att.parse_settlement_data(header(payload), individual=True)
    assert parsed.individual and parsed.record == record
    assert parsed.eth_address == "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
    assert parsed.input == {"model": "m"} and parsed.output == {"choices": []}
    for name in ("input", "output", "eth_address"):
        with pytest.raises(AttestationFieldError) as error:
            att.parse_settlement_payload({k: v for k, v in payload.items() if k != name},
                                         individual=True)
        assert error.value.field == name


@pytest.mark.parametrize(("field", "value"), [
    ("tee_id", None), ("tee_id", "0x1234"), ("tee_id", "0X" + "ab" * 32), ("tee_id", "ab" * 33),
    ("input_hash", " " + "ab" * 32), ("input_hash", "zz" * 32), ("output_hash", 5),
    ("tee_signature", "0x"), ("tee_signature", ""), ("tee_signature", None),
    ("tee_signature", base64.b64encode(b"\xfb" * 256).decode().replace("+", "-")),
    ("tee_signature", base64.b64encode(b"\x01" * 256).decode()[:-1]),
    ("tee_signature", base64.b64encode(b"\x01" * 256).decode() + "="),
    ("tee_signature", "\n" + base64.b64encode(b"\x01" * 256).decode()),
    ("tee_signature", base64.b64encode(b"\x01" * 64).decode()),
    ("tee_timestamp", None), ("tee_timestamp", "1747000000"), ("tee_timestamp", True),
    ("tee_timestamp", -1), ("tee_timestamp", 1 << 256), ("tee_timestamp", 1.5),
    ("timestamp", " 1747000000"), ("timestamp", "+1747000000"), ("timestamp", "01747000000"),
    ("timestamp", "1_747_000_000"), ("timestamp", 1747000001), ("timestamp", "1747000001"),
])
def test_malformed_fields_are_named(private_key, public_key, field, value):
    payload = batch_payload(record_for(private_key, public_key))
    payload[field] = value
    with pytest.raises(AttestationFieldError) as error:
        att.parse_settlement_payload(payload, individual=False)
    assert error.value.field == field
    assert isinstance(error.value, ValueError) and str(error.value).startswith(field)


def test_missing_fields_are_named(private_key, public_key):
    payload = batch_payload(record_for(private_key, public_key))
    for name in payload:
        with pytest.raises(AttestationFieldError) as error:
            att.parse_settlement_payload({k: v for k, v in payload.items() if k != name},
                                         individual=False)
        assert error.value.field == name


@pytest.mark.parametrize("address", [
    "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240003",  # bad checksum
    "0x4020A4F3B7B90CCA423B9FABCC0CE57C6C240002",  # all upper case (viem strict refuses it)
    "0X4020a4f3b7b90cca423b9fabcc0ce57c6c240002", "4020a4f3b7b90cca423b9fabcc0ce57c6c240002",
    "0x4020a4f3b7b90cca423b9fabcc0ce57c6c2400", None])
def test_bad_eth_address(private_key, public_key, address):
    record = record_for(private_key, public_key)
    payload = {**batch_payload(record), "input": {}, "output": {}, "eth_address": address}
    with pytest.raises(AttestationFieldError) as error:
        att.parse_settlement_payload(payload, individual=True)
    assert error.value.field == "eth_address"


def test_checksummed_address_is_kept():
    checksummed = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
    assert att.checksum_address(checksummed) == checksummed
    assert att.checksum_address(checksummed.lower()) == checksummed


@pytest.mark.parametrize("value", [
    "not base64!", base64.b64encode(b"[1, 2]").decode(), base64.b64encode(b"{").decode(),
    base64.b64encode(b"\xff\xfe").decode(), "QQ"])
def test_bad_headers(value):
    with pytest.raises(AttestationFieldError) as error:
        att.parse_settlement_data(value, individual=False)
    assert error.value.field == "x-settlement-data"


def test_oversized_header_is_refused_before_decoding():
    with pytest.raises(AttestationFieldError, match="too large"):
        att.parse_settlement_data("A" * 101, individual=False, max_bytes=100)

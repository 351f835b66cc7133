"""The pure rules behind attestation verification: which hashes a full request/response could
have been signed with (chat or `/v1/completions`), the header decoder, the registry history
as of a timestamp, and the capped fee rule shared with the payment broadcaster."""

from __future__ import annotations

import base64
import json

import pytest

from facilitator.adapters.attestations import REGISTRATION_SKEW_S, TeeHistory
from facilitator.core import attestation as att
from facilitator.core.attestation import AttestationFieldError, UnsupportedRequest
from facilitator.core.fees import capped_max_fee, capped_priority_fee

COMPLETION = {"model": "gpt-4.1", "prompt": "Say hi", "max_tokens": 0, "temperature": 1,
              "stop": ["\n"], "top_p": 0.5, "stream": False}
COMPLETION_ANSWER = {"choices": [{"index": 0, "text": " hi", "finish_reason": "stop"}]}
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Say hi"}]}
CHAT_ANSWER = {"choices": [{"message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop"}]}


def test_a_completion_is_hashed_as_the_gateway_hashes_completions():
    [(input_hash, output_hash)] = att.signed_hash_candidates(COMPLETION, COMPLETION_ANSWER)
    canonical = json.dumps({"max_tokens": 0, "model": "gpt-4.1", "prompt": "Say hi",
                            "stop": ["\n"], "temperature": 1.0}, sort_keys=True).encode()
    assert input_hash == att.keccak(canonical)
    assert output_hash == att.keccak(b" hi")


def test_a_chat_is_hashed_as_a_chat():
    [(input_hash, output_hash)] = att.signed_hash_candidates(CHAT, CHAT_ANSWER)
    assert input_hash == att.input_hash(att.canonical_chat_request(CHAT))
    assert output_hash == att.output_hash("hi")


def test_a_body_with_both_shapes_offers_both_forms():
    both = {**CHAT, "prompt": "Say hi"}
    assert len(att.signed_hash_candidates(both, CHAT_ANSWER)) == 2


@pytest.mark.parametrize("request_body, response_body", [
    ({"model": "gpt-4.1"}, CHAT_ANSWER), ([], CHAT_ANSWER), (CHAT, "text")])
def test_bodies_of_neither_shape_cannot_be_canonicalised(request_body, response_body):
    with pytest.raises(UnsupportedRequest):
        att.signed_hash_candidates(request_body, response_body)


def test_the_header_decoder_returns_the_object_and_names_the_header_on_errors():
    payload = {"tee_id": "0x" + "11" * 32, "anything": [1, 2]}
    assert att.decode_settlement_data(base64.b64encode(json.dumps(payload).encode())) == payload
    for bad in ("not base64!", base64.b64encode(b"[1]").decode(), "A" * 200):
        with pytest.raises(AttestationFieldError) as error:
            att.decode_settlement_data(bad, max_bytes=100)
        assert error.value.field == "x-settlement-data"


def test_checksum_address_is_eip55():
    lower = "0x4020a4f3b7b90cca423b9fabcc0ce57c6c240002"
    assert att.checksum_address(lower) == "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"


def history(*events: tuple[float, str]) -> TeeHistory:
    return TeeHistory(tee_id=b"\x01" * 32, public_key=None, payment_address=None, events=events)


def test_registry_history_as_of_a_timestamp():
    tee = history((100.0, "registered"), (200.0, "disabled"), (300.0, "enabled"))
    assert tee.enabled_at(150) is True
    assert tee.enabled_at(200) is False and tee.enabled_at(250) is False
    assert tee.enabled_at(300) is True
    # Registered shortly after the TEE's clock said: still counts (clock skew).
    assert tee.enabled_at(100 - REGISTRATION_SKEW_S) is True
    assert tee.enabled_at(99 - REGISTRATION_SKEW_S) is None
    assert history().enabled_at(1_000) is None


def test_the_fee_is_capped_and_the_tip_never_exceeds_it():
    assert capped_max_fee(10, 3, 1_000) == 23
    assert capped_max_fee(10**12, 10**9, 50 * 10**9) == 50 * 10**9
    assert capped_priority_fee(10**9, 5 * 10**8) == 5 * 10**8
    assert capped_priority_fee(10**9, 5 * 10**9) == 10**9

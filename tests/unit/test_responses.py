"""VerifyResponse / SettleResponse wire shapes, checked against the SDK's pydantic models."""

from __future__ import annotations

import pytest
from x402.schemas import SettleResponse as SdkSettle
from x402.schemas import VerifyResponse as SdkVerify

from facilitator.protocol.reasons import Reason
from facilitator.protocol.responses import MAX_MESSAGE_CHARS, SettleResponse, VerifyResponse

PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
TX = "0x" + "ab" * 32
NETWORK = "eip155:84532"


def _sdk_wire(model) -> dict:
    # What the SDK itself would put on the wire for the same values.
    return model.model_dump(by_alias=True, exclude_none=True)


VERIFY_CASES = [
    VerifyResponse(is_valid=True, payer=PAYER),
    VerifyResponse(is_valid=True),
    VerifyResponse(is_valid=False, invalid_reason=Reason.INVALID_SIGNATURE, payer=PAYER),
    VerifyResponse(is_valid=False, invalid_reason=Reason.INSUFFICIENT_BALANCE,
                   invalid_message="balance 3 < 10000", payer=PAYER),
    VerifyResponse(is_valid=False, invalid_reason=Reason.INVALID_PAYLOAD),
]


@pytest.mark.parametrize("response", VERIFY_CASES, ids=repr)
def test_verify_json_round_trips_through_sdk(response: VerifyResponse) -> None:
    body = response.to_json()
    parsed = SdkVerify.model_validate(body)
    assert parsed.is_valid is response.is_valid
    assert parsed.invalid_reason == (response.invalid_reason and str(response.invalid_reason))
    assert parsed.invalid_message == response.invalid_message
    assert parsed.payer == response.payer
    assert body == _sdk_wire(parsed)


def test_verify_valid_omits_reason_and_message() -> None:
    assert VerifyResponse(is_valid=True, payer=PAYER).to_json() == {"isValid": True, "payer": PAYER}


def test_verify_invalid_has_reason_string() -> None:
    body = VerifyResponse(is_valid=False, invalid_reason=Reason.NETWORK_MISMATCH).to_json()
    assert body == {"isValid": False, "invalidReason": "network_mismatch"}
    assert type(body["invalidReason"]) is str


def test_verify_empty_message_and_payer_are_omitted() -> None:
    body = VerifyResponse(is_valid=False, invalid_reason=Reason.INVALID_PAYLOAD,
                          invalid_message="", payer="").to_json()
    assert set(body) == {"isValid", "invalidReason"}


def test_verify_reason_and_validity_must_agree() -> None:
    with pytest.raises(AssertionError):
        VerifyResponse(is_valid=False)
    with pytest.raises(AssertionError):
        VerifyResponse(is_valid=True, invalid_reason=Reason.INVALID_PAYLOAD)


SETTLE_CASES = [
    SettleResponse(success=True, network=NETWORK, transaction=TX, payer=PAYER),
    SettleResponse(success=True, network=NETWORK, transaction=TX, payer=PAYER, amount="10000",
                   extensions={"settlement": {"id": "x", "state": "included"}}),
    SettleResponse(success=False, network=NETWORK, error_reason=Reason.NONCE_ALREADY_USED,
                   payer=PAYER),
    SettleResponse(success=False, network="base-sepolia", transaction=TX,
                   error_reason=Reason.SETTLEMENT_PENDING, error_message="receipt timeout"),
    SettleResponse(success=False, network=NETWORK, error_reason=Reason.INVALID_PAYLOAD),
]


@pytest.mark.parametrize("response", SETTLE_CASES, ids=repr)
def test_settle_json_round_trips_through_sdk(response: SettleResponse) -> None:
    body = response.to_json()
    parsed = SdkSettle.model_validate(body)
    assert parsed.success is response.success
    assert parsed.error_reason == (response.error_reason and str(response.error_reason))
    assert (parsed.transaction, parsed.network) == (response.transaction, response.network)
    assert parsed.payer == response.payer and parsed.amount == response.amount
    assert body == _sdk_wire(parsed)


@pytest.mark.parametrize("response", SETTLE_CASES, ids=repr)
def test_settle_always_has_transaction_and_network(response: SettleResponse) -> None:
    body = response.to_json()
    assert isinstance(body["transaction"], str) and body["network"] == response.network


def test_settle_failure_without_broadcast_has_empty_transaction() -> None:
    body = SettleResponse(success=False, network=NETWORK,
                          error_reason=Reason.INVALID_SIGNATURE).to_json()
    assert body == {"success": False, "errorReason": "invalid_exact_evm_payload_signature",
                    "transaction": "", "network": NETWORK}


def test_settle_optional_fields_omitted_when_absent() -> None:
    body = SettleResponse(success=True, network=NETWORK, transaction=TX).to_json()
    assert set(body) == {"success", "transaction", "network"}


def test_settle_success_requires_transaction() -> None:
    with pytest.raises(AssertionError):
        SettleResponse(success=True, network=NETWORK)
    with pytest.raises(AssertionError):
        SettleResponse(success=False, network=NETWORK, transaction=TX)


# ---- message truncation ----------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 499, 500])
def test_short_messages_are_kept_whole(length: int) -> None:
    message = ("revert " * 100)[:length] or None
    v = VerifyResponse(is_valid=False, invalid_reason=Reason.SIMULATION_FAILED,
                       invalid_message=message).to_json()
    s = SettleResponse(success=False, network=NETWORK, error_reason=Reason.TRANSACTION_FAILED,
                       error_message=message).to_json()
    assert v.get("invalidMessage") == message and s.get("errorMessage") == message


@pytest.mark.parametrize("length", [501, 502, 1000, 100_000])
def test_long_messages_are_cut_to_500_chars(length: int) -> None:
    message = "".join(chr(ord("a") + i % 26) for i in range(length))
    v = VerifyResponse(is_valid=False, invalid_reason=Reason.SIMULATION_FAILED,
                       invalid_message=message).to_json()["invalidMessage"]
    s = SettleResponse(success=False, network=NETWORK, error_reason=Reason.TRANSACTION_FAILED,
                       error_message=message).to_json()["errorMessage"]
    for cut in (v, s):
        assert len(cut) == MAX_MESSAGE_CHARS == 500
        assert cut.startswith(message[:MAX_MESSAGE_CHARS - 3])

"""Hand-rolled EIP-712 digests equal eth_account's, and the x402 spec's signed example verifies."""

from __future__ import annotations

import random
import string

from eth_account.messages import _hash_eip191_message
from eth_utils import to_checksum_address

from facilitator.core.ecdsa import recover_address
from facilitator.core.eip712 import domain_separator, transfer_authorization_digest
from facilitator.protocol.eip3009 import TransferAuthorization
from unit.builders import signable

_ALPHABET = string.ascii_letters + string.digits + " -_.é€中🙂"


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 24)))


def _random_case(rng: random.Random) -> dict:
    return {
        "name": _random_text(rng), "version": _random_text(rng),
        "chain_id": rng.choice([1, 8453, 84532, rng.randrange(2**64), rng.randrange(2**256)]),
        "contract": "0x" + rng.randbytes(20).hex(),
        "auth": TransferAuthorization(
            payer="0x" + rng.randbytes(20).hex(), pay_to="0x" + rng.randbytes(20).hex(),
            value=rng.randrange(2 ** rng.randrange(1, 257)), valid_after=rng.randrange(2**64),
            valid_before=rng.randrange(2 ** rng.randrange(1, 257)), nonce=rng.randbytes(32)),
    }


def _oracle(case: dict):
    a = case["auth"]
    wire = {"from": to_checksum_address(a.payer), "to": to_checksum_address(a.pay_to),
            "value": str(a.value), "validAfter": str(a.valid_after),
            "validBefore": str(a.valid_before), "nonce": "0x" + a.nonce.hex()}
    return signable(case["name"], case["version"], case["chain_id"],
                    to_checksum_address(case["contract"]), wire)


def test_domain_separator_matches_eth_account(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        case = _random_case(rng)
        expected = _oracle(case).header
        assert domain_separator(case["name"], case["version"], case["chain_id"],
                                case["contract"]) == expected, case


def test_transfer_digest_matches_eth_account(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        case = _random_case(rng)
        separator = domain_separator(case["name"], case["version"], case["chain_id"],
                                     case["contract"])
        assert transfer_authorization_digest(separator, case["auth"]) == \
            _hash_eip191_message(_oracle(case)), case


def test_domain_separator_ignores_contract_case(seed: int) -> None:
    contract = "0x" + random.Random(seed).randbytes(20).hex()
    assert domain_separator("USDC", "2", 84532, contract) == \
        domain_separator("USDC", "2", 84532, to_checksum_address(contract))


# x402 v2 specification §5.2.1 (specs/x402-specification-v2.md in coinbase/x402): a real
# signature by 0x857b…6b66 over this authorization under Base Sepolia USDC's domain.
SPEC_FROM = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
SPEC_SIGNATURE = ("0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce649"
                  "6642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c")
SPEC_AUTH = TransferAuthorization(
    payer=SPEC_FROM.lower(), pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C".lower(),
    value=10000, valid_after=1740672089, valid_before=1740672154,
    nonce=bytes.fromhex("f3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"))


def test_spec_worked_example_recovers_the_payer() -> None:
    separator = domain_separator("USDC", "2", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e")
    digest = transfer_authorization_digest(separator, SPEC_AUTH)
    assert recover_address(digest, bytes.fromhex(SPEC_SIGNATURE[2:])) == SPEC_FROM.lower()


def test_spec_example_fails_under_another_domain() -> None:
    # Same message, Base mainnet USDC domain: the signature must not verify.
    separator = domain_separator("USD Coin", "2", 8453,
                                 "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    digest = transfer_authorization_digest(separator, SPEC_AUTH)
    assert recover_address(digest, bytes.fromhex(SPEC_SIGNATURE[2:])) != SPEC_FROM.lower()

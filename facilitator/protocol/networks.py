"""Networks and assets we serve: chain ids, CAIP-2 ids, x402 v1 names, tokens.

Pure data. Guarantee: a `NetworkRegistry` resolves a wire network string (CAIP-2 for v2, the v1
name for v1) to exactly one configured network, or to None; lookups never raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

BASE_SEPOLIA_CHAIN_ID = 84532
BASE_SEPOLIA_USDC = "0x036cbd53842c5426634e7929541ec2318f3dcf7e"
BASE_SEPOLIA_OPG = "0x240b09731d96979f50b2c649c9ce10fcf9c7987f"  # OpenGradient's payment token


class TransferMethod(StrEnum):
    EIP3009 = "eip3009"
    PERMIT2 = "permit2"


@dataclass(frozen=True, slots=True)
class Asset:
    address: str  # lower-case hex
    eip712_name: str
    eip712_version: str
    decimals: int
    symbol: str = ""
    transfer_method: TransferMethod = TransferMethod.EIP3009


@dataclass(frozen=True, slots=True)
class Network:
    key: str  # our name for it, used in metrics and config ("base-sepolia")
    chain_id: int
    v1_name: str | None  # x402 v1 network name, None when v1 is not served
    assets: tuple[Asset, ...]
    confirmations: int = 10

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"

    def asset(self, address: str) -> Asset | None:
        return next((a for a in self.assets if a.address == address), None)


BASE_SEPOLIA = Network(
    key="base-sepolia",
    chain_id=BASE_SEPOLIA_CHAIN_ID,
    v1_name="base-sepolia",
    # Watched by the chain watcher (Transfers to payees, front-runs): USDC for `exact`, OPG
    # for OpenGradient's `upto` sessions and `exact` over Permit2.
    assets=(Asset(address=BASE_SEPOLIA_USDC, eip712_name="USDC", eip712_version="2",
                  decimals=6, symbol="USDC"),
            Asset(address=BASE_SEPOLIA_OPG, eip712_name="OPG", eip712_version="2",
                  decimals=18, symbol="OPG", transfer_method=TransferMethod.PERMIT2)),
)


class NetworkRegistry:
    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks
        self._by_wire: dict[tuple[int, str], Network] = {}
        for net in networks:
            self._by_wire[(2, net.caip2)] = net
            if net.v1_name:
                self._by_wire[(1, net.v1_name)] = net

    def resolve(self, version: int, wire_network: str) -> Network | None:
        return self._by_wire.get((version, wire_network))

    def by_key(self, key: str) -> Network | None:
        return next((n for n in self.networks if n.key == key), None)

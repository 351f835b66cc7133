"""Every Prometheus metric the service exports, in one catalog.

Guarantees: all label values come from closed sets (reason codes, configured network keys,
phase names, JSON-RPC method names we call); no payer, nonce, tx hash or URL is ever a label.
Each `Metrics` owns its own registry, so several service instances can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets: verify is ~ms; settle spans automine (~10 ms) to Base's 2 s blocks and beyond.
FAST_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)
SETTLE_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
                  300.0, 900.0)

NS = "facilitator"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.verify_total = Counter(
            f"{NS}_verify_requests", "Verify answers by scheme, network, result and reason.",
            ["scheme", "network", "result", "reason"], registry=r)
        self.settle_total = Counter(
            f"{NS}_settle_requests", "Settle answers by scheme, network, result and reason.",
            ["scheme", "network", "result", "reason"], registry=r)
        self.verify_seconds = Histogram(
            f"{NS}_verify_duration_seconds", "Time to answer /verify.", ["scheme", "network"],
            buckets=FAST_BUCKETS, registry=r)
        self.settle_seconds = Histogram(
            f"{NS}_settle_duration_seconds", "Time to answer /settle.", ["scheme", "network"],
            buckets=SETTLE_BUCKETS, registry=r)
        self.settle_phase_seconds = Histogram(
            f"{NS}_settle_phase_duration_seconds",
            "Settlement phases: verify (checks before broadcast), broadcast (sign, store, send), "
            "receipt (send to receipt).", ["network", "phase"], buckets=SETTLE_BUCKETS, registry=r)
        self.rpc_seconds = Histogram(
            f"{NS}_rpc_request_duration_seconds", "JSON-RPC round trip per call.",
            ["chain", "method"], buckets=FAST_BUCKETS, registry=r)
        self.rpc_errors = Counter(
            f"{NS}_rpc_errors", "JSON-RPC failures by method and kind (transport | node_error).",
            ["chain", "method", "kind"], registry=r)
        self.rpc_batch_size = Histogram(
            f"{NS}_rpc_batch_size", "Calls per JSON-RPC HTTP request.", ["chain"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.signer_balance_wei = Gauge(
            f"{NS}_signer_balance_wei", "Native balance of each facilitator signer.",
            ["network", "signer"], registry=r)
        self.signer_inflight = Gauge(
            f"{NS}_signer_inflight_transactions", "Signed transactions not yet mined.",
            ["network", "signer"], registry=r)
        self.signer_nonce_resets = Counter(
            f"{NS}_signer_nonce_resets", "Times the signer re-read its nonce from the chain.",
            ["network", "cause"], registry=r)
        self.signer_underfunded = Counter(
            f"{NS}_signer_underfunded", "Settlements refused because the signer could not pay gas.",
            ["network"], registry=r)
        self.http_seconds = Histogram(
            f"{NS}_http_request_duration_seconds", "HTTP requests by route and status.",
            ["route", "method", "status"], buckets=FAST_BUCKETS, registry=r)
        self.records_dropped = Counter(
            f"{NS}_verification_records_failed", "Verification audit records that failed to write.",
            registry=r)
        self.db_pool_connections = Gauge(
            f"{NS}_db_pool_connections", "Database pool connections by state (in_use | idle | max).",
            ["state"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

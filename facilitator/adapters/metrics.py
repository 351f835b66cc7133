"""Every Prometheus metric the service exports, in one catalog.

Guarantees: all label values come from closed sets (reason codes, configured network keys,
phase names, JSON-RPC method names we call); no payer, nonce, tx hash or URL is ever a label.
Each `Metrics` owns its own registry, so several service instances can live in one process (tests).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets: verify is ~ms; settle spans automine (~10 ms) to Base's 2 s blocks and beyond.
FAST_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)
SETTLE_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
                  300.0, 900.0)

NS = "facilitator"


FAILURE_EXTRA_CAUSES = ("rpc_error", "signer_underfunded", "reverted", "receipt_timeout",
                        "dropped", "reorged", "expired", "front_run", "gas_cap", "overloaded",
                        "send_rejected", "internal_error")
SCHEME_NAMES = ("exact", "upto")
ATTESTATION_RESULTS = ("valid", "invalid_signature", "unknown_tee", "tee_disabled",
                       "hash_mismatch")
BATCH_RESULTS = ("valid", "unavailable", "malformed", "root_mismatch", "size_mismatch")
FINDING_KINDS = ("paid_not_attested", "attested_not_paid", "invalid_tee_signature", "unknown_tee",
                 "tee_disabled", "attestation_not_settled", "amount_mismatch", "payto_mismatch",
                 "duplicate", "late_settlement", "batch_dump_invalid", "unlinked_reconciliation")
RPC_METHODS = ("eth_blockNumber", "eth_call", "eth_chainId", "eth_createAccessList",
               "eth_estimateGas", "eth_getBalance",
               "eth_getBlockByNumber", "eth_getCode", "eth_getLogs", "eth_getTransactionByHash",
               "eth_getTransactionCount", "eth_getTransactionReceipt", "eth_sendRawTransaction")
AGE_BUCKETS = ("lt_30s", "lt_5m", "lt_1h", "ge_1h")
PHASES = ("verify", "request_to_broadcast", "broadcast_to_inclusion", "inclusion_to_confirmation",
          "end_to_end")


def age_bucket(age_s: float) -> str:
    if age_s < 30:
        return "lt_30s"
    if age_s < 300:
        return "lt_5m"
    return "lt_1h" if age_s < 3600 else "ge_1h"


class Metrics:
    def __init__(self, networks: tuple[str, ...] = (), causes: tuple[str, ...] = ()) -> None:
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
        self.settlement_latency = Histogram(
            f"{NS}_settlement_latency_seconds",
            "Settlement latency per phase: verify (checks before broadcast), request_to_broadcast,"
            " broadcast_to_inclusion, inclusion_to_confirmation, end_to_end (request to "
            "confirmation).", ["network", "phase"], buckets=SETTLE_BUCKETS, registry=r)
        self.settlement_failures = Counter(
            f"{NS}_settlement_failures", "Settlement failures and anomalies by cause (closed set: "
            "every verification reason plus rpc_error, signer_underfunded, reverted, "
            "receipt_timeout, dropped, reorged, expired, front_run, gas_cap, overloaded).",
            ["network", "cause"], registry=r)
        self.settle_replays = Counter(
            f"{NS}_settle_replays", "Repeated /settle of an already settled payload, by the "
            "duplicate policy that answered it (replay: stored success; reject: nonce used).",
            ["network", "policy"], registry=r)
        self.settlements_confirmed = Counter(
            f"{NS}_settlements_confirmed", "Settlements that reached their confirmation depth.",
            ["network", "settled_by"], registry=r)
        self.settlements_unfinished = Gauge(
            f"{NS}_settlements_unfinished", "Settlements not yet final, by state and age bucket.",
            ["network", "state", "age"], registry=r)
        self.watcher_head = Gauge(
            f"{NS}_watcher_processed_block", "Highest block the chain watcher has processed.",
            ["network"], registry=r)
        self.chain_head = Gauge(
            f"{NS}_chain_head_block", "Highest block the node reports.", ["network"], registry=r)
        self.watcher_lag = Gauge(
            f"{NS}_watcher_lag_blocks", "Chain head minus the watcher's processed block.",
            ["network"], registry=r)
        self.reorg_depth = Histogram(
            f"{NS}_reorg_depth_blocks", "Reorgs detected by the watcher, by depth.", ["network"],
            buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200), registry=r)
        self.watcher_halted = Gauge(
            f"{NS}_watcher_halted", "1 when a reorg deeper than the maximum stopped confirmations "
            "on this chain (critical: an operator must act).", ["network"], registry=r)
        self.unmatched_transfers = Counter(
            f"{NS}_unmatched_transfers", "Transfers to a watched payee that match no settlement.",
            ["network"], registry=r)
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
        self.attestations_received = Counter(
            f"{NS}_attestations_received", "Attestations posted to /settle_data, by mode.",
            ["mode"], registry=r)
        self.attestations_verified = Counter(
            f"{NS}_attestations_verified", "Attestations checked, by result (valid, "
            "invalid_signature, unknown_tee, tee_disabled, hash_mismatch).", ["result"],
            registry=r)
        self.attestation_verify_seconds = Histogram(
            f"{NS}_attestation_verification_seconds", "Time to verify one attestation.",
            buckets=FAST_BUCKETS, registry=r)
        self.og_batches_checked = Counter(
            f"{NS}_og_batches_checked", "OpenGradient batch settlements checked against their "
            "published dump, by result.", ["result"], registry=r)
        self.relay_submissions = Counter(
            f"{NS}_relay_submissions", "Data-settlement submissions to the OpenGradient chain.",
            ["kind", "result"], registry=r)
        self.findings = Counter(
            f"{NS}_findings", "Cross-check findings reported, by kind and whether the payment "
            "link was direct (linked) or a per-TEE reconciliation.", ["kind", "linked"],
            registry=r)
        self.crosscheck_runs = Counter(
            f"{NS}_crosscheck_runs", "Cross-check passes, by result.", ["result"], registry=r)
        self.db_pool_connections = Gauge(
            f"{NS}_db_pool_connections",
            "Database pool connections by state (in_use | idle | max).",
            ["state"], registry=r)

        self._initialise(networks, causes)

    def _initialise(self, networks: tuple[str, ...], causes: tuple[str, ...]) -> None:
        """Create every series of the closed label sets up front, so dashboards and alerts see
        zeros instead of "no data" before the first event."""
        for mode in ("private", "batch", "individual"):
            self.attestations_received.labels(mode)
        for result in ATTESTATION_RESULTS:
            self.attestations_verified.labels(result)
        for result in BATCH_RESULTS:
            self.og_batches_checked.labels(result)
        for kind in ("batch", "individual"):
            for result in ("submitted", "included", "failed"):
                self.relay_submissions.labels(kind, result)
        for kind in FINDING_KINDS:
            for linked in ("true", "false"):
                self.findings.labels(kind, linked)
        for result in ("ok", "error"):
            self.crosscheck_runs.labels(result)
        for net in networks:
            for scheme in SCHEME_NAMES:
                self.verify_seconds.labels(scheme, net)
                self.settle_seconds.labels(scheme, net)
            for method in RPC_METHODS:
                for kind in ("transport", "node_error"):
                    self.rpc_errors.labels(net, method, kind)
            for phase in PHASES:
                self.settlement_latency.labels(net, phase)
            for cause in (*causes, *FAILURE_EXTRA_CAUSES):
                self.settlement_failures.labels(net, cause)
            for by in ("facilitator", "external"):
                self.settlements_confirmed.labels(net, by)
            for state in ("pending", "signed", "broadcast", "included"):
                for age in AGE_BUCKETS:
                    self.settlements_unfinished.labels(net, state, age).set(0)
            self.reorg_depth.labels(net)
            for policy in ("replay", "reject"):
                self.settle_replays.labels(net, policy)
            self.watcher_halted.labels(net).set(0)
            self.unmatched_transfers.labels(net)
            self.signer_underfunded.labels(net)
            for cause in ("send_rejected", "nonce_taken"):
                self.signer_nonce_resets.labels(net, cause)

    def initialise_chain(self, key: str) -> None:
        """Watcher series for a chain that carries no payments (the OpenGradient chain)."""
        self.reorg_depth.labels(key)
        self.watcher_halted.labels(key).set(0)
        for method in RPC_METHODS:
            for kind in ("transport", "node_error"):
                self.rpc_errors.labels(key, method, kind)

    def track_db_pool(self, pool: Any) -> None:
        """Pool usage read at scrape time (an asyncpg pool)."""
        gauge = self.db_pool_connections
        gauge.labels("max").set_function(pool.get_max_size)
        gauge.labels("idle").set_function(pool.get_idle_size)
        gauge.labels("in_use").set_function(lambda: pool.get_size() - pool.get_idle_size())

    def render(self) -> bytes:
        return generate_latest(self.registry)

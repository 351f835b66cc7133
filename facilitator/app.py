"""Wiring: builds the running service from `Settings` — adapters, services, background tasks and
the HTTP server — and tears it down in the reverse order.

Start-up fails fast: migrations, database reachability, each RPC's chain id and the signer's
nonce are checked before the port opens. Every background task is owned here and cancelled on
stop; a task that dies unexpectedly is logged as critical.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from facilitator.adapters.attestations import AttestationStore
from facilitator.adapters.blobstore import BlobStoreClient
from facilitator.adapters.chainstate import ChainState, PaymentChainState
from facilitator.adapters.og_chain import OgChainState
from facilitator.adapters.og_relay import RelayStore
from facilitator.protocol.fields import BadRequest
from facilitator.services.attestations import AttestationService
from facilitator.services.datarelay import DataRelay
from facilitator.services.og_logs import OgLogs
from facilitator.adapters.jsonrpc import JsonRpcClient
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.store import Store
from facilitator.config import NetworkSettings, OgSettings, Settings
from facilitator.http.app import build_http_app
from facilitator.protocol.networks import Network, NetworkRegistry
from facilitator.protocol.reasons import Reason
from facilitator.adapters.jobs import JobStore
from facilitator.audit.findings_routes import add_findings_routes
from facilitator.audit.routes import add_audit_routes
from facilitator.core.crosscheck import CrossCheckPolicy
from facilitator.services.crosscheck import CrossChecker
from facilitator.audit.tokens import require_role
from facilitator.adapters.sessions import SessionStore
from facilitator.protocol.fields import to_checksum
from facilitator.schemes.common import Scheme
from facilitator.schemes.exact import ExactEip3009Scheme
from facilitator.schemes.upto import UptoPermit2Scheme
from facilitator.services.jobs import SettleJobWorker
from facilitator.services.broadcaster import Broadcaster, GasPolicy
from facilitator.services.facilitator import FacilitatorService, NetworkServices
from facilitator.services.outcomes import OutcomeBoard
from facilitator.services.recorder import VerificationRecorder
from facilitator.services.settler import SettlePolicy, Settler
from facilitator.services.tracker import Tracker
from facilitator.services.payment_logs import PaymentLogs
from facilitator.services.watcher import ChainWatcher, WatcherPolicy

log = logging.getLogger("facilitator.app")


class StartupError(RuntimeError):
    pass


@dataclass
class _NetworkRuntime:
    settings: NetworkSettings
    chain: JsonRpcClient
    broadcaster: Broadcaster
    tracker: Tracker
    settler: Settler
    schemes: dict[str, Scheme]
    watcher: ChainWatcher


@dataclass
class Facilitator:
    settings: Settings
    metrics: Metrics
    store: Store
    service: FacilitatorService
    recorder: VerificationRecorder
    networks: dict[str, _NetworkRuntime]
    jobs: JobStore
    job_worker: SettleJobWorker
    sessions: SessionStore
    og: _OgRuntime | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @classmethod
    async def create(cls, settings: Settings) -> Facilitator:
        metrics = Metrics(networks=tuple(ns.network.key for ns in settings.networks),
                          causes=tuple(str(r) for r in Reason))
        store = await Store.connect(settings.database_url.reveal(), max_size=settings.db_pool_size)
        metrics.track_db_pool(store.pool)
        try:
            await store.migrate()
        except Exception:
            await store.close()
            raise
        recorder = VerificationRecorder(store, metrics)
        sessions = SessionStore(store.pool)
        runtimes = {ns.network.key: _build_network(ns, settings, store, sessions, metrics)
                    for ns in settings.networks}
        service = FacilitatorService(
            registry=NetworkRegistry(tuple(ns.network for ns in settings.networks)),
            services={k: NetworkServices(r.settings.network, r.schemes, r.settler, sessions)
                      for k, r in runtimes.items()},
            recorder=recorder, metrics=metrics, signer_address=settings.signer_key.address)
        jobs = JobStore(store.pool)
        og = _build_og(settings, store, metrics) if settings.og is not None else None
        return cls(settings=settings, metrics=metrics, store=store, service=service,
                   recorder=recorder, networks=runtimes, jobs=jobs,
                   job_worker=SettleJobWorker(jobs=jobs, service=service), sessions=sessions,
                   og=og)

    async def start(self) -> None:
        for runtime in self.networks.values():
            await runtime.chain.start()
            await _check_chain_id(runtime)
            await runtime.broadcaster.start()
            await runtime.settler.recover()
            self._spawn(runtime.broadcaster.run(), f"broadcaster:{runtime.settings.network.key}")
            self._spawn(runtime.tracker.run(), f"tracker:{runtime.settings.network.key}")
            if self.settings.watcher_enabled:
                self._spawn(runtime.watcher.run(), f"watcher:{runtime.settings.network.key}")
        self._spawn(self.recorder.run(), "recorder")
        self._spawn(self.job_worker.run(), "settle-jobs")
        if self.og is not None:
            await self._start_og(self.og)
        app = build_http_app(self.service, self.metrics, self.readiness, self.settlement_status,
                             _AsyncSettlement(self))
        add_audit_routes(app, self.store.pool, self.settings.api_tokens)
        add_findings_routes(app, self.store.pool,
                            og_chain_id=self.settings.og.chain_id if self.settings.og else None)
        app.router.add_post("/settle_data", self.settle_data)
        app.router.add_post("/v1/ops/chains/{network}/resume",
                            require_role("operator")(self.resume_chain))
        # Header limit 32 KiB: an individual /settle_data carries the whole request and
        # response in `x-settlement-data` (aiohttp's default refuses lines over 8 KiB).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     max_field_size=32 * 1024, max_line_size=32 * 1024)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port,
                           reuse_address=True, backlog=1024)
        await site.start()
        self.port = _bound_port(self._runner) or self.settings.port
        log.info("Facilitator listening on %s (signer %s)", self.url,
                 self.settings.signer_key.address)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(_report_death)
        self._tasks.append(task)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.recorder.close()
        for runtime in self.networks.values():
            await runtime.chain.close()
        if self.og is not None:
            await self.og.chain.close()
            if self.og.blobs is not None:
                await self.og.blobs.close()
        await self.store.close()

    async def _start_og(self, og: _OgRuntime) -> None:
        await og.chain.start()
        actual = int(await og.chain.request("eth_chainId", []), 16)
        if og.settings.chain_id != actual:
            raise StartupError(f"FACILITATOR_OG_RPC_URLS serves chain {actual}, expected "
                               f"{og.settings.chain_id}")
        if og.blobs is not None:
            await og.blobs.start()
        self._spawn(og.watcher.run(), "watcher:opengradient")
        self._spawn(og.attestations.run(), "attestations")
        if og.relay is not None:
            self._spawn(og.relay.run(), "data-relay")
        self._spawn(og.crosscheck.run(), "crosscheck")

    async def settle_data(self, request: web.Request) -> web.Response:
        """`POST /settle_data` (OpenGradient's facilitator API): one attestation per call."""
        if self.og is None:
            return web.json_response({"error": "not_configured", "message": "attestation "
                                      "cross-check is not configured (FACILITATOR_OG_RPC_URLS)"},
                                     status=503)
        try:
            body = await self.og.attestations.ingest(request.headers.get("x-settlement-type"),
                                                     request.headers.get("x-settlement-data"))
        except BadRequest as exc:
            return web.json_response({"error": "invalid_request", "field": exc.field,
                                      "message": exc.message}, status=400)
        return web.json_response(body, status=202)

    async def resume_chain(self, request: web.Request) -> web.Response:
        """Operator action after a deep reorg halted a chain's watcher: accept the chain as it is
        now (the watcher then reverts to the common ancestor and confirms again)."""
        key = request.match_info["network"]
        runtime = self.networks.get(key)
        watcher = runtime.watcher if runtime is not None else \
            self.og.watcher if self.og is not None and key == OG_KEY else None
        if watcher is None:
            return web.json_response({"error": "not_found", "message": "no such network"},
                                     status=404)
        resumed = await watcher.resume()
        log.warning("operator resumed the watcher of %s (was halted: %s)", key, resumed)
        return web.json_response({"network": key, "resumed": resumed})

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = f"unavailable: {type(exc).__name__}"
        chains = [(key, r.chain, r.settings.network.chain_id) for key, r in self.networks.items()]
        for key, chain, chain_id in chains:
            checks[f"rpc:{key}"] = await _chain_check(chain, chain_id)
        ready = all(v == "ok" for v in checks.values())
        if self.og is not None:
            # Reported, but not part of readiness: payments do not depend on the OpenGradient
            # chain, and a load balancer must not stop sending them because it is down.
            checks[f"rpc:{OG_KEY}"] = await _chain_check(self.og.chain, self.og.settings.chain_id)
        return {"ready": ready, "checks": checks}

    async def settlement_status(self, key: str) -> dict[str, Any] | None:
        row = await self.store.find(key)
        if row is None:
            return None
        timeline = await self.store.timeline(row.id)
        runtime = next((r for r in self.networks.values()
                        if r.settings.network.chain_id == row.chain_id), None)
        head = None
        if runtime is not None and row.block_number is not None:
            try:
                head = int(await runtime.chain.request("eth_blockNumber", []), 16)
            except Exception:  # noqa: BLE001 - confirmations are best effort here
                head = None
        return _status_body(row, timeline, head)


def _build_network(ns: NetworkSettings, settings: Settings, store: Store,
                   sessions: SessionStore, metrics: Metrics) -> _NetworkRuntime:
    network = ns.network
    chain = JsonRpcClient([u.reveal() for u in ns.rpc_urls], chain=network.key, metrics=metrics,
                          timeout_s=settings.rpc_timeout_s)
    board = OutcomeBoard()
    signer = settings.signer_key.address.lower()
    schemes: dict[str, Scheme] = {
        "exact": ExactEip3009Scheme(network=network, chain=chain, facilitator_address=signer)}
    if "upto" in settings.schemes:
        schemes["upto"] = UptoPermit2Scheme(network=network, chain=chain,
                                            facilitator_address=signer)
    broadcaster = Broadcaster(
        network=network, chain=chain, store=store, key=settings.signer_key, board=board,
        metrics=metrics, policy=GasPolicy(
            gas_limit_cap=settings.gas_limit_cap,
            max_fee_per_gas_cap_wei=settings.max_fee_per_gas_cap_wei,
            priority_fee_wei=settings.priority_fee_wei))
    tracker = Tracker(network=network, chain=chain, store=store, board=board, metrics=metrics,
                      poll_interval_s=settings.receipt_poll_interval_s,
                      resend_after_s=settings.resend_after_s)
    tracker.signer = settings.signer_key.address
    settler = Settler(network=network, chain=chain, store=store, sessions=sessions, board=board,
                      broadcaster=broadcaster, tracker=tracker, metrics=metrics,
                      policy=SettlePolicy(receipt_timeout_s=settings.receipt_timeout_s,
                                          gas_limit_cap=settings.gas_limit_cap,
                                          duplicates=settings.duplicate_settle))
    watcher, payment_logs = _payment_watcher(network, chain, store, metrics, settings)
    payment_logs.on_reorged = settler.track_again
    payment_logs.after_step = lambda: broadcaster.refresh_balance(min_interval_s=10.0)
    return _NetworkRuntime(ns, chain, broadcaster, tracker, settler, schemes, watcher)


async def run_watchers(settings: Settings, stop: asyncio.Event) -> None:
    """`facilitator watch`: only the chain watchers (confirmations, reorgs, unmatched
    transfers), for running them apart from the API; the same checkpoints, so never both."""
    metrics = Metrics(networks=tuple(ns.network.key for ns in settings.networks))
    store = await Store.connect(settings.database_url.reveal(), max_size=4)
    chains: list[JsonRpcClient] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await store.migrate()
        for ns in settings.networks:
            chain = JsonRpcClient([u.reveal() for u in ns.rpc_urls], chain=ns.network.key,
                                  metrics=metrics, timeout_s=settings.rpc_timeout_s)
            await chain.start()
            chains.append(chain)
            watcher, _ = _payment_watcher(ns.network, chain, store, metrics, settings)
            tasks.append(asyncio.get_running_loop().create_task(watcher.run()))
        log.info("watching %s", ", ".join(ns.network.key for ns in settings.networks))
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for chain in chains:
            await chain.close()
        await store.close()


def _payment_watcher(network: Network, chain: JsonRpcClient, store: Store, metrics: Metrics,
                     settings: Settings) -> tuple[ChainWatcher, PaymentLogs]:
    state = PaymentChainState(store.pool, network.chain_id, network.key)
    policy = _watcher_policy(network, settings)
    logs = PaymentLogs(network=network, state=state, metrics=metrics, policy=policy)
    watcher = ChainWatcher(key=network.key, chain=chain, state=state, metrics=metrics,
                           policy=policy, processor=logs)
    return watcher, logs


def _watcher_policy(network: Network, settings: Settings) -> WatcherPolicy:
    return WatcherPolicy(
        confirmations=network.confirmations, max_reorg_depth=settings.max_reorg_depth,
        range_blocks=settings.watcher_range_blocks,
        poll_interval_s=settings.watcher_poll_interval_s,
        start_lookback_blocks=settings.watcher_start_lookback_blocks,
        watched_payees=settings.watched_payees)


OG_KEY = "opengradient"


@dataclass
class _OgRuntime:
    settings: OgSettings
    chain: JsonRpcClient
    watcher: ChainWatcher
    attestations: AttestationService
    blobs: BlobStoreClient | None
    relay: DataRelay | None
    crosscheck: CrossChecker


def _build_og(settings: Settings, store: Store, metrics: Metrics) -> _OgRuntime:
    og = settings.og
    if og is None:
        raise StartupError("OpenGradient settings are missing")
    metrics.initialise_chain(OG_KEY)
    chain = JsonRpcClient([u.reveal() for u in og.rpc_urls], chain=OG_KEY, metrics=metrics,
                          timeout_s=settings.rpc_timeout_s)
    blobs = BlobStoreClient(og.blobstore_url) if og.blobstore_url else None
    logs = OgLogs(chain=chain, state=OgChainState(store.pool, og.chain_id), metrics=metrics,
                  registry=og.tee_registry, relay=og.settlement_relay,
                  relayer=og.settlement_relayer, blobs=blobs)
    policy = WatcherPolicy(confirmations=og.confirmations, max_reorg_depth=settings.max_reorg_depth,
                           range_blocks=settings.watcher_range_blocks,
                           poll_interval_s=settings.watcher_poll_interval_s,
                           start_lookback_blocks=settings.watcher_start_lookback_blocks)
    watcher = ChainWatcher(key=OG_KEY, chain=chain, state=ChainState(store.pool, og.chain_id,
                                                                        OG_KEY),
                           metrics=metrics, policy=policy, processor=logs)
    payments_chain = settings.networks[0].network.chain_id
    attestations = AttestationService(AttestationStore(store.pool, payments_chain, og.chain_id),
                                      metrics)
    relay = None
    if og.data_relay and og.signer_key is not None and blobs is not None:
        relay = DataRelay(store=RelayStore(store.pool), chain=chain, key=og.signer_key,
                          blobs=blobs, relay_contract=og.settlement_relay, chain_id=og.chain_id,
                          metrics=metrics, batch_size=og.relay_batch_size,
                          batch_age_s=og.relay_batch_age_s)
    crosscheck = CrossChecker(store.pool, metrics,
                              CrossCheckPolicy(settle_window_s=og.settle_window_s),
                              og_chain_id=og.chain_id)
    return _OgRuntime(og, chain, watcher, attestations, blobs, relay, crosscheck)


class _AsyncSettlement:
    """Which /settle calls run as jobs, and the job and usage views (see http/app.py)."""

    def __init__(self, facilitator: Facilitator) -> None:
        self._facilitator = facilitator
        self._targets = facilitator.settings.async_settle_for

    def wanted(self, request: web.Request, body: Any) -> bool:
        mode = request.headers.get("X-Settle-Mode", "").strip().lower()
        if mode in ("async", "sync"):
            return mode == "async"
        return bool(self._targets) and _targets_match(body, self._targets)

    async def enqueue(self, body: Any) -> dict[str, Any]:
        job = await self._facilitator.jobs.enqueue(body)
        self._facilitator.job_worker.wake()
        return {"jobId": job.job_id, "queue": job.queue, "status": job.status}

    async def job(self, job_id: str) -> dict[str, Any] | None:
        job = await self._facilitator.jobs.get(job_id)
        if job is None:
            return None
        return {"jobId": job.job_id, "queue": job.queue, "status": job.status,
                "result": job.result, "error": job.error, "attempts": job.attempts,
                "createdAt": job.created_at.isoformat(),
                "finishedAt": job.finished_at.isoformat() if job.finished_at else None}

    async def usage(self, days: int) -> dict[str, Any]:
        rows = await self._facilitator.sessions.usage_by_day(days)
        return {"days": days, "usage": [_usage_row(r) for r in rows]}


def _targets_match(body: Any, targets: tuple[str, ...]) -> bool:
    if not isinstance(body, dict):
        return False
    requirements = body.get("paymentRequirements")
    pay_to = requirements.get("payTo") if isinstance(requirements, dict) else None
    payment = body.get("paymentPayload")
    resource = payment.get("resource") if isinstance(payment, dict) else None
    url = resource.get("url") if isinstance(resource, dict) else None
    return any((isinstance(pay_to, str) and pay_to.lower() == t) or
               (isinstance(url, str) and t.startswith("http") and url.startswith(t))
               for t in targets)


def _usage_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"day": row["day"].isoformat(), "service": row["service"],
            "payTo": to_checksum("0x" + bytes(row["pay_to"]).hex()),
            "settlements": row["settlements"], "requests": int(row["requests"]),
            "costOpg": str(int(row["cost_opg"])), "costUsd": format(row["cost_usd"], "f"),
            "inputTokens": int(row["input_tokens"]), "outputTokens": int(row["output_tokens"]),
            "totalTokens": int(row["total_tokens"])}


async def _check_chain_id(runtime: _NetworkRuntime) -> None:
    expected = runtime.settings.network.chain_id
    actual = int(await runtime.chain.request("eth_chainId", []), 16)
    if actual != expected:
        raise StartupError(f"RPC for {runtime.settings.network.key} serves chain {actual}, "
                           f"expected {expected}")


async def _chain_check(chain: JsonRpcClient, expected: int) -> str:
    """"ok", or why not (never the URL: it may hold an API key)."""
    try:
        actual = int(await asyncio.wait_for(chain.request("eth_chainId", []), 3.0), 16)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"unavailable: {type(exc).__name__}"
    return "ok" if actual == expected else f"wrong chain: {actual}, expected {expected}"


def _bound_port(runner: web.AppRunner) -> int | None:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    return None


def _report_death(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("background task %s died: %r", task.get_name(), exc)


def _status_body(row: Any, timeline: list[dict[str, Any]], head: int | None) -> dict[str, Any]:
    confirmations = None
    if head is not None and row.block_number is not None and row.state in ("included", "confirmed"):
        confirmations = max(head - row.block_number + 1, 0)
    return {
        "id": row.public_id, "state": str(row.state), "scheme": row.scheme,
        "network": row.network, "chainId": row.chain_id, "asset": row.asset, "payer": row.payer,
        "payTo": row.pay_to, "amount": str(row.amount), "transaction": row.tx_hash_hex or None,
        "blockNumber": row.block_number, "confirmations": confirmations,
        "settledBy": row.settled_by, "reason": row.reason, "message": row.message,
        "timeline": [{"at": e["at"].isoformat(), "from": e["from_state"], "to": e["to_state"],
                      "reason": e["reason"],
                      "transaction": "0x" + e["tx_hash"].hex() if e["tx_hash"] else None}
                     for e in timeline],
    }

"""Wiring: builds the running service from `Settings` — adapters, services, background tasks and
the HTTP server — and tears it down in the reverse order. Two shapes: `Facilitator`
(`facilitator serve`) and `WatchService` (`facilitator watch`: only the chain watchers, for
running them apart from the API with `FACILITATOR_WATCHER=off` on the serving processes).

Start-up fails fast: migrations, database reachability, each RPC's chain id (serve and watch
alike) and the signer's nonce are checked before the port opens. Every background task is owned
here and cancelled on stop; a task that dies unexpectedly is logged as critical.
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
from facilitator.services.attestations import AttestationService
from facilitator.services.datarelay import DataRelay
from facilitator.services.og_logs import OgLogs
from facilitator.adapters.jsonrpc import JsonRpcClient
from facilitator.adapters.metrics import Metrics
from facilitator.adapters.store import Store
from facilitator.config import NetworkSettings, OgSettings, Secret, Settings, StartupError
from facilitator.database import connect_store
from facilitator.http.app import build_http_app, build_metrics_app, status_body
from facilitator.http.og import AsyncSettlement, add_og_routes
from facilitator.protocol.networks import Network, NetworkRegistry
from facilitator.protocol.reasons import Reason
from facilitator.adapters.jobs import JobStore
from facilitator.audit.findings_routes import add_findings_routes
from facilitator.audit.queries import watcher_head
from facilitator.audit.routes import add_audit_routes
from facilitator.core.crosscheck import CrossCheckPolicy
from facilitator.services.crosscheck import CrossChecker
from facilitator.adapters.sessions import SessionStore
from facilitator.schemes.common import AssetCodeCache, Scheme, SchemeKey
from facilitator.schemes.exact import ExactEip3009Scheme
from facilitator.schemes.exact_permit2 import ExactPermit2Scheme
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
from facilitator.invariant import invariant

log = logging.getLogger("facilitator.app")


@dataclass
class _NetworkRuntime:
    settings: NetworkSettings
    chain: JsonRpcClient
    broadcaster: Broadcaster
    tracker: Tracker
    settler: Settler
    schemes: dict[SchemeKey, Scheme]
    watcher: ChainWatcher


async def _metrics_and_migrated_store(settings: Settings, **pool: int
                                      ) -> tuple[Metrics, Store]:
    """What every service process opens first: its metrics and the migrated database."""
    metrics = Metrics(networks=tuple(ns.network.key for ns in settings.networks),
                      causes=tuple(str(r) for r in Reason))
    store = await connect_store(settings.database_url, **pool)
    metrics.track_db_pool(store.pool)
    try:
        await store.migrate()
    except Exception:
        await store.close()
        raise
    return metrics, store

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
        metrics, store = await _metrics_and_migrated_store(settings,
                                                           max_size=settings.db_pool_size)
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
        og = _build_og(settings.og, settings, store, metrics) if settings.og is not None \
            else None
        return cls(settings=settings, metrics=metrics, store=store, service=service,
                   recorder=recorder, networks=runtimes, jobs=jobs,
                   job_worker=SettleJobWorker(jobs=jobs, service=service), sessions=sessions,
                   og=og)

    async def start(self) -> None:
        for runtime in self.networks.values():
            await runtime.chain.start()
            network = runtime.settings.network
            await _expect_chain(runtime.chain, network.chain_id, f"the RPC of {network.key}")
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
        jobs = AsyncSettlement(self.jobs, self.job_worker, self.sessions,
                               self.settings.async_settle_for)
        app = build_http_app(self.service, self.metrics, self.readiness, self.settlement_status,
                             jobs)
        add_audit_routes(app, self.store.pool, self.settings.api_tokens)
        add_findings_routes(app, self.store.pool,
                            og_chain_id=self.settings.og.chain_id if self.settings.og else None)
        watchers = {key: r.watcher for key, r in self.networks.items()}
        if self.og is not None:
            watchers[OG_KEY] = self.og.watcher
        add_og_routes(app, self.og.attestations if self.og is not None else None, watchers)
        self._runner, self.port = await _serve_http(app, self.settings)
        log.info("Facilitator listening on %s (signer %s)", self.url,
                 self.settings.signer_key.address)

    def _spawn(self, coro: Any, name: str) -> None:
        _spawn_into(self._tasks, coro, name)

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
        await _expect_chain(og.chain, og.settings.chain_id, "FACILITATOR_OG_RPC_URLS")
        if og.blobs is not None:
            await og.blobs.start()
        if self.settings.watcher_enabled:  # else `facilitator watch` runs it
            self._spawn(og.watcher.run(), "watcher:opengradient")
        self._spawn(og.attestations.run(), "attestations")
        if og.relay is not None:
            self._spawn(og.relay.run(), "data-relay")
        self._spawn(og.crosscheck.run(), "crosscheck")

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
        """`GET /settle/{id}`; confirmations count from the chain watcher's stored head (as in
        the audit API), so a status poll never waits on the RPC."""
        row = await self.store.find(key)
        if row is None:
            return None
        timeline = await self.store.timeline(row.id)
        head = None
        if row.block_number is not None:
            head = await watcher_head(self.store.pool, row.chain_id)
        return status_body(row, timeline, head)


def _build_network(ns: NetworkSettings, settings: Settings, store: Store,
                   sessions: SessionStore, metrics: Metrics) -> _NetworkRuntime:
    network = ns.network
    chain = _rpc_client(ns.rpc_urls, network.key, settings, metrics)
    board = OutcomeBoard()
    signer = settings.signer_key.address.lower()
    asset_code = AssetCodeCache()  # one per network: its schemes check the same assets
    kinds = [ExactEip3009Scheme, ExactPermit2Scheme]
    if "upto" in settings.schemes:
        kinds.append(UptoPermit2Scheme)
    schemes: dict[SchemeKey, Scheme] = {}
    for kind in kinds:
        scheme = kind(network=network, chain=chain, facilitator_address=signer,
                      asset_code=asset_code)
        schemes[(scheme.scheme, scheme.traits.transfer_method)] = scheme
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
                      broadcaster=broadcaster, tracker=tracker, schemes=schemes,
                      metrics=metrics,
                      policy=SettlePolicy(receipt_timeout_s=settings.receipt_timeout_s,
                                          gas_limit_cap=settings.gas_limit_cap,
                                          duplicates=settings.duplicate_settle))
    watcher, payment_logs = _payment_watcher(network, chain, store, metrics, settings)
    # Rows a reorg moved back are adopted by the tracker: at once from this process's watcher,
    # by its periodic sweep when the watcher runs elsewhere (`facilitator watch`).
    payment_logs.on_reorged = tracker.adopt
    tracker.on_sweep = lambda: broadcaster.refresh_balance(min_interval_s=10.0)
    return _NetworkRuntime(ns, chain, broadcaster, tracker, settler, schemes, watcher)


@dataclass
class WatchService:
    """`facilitator watch`: only the chain watchers — each payment chain's (confirmations,
    reorgs, unmatched transfers) and, when FACILITATOR_OG_RPC_URLS is set, the OpenGradient
    chain's — with `/metrics` and `/health` on FACILITATOR_HOST:FACILITATOR_PORT, so the
    watcher metrics and the unfinished-settlements gauge are scraped from this process. The
    checkpoints are the serving processes' (one database): run those with
    FACILITATOR_WATCHER=off, never both."""

    settings: Settings
    metrics: Metrics
    store: Store
    chains: list[tuple[JsonRpcClient, int, str]]  # (client, expected chain id, what it is)
    watchers: list[ChainWatcher]
    blobs: BlobStoreClient | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @classmethod
    async def create(cls, settings: Settings) -> WatchService:
        metrics, store = await _metrics_and_migrated_store(settings, min_size=1, max_size=4)
        service = cls(settings=settings, metrics=metrics, store=store, chains=[], watchers=[])
        for ns in settings.networks:
            chain = _rpc_client(ns.rpc_urls, ns.network.key, settings, metrics)
            service.chains.append((chain, ns.network.chain_id, f"the RPC of {ns.network.key}"))
            service.watchers.append(
                _payment_watcher(ns.network, chain, store, metrics, settings)[0])
        if settings.og is not None:
            og = settings.og
            metrics.initialise_chain(OG_KEY)
            chain = _rpc_client(og.rpc_urls, OG_KEY, settings, metrics)
            service.blobs = BlobStoreClient(og.blobstore_url) if og.blobstore_url else None
            service.chains.append((chain, og.chain_id, "FACILITATOR_OG_RPC_URLS"))
            service.watchers.append(_og_watcher(og, settings, store, metrics, chain,
                                                service.blobs)[0])
        return service

    async def start(self) -> None:
        for chain, chain_id, what in self.chains:
            await chain.start()
            await _expect_chain(chain, chain_id, what)
        if self.blobs is not None:
            await self.blobs.start()
        for watcher in self.watchers:
            _spawn_into(self._tasks, watcher.run(), f"watcher:{watcher.key}")
        self._runner, self.port = await _serve_http(build_metrics_app(self.metrics),
                                                    self.settings)
        log.info("watching %s; metrics on %s/metrics",
                 ", ".join(w.key for w in self.watchers), self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for chain, _, _ in self.chains:
            await chain.close()
        if self.blobs is not None:
            await self.blobs.close()
        await self.store.close()


def _rpc_client(urls: tuple[Secret, ...], key: str, settings: Settings,
                metrics: Metrics) -> JsonRpcClient:
    return JsonRpcClient([u.reveal() for u in urls], chain=key, metrics=metrics,
                         timeout_s=settings.rpc_timeout_s)


def _payment_watcher(network: Network, chain: JsonRpcClient, store: Store, metrics: Metrics,
                     settings: Settings) -> tuple[ChainWatcher, PaymentLogs]:
    state = PaymentChainState(store.pool, network.chain_id, network.key)
    policy = _watcher_policy(network.confirmations, settings, settings.watched_payees)
    logs = PaymentLogs(network=network, state=state, metrics=metrics, policy=policy)
    watcher = ChainWatcher(key=network.key, chain=chain, state=state, metrics=metrics,
                           policy=policy, processor=logs)
    return watcher, logs


def _watcher_policy(confirmations: int, settings: Settings,
                    payees: frozenset[str] = frozenset()) -> WatcherPolicy:
    return WatcherPolicy(
        confirmations=confirmations, max_reorg_depth=settings.max_reorg_depth,
        range_blocks=settings.watcher_range_blocks,
        poll_interval_s=settings.watcher_poll_interval_s,
        start_lookback_blocks=settings.watcher_start_lookback_blocks,
        watched_payees=payees)


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


def _build_og(og: OgSettings, settings: Settings, store: Store, metrics: Metrics) -> _OgRuntime:
    metrics.initialise_chain(OG_KEY)
    chain = _rpc_client(og.rpc_urls, OG_KEY, settings, metrics)
    blobs = BlobStoreClient(og.blobstore_url) if og.blobstore_url else None
    watcher, _ = _og_watcher(og, settings, store, metrics, chain, blobs)
    payments_chain = settings.networks[0].network.chain_id
    attestations = AttestationService(AttestationStore(store.pool, payments_chain, og.chain_id),
                                      metrics)
    relay = None
    if og.data_relay:  # config guarantees the relay's signer key and blob store
        invariant(og.signer_key is not None and blobs is not None,
                  "the data relay needs FACILITATOR_OG_SIGNER_KEY and FACILITATOR_BLOBSTORE_URL")
        relay = DataRelay(store=RelayStore(store.pool), chain=chain, key=og.signer_key,
                          blobs=blobs, relay_contract=og.settlement_relay, chain_id=og.chain_id,
                          metrics=metrics, batch_size=og.relay_batch_size,
                          batch_age_s=og.relay_batch_age_s)
    crosscheck = CrossChecker(store.pool, metrics,
                              CrossCheckPolicy(settle_window_s=og.settle_window_s),
                              og_chain_id=og.chain_id)
    return _OgRuntime(og, chain, watcher, attestations, blobs, relay, crosscheck)


def _og_watcher(og: OgSettings, settings: Settings, store: Store, metrics: Metrics,
                chain: JsonRpcClient, blobs: BlobStoreClient | None
                ) -> tuple[ChainWatcher, OgLogs]:
    logs = OgLogs(chain=chain, state=OgChainState(store.pool, og.chain_id), metrics=metrics,
                  registry=og.tee_registry, relay=og.settlement_relay,
                  relayer=og.settlement_relayer, blobs=blobs)
    watcher = ChainWatcher(key=OG_KEY, chain=chain,
                           state=ChainState(store.pool, og.chain_id, OG_KEY), metrics=metrics,
                           policy=_watcher_policy(og.confirmations, settings), processor=logs)
    return watcher, logs


async def _chain_id(chain: JsonRpcClient) -> int:
    return int(await chain.request("eth_chainId", []), 16)


async def _expect_chain(chain: JsonRpcClient, expected: int, what: str) -> None:
    """Start-up check (serve, watch, the OpenGradient chain): the RPC serves `expected`."""
    actual = await _chain_id(chain)
    if actual != expected:
        raise StartupError(f"{what} serves chain {actual}, expected {expected}")


async def _chain_check(chain: JsonRpcClient, expected: int) -> str:
    """Readiness: "ok", or why not (never the URL: it may hold an API key)."""
    try:
        actual = await asyncio.wait_for(_chain_id(chain), 3.0)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"unavailable: {type(exc).__name__}"
    return "ok" if actual == expected else f"wrong chain: {actual}, expected {expected}"


async def _serve_http(app: web.Application, settings: Settings) -> tuple[web.AppRunner, int]:
    """Listen on FACILITATOR_HOST:FACILITATOR_PORT; the runner and the bound port."""
    # Header limit 32 KiB: an individual /settle_data carries the whole request and
    # response in `x-settlement-data` (aiohttp's default refuses lines over 8 KiB).
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           max_field_size=32 * 1024, max_line_size=32 * 1024)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _bound_port(runner) or settings.port


def _spawn_into(tasks: list[asyncio.Task[None]], coro: Any, name: str) -> None:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report_death)
    tasks.append(task)


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

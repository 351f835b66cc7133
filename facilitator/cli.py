"""`facilitator` command line: serve, watch, migrate, audit, crosscheck, devnet, demo.

Exit codes: 0 on a clean stop, 2 when the configuration is invalid (the message names the
setting), 1 on any other start-up failure (a one-line message when the world does not match the
settings, e.g. an RPC serving another chain).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from facilitator.adapters.logging import configure_logging
from facilitator.audit.cli import add_audit_parser, run_audit
from facilitator.audit.crosscheck_cli import add_crosscheck_parser, run_crosscheck
from facilitator.config import (
    ConfigError,
    Secret,
    Settings,
    StartupError,
    database_url_from_env,
    load_settings,
)

log = logging.getLogger("facilitator.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facilitator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the facilitator against the configured chains and database")
    sub.add_parser("migrate", help="apply database migrations (DATABASE_URL) and exit")
    sub.add_parser("watch", help="run only the chain watchers (confirmations, reorgs), with "
                   "/metrics and /health on FACILITATOR_PORT")
    add_audit_parser(sub)
    add_crosscheck_parser(sub)
    devnet = sub.add_parser("devnet", help="run a local devnet with the facilitator on it")
    devnet.add_argument("--port", type=int, default=4022, help="facilitator port (4022)")
    devnet.add_argument("--rpc-port", type=int, default=8545, help="anvil port (8545)")
    devnet.add_argument("--block-time", type=float, default=None,
                        help="seconds per block (default: a block per transaction)")
    devnet.add_argument("--og-rpc-port", type=int, default=8546,
                        help="OpenGradient chain anvil port (8546)")
    devnet.add_argument("--blobstore-port", type=int, default=4023, help="blob store port (4023)")
    devnet.add_argument("--gateway-port", type=int, default=4024,
                        help="TEE gateway emulator port (4024)")
    demo = sub.add_parser("demo", help="pay the devnet's TEE gateway for chat requests (x402 upto)")
    demo.add_argument("--requests", type=int, default=20, help="chat requests to send (20)")
    demo.add_argument("--gateway", default=None, help="gateway URL (default: the manifest's)")
    demo.add_argument("--payer-index", type=int, default=0, help="manifest payer to use (0)")
    demo.add_argument("--settlement-type", choices=("batch", "individual", "private"),
                      default=None, help="X-SETTLEMENT-TYPE sent (default: none, i.e. batch)")
    demo.add_argument("--manifest", default=None, help="devnet manifest (.devnet/manifest.json)")
    args = parser.parse_args(argv)
    _use_fast_event_loop()
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"facilitator: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"facilitator: start-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _use_fast_event_loop() -> None:
    """uvloop (libuv) roughly halves the per-request cost of the asyncio machinery;
    FACILITATOR_EVENT_LOOP=asyncio keeps the standard loop (for debugging)."""
    if os.environ.get("FACILITATOR_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class _Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _serve(args: argparse.Namespace) -> int:
    from facilitator.app import Facilitator

    settings = _settings_with_logging()
    await _run_until_signalled(await Facilitator.create(settings))
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from facilitator.app import WatchService

    settings = _settings_with_logging()
    await _run_until_signalled(await WatchService.create(settings))
    return 0


def _settings_with_logging() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.secrets)
    for name in settings.unused_env:  # names only: a value may be a secret
        log.warning("environment variable %s is set but not used by this configuration", name)
    return settings


async def _run_until_signalled(service: _Service) -> None:
    """Start `service`, run it until SIGINT or SIGTERM, stop it (also when start failed)."""
    try:
        await service.start()
        await _until_signalled()
    finally:
        await service.stop()


async def _migrate(args: argparse.Namespace) -> int:
    from facilitator.database import connect_store

    configure_logging("INFO", "text")
    store = await connect_store(Secret(database_url_from_env()), min_size=1, max_size=2)
    try:
        applied = await store.migrate()
    finally:
        await store.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def _devnet(args: argparse.Namespace) -> int:
    from facilitator.devnet.run import Devnet

    configure_logging(os.environ.get("FACILITATOR_LOG_LEVEL", "INFO"), "text")
    devnet = Devnet(port=args.port, rpc_port=args.rpc_port, block_time_s=args.block_time,
                    og_rpc_port=args.og_rpc_port, blobstore_port=args.blobstore_port,
                    gateway_port=args.gateway_port)
    try:
        manifest = await devnet.start()
        print(json.dumps(manifest, indent=2), flush=True)
        print(f"devnet ready: facilitator {manifest['facilitator']['url']}, chain "
              f"{manifest['rpcUrl']}; manifest in .devnet/manifest.json; Ctrl-C stops it",
              flush=True)
        await _until_signalled()
    finally:
        await devnet.stop()
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from facilitator.devnet.demo import DemoError, load_manifest, run_demo

    configure_logging(os.environ.get("FACILITATOR_LOG_LEVEL", "WARNING"), "text")
    try:
        manifest = load_manifest(args.manifest)
        summary = await run_demo(manifest=manifest, gateway_url=args.gateway,
                                 payer_index=args.payer_index, requests=args.requests,
                                 settlement_type=args.settlement_type)
    except DemoError as exc:
        print(f"facilitator demo: {exc}", file=sys.stderr)
        return 1
    return 0 if summary.served == summary.requests == summary.verified else 1


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "serve": _serve, "migrate": _migrate, "devnet": _devnet, "watch": _watch,
    "audit": run_audit, "crosscheck": run_crosscheck, "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())

"""Configuration: one frozen, typed `Settings` object, read once at start.

Sources, highest precedence first: environment variables, then an optional TOML file named by
`FACILITATOR_CONFIG` (non-secret settings only: it is refused if it holds a secret), then
defaults. The variable reference is in README.md ("Configuration").

Guarantees: a missing or invalid setting raises `ConfigError` whose message names the variable
(or TOML key) and what was expected, and never contains a secret's value. Secrets (signer key,
database URL, RPC URLs, which may embed API keys) are wrapped so `repr` shows only a mask.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from facilitator.adapters.signer import SignerKey, SignerKeyError
from facilitator.audit.tokens import ApiToken, parse_api_tokens
from facilitator.protocol.fields import BadRequest, address
from facilitator.protocol.networks import BASE_SEPOLIA, Asset, Network, TransferMethod

GWEI = 10**9
_SECRET_TOML_KEYS = frozenset({"database_url", "signer_key", "rpc_urls"})
_HTTP_URL = re.compile(r"https?://[^\s/]+")
DEFAULT_OG_CHAIN_ID = 10740
DEFAULT_SETTLE_WINDOW_S = 3600.0


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


class StartupError(RuntimeError):
    """The settings are valid but the world does not match them (e.g. an RPC serves another
    chain); raised by the wiring before it starts serving."""


class Secret:
    """A string that must not be shown: `repr`/`str` print a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class NetworkSettings:
    network: Network
    rpc_urls: tuple[Secret, ...]


@dataclass(frozen=True)
class OgSettings:
    """The OpenGradient chain: where inference attestations are settled and TEEs registered."""

    chain_id: int
    rpc_urls: tuple[Secret, ...]
    tee_registry: str
    settlement_relay: str
    settlement_relayer: str  # only events sent by this address count (anyone can deploy a copy)
    blobstore_url: str | None
    confirmations: int = 0
    data_relay: bool = False  # run our own data-settlement relay (batch / individual)
    signer_key: SignerKey | None = None
    relay_batch_size: int = 20
    relay_batch_age_s: float = 300.0
    settle_window_s: float = 3600.0  # attestation_not_settled after this long


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    database_url: Secret
    signer_key: SignerKey
    networks: tuple[NetworkSettings, ...]
    receipt_timeout_s: float = 15.0
    gas_limit_cap: int = 300_000
    max_fee_per_gas_cap_wei: int = 50 * GWEI
    priority_fee_wei: int = GWEI // 1000
    rpc_timeout_s: float = 5.0
    receipt_poll_interval_s: float = 0.1
    resend_after_s: float = 4.0
    db_pool_size: int = 20
    duplicate_settle: str = "replay"
    schemes: tuple[str, ...] = ("exact", "upto")
    async_settle_for: tuple[str, ...] = ()  # payTo addresses or resource URL prefixes
    watcher_enabled: bool = True
    max_reorg_depth: int = 64
    watcher_range_blocks: int = 200
    watcher_poll_interval_s: float = 1.0
    watcher_start_lookback_blocks: int = 1_000
    watched_payees: frozenset[str] = frozenset()
    api_tokens: tuple[ApiToken, ...] = ()
    og: OgSettings | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    secrets: tuple[str, ...] = field(default=(), repr=False)  # values the log filter redacts
    # FACILITATOR_* variables set but read by nothing in this configuration (a misspelt name,
    # or a setting of a part that is off): logged at start, names only.
    unused_env: tuple[str, ...] = ()


class _Reader:
    """Typed lookups that name the variable on failure: env first, then TOML, then default."""

    def __init__(self, env: Mapping[str, str], toml: Mapping[str, Any]) -> None:
        self.env = env
        self.toml = toml

    def _raw(self, var: str, toml_path: str | None) -> tuple[Any, str] | None:
        if self.env.get(var, "") != "":
            return self.env[var], var
        if toml_path:
            node: Any = self.toml
            for part in toml_path.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    return None
                node = node[part]
            return node, f"{toml_path} (in FACILITATOR_CONFIG)"
        return None

    def text(self, var: str, default: str | None = None, toml: str | None = None) -> str:
        found = self._raw(var, toml)
        if found is None:
            if default is None:
                raise ConfigError(f"{var} is required")
            return default
        value, name = found
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty string")
        return value.strip()

    def integer(self, var: str, default: int, toml: str | None = None, *, low: int = 0,
                high: int = 2**63 - 1) -> int:
        found = self._raw(var, toml)
        if found is None:
            return default
        value, name = found
        text = str(value).strip()
        if not re.fullmatch(r"-?[0-9]{1,19}", text, re.ASCII):
            raise ConfigError(f"{name} must be an integer, got {text[:40]!r}")
        number = int(text)
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
        return number

    def number(self, var: str, default: float, toml: str | None = None, *, low: float = 0.0,
               high: float = 1e12) -> float:
        found = self._raw(var, toml)
        if found is None:
            return default
        value, name = found
        text = str(value).strip()
        if not re.fullmatch(r"-?[0-9]{1,12}(\.[0-9]{1,12})?", text, re.ASCII):
            raise ConfigError(f"{name} must be a decimal number, got {text[:40]!r}")
        number = float(text)
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
        return number

    def choice(self, var: str, default: str, options: tuple[str, ...], toml: str | None = None
               ) -> str:
        found = self._raw(var, toml)
        if found is None:
            return default
        value, name = found
        if not isinstance(value, str) or value.strip() not in options:
            shown = value[:40] if isinstance(value, str) else value
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {shown!r}")
        return value.strip()

    def secret_text(self, var: str) -> str | None:
        """An environment-only value (secrets never come from the TOML file), or None."""
        value = self.env.get(var, "").strip()
        return value or None


def database_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL (for the commands that need only the database); ConfigError when unset."""
    return _Reader(os.environ if env is None else env, {}).text("DATABASE_URL")


@dataclass(frozen=True)
class CrossCheckSettings:
    og_chain_id: int = DEFAULT_OG_CHAIN_ID
    settle_window_s: float = DEFAULT_SETTLE_WINDOW_S


def crosscheck_settings(env: Mapping[str, str] | None = None) -> CrossCheckSettings:
    """The two settings `facilitator crosscheck` shares with the service (environment, then
    FACILITATOR_CONFIG), read and validated exactly as `load_settings` reads them."""
    env = os.environ if env is None else env
    return _crosscheck_settings(_Reader(env, _load_toml(env.get("FACILITATOR_CONFIG", ""))))


def _crosscheck_settings(read: _Reader) -> CrossCheckSettings:
    return CrossCheckSettings(
        og_chain_id=read.integer("FACILITATOR_OG_CHAIN_ID", DEFAULT_OG_CHAIN_ID, "og.chain_id",
                                 low=1),
        settle_window_s=read.number("FACILITATOR_ATTESTATION_SETTLE_WINDOW_S",
                                    DEFAULT_SETTLE_WINDOW_S, "og.settle_window_s", low=1,
                                    high=30 * 86_400))


# Read by the devnet and test tooling, not by the service.
TOOLING_ENV = frozenset({"FACILITATOR_ANVIL_BIN", "FACILITATOR_EVENT_LOOP",
                         "FACILITATOR_PG_BACKEND", "FACILITATOR_TEST_SEED"})


class _RecordingEnv(dict[str, str]):
    """The environment, remembering which names were looked up (to report the unused ones)."""

    def __init__(self, items: Mapping[str, str]) -> None:
        super().__init__(items)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def unused_env(env: _RecordingEnv) -> tuple[str, ...]:
    return tuple(sorted(name for name in env if name.startswith("FACILITATOR_")
                        and name not in env.asked and name not in TOOLING_ENV))


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = _RecordingEnv(os.environ if env is None else env)
    settings = _load(env)
    return replace(settings, unused_env=unused_env(env))


def _load(env: _RecordingEnv) -> Settings:
    toml = _load_toml(env.get("FACILITATOR_CONFIG", ""))
    read = _Reader(env, toml)
    key = _signer_key(env)
    database_url = Secret(read.text("DATABASE_URL"))
    networks = _networks(read)
    og = _og_settings(read)
    secrets = ([database_url.reveal()] + [u.reveal() for n in networks for u in n.rpc_urls]
               + list(key.redaction_forms()))
    if og is not None:
        secrets += [u.reveal() for u in og.rpc_urls]
        secrets += list(og.signer_key.redaction_forms()) if og.signer_key else []
    return Settings(
        host=read.text("FACILITATOR_HOST", "127.0.0.1", "server.host"),
        port=read.integer("FACILITATOR_PORT", 4022, "server.port", low=1, high=65535),
        database_url=database_url,
        signer_key=key,
        networks=networks,
        receipt_timeout_s=read.number("FACILITATOR_RECEIPT_TIMEOUT_S", 15.0,
                                      "settlement.receipt_timeout_s", low=0.1, high=600),
        gas_limit_cap=read.integer("FACILITATOR_GAS_LIMIT_CAP", 300_000,
                                   "settlement.gas_limit_cap", low=21_000, high=30_000_000),
        max_fee_per_gas_cap_wei=_gwei_to_wei(read.number(
            "FACILITATOR_MAX_FEE_GWEI", 50.0, "settlement.max_fee_gwei", low=1e-9,
            high=100_000)),
        priority_fee_wei=_gwei_to_wei(read.number(
            "FACILITATOR_PRIORITY_FEE_GWEI", 0.001, "settlement.priority_fee_gwei", low=0,
            high=10_000)),
        rpc_timeout_s=read.number("FACILITATOR_RPC_TIMEOUT_S", 5.0, "rpc.timeout_s",
                                  low=0.1, high=120),
        receipt_poll_interval_s=read.number(
            "FACILITATOR_RECEIPT_POLL_INTERVAL_S", 0.1, "settlement.receipt_poll_interval_s",
            low=0.01, high=60),
        resend_after_s=read.number("FACILITATOR_RESEND_AFTER_S", 4.0, "settlement.resend_after_s",
                                   low=0.1, high=3600),
        db_pool_size=read.integer("FACILITATOR_DB_POOL_SIZE", 20, "database.pool_size",
                                  low=2, high=500),
        schemes=_schemes(read.text("FACILITATOR_SCHEMES", "exact,upto", "settlement.schemes")),
        async_settle_for=_async_targets(read.text("FACILITATOR_ASYNC_SETTLE_FOR", "-",
                                                  "settlement.async_for")),
        duplicate_settle=read.choice("FACILITATOR_DUPLICATE_SETTLE", "replay",
                                     ("replay", "reject"), "settlement.duplicates"),
        watcher_enabled=read.choice("FACILITATOR_WATCHER", "on", ("on", "off"),
                                    "watcher.enabled") == "on",
        max_reorg_depth=read.integer("FACILITATOR_MAX_REORG_DEPTH", 64, "watcher.max_reorg_depth",
                                     low=1, high=100_000),
        watcher_range_blocks=read.integer("FACILITATOR_WATCHER_RANGE_BLOCKS", 200,
                                          "watcher.range_blocks", low=1, high=100_000),
        watcher_poll_interval_s=read.number("FACILITATOR_WATCHER_POLL_INTERVAL_S", 1.0,
                                            "watcher.poll_interval_s", low=0.01, high=600),
        watcher_start_lookback_blocks=read.integer(
            "FACILITATOR_WATCHER_START_LOOKBACK_BLOCKS", 1_000, "watcher.start_lookback_blocks",
            low=0, high=10_000_000),
        watched_payees=_addresses(read.text("FACILITATOR_WATCH_PAY_TO", "-",
                                            "watcher.pay_to"), "FACILITATOR_WATCH_PAY_TO"),
        api_tokens=_api_tokens(env.get("FACILITATOR_API_TOKENS", "")),
        og=og,
        log_level=read.choice("FACILITATOR_LOG_LEVEL", "INFO",
                              ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level"),
        log_format=read.choice("FACILITATOR_LOG_FORMAT", "json", ("json", "text"),
                               "logging.format"),
        secrets=tuple(s for s in secrets if s),
    )


def _og_settings(read: _Reader) -> OgSettings | None:
    """Set up only when FACILITATOR_OG_RPC_URLS is given (the attestation cross-check)."""
    if read.secret_text("FACILITATOR_OG_RPC_URLS") is None:
        return None
    relay_on = read.choice("FACILITATOR_DATA_RELAY", "off", ("on", "off"), "og.data_relay") == "on"
    signer = None
    if relay_on:
        raw = read.secret_text("FACILITATOR_OG_SIGNER_KEY")
        if raw is None:
            raise ConfigError(
                "FACILITATOR_OG_SIGNER_KEY is required when FACILITATOR_DATA_RELAY=on")
        try:
            signer = SignerKey.from_hex(raw)
        except SignerKeyError as exc:
            raise ConfigError(f"FACILITATOR_OG_SIGNER_KEY: {exc}") from None
    blobstore = read.text("FACILITATOR_BLOBSTORE_URL", "-")
    blobstore = None if blobstore == "-" else blobstore
    if blobstore is not None and not _HTTP_URL.match(blobstore):
        raise ConfigError("FACILITATOR_BLOBSTORE_URL must start with http:// or https://")
    if relay_on and blobstore is None:
        raise ConfigError("FACILITATOR_BLOBSTORE_URL is required when FACILITATOR_DATA_RELAY=on")
    shared = _crosscheck_settings(read)
    return OgSettings(
        chain_id=shared.og_chain_id,
        rpc_urls=_rpc_urls(read.env, "FACILITATOR_OG_RPC_URLS"),
        tee_registry=_one_address(read, "FACILITATOR_TEE_REGISTRY", "og.tee_registry"),
        settlement_relay=_one_address(read, "FACILITATOR_SETTLEMENT_RELAY",
                                      "og.settlement_relay"),
        settlement_relayer=_one_address(read, "FACILITATOR_SETTLEMENT_RELAYER",
                                        "og.settlement_relayer"),
        blobstore_url=blobstore.rstrip("/") if blobstore else None,
        confirmations=read.integer("FACILITATOR_OG_CONFIRMATIONS", 0, "og.confirmations",
                                   low=0, high=10_000),
        data_relay=relay_on, signer_key=signer,
        relay_batch_size=read.integer("FACILITATOR_RELAY_BATCH_SIZE", 20, "og.relay_batch_size",
                                      low=1, high=10_000),
        relay_batch_age_s=read.number("FACILITATOR_RELAY_BATCH_AGE_S", 300.0,
                                      "og.relay_batch_age_s", low=0.1, high=86_400),
        settle_window_s=shared.settle_window_s,
    )


def _one_address(read: _Reader, var: str, toml: str) -> str:
    try:
        return address(read.text(var, None, toml), var)
    except BadRequest:
        raise ConfigError(f"{var} must be a 0x-prefixed 20-byte hex address") from None


def _api_tokens(value: str) -> tuple[ApiToken, ...]:
    try:
        return parse_api_tokens(value)
    except ValueError as exc:
        raise ConfigError(f"FACILITATOR_API_TOKENS: {exc}") from None


def _schemes(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in ("exact", "upto")]
    if unknown or not names or "exact" not in names:
        raise ConfigError("FACILITATOR_SCHEMES must list exact and optionally upto, "
                          f"got {value[:60]!r}")
    return names


def _async_targets(value: str) -> tuple[str, ...]:
    """payTo addresses (lower-cased) and resource URL prefixes whose /settle runs as a job."""
    if value == "-":
        return ()
    targets = []
    for item in (t.strip() for t in value.split(",") if t.strip()):
        if item.startswith(("http://", "https://")):
            targets.append(item)
            continue
        try:
            targets.append(address(item, "FACILITATOR_ASYNC_SETTLE_FOR"))
        except BadRequest:
            raise ConfigError("FACILITATOR_ASYNC_SETTLE_FOR entries must be payTo addresses or "
                              "http(s) resource URL prefixes") from None
    return tuple(targets)


def _addresses(value: str, var: str) -> frozenset[str]:
    if value == "-":
        return frozenset()
    try:
        return frozenset(address(a.strip(), var) for a in value.split(",") if a.strip())
    except BadRequest as exc:
        raise ConfigError(f"{var}: every entry must be a 20-byte hex address ({exc.message})") \
            from None


def _gwei_to_wei(gwei: float) -> int:
    """Exact for the decimals people write (1.001 gwei is 1001000000 wei, not ...999)."""
    return int(Decimal(repr(gwei)) * GWEI)


def _load_toml(path: str) -> Mapping[str, Any]:
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"FACILITATOR_CONFIG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"FACILITATOR_CONFIG: {path} is not valid TOML: {exc}") from None
    leaked = _SECRET_TOML_KEYS & _all_keys(data)
    if leaked:
        raise ConfigError(f"FACILITATOR_CONFIG: secrets ({', '.join(sorted(leaked))}) belong in "
                          "environment variables, not in the TOML file")
    return data


def _all_keys(node: Any) -> set[str]:
    if isinstance(node, Mapping):
        return set(node) | {k for v in node.values() for k in _all_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _all_keys(v)}
    return set()


def _signer_key(env: Mapping[str, str]) -> SignerKey:
    try:
        if env.get("FACILITATOR_SIGNER_KEY"):
            return SignerKey.from_hex(env["FACILITATOR_SIGNER_KEY"])
        if env.get("FACILITATOR_SIGNER_KEY_FILE"):
            return SignerKey.from_file(Path(env["FACILITATOR_SIGNER_KEY_FILE"]))
    except SignerKeyError as exc:
        var = "FACILITATOR_SIGNER_KEY" if env.get("FACILITATOR_SIGNER_KEY") else \
            "FACILITATOR_SIGNER_KEY_FILE"
        raise ConfigError(f"{var}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"FACILITATOR_SIGNER_KEY_FILE: cannot read it: {exc.strerror}") from None
    raise ConfigError("FACILITATOR_SIGNER_KEY or FACILITATOR_SIGNER_KEY_FILE is required")


def _confirmations(read: _Reader, default: int) -> int:
    """FACILITATOR_CONFIRMATIONS when set (it overrides every `networks[].confirmations`),
    else `default` (the network's TOML value, or the built-in one)."""
    return read.integer("FACILITATOR_CONFIRMATIONS", default, low=0, high=10_000)


def _networks(read: _Reader) -> tuple[NetworkSettings, ...]:
    tables = read.toml.get("networks")
    if tables is None:
        network = Network(key=BASE_SEPOLIA.key, chain_id=BASE_SEPOLIA.chain_id,
                          v1_name=BASE_SEPOLIA.v1_name, assets=BASE_SEPOLIA.assets,
                          confirmations=_confirmations(read, BASE_SEPOLIA.confirmations))
        return (NetworkSettings(network, _rpc_urls(read.env, "FACILITATOR_RPC_URLS")),)
    if not isinstance(tables, list) or not tables:
        raise ConfigError("networks (in FACILITATOR_CONFIG) must be a non-empty array of tables")
    return tuple(_network(read, t, i) for i, t in enumerate(tables))


def _network(read: _Reader, table: Any, index: int) -> NetworkSettings:
    where = f"networks[{index}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    key = _toml_str(table, "key", where)
    if not re.fullmatch(r"[a-z0-9-]{1,32}", key):
        raise ConfigError(f"{where}.key must match [a-z0-9-]{{1,32}}")
    chain_id = _toml_int(table, "chain_id", where, low=1)
    assets = table.get("assets", [])
    if not isinstance(assets, list) or not assets:
        raise ConfigError(f"{where}.assets must be a non-empty array of tables")
    network = Network(
        key=key, chain_id=chain_id, v1_name=table.get("v1_name"),
        assets=tuple(_asset(a, f"{where}.assets[{i}]") for i, a in enumerate(assets)),
        confirmations=_confirmations(
            read, _toml_int(table, "confirmations", where, low=0, default=10)))
    env_var = table.get("rpc_urls_env") or "FACILITATOR_RPC_URLS_" + key.upper().replace("-", "_")
    return NetworkSettings(network, _rpc_urls(read.env, str(env_var)))


def _asset(table: Any, where: str) -> Asset:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    try:
        addr = address(table.get("address"), f"{where}.address")
    except BadRequest as exc:
        raise ConfigError(str(exc)) from None
    method = table.get("transfer_method", "eip3009")
    if method not in {m.value for m in TransferMethod}:
        raise ConfigError(f"{where}.transfer_method must be eip3009 or permit2")
    return Asset(address=addr, eip712_name=_toml_str(table, "name", where),
                 eip712_version=_toml_str(table, "version", where),
                 decimals=_toml_int(table, "decimals", where, low=0, default=18),
                 symbol=str(table.get("symbol", "")), transfer_method=TransferMethod(method))


def _rpc_urls(env: Mapping[str, str], var: str) -> tuple[Secret, ...]:
    raw = env.get(var, "")
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise ConfigError(f"{var} is required: comma-separated JSON-RPC URLs")
    for i, url in enumerate(urls):
        if not _HTTP_URL.match(url):
            raise ConfigError(f"{var}: URL #{i + 1} must start with http:// or https://")
    return tuple(Secret(u) for u in urls)


def _toml_str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} must be a non-empty string")
    return value


def _toml_int(table: Mapping[str, Any], key: str, where: str, *, low: int,
              default: int | None = None) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}.{key} must be an integer >= {low}")
    return value

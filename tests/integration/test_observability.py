"""Observability artefacts against the real thing: Grafana dashboards (grafana/dashboards/*.json),
the Prometheus configuration and alert rules (deploy/), the metric catalog, and a real Prometheus
(Debian's `prometheus` package; `deploy/ensure-prometheus.sh` installs it) scraping a running
facilitator after genuine verifies and settlements on anvil.

The live test asserts that every PromQL expression of every dashboard panel, template variable
and alert rule returns data (comparisons with a constant removed, so a rule that is not firing
still has to find its series): a panel can never show "No data" because of a wrong metric or
label name. The static tests catch misspelt names even for series that have no data yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from harness import (
    body_v1,
    body_v2,
    pay,
    requirements,
    requirements_v1,
    sign_authorization,
    wait_until,
)
from prometheus_client.utils import floatToGoString

from facilitator.adapters.metrics import AGE_BUCKETS, FAILURE_EXTRA_CAUSES, PHASES, Metrics
from facilitator.devnet.anvil import free_port
from facilitator.protocol.reasons import Reason

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
DATASOURCE_FILE = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_FILE = REPO / "grafana" / "provisioning" / "dashboards" / "facilitator.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
ALERT_RULES = REPO / "deploy" / "alerts.yml"
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
ENSURE_SCRIPT = "deploy/ensure-prometheus.sh"

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
NETWORK = "base-sepolia"
# Grafana's variables, replaced by concrete values before querying Prometheus.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "10m",
                 "${network}": NETWORK, "$network": NETWORK}
# Series Prometheus itself attaches to every scrape, and the labels of the scrape target.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance", "service"}
DATA_TIMEOUT_S = 30.0


# -- the metric catalog ---------------------------------------------------------------------

def catalog() -> dict[str, set[str]]:
    """Every series name the service can expose -> the label names it carries."""
    metrics = Metrics(networks=(NETWORK,), causes=tuple(str(r) for r in Reason))
    names: dict[str, set[str]] = {}
    for collector in list(metrics.registry._collector_to_names):  # noqa: SLF001
        labels = set(getattr(collector, "_labelnames", ()))
        kind, base = collector._type, collector._name  # noqa: SLF001
        suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                    "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "summary": ("", "_count", "_sum", "_created")}[kind]
        for suffix in suffixes:
            names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


# -- PromQL, just enough to find names ---------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:$])[a-zA-Z_:][\w:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}
# A comparison with a constant (a filter): removed before asking whether the series exist.
_COMPARISON = re.compile(
    r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _, _ in self.matchers)


def parse_names(expr: str) -> tuple[list[Selector], set[str]]:
    """The vector selectors of an expression (metric name, matcher label names) and the label
    names used by grouping and matching clauses."""
    grouping: set[str] = set()
    for match in _GROUPING.finditer(expr):
        grouping |= {x.strip() for x in match.group(2).split(",") if x.strip()}
    text = _GROUPING.sub(" ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    selectors: list[Selector] = []
    # name{matchers} and bare {matchers}; strings may contain braces, so blank them first.
    blanked = _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', text)
    spans = []
    for match in re.finditer(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}", blanked):
        inner = text[match.start(2):match.end(2)]  # blanking keeps every offset
        matchers = tuple(re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', inner))
        selectors.append(Selector(match.group(1), matchers))
        spans.append(match.span())
    for start, end in reversed(spans):
        blanked = blanked[:start] + " " + blanked[end:]
    blanked = _STRING.sub(" ", blanked)
    for match in _IDENT.finditer(blanked):
        name = match.group()
        if name.lower() in _KEYWORDS or blanked[match.end():].lstrip().startswith("("):
            continue
        selectors.append(Selector(name, ()))
    return selectors, grouping


def unknown_names(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Metric and label names in `expr` that the catalog does not have."""
    selectors, grouping = parse_names(expr)
    problems = []
    used_labels: set[str] = set(TARGET_LABELS)
    for sel in selectors:
        if sel.metric is None:
            problems.append("selector without a metric name")
            continue
        if sel.metric in PROMETHEUS_SERIES:
            labels = TARGET_LABELS
        elif sel.metric not in known:
            problems.append(f"metric {sel.metric!r}")
            continue
        else:
            labels = known[sel.metric] | TARGET_LABELS
        used_labels |= labels
        problems += [f"label {label!r} of {sel.metric}" for label in sel.labels
                     if label not in labels]
    problems += [f"grouping label {label!r}" for label in sorted(grouping - used_labels)]
    return problems


def closed_label_values() -> dict[tuple[str, str], set[str]]:
    """(series name, label) -> every value the service can give that label."""
    metrics = Metrics(networks=(NETWORK,))
    causes = {*FAILURE_EXTRA_CAUSES, *(str(r) for r in Reason)}
    reorg_buckets = {floatToGoString(b) for b in metrics.reorg_depth._upper_bounds}  # noqa: SLF001
    latency = "facilitator_settlement_latency_seconds"
    values = {("facilitator_settlement_failures_total", "cause"): causes,
              ("facilitator_settlements_unfinished", "age"): set(AGE_BUCKETS),
              ("facilitator_settlements_unfinished", "state"):
                  {"pending", "signed", "broadcast", "included"},
              ("facilitator_settlements_confirmed_total", "settled_by"):
                  {"facilitator", "external"},
              ("facilitator_settle_requests_total", "result"): {"success", "pending", "failed"},
              ("facilitator_verify_requests_total", "result"): {"valid", "invalid"},
              ("facilitator_db_pool_connections", "state"): {"in_use", "idle", "max"},
              ("facilitator_reorg_depth_blocks_bucket", "le"): reorg_buckets}
    for suffix in ("_bucket", "_count", "_sum"):
        values[(latency + suffix, "phase")] = set(PHASES)
    return values


def unknown_label_values(expr: str) -> list[str]:
    """Literal matcher values (`l="v"`, `l=~"a|b"`) outside a closed label set."""
    closed = closed_label_values()
    problems = []
    for sel in parse_names(expr)[0]:
        for label, op, value in sel.matchers:
            allowed = closed.get((sel.metric or "", label))
            if allowed is None or op not in ("=", "=~", "!="):
                continue
            if op == "=~" and not re.fullmatch(r"[\w.+-]+(\|[\w.+-]+)*", value):
                continue  # a real pattern (e.g. 5..), not a list of values
            for item in value.split("|") if op == "=~" else [value]:
                if item not in allowed:
                    problems.append(f"{sel.metric}{{{label}{op}...}}: {item!r} is not a value "
                                    f"the service exports")
    return problems


def concrete(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted template variable in {expr}"
    return expr


def without_thresholds(expr: str) -> str:
    return _COMPARISON.sub("", expr)


# -- the artefacts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    paths = sorted(DASHBOARD_DIR.glob("*.json"))
    return [(p, json.loads(p.read_text(encoding="utf-8"))) for p in paths]


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows carry their panels


def dashboard_queries() -> list[Query]:
    queries = []
    for path, board in dashboards():
        for panel in all_panels(board):
            for target in panel.get("targets", []):
                queries.append(Query(f"{path.name}: {panel['title']} [{target['refId']}]",
                                     target["expr"]))
    return queries


def label_values_variables() -> list[tuple[str, str, str]]:
    """(where, metric, label) of every `label_values(metric, label)` template variable."""
    found = []
    for path, board in dashboards():
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*",
                                 text)
            assert match, f"{path.name}: variable {variable['name']}: unsupported query {text!r}"
            found.append((f"{path.name}: ${variable['name']}", match.group(1), match.group(2)))
    return found


# -- static checks ------------------------------------------------------------------------------

def test_dashboards_are_valid_and_every_panel_queries_the_provisioned_datasource():
    boards = dashboards()
    assert {p.stem for p, _ in boards} >= {"settlements", "chain-watcher", "signers", "service"}
    uids = [board["uid"] for _, board in boards]
    assert len(set(uids)) == len(uids), "dashboard uids must be unique"
    for path, board in boards:
        assert board.get("title") and board.get("schemaVersion"), path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "network" in variables, f"{path.name}: no $network template variable"
        assert variables["network"]["datasource"] == DATASOURCE, path.name
        ids = [panel["id"] for panel in all_panels(board)]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
        panels = [p for p in all_panels(board) if p["type"] != "row"]
        assert panels, f"{path.name}: no panels"
        for panel in panels:
            where = f"{path.name}: {panel.get('title')!r}"
            assert panel.get("title"), where
            assert panel.get("datasource") == DATASOURCE, f"{where}: datasource"
            assert panel.get("targets"), f"{where}: no target"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, where
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{where}: empty expression"
                assert target.get("datasource", DATASOURCE) == DATASOURCE, where
        network_scoped = [t["expr"] for p in panels for t in p["targets"]
                          if "network" in t["expr"] or "chain" in t["expr"]]
        assert all('=~"$network"' in e for e in network_scoped
                   if re.search(r'\b(network|chain)\s*=', e)), f"{path.name}: use =~\"$network\""


def test_dashboards_reference_only_catalog_metrics_and_labels():
    known = catalog()
    problems = [f"{q.where}: {problem}  in  {q.expr}" for q in dashboard_queries()
                for problem in unknown_names(q.expr, known) + unknown_label_values(q.expr)]
    for where, metric, label in label_values_variables():
        if metric not in known or label not in known[metric]:
            problems.append(f"{where}: label_values({metric}, {label})")
    assert not problems, "\n".join(problems)


def test_the_name_checker_catches_typos():
    known = catalog()
    assert unknown_names('sum by (network) (rate(facilitator_settle_requests_total'
                         '{network=~"$network"}[5m]))', known) == []
    assert unknown_names("facilitator_settle_request_total", known) == [
        "metric 'facilitator_settle_request_total'"]
    assert unknown_names('facilitator_rpc_errors_total{network="x"}', known) == [
        "label 'network' of facilitator_rpc_errors_total"]  # the label is `chain`
    assert unknown_names("sum by (phase) (facilitator_settle_requests_total)", known) == [
        "grouping label 'phase'"]
    assert unknown_names("histogram_quantile(0.9, sum by (le) (rate("
                         "facilitator_settle_duration_seconds_bucket[5m])))", known) == []
    assert without_thresholds("max(x) < 5e+16 and y >= 10") == "max(x) and y"
    assert unknown_label_values(
        'facilitator_settlement_failures_total{cause=~"reverted|revert"}') == [
        "facilitator_settlement_failures_total{cause=~...}: 'revert' is not a value the service"
        " exports"]
    assert unknown_label_values('facilitator_reorg_depth_blocks_bucket{le="2"}') == [
        "facilitator_reorg_depth_blocks_bucket{le=...}: '2' is not a value the service exports",
    ]  # it is "2.0"
    assert not unknown_label_values('facilitator_settlement_latency_seconds_count'
                                    '{network=~"$network",phase="end_to_end"}')


def test_alert_rules_reference_only_catalog_metrics():
    known = catalog()
    text = ALERT_RULES.read_text(encoding="utf-8")
    used = set(re.findall(r"\bfacilitator_[a-z0-9_]+\b", text))
    assert used, "no facilitator metric in the alert rules?"
    assert not used - set(known), f"not in the catalog: {sorted(used - set(known))}"
    for expr in re.findall(r"\bfacilitator_\w+\{[^}]*\}", text):
        assert not unknown_label_values(expr), unknown_label_values(expr)
    for alert in ("FacilitatorDown", "SignerBalanceLow", "WatcherLagging",
                  "SettlementFailureRatioHigh", "SettlementsPendingTooLong", "WatcherHalted",
                  "DeepReorg"):
        assert re.search(rf"^\s*- alert: {alert}\s*$", text, re.M), f"missing alert {alert}"


def test_grafana_provisioning_matches_the_dashboards_and_compose():
    datasource = DATASOURCE_FILE.read_text(encoding="utf-8")
    assert re.search(r"^\s*uid: prometheus\s*$", datasource, re.M)
    assert re.search(r"^\s*type: prometheus\s*$", datasource, re.M)
    provider = PROVIDER_FILE.read_text(encoding="utf-8")
    path = re.search(r"^\s*path: (\S+)\s*$", provider, re.M)
    assert path, "dashboard provider has no path"
    compose = COMPOSE_FILE.read_text(encoding="utf-8")
    assert f"../grafana/dashboards:{path.group(1)}" in compose, \
        "compose must mount grafana/dashboards where the provider reads them"
    assert "../grafana/provisioning:/etc/grafana/provisioning" in compose


# -- a real Prometheus --------------------------------------------------------------------------

def prometheus_binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        pytest.fail(f"prometheus and promtool are required (Debian package `prometheus`); run "
                    f"`sh {ENSURE_SCRIPT}` (the Makefile's test bootstrap does)", pytrace=False)
    return prometheus, promtool


def test_promtool_accepts_the_config_and_the_rules():
    _, promtool = prometheus_binaries()
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERT_RULES)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def scrape_config_for(port: int, target: str) -> str:
    """deploy/prometheus.yml, pointed at the test service and scraping every second."""
    text = PROMETHEUS_CONFIG.read_text(encoding="utf-8")
    for pattern, value in ((r"(scrape_interval:\s*)\S+", r"\g<1>1s"),
                           (r"(scrape_timeout:\s*)\S+", r"\g<1>1s"),
                           (r"(evaluation_interval:\s*)\S+", r"\g<1>1s"),
                           (r'"facilitator:4022"', f'"{target}"')):
        text, count = re.subn(pattern, value, text)
        assert count, f"deploy/prometheus.yml no longer matches {pattern!r}"
    return text


class Prometheus:
    def __init__(self, directory: Path, target: str) -> None:
        self.binary, _ = prometheus_binaries()
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "prometheus.yml").write_text(scrape_config_for(self.port, target))
        shutil.copy(ALERT_RULES, directory / ALERT_RULES.name)
        self.log_path = directory / "prometheus.log"
        self.process: asyncio.subprocess.Process | None = None
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary, f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        async def ready() -> bool:
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"prometheus exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                return (await self.http.get("/-/ready")).status_code == 200
            return False
        await wait_until(ready, timeout_s=20, interval_s=0.2, what="prometheus to be ready",
                         detail=self.log_detail)

    async def stop(self) -> None:
        await self.http.aclose()
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def log_detail(self) -> str:
        """For `wait_until(detail=...)`: the end of prometheus's log."""
        return f"\nprometheus log:\n{self.log()}"

    async def api(self, path: str, **params: Any) -> Any:
        response = await self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a finite value (a histogram quantile with no observations is
    NaN: the panel would be empty)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture
async def prometheus(facilitator_factory, tmp_path) -> AsyncIterator[tuple[Prometheus, Any]]:
    prometheus_binaries()
    service = await facilitator_factory(
        FACILITATOR_CONFIRMATIONS="2", FACILITATOR_RECEIPT_TIMEOUT_S="1",
        FACILITATOR_WATCHER_POLL_INTERVAL_S="0.1", FACILITATOR_RECEIPT_POLL_INTERVAL_S="0.05")
    server = Prometheus(tmp_path, service.url.removeprefix("http://"))
    await server.start()
    try:
        yield server, service
    finally:
        await server.stop()


# -- traffic ------------------------------------------------------------------------------------

async def make_traffic(chain, service, server: Prometheus) -> None:
    """Real verifies and settlements: valid, invalid, failing, refused and pending ones."""
    pay_to = Account.create().address
    payers = await asyncio.gather(*(chain.new_payer() for _ in range(9)))
    broke = Account.create()  # no USDC: the transfer simulation reverts (an RPC node error)

    # Warm-up: a series born between two scrapes shows no rate for what it counted at birth
    # (the service creates the /verify and /settle series on first use), so let Prometheus see
    # them once before the bulk of the traffic, as it would under continuous production load.
    assert (await service.verify(pay(payers[8], pay_to)))["isValid"] is True
    assert (await service.settle(pay(payers[8], pay_to)))["success"] is True

    async def scraped() -> bool:
        found = await server.query(
            '{__name__=~"facilitator_(verify|settle)_duration_seconds_count",scheme="exact"} > 0')
        return len(found) == 2
    await wait_until(scraped, timeout_s=10, interval_s=0.2,
                     what="the first verify and settle to be scraped", detail=server.log_detail)

    # Valid verifies (v2 and v1) and invalid ones for several reasons.
    verifies = [pay(p, pay_to) for p in payers[:4]]
    reqs_v1 = requirements_v1(pay_to)
    verifies.append(body_v1(sign_authorization(payers[4], to=pay_to, value=10_000), reqs_v1))
    verifies.append(pay(payers[0], pay_to, signer=Account.create()))           # bad signature
    verifies.append(pay(broke, pay_to))                                          # no balance
    verifies.append(pay(payers[1], pay_to, valid_before=int(time.time()) - 10))  # expired
    verifies.append(body_v2(sign_authorization(payers[2], to=pay_to, value=1),      # value
                            requirements(pay_to)))
    answers = await asyncio.gather(*(service.verify(b) for b in verifies))
    assert [a["isValid"] for a in answers] == [True] * 5 + [False] * 4, answers

    # A malformed request (400) and an unknown settlement (404) for the HTTP panels.
    assert (await service.http.post("/verify", content=b"{")).status_code == 400
    assert (await service.http.get("/settle/" + "0x" + "11" * 32)).status_code == 404

    # Refused: the signer cannot pay gas (the balance is restored right after).
    balance = await chain.rpc("eth_getBalance", [service.signer, "latest"])
    await chain.rpc("anvil_setBalance", [service.signer, "0x0"])
    refused = await service.settle(pay(payers[5], pay_to))
    assert refused["success"] is False and "cannot pay gas" in refused["errorMessage"], refused
    await chain.rpc("anvil_setBalance", [service.signer, balance])

    # Valid settlements, concurrently, plus an idempotent replay.
    bodies = [pay(p, pay_to, 1_000 + i) for i, p in enumerate(payers[:6])]
    settled = await asyncio.gather(*(service.settle(b) for b in bodies))
    assert all(a["success"] for a in settled), settled
    assert (await service.settle(bodies[0]))["transaction"] == settled[0]["transaction"]
    assert (await service.http.get(f"/settle/{settled[0]['transaction']}")).status_code == 200

    # Failing settlements: no balance (rejected on chain), bad signature (rejected off chain).
    failed = await asyncio.gather(service.settle(pay(broke, pay_to)),
                                  service.settle(pay(payers[6], pay_to, signer=Account.create())))
    assert not any(a["success"] for a in failed), failed

    # A receipt that does not come in time: `settlement_pending`, then the final answer.
    body = pay(payers[7], pay_to)
    async with chain.manual_mining(mine_on_exit=True):
        pending = await service.settle(body)
        assert pending["errorReason"] == "settlement_pending", pending
    assert (await service.settle(body))["success"] is True

    # Bury everything under the confirmation depth (2) for the chain watcher.
    await chain.mine(3)


# -- the live test ------------------------------------------------------------------------------

async def test_every_dashboard_and_alert_expression_returns_data(chain, prometheus):
    started = time.monotonic()
    server, service = prometheus

    async def target_up() -> bool:
        targets = (await server.api("targets"))["activeTargets"]
        return any(t["labels"].get("job") == "facilitator" and t["health"] == "up"
                   for t in targets)
    await wait_until(target_up, timeout_s=15, interval_s=0.2,
                     what="the facilitator target to be up", detail=server.log_detail)

    await make_traffic(chain, service, server)

    groups = (await server.api("rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    declared = len(re.findall(r"^\s*- alert: ", ALERT_RULES.read_text(), re.M))
    assert len(rules) == declared, "prometheus loaded a different number of rules"
    known = catalog()
    names = [f"{r['name']}: {problem}" for r in rules
             for problem in unknown_names(r["query"], known) + unknown_label_values(r["query"])]
    assert not names, "\n".join(names)

    queries = dashboard_queries() + [Query(f"alert {r['name']}", r["query"]) for r in rules]
    missing: dict[str, str] = {q.where: q.expr for q in queries}

    async def all_have_data() -> bool:
        for where, expr in list(missing.items()):
            if has_data(await server.query(without_thresholds(concrete(expr)))):
                del missing[where]
        return not missing

    def still_missing() -> str:
        lines = [f"  {where}:\n      {without_thresholds(concrete(expr))}"
                 for where, expr in missing.items()]
        return (f"{len(missing)} of {len(queries)} expressions return no data (no series, or "
                f"only NaN) {DATA_TIMEOUT_S:.0f} s after the traffic:\n" + "\n".join(lines))
    await wait_until(all_have_data, timeout_s=DATA_TIMEOUT_S, interval_s=0.2,
                     what="every expression to return data", detail=still_missing)

    for where, metric, label in label_values_variables():
        values = await server.api(f"label/{label}/values", **{"match[]": metric})
        assert NETWORK in values, f"{where}: label_values({metric}, {label}) = {values}"

    async def rules_evaluated() -> bool:
        groups = (await server.api("rules"))["groups"]
        return all(r.get("health") == "ok" for g in groups for r in g["rules"])
    await wait_until(rules_evaluated, timeout_s=10, interval_s=0.2,
                     what="every alert rule to evaluate without error", detail=server.log_detail)
    bad = [(r["name"], r.get("lastError")) for g in (await server.api("rules"))["groups"]
           for r in g["rules"] if r.get("lastError")]
    assert not bad, bad
    print(f"\n{len(queries)} expressions returned data in {time.monotonic() - started:.1f} s")

"""The monitoring kit in deploy/: Prometheus alert rules (and their promtool unit
tests), the example scrape config, and the Grafana dashboard, checked against
what a live ingress really exports and scraped by a real Prometheus server.

promtool and prometheus come from the Debian package `prometheus`. Without them
these tests skip on a developer's machine and fail under CI (CI set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import SimulatedFleet
from tests.support import StartIngress, TLSFiles, eventually, wss_url

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "fleet-ingress-alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "fleet-ingress-alerts.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fleet-ingress-dashboard.json"
DEPLOY_README = ROOT / "deploy" / "README.md"
JOB = "fleet-ingress"  # the job name the alert rules match and the example config sets

APT_INSTALL = "apt-get install -y --no-install-recommends prometheus"


def require_tool(name: str, install: str = APT_INSTALL) -> str:
    """The path of promtool/prometheus/amtool; skip without it, unless on CI,
    where it is a failure."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed and CI must run this test; install it: {install}")
    pytest.skip(f"{name} is not installed (CI unset); install it with: {install}")


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- PromQL: which metric names an expression reads -----------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number ("5m", "1e3"), a "$variable" or a "."
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sqrt", "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; a name that is neither a metric
    nor a known function or keyword (a typo'd function) is an error."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if word.lower() in _KEYWORDS:
            continue  # "or (a > 0 unless b)": an operator before a parenthesis, no call
        if call:
            assert word in _FUNCTIONS, f"unknown PromQL function {word!r} in: {expr}"
        else:
            names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("fleet_ingress_fleet_up == 0", {"fleet_ingress_fleet_up"}),
        (
            'sum by (fleet, le) (rate(fleet_ingress_x_bucket{job="$job", fleet=~"a|b"}'
            "[$__rate_interval])) / on (fleet) group_left max without (le) (y_total offset 5m)",
            {"fleet_ingress_x_bucket", "y_total"},
        ),
        ('a{l="}sum{"} and bool b unless c or Inf > 1e3', {"a", "b", "c"}),
        ("rate(a[5m]) > 0 or (b > 0 unless (c offset 15m))", {"a", "b", "c"}),
        ("histogram_quantile(0.99, sum(rate(h_bucket[5m])) by (le)) - time()", {"h_bucket"}),
    ],
)
def test_metric_name_extraction(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_metric_name_extraction_flags_an_unknown_function() -> None:
    with pytest.raises(AssertionError, match="rat"):
        metric_names("sum(rat(x[5m]))")


# -- what the files hold ----------------------------------------------------------------


def load_alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_selectors(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """The series selector in each `label_values(SELECTOR, label)` variable query."""
    out = []
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert m, f"variable {var['name']}: expected label_values(SELECTOR, label): {query}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


def grafana_to_promql(expr: str, instance: str) -> str:
    """A dashboard query as Grafana sends it, for the variables this dashboard has."""
    out = (
        expr.replace("$__rate_interval", "1m")
        .replace("$job", JOB)
        .replace("$instance", instance)
        .replace("$fleet", ".*")
    )
    assert "$" not in out, f"a Grafana variable this test does not know: {expr}"
    return out


# -- alert rules: promtool check and unit tests ------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_alert_rules())} rules found" in result.stdout


def test_alert_rules_fire_on_synthetic_series() -> None:
    """promtool's unit tests: fleet DOWN (not when in MAINT), certificate expiry,
    no capacity, all fleets down, 503 rate (with its volume guard, and within 2
    minutes of an outage), a fleet answering 5xx or 429 to most calls, queue
    timeouts, a worker dying with calls or hung, a TLS handshake failure storm,
    :80's challenges certbot did not answer, resets and evictions, and the scrape
    target down each fire, and stay quiet when they should."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    firing = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {
        "FleetIngressFleetDown",
        "FleetIngressCertificateExpiringSoon",
        "FleetIngressWorkerDied",
        "FleetIngressReloadRefused",
        "FleetIngressConnectionsRefused",
        "FleetIngressAcceptFailures",
        "FleetIngressLogLinesDropped",
        "FleetIngressFleetCertificateExpiringSoon",
        "FleetIngressAdminStateNotSaved",
        "FleetIngressHigh503Rate",
        "FleetIngressFleetAnswers5xx",
        "FleetIngressFleetAnswers429",
        "FleetIngressWorkerHung",
        "FleetIngressTLSHandshakeFailures",
        "FleetIngressSupervisorTaskFailed",
        "FleetIngressUnexpectedErrors",
        "FleetIngressAcmeResponderFailing",
        "FleetIngressAcmeConnectionsRefused",
        "FleetIngressAcmeConnectionsEvicted",
        "FleetIngressFdStoreFull",
        "FleetIngressCallsWaitForSlots",
        "FleetIngressSlotsGrantedPastCut",
    } <= firing
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_tells_the_operator_what_to_do() -> None:
    rules = load_alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "FleetIngressTargetDown",
        "FleetIngressFleetDown",
        "FleetIngressNoEligibleFleet",
        "FleetIngressCapacityExhausted",
        "FleetIngressHigh503Rate",
        "FleetIngressQueueTimeouts",
        "FleetIngressWorkerDied",
        "FleetIngressCertificateExpiringSoon",
        "FleetIngressFleetAnswers5xx",
        "FleetIngressFleetAnswers429",
        "FleetIngressWorkerHung",
        "FleetIngressTLSHandshakeFailures",
    } <= names
    assert len(names) == len(rules), "duplicate alert names"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"].split()) >= 15, rule["alert"]
    up_rules = [rule for rule in rules if "up" in metric_names(rule["expr"])]
    assert all(f'job="{JOB}"' in rule["expr"] for rule in up_rules)


def test_the_task_failed_alert_names_every_background_task() -> None:
    """FleetIngressSupervisorTaskFailed says which tasks are started again when
    they fail (as against a one-off task, not run again): every one the
    supervisor runs. `admin socket` (session 34) was left out of it (review of
    session 34)."""
    from fleet_ingress.service.supervisor import BACKGROUND_TASKS

    (rule,) = [r for r in load_alert_rules() if r["alert"] == "FleetIngressSupervisorTaskFailed"]
    listed = re.search(
        r"A background task \(([^)]*)\)", " ".join(rule["annotations"]["description"].split())
    )
    assert listed is not None, rule["annotations"]["description"]
    assert sorted(listed.group(1).split(", ")) == sorted(BACKGROUND_TASKS)


def test_every_alert_is_explained_in_the_deploy_readme() -> None:
    """deploy/README.md's alert table names every alert an operator can get."""
    readme = DEPLOY_README.read_text()
    rows = set(re.findall(r"^\| `(FleetIngress\w+)`(?: / `(FleetIngress\w+)`)?", readme, re.M))
    listed = {name for row in rows for name in row if name}
    assert sorted({rule["alert"] for rule in load_alert_rules()} - listed) == []


def test_deploy_readmes_inhibit_rule_is_a_valid_alertmanager_config(tmp_path: Path) -> None:
    """The inhibit rule example (AllFleetsDown over FleetDown and the 503s): valid
    YAML naming real alerts; `amtool check-config` takes it where amtool is
    installed (Debian: prometheus-alertmanager; .ci/run installs it)."""
    (block,) = re.findall(r"```yaml\n(.*?)```", DEPLOY_README.read_text(), re.S)
    example = yaml.safe_load(block)
    (rule,) = example["inhibit_rules"]
    names = {r["alert"] for r in load_alert_rules()}
    matched = " ".join(rule["source_matchers"] + rule["target_matchers"])
    assert set(re.findall(r"FleetIngress\w+", matched)) <= names
    assert rule["equal"] == ["job", "instance"]
    amtool = require_tool(
        "amtool", "apt-get install -y --no-install-recommends prometheus-alertmanager"
    )
    config = {"route": {"receiver": "null"}, "receivers": [{"name": "null"}], **example}
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_prometheus_config_scrapes_the_stats_listener_and_loads_the_rules() -> None:
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8404"]
    result = promtool("check", "config", EXAMPLE_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard ---------------------------------------------------------------------

# What an operator must be able to see (each name must be read by some panel).
DASHBOARD_MUST_SHOW = {
    "fleet_ingress_fleet_active_calls",
    "fleet_ingress_fleet_maxconn",
    # Slots held for standing budgets: why a fleet at maxconn shows fewer calls.
    "fleet_ingress_fleet_reserved_slots",
    "fleet_ingress_fleet_estimated_available",
    "fleet_ingress_fleet_reported_available",
    "fleet_ingress_fleet_health_state",
    "fleet_ingress_fleet_admin_state",
    "fleet_ingress_requests_total",
    "fleet_ingress_fleet_retries_total",
    "fleet_ingress_fleet_redispatches_total",
    "fleet_ingress_queue_length",
    "fleet_ingress_queue_timeouts_total",
    "fleet_ingress_handshake_duration_seconds_bucket",
    "fleet_ingress_call_duration_seconds_bucket",
    "fleet_ingress_relayed_bytes_total",
    "fleet_ingress_fleet_check_duration_seconds_bucket",
    "fleet_ingress_fleet_tls_handshakes_total",
    "fleet_ingress_fleet_tls_sessions_refused_total",
    "fleet_ingress_certificate_expiry_timestamp_seconds",
    "fleet_ingress_workers",
    "fleet_ingress_worker_calls",
    "fleet_ingress_worker_restarts_total",
    "fleet_ingress_worker_calls_lost_total",
    "fleet_ingress_worker_report_age_seconds",
    "up",  # with the ingress down, the one panel that says so
}


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == "${DS_PROMETHEUS}", var["name"]
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    assert sorted(DASHBOARD_MUST_SHOW - shown) == []


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, variables filled in as Grafana does, parses as PromQL:
    promtool checks them as recording rules."""
    queries = dashboard_queries(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr, "h:1")}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- against a live ingress -------------------------------------------------------------


def fleet_line(fleet: SimulatedFleet) -> str:
    return f"{fleet.url} name={fleet.name}"


@contextlib.asynccontextmanager
async def running_fleets(tls_files: TLSFiles, *names: str) -> AsyncIterator[list[SimulatedFleet]]:
    fleets = [SimulatedFleet(name=n, ssl_context=tls_files.fleet_server_context()) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        for fleet in fleets:
            await stack.enter_async_context(fleet)
        yield fleets


async def started_with_stats(start_ingress: StartIngress, fleets: list[SimulatedFleet]) -> Ingress:
    ingress = await start_ingress(
        [fleet_line(f) for f in fleets], health_checks=True, listen={"stats": "127.0.0.1:0"}
    )
    assert ingress.poller is not None and ingress.stats_address is not None
    assert await ingress.poller.wait_first_probes(timeout=5)
    return ingress


async def scrape(ingress: Ingress) -> str:
    assert ingress.stats_address is not None
    host, port = ingress.stats_address
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"http://{host}:{port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


def sample_names(exposition: str) -> set[str]:
    """Every series name in a scrape: gauges, counters' `_total`, histograms'
    `_bucket`/`_sum`/`_count` (what PromQL can select)."""
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


async def test_each_fleets_certificate_expiry_is_exported_from_its_probes(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """A fleet's certificate running out takes every call to it down at once (the
    TLS audit of session 12: seen only when it fails). Its probe's connection
    holds the certificate: its expiry is a gauge per fleet, which an alert watches."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(tls_files.fleet_cert.cert_chain_pems[0].bytes())
    async with running_fleets(tls_files, "a") as fleets:
        ingress = await started_with_stats(start_ingress, fleets)
        samples = {
            s.labels.get("fleet"): s.value
            for family in text_string_to_metric_families(await scrape(ingress))
            for s in family.samples
            if s.name == "fleet_ingress_fleet_certificate_expiry_timestamp_seconds"
        }
    assert samples == {"a": leaf.not_valid_after_utc.timestamp()}


async def test_dashboard_and_alerts_read_only_metrics_the_ingress_exports(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    async with running_fleets(tls_files, "a") as fleets:
        ingress = await started_with_stats(start_ingress, fleets)
        ws = await connect(wss_url(ingress), ssl=tls_files.client_context())
        await ws.send(b"frame")
        assert await ws.recv() == b"frame"
        await ws.close()
        # The call's duration is observed when the ingress sees it end.
        async with asyncio.timeout(5):
            while "fleet_ingress_call_duration_seconds_count 1.0" not in (
                text := await scrape(ingress)
            ):
                await asyncio.sleep(0.05)
    exported = sample_names(text)
    assert "fleet_ingress_fleet_active_calls" in exported  # per-fleet series are there
    assert "fleet_ingress_fleet_check_duration_seconds_bucket" in exported
    assert "fleet_ingress_certificate_expiry_timestamp_seconds" in exported

    dashboard = load_dashboard()
    checked = [*dashboard_queries(dashboard), *variable_selectors(dashboard)]
    checked += [(f"alert {r['alert']}", r["expr"]) for r in load_alert_rules()]
    missing = [
        f"{where}: {name}"
        for where, expr in checked
        for name in sorted(metric_names(expr) - exported)
        if name != "up"  # Prometheus's own series (alerts, the dashboard's up panel)
        # The supervisor's rows per worker and generation, beside the one-process
        # names, and its task failures (tests/unit/test_host_stats.py checks that
        # the host exports them), and its look at the certificate file
        # (test_supervisor.py's renewal test; test_under_systemd's restart test
        # for the refused one), and whether the last upgrade failed (test_upgrade.py).
        and not name.startswith("fleet_ingress_worker")
        and name != "fleet_ingress_supervisor_task_failures_total"
        and name != "fleet_ingress_supervisor_deaths_total"  # test_under_systemd.py
        and name != "fleet_ingress_supervisor_oom_kills_total"  # unit/test_host_stats.py
        and name != "fleet_ingress_certificate_file_expiry_timestamp_seconds"
        and name != "fleet_ingress_certificate_file_refused"
        and name != "fleet_ingress_certificate_chain_doubted"
        and name != "fleet_ingress_upgrade_failed"
        # The supervisor's count of lone-budget grants past a cut (unit/test_host_stats.py).
        and name != "fleet_ingress_slots_granted_past_cut_total"
        # systemd's fd store, exported under systemd alone (test_under_systemd.py).
        and not name.startswith("fleet_ingress_fd_store_")
    ]
    assert missing == [], "metrics the ingress does not export:\n" + "\n".join(missing)


async def test_event_loop_lag_is_exported_while_a_carrier_is_connected(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """The lag is sampled while a carrier is connected, and the probe rests (no
    timer: the idle worker's only wake-up but its report) while none is."""
    ingress = await start_ingress(
        ["https://127.0.0.1:9 name=unused"], listen={"stats": "127.0.0.1:0"}
    )
    assert ingress.loop_lag.running
    await eventually(lambda: ingress.loop_lag.resting)
    host, port = ingress.wss_address
    # A carrier through its handshake, its request not sent yet (timeouts.request, 10 s).
    _, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname=host
    )
    try:
        await eventually(lambda: not ingress.loop_lag.resting)
        time.sleep(0.6)  # noqa: ASYNC251 - the loop held on purpose: the next probe fires late
        async with asyncio.timeout(5):
            while True:
                families = {
                    f.name: f for f in text_string_to_metric_families(await scrape(ingress))
                }
                lag = families["fleet_ingress_event_loop_lag_seconds"]
                counts = {
                    s.labels.get("le"): s.value for s in lag.samples if s.name.endswith("_bucket")
                }
                if counts["+Inf"] >= 1:
                    break
                await asyncio.sleep(0.1)
        # Late by at least the hold less the longest wait between probes (1.5 x 0.2 s).
        assert counts["+Inf"] > counts["0.25"]
    finally:
        writer.close()
    # The carrier gone, the probe's next firing finds nothing busy and rests.
    await eventually(lambda: not ingress.registry.connections and ingress.loop_lag.resting)
    await ingress.stop(drain_timeout=0)
    assert not ingress.loop_lag.running


# -- a real Prometheus scraping a live ingress ----------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if self.process.returncode is not None:
                    pytest.fail(f"prometheus exited {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with self.session.get(f"{self.url}/-/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=promql)
        return data["result"]

    async def stop(self) -> None:
        await self.session.close()
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def prometheus_scraping(ingress: Ingress, tmp_path: Path) -> AsyncIterator[PrometheusServer]:
    """Prometheus on a free loopback port scraping the ingress's stats listener
    every second, with the alert rules loaded; no other target, no remote anything."""
    binary = require_tool("prometheus")
    assert ingress.stats_address is not None
    host, stats_port = ingress.stats_address
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"{host}:{stats_port}"]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    port = free_loopback_port()
    with log.open("wb") as log_out:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(process, port, log)
    try:
        await server.wait_ready(timeout=20)
        yield server
    finally:
        await server.stop()


async def wait_for_per_fleet_active_calls(
    prometheus: PrometheusServer, instance: str, expected: dict[str, float], timeout: float
) -> None:
    seen: dict[str, float] = {}
    try:
        async with asyncio.timeout(timeout):
            while seen != expected:
                await asyncio.sleep(0.2)
                result = await prometheus.query("fleet_ingress_fleet_active_calls")
                seen = {r["metric"]["fleet"]: float(r["value"][1]) for r in result}
                for r in result:
                    assert (r["metric"]["job"], r["metric"]["instance"]) == (JOB, instance)
    except TimeoutError:
        pytest.fail(f"Prometheus saw {seen}, not {expected}:\n{prometheus.log_tail()}")


async def wait_for_scrapes(prometheus: PrometheusServer, n: int, timeout: float) -> None:
    """Until `n` scrapes are stored (so rate() over them has an answer)."""
    async with asyncio.timeout(timeout):
        while not await prometheus.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= {n}'):
            await asyncio.sleep(0.2)


async def wait_for_rules_evaluated(prometheus: PrometheusServer, timeout: float) -> set[str]:
    """Until every loaded rule has been evaluated without error; their names."""
    async with asyncio.timeout(timeout):
        while True:
            groups = (await prometheus.api("rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            failing = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
            assert failing == []
            if rules and all(r["health"] == "ok" for r in rules):
                return {r["name"] for r in rules}
            await asyncio.sleep(0.2)


@pytest.mark.uvloop_only
async def test_real_prometheus_sees_three_calls_held_open_on_one_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path
):
    async with running_fleets(tls_files, "a", "b") as (a, b):
        b.available_override = 0  # FULL by its own report: every call goes to a
        ingress = await started_with_stats(start_ingress, [a, b])
        fleet_b = ingress.balancer.get("b")
        assert fleet_b is not None and fleet_b.full
        assert ingress.stats_address is not None
        instance = "{}:{}".format(*ingress.stats_address)
        ctx = tls_files.client_context()
        calls: list[ClientConnection] = []
        try:
            for _ in range(3):
                calls.append(await connect(wss_url(ingress), ssl=ctx))
            assert [ws.response.headers["X-Fleet"] for ws in calls if ws.response] == ["a"] * 3

            async with prometheus_scraping(ingress, tmp_path) as prometheus:
                await wait_for_per_fleet_active_calls(
                    prometheus, instance, {"a": 3.0, "b": 0.0}, timeout=20
                )
                up = await prometheus.query(f'up{{job="{JOB}"}}')
                assert [float(r["value"][1]) for r in up] == [1.0]

                # Every dashboard query runs on the real series without error, and
                # shows data unless it selects a status code that never happened here.
                await wait_for_scrapes(prometheus, 3, timeout=10)
                no_data = []
                for where, expr in dashboard_queries(load_dashboard()):
                    # The workers' series come from the supervisor (`run`), not from
                    # this one-process Ingress (tests/unit/test_host_stats.py).
                    if all(n.startswith("fleet_ingress_worker") for n in metric_names(expr)):
                        continue
                    if not await prometheus.query(grafana_to_promql(expr, instance)):
                        if 'code="' not in expr:
                            no_data.append(f"{where}: {expr}")
                assert no_data == []

                # The alert rules, loaded by the server, evaluate without error.
                rule_names = await wait_for_rules_evaluated(prometheus, timeout=10)
                assert rule_names == {rule["alert"] for rule in load_alert_rules()}
        finally:
            for ws in calls:
                await ws.close()

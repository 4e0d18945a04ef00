"""The deployment and observability assets under deploy/, checked without Docker.

- Prometheus rules, their unit tests and the Grafana dashboard only name metrics and labels
  that a daemon's `cms_ingest.metrics.Metrics` really exports (a renamed metric breaks this test, not
  the on-call engineer's dashboard at 3 a.m.).
- Every alert says how long, how bad, what and what to check.
- The Compose stack and the Kubernetes manifest mount files that exist, and the configs they
  give the daemon pass the daemon's own validation (`load_config`), secret files included.
- With promtool installed: `promtool check rules/config` and `promtool test rules`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from cms_ingest.config import AppConfig, load_config
from cms_ingest.metrics import POLL_SERIES_FAMILIES, Metrics
from cms_ingest.simulators import davantis as davantis_simulator
from cms_ingest.simulators.base import parse_cli_args, tenant_names

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "cms-ingest.json"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yaml"
KUBERNETES = DEPLOY / "kubernetes" / "cms-ingest.yaml"

YAML_FILES = [
    PROMETHEUS / "prometheus.yml",
    PROMETHEUS / "alerts.yml",
    PROMETHEUS / "alerts.test.yml",
    GRAFANA / "provisioning" / "datasources" / "prometheus.yml",
    GRAFANA / "provisioning" / "dashboards" / "cms-ingest.yml",
    COMPOSE,
    COMPOSE_REPLICAS,
    DEPLOY / "compose" / "config.yaml",
    KUBERNETES,
]

# Labels Prometheus adds to every scraped series (target labels).
TARGET_LABELS = frozenset({"job", "instance"})

# --------------------------------------------------------------------------- helpers


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree (comments are not values)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


# ----------------------------------------------------------- the metric catalogue


def _catalogue() -> tuple[dict[str, frozenset[str]], set[str]]:
    """({series name a query may use: its labels}, {family names, for mentions in prose})."""
    metrics = Metrics()  # what a daemon builds
    wrappers: dict[str, MetricWrapperBase] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            wrappers[family.name] = value
    series: dict[str, frozenset[str]] = {}
    families: set[str] = set()
    for family in metrics.registry.collect():
        families.add(family.name)
        # prometheus_client keeps a wrapper's label names in `_labelnames`; collect() shows
        # them only once a child exists, and these tests must not create series.
        own = (
            wrappers[family.name]._labelnames
            if family.name in wrappers
            else POLL_SERIES_FAMILIES[family.name]  # built at scrape time, no wrapper
        )
        labels = frozenset(own) | TARGET_LABELS
        if family.type == "counter":
            series[family.name + "_total"] = labels
        elif family.type == "histogram":
            series[family.name + "_bucket"] = labels | {"le"}
            series[family.name + "_sum"] = labels
            series[family.name + "_count"] = labels
        else:
            series[family.name] = labels
    assert families == set(wrappers) | set(POLL_SERIES_FAMILIES), "a metric of unknown labels"
    return series, families


SERIES, FAMILIES = _catalogue()

_METRIC_RE = re.compile(r"cms_ingest_[a-z0-9_]+")
_SELECTOR_RE = re.compile(r"\b(cms_ingest_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES_RE = re.compile(r"label_values\(\s*(cms_ingest_[a-z0-9_]+)[^,]*,\s*(\w+)\s*\)")


def _group_end(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _group_start(text: str, end: int) -> int:
    """Index of the "(" opening the group whose ")" is text[end - 1]."""
    depth = 0
    for index in range(end - 1, -1, -1):
        if text[index] == ")":
            depth += 1
        elif text[index] == "(":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _aggregated(text: str, match: re.Match[str]) -> str:
    """The expression a `by (...)` clause groups: `sum by (l) (x)` or `sum (x) by (l)`."""
    after = text[match.end() :].lstrip()
    if after.startswith("("):
        start = text.index("(", match.end())
        return text[start : _group_end(text, start)]
    before = text[: match.start()].rstrip()
    if before.endswith(")"):
        return before[_group_start(before, len(before)) :]
    return text


def promql_problems(expr: str) -> list[str]:
    """Unknown cms_ingest metrics and labels in one PromQL expression (or series selector).

    A label in a matcher must belong to its metric. A label in `by`/`without` must belong to
    every cms_ingest metric the aggregation covers; in `on`/`ignoring`/`group_*`, to every
    cms_ingest metric of the expression. Target labels (job, instance) belong to all.
    """
    problems: list[str] = []
    for match in _SELECTOR_RE.finditer(expr):
        name, braces = match.groups()
        if name not in SERIES:
            hint = ""
            if f"{name}_total" in SERIES:
                hint = " (a counter: use _total)"
            elif f"{name}_bucket" in SERIES:
                hint = " (a histogram: use _bucket/_sum/_count)"
            problems.append(f"unknown metric {name}{hint}")
            continue
        for label in _MATCHER_RE.findall(braces or ""):
            if label not in SERIES[name]:
                problems.append(f"{name} has no label {label!r}")
    for match in _GROUPING_RE.finditer(expr):
        keyword, label_list = match.groups()
        labels = [label.strip() for label in label_list.split(",") if label.strip()]
        scope = _aggregated(expr, match) if keyword in ("by", "without") else expr
        for name in set(_METRIC_RE.findall(scope)) & set(SERIES):
            problems += [
                f"{keyword} ({label}): {name} has no label {label!r}"
                for label in labels
                if label not in SERIES[name]
            ]
    for name, label in _LABEL_VALUES_RE.findall(expr):
        if name in SERIES and label not in SERIES[name]:
            problems.append(f"label_values: {name} has no label {label!r}")
    return problems


def prose_problems(text: str) -> list[str]:
    """cms_ingest names mentioned anywhere (annotations, descriptions) that do not exist."""
    unknown = set(_METRIC_RE.findall(text)) - set(SERIES) - FAMILIES
    return sorted(f"unknown metric {name}" for name in unknown)


def _alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in _yaml(PROMETHEUS / "alerts.yml")["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[str]:
    dashboard = _dashboard()
    exprs = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return exprs


# ------------------------------------------------------------------ the checker itself


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(rate(cms_ingest_made_up_total[5m]))", "unknown metric cms_ingest_made_up_total"),
        ("cms_ingest_polls", "unknown metric cms_ingest_polls (a counter: use _total)"),
        (
            "histogram_quantile(0.9, rate(cms_ingest_poll_duration_seconds[5m]))",
            "unknown metric cms_ingest_poll_duration_seconds (a histogram",
        ),
        ('cms_ingest_polls_total{sitee_id="a"}', "cms_ingest_polls_total has no label 'sitee_id'"),
        (
            "sum by (site_id) (rate(cms_ingest_alarms_ingested_total[5m]))",
            "by (site_id): cms_ingest_alarms_ingested_total has no label 'site_id'",
        ),
        (
            "sum(rate(cms_ingest_alarms_ingested_total[5m])) by (outcome)",
            "by (outcome): cms_ingest_alarms_ingested_total has no label 'outcome'",
        ),
        (
            "sum by (le) (cms_ingest_media_queue_depth)",
            "by (le): cms_ingest_media_queue_depth has no label 'le'",
        ),
        (
            "cms_ingest_site_up and on (task) cms_ingest_task_restarts_total",
            "on (task): cms_ingest_site_up has no label 'task'",
        ),
        (
            "label_values(cms_ingest_sites, site_id)",
            "label_values: cms_ingest_sites has no label 'site_id'",
        ),
    ],
)
def test_checker_catches_wrong_names_and_labels(expr: str, expected: str) -> None:
    assert any(problem.startswith(expected) for problem in promql_problems(expr)), promql_problems(
        expr
    )


@pytest.mark.parametrize(
    "expr",
    [
        'histogram_quantile(0.99, sum by (le, vendor) (rate(cms_ingest_poll_duration_seconds_bucket{vendor=~"$vendor"}[5m])))',
        'sum by (instance, operation) (increase(cms_ingest_db_errors_total{job="cms-ingest"}[10m]))',
        "max(sum by (instance) (cms_ingest_sites)) - sum(cms_ingest_sites_owned)",
        'up{job="cms-ingest"} == 0',
    ],
)
def test_checker_accepts_real_names_and_labels(expr: str) -> None:
    assert promql_problems(expr) == []


def test_prose_checker_catches_unknown_names() -> None:
    assert prose_problems("see cms_ingest_made_up_seconds") == [
        "unknown metric cms_ingest_made_up_seconds"
    ]
    assert prose_problems("see cms_ingest_poll_duration_seconds and cms_ingest_polls_total") == []


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: str(path.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert _yaml_all(path), f"{path} is empty"


# ------------------------------------------------------------------- Prometheus


def test_alert_rules_use_real_metrics_and_labels() -> None:
    problems = [
        f"{rule['alert']}: {problem}"
        for rule in _alert_rules()
        for problem in promql_problems(rule["expr"])
    ]
    problems += prose_problems((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    assert problems == []


def test_alert_rules_are_written_for_the_on_call_engineer() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        where = rule["alert"]
        assert "for" in rule, f"{where}: no `for:`"
        assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), where
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{where}: no summary"
        # What is wrong and what to check first: a sentence or three, not a title.
        assert len(annotations.get("description", "")) >= 120, f"{where}: description too short"
        assert re.search(r"\bcheck", annotations["description"], re.IGNORECASE), (
            f"{where}: the description does not say what to check"
        )


def test_the_required_alerts_exist() -> None:
    by_expr: dict[str, str] = {
        rule["alert"]: " ".join(rule["expr"].split()) for rule in _alert_rules()
    }
    by_for = {rule["alert"]: rule["for"] for rule in _alert_rules()}

    def find(*fragments: str) -> str:
        found = [name for name, expr in by_expr.items() if all(f in expr for f in fragments)]
        assert found, f"no alert whose expr has {fragments}"
        return found[0]

    assert by_for[find("cms_ingest_site_up", "site_id", "== 0")] == "2m"
    latency = find(
        "histogram_quantile(0.99", "cms_ingest_alarm_ingest_latency_seconds_bucket", "> 10"
    )
    assert by_for[latency] == "5m"
    find("cms_ingest_media_queue_depth")
    find("cms_ingest_action_queue_depth")
    find('up{job="cms-ingest"} == 0')
    find('absent(up{job="cms-ingest"})')
    find("cms_ingest_db_errors_total")
    find("increase(cms_ingest_fencing_refusals_total", "> 0")
    find('cms_ingest_config_reloads_total{outcome!="applied"}', "increase(")
    unowned = find("sum(cms_ingest_sites_owned)", "<", "max(", "cms_ingest_sites)")
    assert by_for[unowned] == "1m"


def test_alert_unit_tests_use_real_metrics() -> None:
    tests = _yaml(PROMETHEUS / "alerts.test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    problems: list[str] = []
    tested: set[str] = set()
    for case in tests["tests"]:
        for series in case.get("input_series", []):
            problems += promql_problems(series["series"])
        for expr_test in case.get("promql_expr_test", []):
            problems += promql_problems(expr_test["expr"])
        tested |= {check["alertname"] for check in case.get("alert_rule_test", [])}
    problems += prose_problems((PROMETHEUS / "alerts.test.yml").read_text(encoding="utf-8"))
    assert problems == []
    assert {"CmsIngestSiteDown", "CmsIngestLatencyHigh", "CmsIngestDaemonDown"} <= tested
    assert tested <= {rule["alert"] for rule in _alert_rules()}


def test_prometheus_scrapes_cms_ingest_and_loads_the_rules() -> None:
    config = _yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "cms-ingest"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # Docker DNS: one A record per running replica of the Compose service.
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A"
    assert discovery["port"] == 9108
    assert discovery["names"] == ["cms-ingest"]
    assert "cms-ingest" in _yaml(COMPOSE)["services"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus); "
    "rules and config were checked structurally only",
)


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@needs_promtool
def test_promtool_check_rules() -> None:
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_promtool_check_config() -> None:
    # rule_files are relative to prometheus.yml, so this also checks alerts.yml beside it.
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_promtool_test_rules() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts.test.yml")


# ------------------------------------------------------------------------ Grafana


def test_dashboard_uses_real_metrics_and_labels() -> None:
    problems = [problem for expr in _dashboard_exprs() for problem in promql_problems(expr)]
    problems += prose_problems(DASHBOARD.read_text(encoding="utf-8"))
    assert problems == []


def test_dashboard_is_provisionable() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "cms-ingest"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text(encoding="utf-8")
    assert "__inputs" not in dashboard  # an export "for sharing" needs an import step
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    prometheus = {"type": "prometheus", "uid": "prometheus"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        where = panel["title"]
        assert panel["datasource"] == prometheus, where
        assert panel["targets"], f"{where}: no targets"
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target.get("datasource", prometheus) == prometheus, where
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), where
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
    for variable in dashboard["templating"]["list"]:
        assert variable.get("datasource", prometheus) == prometheus


def test_dashboard_shows_what_operations_asked_for() -> None:
    panels = [panel for panel in _panels(_dashboard()["panels"]) if panel["type"] != "row"]
    exprs = " ".join(" ".join(t["expr"].split()) for p in panels for t in p["targets"])
    for wanted in [
        "cms_ingest_site_up",
        "sum by (vendor, event_type) (rate(cms_ingest_alarms_ingested_total",
        "histogram_quantile(0.5, sum by (le) (rate(cms_ingest_alarm_ingest_latency_seconds_bucket",
        "histogram_quantile(0.9, sum by (le) (rate(cms_ingest_alarm_ingest_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(cms_ingest_alarm_ingest_latency_seconds_bucket",
        "sum by (outcome) (rate(cms_ingest_polls_total",
        "histogram_quantile(0.99, sum by (le, vendor) (rate(cms_ingest_poll_duration_seconds_bucket",
        "cms_ingest_media_queue_depth",
        "cms_ingest_action_queue_depth",
        "sum by (outcome) (rate(cms_ingest_media_fetches_total",
        "cms_ingest_media_bytes_total",
        "sum by (kind, outcome) (increase(cms_ingest_actions_total",
        "cms_ingest_db_errors_total",
        "cms_ingest_task_restarts_total",
        "cms_ingest_flood_grouped_total",
        "sum by (instance) (cms_ingest_sites_owned)",
        "cms_ingest_lease_takeovers_total",
        "cms_ingest_lease_handoffs_total",
        "cms_ingest_leases_lost_total",
        "cms_ingest_fencing_refusals_total",
        "sum by (outcome) (increase(cms_ingest_config_reloads_total",
        "cms_ingest_clock_skew_seconds",
    ]:
        assert wanted in exprs, f"no panel queries {wanted}"
    types = {panel["type"] for panel in panels}
    assert {"stat", "table", "timeseries", "heatmap"} <= types
    (heatmap,) = [panel for panel in panels if panel["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "cms_ingest_alarm_ingest_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
    # Media fetch errors stand out.
    (fetches,) = [p for p in panels if "cms_ingest_media_fetches_total" in str(p["targets"])]
    assert "red" in json.dumps(fetches["fieldConfig"]["overrides"])


def test_grafana_provisioning() -> None:
    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus"
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    assert "prometheus" in _yaml(COMPOSE)["services"]
    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "cms-ingest.yml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # The folder it loads is where compose.yaml mounts the dashboard.
    grafana = _yaml(COMPOSE)["services"]["grafana"]
    targets = {_mount(volume)[1]: _mount(volume)[0] for volume in grafana["volumes"]}
    folder = provider["options"]["path"].rstrip("/")
    assert targets[f"{folder}/cms-ingest.json"] == "./grafana/cms-ingest.json"
    assert targets["/etc/grafana/provisioning/datasources/prometheus.yml"].endswith(
        "provisioning/datasources/prometheus.yml"
    )
    assert targets["/etc/grafana/provisioning/dashboards/cms-ingest.yml"].endswith(
        "provisioning/dashboards/cms-ingest.yml"
    )


# ------------------------------------------------------------------------ Compose


def _mount(volume: str | dict[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read_only) of a service volume, short or long syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"], bool(volume.get("read_only"))
    source, target, *mode = volume.split(":")
    return source, target, "ro" in (mode[0].split(",") if mode else [])


def _is_host_path(source: str) -> bool:
    return source.startswith(("./", "../", "/", "~"))


def test_compose_mounts_files_that_exist() -> None:
    compose = _yaml(COMPOSE)
    for name, secret in compose["secrets"].items():
        assert (DEPLOY / secret["file"]).is_file(), f"secret {name}: {secret['file']}"
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, _ = _mount(volume)
            if _is_host_path(source):
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: undeclared secret {secret}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()


def test_compose_services() -> None:
    services = _yaml(COMPOSE)["services"]
    assert {"postgres", "simulator", "cms-ingest", "prometheus", "grafana"} <= set(services)

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert postgres["healthcheck"]["test"]
    assert any(not _is_host_path(_mount(v)[0]) for v in postgres["volumes"]), "named volume"

    daemon = services["cms-ingest"]
    assert daemon["build"]["context"] == ".."
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
    mounts = {_mount(v)[1]: _mount(v) for v in daemon["volumes"]}
    assert mounts["/etc/cms-ingest/config.yaml"][0] == "./compose/config.yaml"
    assert mounts["/etc/cms-ingest/config.yaml"][2], "the config must be mounted read-only"
    assert not _is_host_path(mounts["/var/lib/cms-ingest"][0]), "media on a named volume"
    assert "database_url" in daemon["secrets"]
    # The image's own HEALTHCHECK (GET /healthz) applies: not overridden, and present.
    assert "healthcheck" not in daemon
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text(encoding="utf-8")
    # Replicas need neither a fixed container name nor a fixed host port.
    assert "container_name" not in daemon
    assert "ports" not in daemon
    # SIGTERM stops the daemon within 10 s: Compose's default grace (10 s) is too tight.
    assert daemon.get("stop_grace_period") in ("20s", "30s")

    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        ports = services[name]["ports"]
        assert ports == [f"127.0.0.1:{port}:{port}"], f"{name} must bind to 127.0.0.1 only"

    prometheus_mounts = {_mount(v)[1]: _mount(v)[0] for v in services["prometheus"]["volumes"]}
    config_target = next(t for t in prometheus_mounts if t.endswith("/prometheus.yml"))
    assert prometheus_mounts[config_target] == "./prometheus/prometheus.yml"
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    for rule_file in _yaml(PROMETHEUS / "prometheus.yml")["rule_files"]:
        target = str(Path(config_target).parent / rule_file)
        assert prometheus_mounts.get(target) == f"./prometheus/{rule_file}"


def test_compose_simulator_serves_the_configured_sites() -> None:
    services = _yaml(COMPOSE)["services"]
    simulator = services["simulator"]
    assert simulator["build"] == services["cms-ingest"]["build"]
    assert simulator["entrypoint"] == ["python", "-m", "cms_ingest.simulators.davantis"]
    # Parse the command with the simulator's own flags: an unknown flag fails here.
    args = parse_cli_args(
        simulator["command"],
        description="",
        default_port=davantis_simulator.DEFAULT_PORT,
        add_arguments=davantis_simulator._add_arguments,
    )
    assert args.host == "0.0.0.0", "reachable from the other containers"
    assert (args.sites, args.rate) == (3, 0.05)
    expected = {f"http://simulator:{args.port}/t/{tenant}" for tenant in tenant_names(args.sites)}
    config = _yaml(DEPLOY / "compose" / "config.yaml")
    assert {site["url"] for site in config["sites"]} == expected
    # The simulator overrides the image's daemon HEALTHCHECK (port 9108) with its own port.
    assert str(args.port) in " ".join(simulator["healthcheck"]["test"])


def _check_database_url(config: AppConfig, secret: Path) -> None:
    expected = secret.read_text(encoding="utf-8").strip()
    assert config.database_url is not None, "database_url_file was read"
    assert config.database_url.get_secret_value() == expected


def test_compose_config_passes_the_daemons_validation(tmp_path: Path) -> None:
    compose = _yaml(COMPOSE)
    daemon = compose["services"]["cms-ingest"]
    mounts = {_mount(v)[1]: _mount(v)[0] for v in daemon["volumes"]}
    text = (DEPLOY / mounts["/etc/cms-ingest/config.yaml"]).read_text(encoding="utf-8")
    # Compose mounts each of the service's secrets at /run/secrets/<name>.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for name in daemon["secrets"]:
        shutil.copy(DEPLOY / compose["secrets"][name]["file"], secrets_dir / name)
        text = text.replace(f"/run/secrets/{name}", str(secrets_dir / name))
    unmounted = [value for value in _strings(yaml.safe_load(text)) if "/run/secrets" in value]
    assert unmounted == [], "the config reads secrets the service does not mount"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(text, encoding="utf-8")

    config = load_config(config_path, environ={})

    assert config.listen == "0.0.0.0:9108"
    assert str(config.data_dir) == "/var/lib/cms-ingest"
    _check_database_url(config, secrets_dir / "database_url")
    device = davantis_simulator.DavantisSite()  # the simulated device's account
    for site in config.sites:
        assert site.vendor == "davantis"
        assert site.username == device.username
        assert site.password is not None
        assert site.password.get_secret_value() == device.password


def test_compose_database_secret_matches_postgres() -> None:
    compose = _yaml(COMPOSE)
    postgres = compose["services"]["postgres"]["environment"]
    secret_file = compose["secrets"]["database_url"]["file"]
    url = urlsplit((DEPLOY / secret_file).read_text(encoding="utf-8").strip())
    password_file = compose["secrets"]["postgres_password"]["file"]
    password = (DEPLOY / password_file).read_text(encoding="utf-8").strip()
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert (url.username, url.password) == (postgres["POSTGRES_USER"], password)
    assert url.path == "/" + postgres["POSTGRES_DB"]


def test_compose_replicas_override() -> None:
    override = _yaml(COMPOSE_REPLICAS)
    assert set(override["services"]) == {"cms-ingest"}
    assert override["services"]["cms-ingest"]["deploy"]["replicas"] == 2
    # Both replicas share the one config: a fixed instance_id there would be shared too.
    assert "instance_id" not in _yaml(DEPLOY / "compose" / "config.yaml")


# --------------------------------------------------------------------- Kubernetes


def _manifests() -> dict[str, dict[str, Any]]:
    documents = _yaml_all(KUBERNETES)
    by_kind: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert "namespace" not in document["metadata"], "manifests must be namespace-less"
        assert document["kind"] not in by_kind, f"two {document['kind']}s"
        by_kind[document["kind"]] = document
    return by_kind


def test_kubernetes_deployment() -> None:
    manifests = _manifests()
    assert {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget"} <= set(manifests)
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    pod = deployment["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9108"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    (container,) = spec["containers"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": 9108}, probe
    assert 9108 in [port["containerPort"] for port in container["ports"]]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security.get("runAsUser") == 10001
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    # Media: writable, on a PVC defined here or an emptyDir.
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    media = volumes[mounts["/var/lib/cms-ingest"]["name"]]
    assert not mounts["/var/lib/cms-ingest"].get("readOnly")
    if "persistentVolumeClaim" in media:
        claim = manifests["PersistentVolumeClaim"]
        assert claim["metadata"]["name"] == media["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "shared by both replicas"
    else:
        assert "emptyDir" in media
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget.get("minAvailable") == 1 or budget.get("maxUnavailable") == 1


def test_kubernetes_config_passes_the_daemons_validation(tmp_path: Path) -> None:
    manifests = _manifests()
    spec = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    config_mount = next(m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]])
    secret_mount = next(m for m in container["volumeMounts"] if "secret" in volumes[m["name"]])
    assert (
        volumes[config_mount["name"]]["configMap"]["name"]
        == (manifests["ConfigMap"]["metadata"]["name"])
    )
    assert (
        volumes[secret_mount["name"]]["secret"]["secretName"]
        == (manifests["Secret"]["metadata"]["name"])
    )
    assert config_mount.get("readOnly") and secret_mount.get("readOnly")
    # The daemon is started on the ConfigMap's file.
    config_key = "config.yaml"
    assert container["args"] == ["run", "--config", f"{config_mount['mountPath']}/{config_key}"]
    text = manifests["ConfigMap"]["data"][config_key]

    # The Secret's keys become files under the secret mount.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in manifests["Secret"]["stringData"].items():
        (secrets_dir / key).write_text(value + "\n", encoding="utf-8")
    text = text.replace(secret_mount["mountPath"].rstrip("/") + "/", f"{secrets_dir}/")
    unmounted = [value for value in _strings(yaml.safe_load(text)) if "/run/secrets" in value]
    assert unmounted == [], "the config reads files the pod does not mount"
    config_path = tmp_path / config_key
    config_path.write_text(text, encoding="utf-8")
    # ${VAR} references must be variables the container sets.
    environ = {variable["name"]: "cms-ingest-7d9f8-abcde" for variable in container["env"]}

    config = load_config(config_path, environ=environ)

    assert config.listen == "0.0.0.0:9108"
    assert config.listen_port == container["livenessProbe"]["httpGet"]["port"]
    assert str(config.data_dir) == "/var/lib/cms-ingest"
    _check_database_url(config, secrets_dir / "database_url")
    assert all(site.password is not None for site in config.sites)
    # Both replicas share the ConfigMap: the instance id must come from the pod itself.
    assert config.lease_ttl == 15
    assert config.instance_id == "cms-ingest-7d9f8-abcde"

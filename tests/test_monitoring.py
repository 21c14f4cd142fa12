"""The Grafana dashboard and the Prometheus alert rules in deploy/monitoring: their PromQL parses,
the alerts an operator needs are there, and every metric they query is one that real Spaces
processes export (a local cluster's API process and media node are scraped: the list is what
they serve, never written down here)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spaces.cluster import LocalCluster
from tests.support.system import ADMIN_KEY

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
REQUIRED_ALERTS = {
    "SpacesMediaNodeLost": "node loss",
    "SpacesWebhookBacklog": "a webhook backlog",
    "SpacesRedisEpochChanged": "a Redis epoch change",
    "SpacesJoinErrors": "join errors",
}


def walk(node: Any) -> Iterator[Any]:
    """Every node of a promql_parser expression tree."""
    yield node
    for attribute in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, str | int | float):
            yield from walk(child)
    for child in getattr(node, "args", None) or []:
        yield from walk(child)


def metric_names(expr: str) -> set[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    tree = promql_parser.parse(expr)  # raises on a syntax error
    names = {n.name for n in walk(tree) if type(n).__name__ == "VectorSelector" and n.name}
    assert names, f"no metric in {expr!r}"
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "spaces-dashboard.json").read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    exprs = dashboard_exprs()
    used = {name for _, expr in exprs for name in metric_names(expr)}
    for needed in (
        "spaces_joins_total",
        "spaces_join_latency_seconds_bucket",
        "spaces_participants",
        "spaces_media_spaces",
        "spaces_forwarded_packets_total",
        "spaces_forwarded_bytes_total",
        "spaces_node_load",
        "spaces_lease_expiries_total",
        "spaces_webhook_queues",
        "spaces_webhook_dead_letters",
    ):
        assert needed in used, needed
    dashboard = json.loads((MONITORING / "spaces-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Broadcast health, from the broadcaster workers' metrics.
    assert any(p["title"] == "Broadcasts" and p["type"] == "row" for p in dashboard["panels"])
    assert {"spaces_broadcasts_active", "spaces_broadcast_errors_total"} <= used


def test_the_alert_rules_are_well_formed_and_cover_the_failures() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for name, failure in REQUIRED_ALERTS.items():
        assert name in names, f"no alert for {failure}"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        metric_names(rule["expr"])


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[str, str]]:
    """The /metrics text of a real API process (control, auth, presence, webhooks) and a real
    media node, after a little traffic."""
    cluster = LocalCluster(replicas=1, nodes=1, admin_key=ADMIN_KEY)
    cluster.start()
    try:
        cluster.wait_ready()
        asyncio.run(traffic(cluster))
        texts = {}
        for name in ("api-0", "media-0"):
            address = cluster.by_name(name).env["SPACES_METRICS_ADDR"]
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                texts[name] = reply.read().decode()
        yield texts
    finally:
        cluster.stop()


async def traffic(cluster: LocalCluster) -> None:
    """A join and a media session, so that labelled series exist too."""
    from spaces.sdk import client as sdk
    from tests.support.system import Admin, Tenant

    admin = Admin(cluster.api_addresses()[0])
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        space = sdk.Space(tenant.token(space_id, "probe"), admin.address, decode=False)
        await space.join()
        await space.leave()
    finally:
        await admin.close()


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(
    scraped: dict[str, str],
) -> None:
    exported = set().union(*(exported_names(text) for text in scraped.values()))
    assert "spaces_joins_total" in exported and "process_resident_memory_bytes" in exported
    queried = {
        name: where
        for where, expr in [
            *((f"panel {title!r}", expr) for title, expr in dashboard_exprs()),
            *((f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()),
        ]
        for name in metric_names(expr)
    }
    missing = {name: where for name, where in queried.items() if name not in exported}
    assert not missing, f"queried but not exported by any process: {missing}"


def test_the_media_node_and_the_api_process_each_export_their_own_metrics(
    scraped: dict[str, str],
) -> None:
    """The series that only one kind of process produces come from that process."""

    def series(text: str) -> set[str]:
        return {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    api, media = series(scraped["api-0"]), series(scraped["media-0"])
    assert "spaces_joins_total" in api and "spaces_join_latency_seconds_count" in api
    assert "spaces_media_nodes" in api  # presence publishes the registry's view
    assert "spaces_media_sessions" in media and "spaces_node_load" in media
    assert "spaces_asyncio_tasks" in api and "spaces_asyncio_tasks" in media


def test_the_monitoring_manifests_render_and_validate() -> None:
    import subprocess

    import kubernetes_validate

    rendered = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    objects = {o["metadata"]["name"]: o for o in yaml.safe_load_all(rendered) if o}
    for obj in objects.values():
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
    dashboard = objects["spaces-grafana-dashboard"]
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert (
        dashboard["data"]["spaces-dashboard.json"]
        == (MONITORING / "spaces-dashboard.json").read_text()
    )
    assert (
        objects["spaces-prometheus-rules"]["data"]["alerts.yaml"]
        == (MONITORING / "alerts.yaml").read_text()
    )

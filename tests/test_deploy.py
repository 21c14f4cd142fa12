"""The Kubernetes manifests, the Dockerfile and .dockerignore, checked offline.

Each overlay is rendered with `kubectl kustomize`, every rendered object is validated against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and then each
promise docs/operations.md makes about the deployment is checked on the rendered objects.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spaces.config import NodeConfig, ServerConfig, parse_port_range, port_of

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"
OVERLAYS = ("dev", "production")

K8S_VERSIONS = ("1.28.0", "1.32.0")
"""The oldest Kubernetes the manifests support (native gRPC probes are GA since 1.27) and the
version of the kubectl used here. kubernetes-validate ships both schemas."""

API_SERVICES = ("control", "auth", "presence", "webhooks")
"""Separate Deployments, each scaled on its own."""
ADMIN_ONLY_SERVICES = ("control", "auth", "webhooks")
SPACES_NAME = "spaces"
"""app.kubernetes.io/name of every Spaces pod (not Redis)."""
EXTERNAL_SECRET = "spaces-secrets"
"""The Secret production expects to exist already (docs/operations.md, "Installing")."""
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"


# --- rendering ---------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Never a silent skip: the manifests are part of the product.
        pytest.fail("kubectl is required to render the manifests offline (kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(overlay: str) -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "overlays" / overlay)


def render_with_port_range(overlay: str) -> list[dict[str, Any]]:
    """An overlay plus the port-range component, as an operator adds it (kustomize takes only
    relative paths to other directories)."""
    with tempfile.TemporaryDirectory() as directory:
        relative = os.path.relpath(DEPLOY, directory)
        (Path(directory) / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            f"resources: [{relative}/overlays/{overlay}]\n"
            f"components: [{relative}/components/media-port-range]\n"
        )
        return kustomize(Path(directory))


VARIANTS = (*OVERLAYS, "production+media-port-range")


def render_variant(variant: str) -> list[dict[str, Any]]:
    overlay, _, component = variant.partition("+")
    return render_with_port_range(overlay) if component else render(overlay)


@pytest.fixture(scope="module", params=VARIANTS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render_variant(request.param)


@pytest.fixture(scope="module", params=OVERLAYS)
def single_port(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The overlays as shipped: media nodes in single-port mode."""
    return render(request.param)


@pytest.fixture(scope="module", params=OVERLAYS)
def port_range(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Each overlay with the media-port-range component."""
    return render_with_port_range(request.param)


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return render("dev")


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render("production")


# --- helpers -----------------------------------------------------------------------------------


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def spaces_workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in workloads(objects) if pod_labels(w).get(NAME) == SPACES_NAME]


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def api_deployment(objects: list[dict[str, Any]], service: str) -> dict[str, Any]:
    return named(objects, "Deployment", f"spaces-{service}")


def media_daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "DaemonSet", "spaces-media")


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return dict(containers[0])


def container_port(container: dict[str, Any], name: str) -> int:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"container {container['name']} declares no port named {name}"
    return int(ports[0])


@dataclass(frozen=True)
class EnvValue:
    """Where one environment variable of a container comes from."""

    value: str | None = None
    secret: tuple[str, str] | None = None
    """(secret name, key)"""
    field: str | None = None
    """fieldRef path, e.g. status.hostIP"""
    optional: bool = False


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, EnvValue]:
    """The container's environment as the kubelet builds it: envFrom first, then env on top."""
    env: dict[str, EnvValue] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, "only ConfigMaps are used with envFrom"
        data = named(objects, "ConfigMap", ref["name"]).get("data", {})
        for key, value in data.items():
            env[source.get("prefix", "") + key] = EnvValue(value=value)
    for item in container.get("env", []):
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = EnvValue(value=item.get("value", ""))
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = EnvValue(
                secret=(ref["name"], ref["key"]), optional=bool(ref.get("optional"))
            )
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = named(objects, "ConfigMap", ref["name"]).get("data", {})
            env[item["name"]] = EnvValue(value=data[ref["key"]])
        elif "fieldRef" in source:
            env[item["name"]] = EnvValue(field=source["fieldRef"]["fieldPath"])
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def literal(env: dict[str, EnvValue], name: str, default: str) -> str:
    item = env.get(name)
    if item is None:
        return default
    assert item.value is not None, f"{name} must be a literal value here"
    return item.value


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def ingress_rules_for(
    objects: list[dict[str, Any]], labels: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """Every ingress rule of every NetworkPolicy that selects pods with these labels."""
    for policy in of_kind(objects, "NetworkPolicy"):
        if selector_matches(policy["spec"]["podSelector"], labels):
            yield from policy["spec"].get("ingress", [])


def isolated_for_ingress(objects: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """A pod selected by any policy with Ingress in policyTypes accepts only what rules allow."""
    return any(
        selector_matches(p["spec"]["podSelector"], labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        for p in of_kind(objects, "NetworkPolicy")
    )


def rule_ports(rule: dict[str, Any]) -> set[int] | None:
    """The ports a rule opens; None means every port."""
    if not rule.get("ports"):
        return None
    return {int(p["port"]) for p in rule["ports"]}


def open_to_everyone(rule: dict[str, Any]) -> bool:
    peers = rule.get("from")
    if not peers:
        return True
    for peer in peers:
        block = peer.get("ipBlock")
        if block is not None and ipaddress.ip_network(block["cidr"]).prefixlen == 0:
            return True
        namespaces = peer.get("namespaceSelector")
        if namespaces is not None and not namespaces and "podSelector" not in peer:
            return True
    return False


# --- schema validation -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_is_valid_for_kubernetes(
    rendered: list[dict[str, Any]], version: str
) -> None:
    assert rendered
    failures = []
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


# --- API services ------------------------------------------------------------------------------


def test_each_api_service_is_its_own_deployment(rendered: list[dict[str, Any]]) -> None:
    for service in API_SERVICES:
        deployment = api_deployment(rendered, service)
        args = only_container(deployment).get("args", [])
        assert args == ["serve", "--services", service], (service, args)
        assert pod_labels(deployment)[COMPONENT] == service


def test_each_api_service_has_a_cluster_ip_service_on_its_grpc_port(
    rendered: list[dict[str, Any]],
) -> None:
    for service in API_SERVICES:
        deployment = api_deployment(rendered, service)
        svc = named(rendered, "Service", f"spaces-{service}")
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(deployment))
        grpc = container_port(only_container(deployment), "grpc")
        targets = {p["targetPort"] for p in svc["spec"]["ports"]}
        assert "grpc" in targets or grpc in targets, (service, targets)


def test_every_api_deployment_has_an_hpa_that_targets_it(rendered: list[dict[str, Any]]) -> None:
    hpas = of_kind(rendered, "HorizontalPodAutoscaler")
    for service in API_SERVICES:
        deployment = api_deployment(rendered, service)
        targeting = [
            h
            for h in hpas
            if h["apiVersion"] == "autoscaling/v2"
            and h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            and h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        ]
        assert len(targeting) == 1, service
        spec = targeting[0]["spec"]
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"], service
        assert spec["metrics"], service


def test_autoscaled_deployments_leave_the_replica_count_to_the_hpa(
    rendered: list[dict[str, Any]],
) -> None:
    for service in API_SERVICES:
        assert "replicas" not in api_deployment(rendered, service)["spec"], service


def test_every_api_deployment_has_a_pdb_that_selects_exactly_its_pods(
    rendered: list[dict[str, Any]],
) -> None:
    pdbs = of_kind(rendered, "PodDisruptionBudget")
    for service in API_SERVICES:
        deployment = api_deployment(rendered, service)
        covering = [
            p for p in pdbs if selector_matches(p["spec"]["selector"], pod_labels(deployment))
        ]
        assert len(covering) == 1, service
        pdb = covering[0]
        others = [w for w in workloads(rendered) if w is not deployment]
        for other in others:
            assert not selector_matches(pdb["spec"]["selector"], pod_labels(other)), (
                f"PDB {pdb['metadata']['name']} also selects {other['metadata']['name']}"
            )
        # Never a budget that forbids every eviction (it would block node drains).
        assert pdb["spec"].get("maxUnavailable", 1) not in (0, "0%"), service


# --- probes ------------------------------------------------------------------------------------


def test_probes_are_native_grpc_probes_on_the_grpc_port(rendered: list[dict[str, Any]]) -> None:
    for workload in spaces_workloads(rendered):
        container = only_container(workload)
        grpc_port = container_port(container, "grpc")
        env = container_env(container, rendered)
        assert port_of(literal(env, "SPACES_GRPC_ADDR", "")) == grpc_port
        for probe_name in ("livenessProbe", "readinessProbe"):
            probe = container.get(probe_name)
            assert probe is not None, (workload["metadata"]["name"], probe_name)
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
            assert probe["grpc"]["port"] == grpc_port, (workload["metadata"]["name"], probe_name)


def test_liveness_probe_asks_the_liveness_health_service(rendered: list[dict[str, Any]]) -> None:
    from spaces.server import LIVENESS_SERVICE

    for workload in spaces_workloads(rendered):
        probe = only_container(workload)["livenessProbe"]
        assert probe["grpc"].get("service") == LIVENESS_SERVICE, workload["metadata"]["name"]


def test_readiness_probe_asks_the_default_health_service(rendered: list[dict[str, Any]]) -> None:
    for workload in spaces_workloads(rendered):
        probe = only_container(workload)["readinessProbe"]
        assert probe["grpc"].get("service", "") == "", workload["metadata"]["name"]


# --- resources and security --------------------------------------------------------------------


def test_every_container_sets_resource_requests_and_limits(
    rendered: list[dict[str, Any]],
) -> None:
    for workload in workloads(rendered):
        for container in all_containers(workload):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(bound, {}), (
                        f"{workload['metadata']['name']}/{container['name']}: {bound}.{resource}"
                    )


def test_every_container_runs_as_non_root_on_a_read_only_root_filesystem(
    rendered: list[dict[str, Any]],
) -> None:
    for workload in workloads(rendered):
        pod_security = pod_spec(workload).get("securityContext", {})
        for container in all_containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            assert not security.get("privileged"), where


def test_spaces_pods_get_a_writable_tmp(rendered: list[dict[str, Any]]) -> None:
    for workload in spaces_workloads(rendered):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in only_container(workload)["volumeMounts"]}
        assert "/tmp" in mounts, workload["metadata"]["name"]
        assert "emptyDir" in volumes[mounts["/tmp"]], workload["metadata"]["name"]


def test_spaces_pods_get_no_kubernetes_api_token(rendered: list[dict[str, Any]]) -> None:
    for workload in spaces_workloads(rendered):
        assert pod_spec(workload).get("automountServiceAccountToken") is False


def test_metrics_are_scraped_from_the_metrics_port(rendered: list[dict[str, Any]]) -> None:
    for workload in spaces_workloads(rendered):
        container = only_container(workload)
        metrics_port = container_port(container, "metrics")
        env = container_env(container, rendered)
        assert port_of(literal(env, "SPACES_METRICS_ADDR", "")) == metrics_port
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", workload["metadata"]["name"]
        assert annotations.get("prometheus.io/port") == str(metrics_port)
        assert annotations.get("prometheus.io/path") == "/metrics"


def test_no_image_is_unpinned(rendered: list[dict[str, Any]]) -> None:
    for workload in workloads(rendered):
        for container in all_containers(workload):
            image = container["image"]
            if "@sha256:" in image:
                continue
            last_part = image.rsplit("/", 1)[-1]
            assert ":" in last_part, f"{image} has no tag"
            tag = last_part.rsplit(":", 1)[1]
            assert tag and tag != "latest", f"{image} is not pinned"


# --- media nodes -------------------------------------------------------------------------------


def test_media_nodes_are_a_daemonset_on_the_pod_network_with_one_udp_port(
    single_port: list[dict[str, Any]],
) -> None:
    daemonset = media_daemonset(single_port)
    spec = pod_spec(daemonset)
    assert not spec.get("hostNetwork")
    container = only_container(daemonset)
    assert container["args"] == ["media-node"]
    env = container_env(container, single_port)
    assert "SPACES_UDP_PORT_RANGE" not in env
    udp = [p for p in container["ports"] if p.get("protocol") == "UDP"]
    assert [p["name"] for p in udp] == ["media"]
    port = int(literal(env, "SPACES_MEDIA_UDP_PORT", ""))
    assert udp[0]["containerPort"] == port
    assert not any("hostPort" in p for p in container["ports"])
    # The settings are ones a node accepts.
    config = ServerConfig.from_env(
        {
            "SPACES_MEDIA_UDP_PORT": str(port),
            "SPACES_MEDIA_UDP_ADVERTISE_PORT": literal(env, "SPACES_MEDIA_UDP_ADVERTISE_PORT", ""),
        }
    )
    assert config.node.udp_port == port and not config.node.udp_port_min
    # A machine's node ports reach one media pod: an update replaces, never surges.
    rolling = daemonset["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling.get("maxSurge", 0) in (0, "0%")
    assert rolling.get("maxUnavailable") == 1


def service_port(service: dict[str, Any], protocol: str) -> dict[str, Any]:
    ports = [p for p in service["spec"]["ports"] if p.get("protocol", "TCP") == protocol]
    assert len(ports) == 1, (service["metadata"]["name"], protocol)
    return dict(ports[0])


def target_of(container: dict[str, Any], port: dict[str, Any]) -> int:
    target = port.get("targetPort", port["port"])
    return container_port(container, target) if isinstance(target, str) else int(target)


def test_each_machines_node_ports_lead_to_its_own_media_pod_at_the_announced_ports(
    single_port: list[dict[str, Any]],
) -> None:
    daemonset = media_daemonset(single_port)
    container = only_container(daemonset)
    env = container_env(container, single_port)
    service = named(single_port, "Service", "spaces-media")
    spec = service["spec"]
    assert spec["type"] == "NodePort"
    # No hop to another machine's pod, and the client's source address kept (ICE needs it).
    assert spec["externalTrafficPolicy"] == "Local"
    selected = [
        w["metadata"]["name"]
        for w in workloads(single_port)
        if selector_matches({"matchLabels": spec["selector"]}, pod_labels(w))
    ]
    assert selected == ["spaces-media"]
    media = service_port(service, "UDP")
    assert target_of(container, media) == int(literal(env, "SPACES_MEDIA_UDP_PORT", ""))
    assert media["nodePort"] == int(literal(env, "SPACES_MEDIA_UDP_ADVERTISE_PORT", ""))
    grpc = service_port(service, "TCP")
    assert target_of(container, grpc) == container_port(container, "grpc")
    assert grpc["nodePort"] == port_of(literal(env, "SPACES_PUBLIC_ADDR", ""))
    for port in (media, grpc):
        assert 30000 <= port["nodePort"] <= 32767  # Kubernetes' default node port range


def test_media_node_announces_the_host_ip_and_binds_the_pod_ip(
    single_port: list[dict[str, Any]],
) -> None:
    container = only_container(media_daemonset(single_port))
    env = container_env(container, single_port)
    assert env["SPACES_ICE_ADVERTISE_IP"].field == "status.hostIP"
    assert env["SPACES_ICE_BIND"].field == "status.podIP"
    public = literal(env, "SPACES_PUBLIC_ADDR", "")
    reference = re.fullmatch(r"\$\((\w+)\):(\d+)", public)
    assert reference is not None, public
    variable = reference.group(1)
    assert env[variable].field == "status.hostIP"
    order = [item["name"] for item in container["env"]]
    assert order.index(variable) < order.index("SPACES_PUBLIC_ADDR")
    assert env["SPACES_NODE_ID"].field or "$(" in (env["SPACES_NODE_ID"].value or "")


def test_the_port_range_variant_is_a_host_network_daemonset(
    port_range: list[dict[str, Any]],
) -> None:
    daemonset = media_daemonset(port_range)
    spec = pod_spec(daemonset)
    assert spec.get("hostNetwork") is True
    assert spec.get("dnsPolicy") == "ClusterFirstWithHostNet"
    assert not [
        s for s in of_kind(port_range, "Service") if s["metadata"]["name"] == "spaces-media"
    ]
    container = only_container(daemonset)
    env = container_env(container, port_range)
    assert "SPACES_MEDIA_UDP_PORT" not in env and "SPACES_MEDIA_UDP_ADVERTISE_PORT" not in env
    assert not [p for p in container["ports"] if p.get("protocol") == "UDP"]
    for port in container["ports"]:
        assert port["hostPort"] == port["containerPort"]
    rolling = daemonset["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling.get("maxSurge", 0) in (0, "0%")


def test_media_udp_port_range_matches_the_manifests_and_the_docs(
    port_range: list[dict[str, Any]],
) -> None:
    daemonset = media_daemonset(port_range)
    env = container_env(only_container(daemonset), port_range)
    declared = literal(env, "SPACES_UDP_PORT_RANGE", "")
    low, high = parse_port_range(declared)
    assert 1024 < low <= high <= 65535
    annotation = daemonset["metadata"]["annotations"]["spaces-oss.io/udp-port-range"]
    assert annotation == declared
    docs = OPERATIONS.read_text()
    ranges = set(re.findall(r"UDP (\d+)-(\d+)|(\d{4,5})-(\d{4,5}) \| UDP", docs))
    documented = {tuple(int(p) for p in r if p) for r in ranges}
    assert documented == {(low, high)}, f"docs give {documented}, manifests {declared}"


def test_the_port_range_variant_announces_and_binds_the_host_ip(
    port_range: list[dict[str, Any]],
) -> None:
    container = only_container(media_daemonset(port_range))
    env = container_env(container, port_range)
    assert env["SPACES_ICE_ADVERTISE_IP"].field == "status.hostIP"
    assert env["SPACES_ICE_BIND"].field == "status.hostIP"
    # Clients dial the machine: $(HOST_IP) with HOST_IP from status.hostIP, defined before use.
    public = literal(env, "SPACES_PUBLIC_ADDR", "")
    reference = re.fullmatch(r"\$\((\w+)\):(\d+)", public)
    assert reference is not None, public
    variable, port = reference.group(1), int(reference.group(2))
    assert env[variable].field == "status.hostIP"
    order = [item["name"] for item in container["env"]]
    assert order.index(variable) < order.index("SPACES_PUBLIC_ADDR")
    assert port == container_port(container, "grpc")


def prestop_drain(container: dict[str, Any]) -> list[str]:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    if command[:2] == ["sh", "-c"] or command[:2] == ["/bin/sh", "-c"]:
        command = shlex.split(command[2])
    return [str(part) for part in command]


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_media_node_drains_in_its_prestop_hook(rendered: list[dict[str, Any]]) -> None:
    container = only_container(media_daemonset(rendered))
    command = prestop_drain(container)
    assert command[:2] == ["spaces", "drain"], command
    assert flag(command, "--pid") == "1"
    assert port_of(flag(command, "--address")) == container_port(container, "grpc")


def test_termination_grace_covers_the_drain(rendered: list[dict[str, Any]]) -> None:
    daemonset = media_daemonset(rendered)
    container = only_container(daemonset)
    env = container_env(container, rendered)
    drain_grace = float(literal(env, "SPACES_DRAIN_GRACE_SECONDS", str(NodeConfig.drain_grace_s)))
    shutdown_grace = float(
        literal(env, "SPACES_SHUTDOWN_GRACE_SECONDS", str(ServerConfig.shutdown_grace_s))
    )
    drain_timeout = float(flag(prestop_drain(container), "--timeout"))
    termination = pod_spec(daemonset).get("terminationGracePeriodSeconds", 30)
    # The hook waits out the drain grace (plus time to close sessions)...
    assert drain_timeout > drain_grace
    # ...and the hook plus the SIGTERM shutdown fit before the kubelet's SIGKILL.
    assert termination >= drain_timeout + shutdown_grace
    assert termination >= drain_grace


# --- Redis -------------------------------------------------------------------------------------


def test_dev_runs_redis_as_a_statefulset_with_an_append_only_file_on_a_volume(
    dev: list[dict[str, Any]],
) -> None:
    redis = named(dev, "StatefulSet", "spaces-redis")
    container = only_container(redis)
    args = container.get("args", [])
    assert flag(args, "--appendonly") == "yes"
    assert flag(args, "--maxmemory-policy") == "noeviction"
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data_dir = flag(args, "--dir")
    assert any(mounts.get(claim) == data_dir for claim in claims), (claims, mounts, data_dir)


def test_redis_is_reachable_only_from_spaces_pods(dev: list[dict[str, Any]]) -> None:
    redis = named(dev, "StatefulSet", "spaces-redis")
    labels = pod_labels(redis)
    redis_port = container_port(only_container(redis), "redis")
    assert isolated_for_ingress(dev, labels)
    rules = list(ingress_rules_for(dev, labels))
    assert rules
    for rule in rules:
        assert rule_ports(rule) == {redis_port}
        assert not open_to_everyone(rule)
        for peer in rule["from"]:
            assert "namespaceSelector" not in peer, "only this namespace's pods"
            if "podSelector" in peer:
                assert peer["podSelector"].get("matchLabels", {}).get(NAME) == SPACES_NAME
            else:
                # Host-network media nodes: the machines' addresses, never a catch-all.
                assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen >= 8
    # And every Spaces pod does get in: by its labels, or (host network) through the ipBlock.
    for workload in spaces_workloads(dev):
        peers = [peer for rule in rules for peer in rule["from"]]
        if pod_spec(workload).get("hostNetwork"):
            assert any("ipBlock" in peer for peer in peers), workload["metadata"]["name"]
        else:
            assert any(
                selector_matches(peer["podSelector"], pod_labels(workload))
                for peer in peers
                if "podSelector" in peer
            ), workload["metadata"]["name"]


def test_production_takes_the_redis_url_from_a_secret(production: list[dict[str, Any]]) -> None:
    assert not [w for w in workloads(production) if pod_labels(w).get(NAME) == "redis"]
    secrets = {s["metadata"]["name"] for s in of_kind(production, "Secret")}
    for workload in spaces_workloads(production):
        env = container_env(only_container(workload), production)
        if only_container(workload).get("args") == ["serve", "--services", "signal"]:
            # The signaling service never touches Redis (it joins through presence): it gets
            # no Redis credentials at all.
            assert "SPACES_REDIS_URL" not in env
            continue
        redis_url = env["SPACES_REDIS_URL"]
        assert redis_url.secret is not None, workload["metadata"]["name"]
        assert not redis_url.optional
        # An existing Secret, never a placeholder committed to the repository.
        assert redis_url.secret[0] == EXTERNAL_SECRET
        assert EXTERNAL_SECRET not in secrets
    assert EXTERNAL_SECRET in OPERATIONS.read_text()


def test_api_services_take_the_admin_key_from_a_secret(rendered: list[dict[str, Any]]) -> None:
    for service in API_SERVICES:
        env = container_env(only_container(api_deployment(rendered, service)), rendered)
        assert env["SPACES_ADMIN_KEY"].secret is not None, service
        assert not env["SPACES_ADMIN_KEY"].optional, service


def test_dev_is_self_contained(dev: list[dict[str, Any]]) -> None:
    """Every ConfigMap and Secret the dev pods read is rendered (with its hashed name)."""
    present = {(o["kind"], o["metadata"]["name"]) for o in dev}
    for workload in workloads(dev):
        for container in all_containers(workload):
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in present
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    secret = named(dev, "Secret", ref["name"])
                    assert ref["key"] in secret.get("data", {}) or ref.get("optional"), ref


# --- network policy ----------------------------------------------------------------------------


def test_only_presence_signal_and_media_nodes_are_open_to_clients(
    rendered: list[dict[str, Any]],
) -> None:
    public_ports = {
        "spaces-presence": ("grpc",),
        "spaces-signal": ("http",),
        # Clients dial media nodes' gRPC and send them media (single-port mode).
        "spaces-media": ("grpc", "media"),
    }
    for policy in of_kind(rendered, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if not open_to_everyone(rule):
                continue
            selector = policy["spec"]["podSelector"]
            selected = [w for w in workloads(rendered) if selector_matches(selector, pod_labels(w))]
            names = [w["metadata"]["name"] for w in selected]
            assert len(names) == 1 and names[0] in public_ports, policy
            container = only_container(selected[0])
            ports = {container_port(container, name) for name in public_ports[names[0]]}
            assert rule_ports(rule) == ports, policy["metadata"]["name"]
    presence = pod_labels(api_deployment(rendered, "presence"))
    assert any(open_to_everyone(r) for r in ingress_rules_for(rendered, presence))


def test_every_pod_on_the_pod_network_is_isolated_by_network_policy(
    rendered: list[dict[str, Any]],
) -> None:
    for workload in workloads(rendered):
        if pod_spec(workload).get("hostNetwork"):
            continue  # NetworkPolicy does not apply; docs/operations.md says to firewall the host
        assert isolated_for_ingress(rendered, pod_labels(workload)), workload["metadata"]["name"]


def test_admin_apis_accept_only_backends(rendered: list[dict[str, Any]]) -> None:
    for service in ADMIN_ONLY_SERVICES:
        deployment = api_deployment(rendered, service)
        grpc = container_port(only_container(deployment), "grpc")
        rules = [
            rule
            for rule in ingress_rules_for(rendered, pod_labels(deployment))
            if rule_ports(rule) is None or grpc in (rule_ports(rule) or set())
        ]
        assert rules, service
        for rule in rules:
            assert not open_to_everyone(rule), service
            for peer in rule["from"]:
                assert "ipBlock" not in peer, service
                namespaces = peer.get("namespaceSelector")
                # Same namespace, or namespaces explicitly labelled as backends.
                assert namespaces is None or namespaces.get("matchLabels"), service


def test_media_machine_firewall_is_documented(rendered: list[dict[str, Any]]) -> None:
    daemonset = media_daemonset(rendered)
    container = only_container(daemonset)
    docs = OPERATIONS.read_text()
    if pod_spec(daemonset).get("hostNetwork"):
        assert "NetworkPolicy does not apply to host-network pods" in docs
        assert f"TCP {container_port(container, 'grpc')}" in docs
    else:
        service = named(rendered, "Service", "spaces-media")
        assert f"TCP {service_port(service, 'TCP')['nodePort']}" in docs
        assert f"UDP {service_port(service, 'UDP')['nodePort']}" in docs


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.strip().startswith("#")),
    )
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def test_dockerfile_is_multi_stage_on_a_pinned_python_image() -> None:
    instructions = dockerfile_instructions()
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    froms = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    for written in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], written)
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image


def test_dockerfile_final_stage_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    stage = " ".join(rest for keyword, rest in final_stage() if keyword == "RUN")
    for tool in ("gcc", "build-essential", "pip install", "apt-get install", "make "):
        assert tool not in stage, tool
    copies = [rest for keyword, rest in final_stage() if keyword == "COPY"]
    assert all(c.startswith("--from=") for c in copies), "only built artifacts are copied in"


def test_dockerfile_runs_spaces_and_exposes_its_ports() -> None:
    stage = final_stage()
    entrypoints = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["spaces"]
    exposed = {int(p.split("/")[0]) for k, rest in stage if k == "EXPOSE" for p in rest.split()}
    assert {50051, 9464, 8080} <= exposed


def test_dockerfile_copies_every_source_root_of_the_package() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    roots = {path.split("/")[0] for path in config["tool"]["setuptools"]["package-dir"].values()}
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert roots <= copied, roots - copied


def test_dockerignore_keeps_the_venv_git_and_caches_out_of_the_build() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", ".pytest_cache", ".mypy_cache", "bench/results"):
        assert required in patterns or required.split("/")[0] in patterns, required


def test_broadcasters_are_an_autoscaled_deployment_that_drains(
    rendered: list[dict[str, Any]],
) -> None:
    worker = named(rendered, "Deployment", "spaces-broadcaster")
    container = only_container(worker)
    assert container["args"] == ["broadcaster"]
    assert not pod_spec(worker).get("hostNetwork")
    # Sized from bench/broadcast.py (docs/benchmarks.md): at least a core per pod requested.
    assert container["resources"]["requests"]["cpu"] == "1"
    hpa = [
        h
        for h in of_kind(rendered, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "spaces-broadcaster"
    ]
    assert hpa
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 15


def test_production_keeps_two_broadcasters_so_one_can_take_over(
    production: list[dict[str, Any]],
) -> None:
    hpa = [
        h
        for h in of_kind(production, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "spaces-broadcaster"
    ]
    assert hpa[0]["spec"]["minReplicas"] >= 2


# --- signaling service -------------------------------------------------------------------------


def test_signal_is_an_autoscaled_deployment_reaching_presence(
    rendered: list[dict[str, Any]],
) -> None:
    from spaces.config import host_of

    deployment = named(rendered, "Deployment", "spaces-signal")
    container = only_container(deployment)
    assert container["args"] == ["serve", "--services", "signal"]
    assert not pod_spec(deployment).get("hostNetwork")
    assert "replicas" not in deployment["spec"]
    env = container_env(container, rendered)
    http = container_port(container, "http")
    assert port_of(literal(env, "SPACES_SIGNAL_ADDR", "")) == http
    assert host_of(literal(env, "SPACES_SIGNAL_ADDR", "")) == "0.0.0.0"
    presence = literal(env, "SPACES_PRESENCE_ADDR", "")
    presence_service = named(rendered, "Service", "spaces-presence")
    assert host_of(presence) == presence_service["metadata"]["name"]
    assert port_of(presence) in {p["port"] for p in presence_service["spec"]["ports"]}
    # The config this environment builds is valid for a signal-only process.
    ServerConfig.from_env(
        {k: v.value for k, v in env.items() if v.value is not None}, services="signal"
    )
    hpas = [
        h
        for h in of_kind(rendered, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "spaces-signal"
    ]
    assert len(hpas) == 1 and hpas[0]["spec"]["minReplicas"] >= 1
    pdbs = [
        p
        for p in of_kind(rendered, "PodDisruptionBudget")
        if selector_matches(p["spec"]["selector"], pod_labels(deployment))
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1
    service = named(rendered, "Service", "spaces-signal")
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
    assert any(p["targetPort"] in ("http", http) for p in service["spec"]["ports"])


def test_production_serves_browsers_over_tls_with_websocket_timeouts(
    production: list[dict[str, Any]],
) -> None:
    ingress = named(production, "Ingress", "spaces-signal")
    spec = ingress["spec"]
    assert spec["tls"] and spec["tls"][0]["secretName"]
    hosts = {h for t in spec["tls"] for h in t["hosts"]}
    backends = []
    for rule in spec["rules"]:
        assert rule["host"] in hosts  # every host it serves has a certificate
        for path in rule["http"]["paths"]:
            backends.append(path["backend"]["service"])
    assert backends and all(b["name"] == "spaces-signal" for b in backends)
    service_ports = {
        p["name"] for p in named(production, "Service", "spaces-signal")["spec"]["ports"]
    }
    assert all(b["port"]["name"] in service_ports for b in backends)
    annotations = ingress["metadata"]["annotations"]
    # A WebSocket lives as long as a meeting: well beyond the proxy's default 60 s.
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    hpa = [
        h
        for h in of_kind(production, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "spaces-signal"
    ]
    assert hpa[0]["spec"]["minReplicas"] >= 3
    docs = OPERATIONS.read_text()
    assert "Behind a proxy" in docs and "proxy-read-timeout" in docs

"""Operating promises of the manifests, checked offline on the rendered overlays (the same
rendering and helpers as tests/test_deploy.py): the media nodes' drain grace per overlay, and
coturn (its ports, its secret shared with presence, and its command line run for real)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aioice import turn as aioice_turn

from spaces.config import TurnConfig, parse_port_range
from spaces.turn import mint
from tests.support.system import free_port
from tests.support.turn_server import stun_binding_answered, turnserver_binary, udp_port_free
from tests.test_deploy import (
    container_env,
    flag,
    literal,
    media_daemonset,
    named,
    only_container,
    pod_spec,
    prestop_drain,
    render,
    render_with_port_range,
    spaces_workloads,
)

REAL_MEETING_S = 3600
"""A rolling upgrade must not cut a meeting shorter than this in production."""


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render("production")


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return render("dev")


def drain_settings(objects: list[dict[str, Any]]) -> tuple[float, float, float]:
    daemonset = media_daemonset(objects)
    container = only_container(daemonset)
    env = container_env(container, objects)
    grace = float(literal(env, "SPACES_DRAIN_GRACE_SECONDS", "30"))
    timeout = float(flag(prestop_drain(container), "--timeout"))
    termination = float(pod_spec(daemonset).get("terminationGracePeriodSeconds", 30))
    return grace, timeout, termination


def test_production_media_nodes_drain_for_as_long_as_real_meetings_last(
    production: list[dict[str, Any]],
) -> None:
    grace, timeout, termination = drain_settings(production)
    assert grace >= REAL_MEETING_S
    assert timeout > grace and termination >= timeout + 5


def test_dev_media_nodes_drain_briefly(dev: list[dict[str, Any]]) -> None:
    grace, timeout, termination = drain_settings(dev)
    assert grace <= 60 and termination <= 120, (grace, timeout, termination)


# --- TURN ------------------------------------------------------------------------------------


def coturn_daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "DaemonSet", "spaces-turn")


def coturn_args(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """coturn's --name=value arguments, by name (a flag may repeat)."""
    args: dict[str, list[str]] = {}
    for arg in only_container(coturn_daemonset(objects))["args"]:
        name, _, value = arg.partition("=")
        args.setdefault(name, []).append(value)
    return args


def test_production_runs_coturn_on_the_host_network_with_its_ports(
    production: list[dict[str, Any]],
) -> None:
    daemonset = coturn_daemonset(production)
    spec = pod_spec(daemonset)
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"spaces-oss.io/turn-node": "true"}
    container = only_container(daemonset)
    ports = {(p["containerPort"], p["protocol"]) for p in container["ports"]}
    args = coturn_args(production)
    listening = int(args["--listening-port"][0])
    tls = int(args["--tls-listening-port"][0])
    assert {(listening, "UDP"), (listening, "TCP"), (tls, "TCP")} <= ports
    # Relay ports: as annotated, and clear of the media nodes' range on a shared machine.
    low, high = int(args["--min-port"][0]), int(args["--max-port"][0])
    assert daemonset["metadata"]["annotations"]["spaces-oss.io/udp-port-range"] == f"{low}-{high}"
    # Single-port media nodes: every machine's node ports lead to them.
    for port in named(production, "Service", "spaces-media")["spec"]["ports"]:
        assert not low <= port["nodePort"] <= high
    # The host-network variant's range.
    port_range = render_with_port_range("production")
    media_env = container_env(only_container(media_daemonset(port_range)), port_range)
    media_low, media_high = parse_port_range(literal(media_env, "SPACES_UDP_PORT_RANGE", ""))
    assert media_low and (high < media_low or low > media_high)
    assert "--use-auth-secret" in args and "--no-cli" in args


def test_presence_and_coturn_share_the_turn_secret_and_the_urls_fit(
    production: list[dict[str, Any]],
) -> None:
    coturn_env = container_env(only_container(coturn_daemonset(production)), production)
    args = coturn_args(production)
    assert args["--static-auth-secret"] == ["$(TURN_SECRET)"]
    presence_env = container_env(
        only_container(named(production, "Deployment", "spaces-presence")), production
    )
    assert presence_env["SPACES_TURN_SECRET"].secret == coturn_env["TURN_SECRET"].secret
    assert coturn_env["TURN_SECRET"].secret == ("spaces-secrets", "turn-secret")
    config = TurnConfig(
        urls=tuple(literal(presence_env, "SPACES_TURN_URLS", "").split(",")), secret="x"
    )
    ports = {int(url.split("?")[0].rsplit(":", 1)[1]) for url in config.urls}
    assert ports == {int(args["--listening-port"][0]), int(args["--tls-listening-port"][0])}
    # Only presence mints credentials: no other process is given the secret.
    for workload in spaces_workloads(production):
        env = container_env(only_container(workload), production)
        if workload["metadata"]["name"] != "spaces-presence":
            assert "SPACES_TURN_SECRET" not in env, workload["metadata"]["name"]


def test_the_rendered_coturn_arguments_run_debians_coturn_and_accept_minted_credentials(
    production: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The manifest's command line, given to the real turnserver (on loopback), starts it, and
    an Allocate with a credential minted as presence mints them succeeds."""
    secret = "rendered-secret"
    raw = only_container(coturn_daemonset(production))["args"]
    args = [
        a.replace("$(HOST_IP)", "127.0.0.1")
        .replace("$(TURN_SECRET)", secret)
        .replace("/tmp/", f"{tmp_path}/")
        for a in raw
    ]
    listening = int(coturn_args(production)["--listening-port"][0])
    if not udp_port_free(listening):
        listening = free_port()
        args = [
            f"--listening-port={listening}" if a.startswith("--listening-port=") else a
            for a in args
        ]
    proc = subprocess.Popen(
        [turnserver_binary(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while not stun_binding_answered(listening):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "coturn did not answer"
            time.sleep(0.05)
        credential = mint(secret, "conn-1", int(time.time()) + 600)

        async def allocate() -> None:
            transport, _ = await aioice_turn.create_turn_endpoint(
                asyncio.DatagramProtocol,
                server_addr=("127.0.0.1", listening),
                username=credential.username,
                password=credential.credential,
                transport="udp",
            )
            transport.close()

        asyncio.run(allocate())
    finally:
        proc.terminate()
        proc.wait(10)

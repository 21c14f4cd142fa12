"""Operating promises of the manifests, checked offline on the rendered overlays (the same
rendering and helpers as tests/test_deploy.py): the media nodes' drain grace per overlay."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_deploy import (
    container_env,
    flag,
    literal,
    media_daemonset,
    only_container,
    pod_spec,
    prestop_drain,
    render,
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

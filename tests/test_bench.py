"""The benchmarks stay runnable: each one runs in its smallest configuration (``--quick``) and
must produce its figures. Their values are not checked here (STYLE.md §14: benchmarks are not
tests); docs/benchmarks.md records a full run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bench
"""Run by ``make test-bench`` (CI runs it after ``make test``): load runs, kept out of the
suite's time budget."""


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def is_figure(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_help_lists_every_benchmark() -> None:
    result = run_bench("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for name in (
        "join",
        "fanout",
        "single-port",
        "latency",
        "meetings",
        "broadcast",
        "browser-join",
        "redis",
        "simulcast",
        "all",
    ):
        assert name in result.stdout


# name -> paths (dotted, into the JSON result) that must hold numbers
FIGURES = {
    "broadcast": [
        "summary.cores_720p_3",
        "summary.encode_only_720p",
    ],
    "join": [
        "summary.joins_per_s_one_presence",
        "summary.latency_ms_at_rate.p50",
        "summary.latency_ms_at_rate.p99",
        "summary.contested_duplicates",
    ],
    "fanout": [
        "summary.node_cores_at_max",
        "summary.forwarded_pps_at_max",
        "summary.pps_per_core_at_max",
        "summary.late_first_frame_ms_all_steps.p95",
        "summary.relay_vs_spaces_ratio",
        "planes.native.pps_per_core",
        "planes.python.pps_per_core",
        "planes.native.generator_cores",
    ],
    "single-port": [
        "summary.modes.port-range.marginal_cores_per_subscriber",
        "summary.modes.single-port.marginal_cores_per_subscriber",
        "summary.modes.single-port.udp_sockets_at_max",
        "summary.modes.port-range.udp_sockets_at_max",
        "summary.modes.single-port.mux_dropped",
        "summary.single_vs_range_marginal_ratio",
        "summary.single_vs_range_cores_ratio",
    ],
    "latency": [
        "summary.added_p50_ms",
        "summary.added_p99_ms",
        "summary.direct_p50_ms",
        "summary.spaces_p99_ms",
        "python_summary.added_p50_ms",
        "python_summary.added_p99_ms",
    ],
    "meetings": [
        "summary.participants_per_core",
        "summary.node_cores_per_participant",
        "planes.python.participants_per_core",
        "planes.native.generator_cores_at_zero_loss",
    ],
    "dataplane": [
        "summary.receive_us_native",
        "summary.receive_us_python",
        "summary.per_subscriber_us_native",
        "summary.per_subscriber_us_python",
    ],
    "simulcast": [
        "summary.simulcast_vs_single_at_most",
        "summary.selection_vs_forwarding_worst",
        "summary.selection_us_per_tick",
        "summary.single_cores_at_most",
        "summary.simulcast_top_cores_at_most",
    ],
    "redis": [
        "summary.redis_us_per_participant_s",
        "summary.participants_at_70pct_core",
        "summary.redis_us_per_session",
        "summary.sessions_per_s_at_70pct_core",
        "summary.participant_in_pings",
        "summary.script_us_per_participant_s",
        "summary.script_us.renew",
        "summary.measured_participants_redis_cores",
        "summary.measured_sessions_per_s",
        "summary.measured_sessions_redis_cores",
        "baseline.redis_us_per_ping",
    ],
    "browser-join": [
        "summary.first_frame_ms.p50",
        "summary.first_frame_ms.p95",
        "summary.joined_ms.p50",
        "summary.direct_first_frame_ms.p50",
        "summary.spaces_vs_direct_p50_ratio",
    ],
}


TIMEOUT_S = {"single-port": 420}
"""A quick run's limit when it is not the default: single-port starts two clusters, one per
UDP mode."""


def lookup(document: dict[str, Any], path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_quick_run_produces_figures(name: str, tmp_path: Path) -> None:
    result = run_bench(name, "--quick", "--out", str(tmp_path), timeout=TIMEOUT_S.get(name, 240))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    document = json.loads((tmp_path / f"{name}.quick.json").read_text())
    assert document["benchmark"] == name
    assert document["machine"]["cores"] >= 1 and document["machine"]["cpu_model"]
    for path in FIGURES[name]:
        if name == "single-port" and path == "summary.single_vs_range_marginal_ratio":
            # A ratio only over a positive port-range slope: two quick steps on a busy machine
            # can give a flat or negative one, and then the bench reports none.
            ranged = document["summary"]["modes"]["port-range"]["marginal_cores_per_subscriber"]
            if not ranged > 0:
                assert lookup(document, path) is None, document["summary"]
                continue
        assert is_figure(lookup(document, path)), f"{name}: {path} = {lookup(document, path)!r}"
    assert document["targets"], "each benchmark reports its targets"
    if name == "fanout":
        # The judged late-joiner figure only counts steps where the machine had room (a busy
        # CI machine may have none); then it must be there too.
        roomy = [r for r in document["spaces"] if r["machine_busy"] <= 0.8]
        late = document["summary"]["late_first_frame_ms"]["p95"]
        assert is_figure(late) if roomy else late is None, (roomy, late)
    # The table was printed.
    assert f"## {name} (quick)" in result.stdout
    assert "| ---" in result.stdout

"""The media node's two UDP modes in one run: a port per peer connection (the port-range mode,
``SPACES_UDP_PORT_RANGE`` or ephemeral ports) against every peer connection behind one port
(``SPACES_MEDIA_UDP_PORT``, ``spaces/media/udp_mux.py``).

Each mode gets the fan-out benchmark's Spaces steps (``bench/fanout.py``: one 1 Mbps VP8
publisher, N ``decode=False`` subscribers, late joiners, one decoding sample), one mode after
the other with the same plan, load generators and measurement windows. Per step it adds the UDP
sockets the node holds (its descriptors found in /proc/net/udp) and the datagrams the mux
dropped. The comparison is single-port over port-range: node cores per subscriber at the same
N, the marginal cost per extra subscriber, and the late joiners' connect and first-frame
times."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from bench import fanout
from bench.common import fmt, percentile, say, table
from spaces.cluster import free_port

NAME = "single-port"
SUMMARY = "fan-out through a node with a port per peer connection vs one UDP port for all"

MODES = ("port-range", "single-port")

FULL = fanout.Plan(
    steps=(1, 5, 10, 20),
    relay_steps=(),
    window_s=10.0,
    warmup_s=3.0,
    late_per_step=2,
    workers=2,
)
QUICK = fanout.Plan(
    steps=(1, 2),
    relay_steps=(),
    window_s=2.0,
    warmup_s=1.0,
    late_per_step=1,
    workers=1,
    quick=True,
)

COST_LIMIT = 1.10
"""Target: single-port mode costs the node at most 10% more per extra subscriber."""


def free_udp_port() -> int:
    """A UDP port free on loopback now (and, from free_port, for TCP too)."""
    import socket

    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def udp_sockets(pid: int) -> int:
    """UDP sockets process ``pid`` holds: its socket descriptors whose inode /proc/net/udp
    (and udp6) lists."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    udp: set[str] = set()
    for table_name in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table_name}").read_text().splitlines()[1:]
        except OSError:
            continue
        udp.update(line.split()[9] for line in lines if len(line.split()) > 9)
    return len(inodes & udp)


def count_sockets(row: dict[str, Any], node_pid: int) -> None:
    row["node_udp_sockets"] = udp_sockets(node_pid)


def step_limit(row: dict[str, Any]) -> str:
    """Loss or a saturated node ends a mode's steps; a busy machine does not (unlike
    ``bench fanout``): both modes take the same steps, so that they compare at the same N on a
    machine others share, and the table shows how busy it was."""
    if not max(row["loss"], row["frame_loss"]) <= fanout.LOSS_LIMIT:
        return f"loss {max(row['loss'], row['frame_loss']):.2%}"
    if not row["frame_delivery"] >= 1 - fanout.DELIVERY_SHORTFALL:
        # No loss by sequence number, but frames did not arrive (or were never sent: the
        # publisher's connection died on an overloaded machine).
        return f"subscribers received {row['frame_delivery']:.1%} of the published frames"
    if row["server_cores"] > fanout.SATURATED:
        return f"node saturated ({row['server_cores']:.2f} cores)"
    return ""


def node_env(mode: str) -> dict[str, str]:
    if mode == "single-port":
        return {"SPACES_MEDIA_UDP_PORT": str(free_udp_port())}
    return {}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _late(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for r in rows for v in r.get(key, []) if v is not None]


def carried(row: dict[str, Any]) -> bool:
    """The step delivered the stream: no loss, and (nearly) every published frame arrived."""
    return (
        max(row["loss"], row["frame_loss"]) <= fanout.LOSS_LIMIT
        and row["frame_delivery"] >= 1 - fanout.DELIVERY_SHORTFALL
    )


def mode_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    clean = [r for r in rows if carried(r)] or rows
    largest = max(clean, key=lambda r: r["subscribers"])
    first_frame = _late(rows, "late_first_frame_ms")
    connected = _late(rows, "late_connected_ms")
    return {
        "max_subscribers_clean": largest["subscribers"],
        "marginal_cores_per_subscriber": fanout.slope(clean),
        "node_cores_at_max": largest["server_cores"],
        "pps_per_core_at_max": largest["pps_per_core"],
        "udp_sockets_at_max": largest.get("node_udp_sockets", 0),
        "mux_dropped": sum(r.get("node_mux_dropped", 0.0) for r in rows),
        "late_connected_ms_p50": percentile(connected, 50),
        "late_first_frame_ms_p50": percentile(first_frame, 50),
        "late_first_frame_ms_p95": percentile(first_frame, 95),
        "late_missing": sum(1 for r in rows for v in r.get("late_first_frame_ms", []) if v is None),
    }


def compare(by_mode: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Node cores per subscriber, single-port over port-range, at each N both modes reached."""
    ranged = {r["subscribers"]: r for r in by_mode["port-range"] if carried(r)}
    out = []
    for r in by_mode["single-port"]:
        base = ranged.get(r["subscribers"])
        if base is None or base["server_cores"] <= 0 or not carried(r):
            continue
        out.append(
            {
                "subscribers": r["subscribers"],
                "port_range_cores": base["server_cores"],
                "single_port_cores": r["server_cores"],
                "ratio": r["server_cores"] / base["server_cores"],
            }
        )
    return out


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    load_before = loadavg()
    by_mode: dict[str, list[dict[str, Any]]] = {}
    samples: dict[str, Any] = {}
    stopped: dict[str, str] = {}
    for mode in MODES:
        say(f"single-port: the node in {mode} mode")
        rows, extra = await fanout.run_spaces(
            plan,
            label=mode,
            node_env=node_env(mode),
            on_step=count_sockets,
            limit=step_limit,
            stop_on_join_failure=True,
        )
        for row in rows:
            row["mode"] = mode
        by_mode[mode] = rows
        samples[mode] = extra.get("decoded_sample")
        if extra.get("stopped"):
            stopped[mode] = extra["stopped"]
    ratios = compare(by_mode)
    # Both modes are judged over the steps both took.
    common = set.intersection(
        *({r["subscribers"] for r in rows if carried(r)} for rows in by_mode.values())
    )
    summaries = {
        mode: mode_summary([r for r in rows if r["subscribers"] in common] or rows)
        for mode, rows in by_mode.items()
    }
    ranged, single = summaries["port-range"], summaries["single-port"]
    marginal_ratio = (
        single["marginal_cores_per_subscriber"] / ranged["marginal_cores_per_subscriber"]
        if ranged["marginal_cores_per_subscriber"] > 0
        else math.nan
    )
    headline = max(ratios, key=lambda r: r["subscribers"]) if ratios else None
    summary = {
        "modes": summaries,
        "single_vs_range_marginal_ratio": marginal_ratio,
        "single_vs_range_cores_ratio": headline["ratio"] if headline else math.nan,
        "ratio_at_subscribers": headline["subscribers"] if headline else 0,
        "decoded_sample": samples,
        "stopped": stopped,
    }
    targets = [
        {
            "target": "single-port costs the node at most 10% more per extra subscriber "
            "(marginal cores, single-port over port-range)",
            "value": marginal_ratio,
            "met": marginal_ratio <= COST_LIMIT,
        },
        {
            "target": "single-port: one UDP socket for every peer connection "
            f"(N = {single['max_subscribers_clean']} subscribers + late joiners)",
            "value": single["udp_sockets_at_max"],
            "met": single["udp_sockets_at_max"] == 1,
        },
        {
            "target": "single-port: no datagram of the run dropped by the mux",
            "value": single["mux_dropped"],
            "met": single["mux_dropped"] == 0,
        },
    ]
    return {
        "config": {
            "steps": list(plan.steps),
            "window_s": plan.window_s,
            "generator_processes": plan.workers,
            "late_per_step": plan.late_per_step,
            "video": "640x480@30 VP8, encoder pinned to 1 Mbps (REMB ignored)",
            "order": list(MODES),
        },
        "load": {"loadavg_before": load_before, "loadavg_after": loadavg()},
        "spaces": [r for mode in MODES for r in by_mode[mode]],
        "ratios": ratios,
        "summary": summary,
        "targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["spaces"]:
        late = [v for v in r.get("late_first_frame_ms", []) if v is not None]
        connected = [v for v in r.get("late_connected_ms", []) if v is not None]
        rows.append(
            [
                r["mode"],
                r["subscribers"],
                f"{r['server_cores']:.3f}",
                f"{r['server_cores_per_subscriber'] * 1000:.2f}",
                fmt(r["forwarded_pps"], 0),
                fmt(r["pps_per_core"], 0),
                f"{max(r['loss'], r['frame_loss']):.3%}",
                r.get("node_udp_sockets", "-"),
                fmt(r.get("node_mux_dropped", 0), 0),
                fmt(percentile(connected, 50), 0) if connected else "-",
                fmt(percentile(late, 50), 0) if late else "-",
                f"{r['generator_cores']:.2f}",
                f"{r['foreign_cores']:.2f}",
                f"{r['machine_busy']:.0%}",
            ]
        )
    out = [
        table(
            [
                "mode",
                "N",
                "node cores",
                "millicores/sub",
                "pkt/s out",
                "pkt/s per core",
                "loss",
                "node UDP sockets",
                "mux drops",
                "late connected p50 ms",
                "late 1st frame p50 ms",
                "generator cores",
                "other work cores",
                "machine busy",
            ],
            rows,
        )
    ]
    if result["ratios"]:
        out.append("")
        out.append(
            table(
                ["N", "port-range node cores", "single-port node cores", "single / range"],
                [
                    [
                        r["subscribers"],
                        f"{r['port_range_cores']:.3f}",
                        f"{r['single_port_cores']:.3f}",
                        f"{r['ratio']:.2f}x",
                    ]
                    for r in result["ratios"]
                ],
            )
        )
    s = result["summary"]
    out.append("")
    for mode in MODES:
        m = s["modes"][mode]
        out.append(
            f"{mode}: {m['marginal_cores_per_subscriber'] * 1000:.2f} millicores per extra "
            f"subscriber; {m['udp_sockets_at_max']} UDP sockets at N = "
            f"{m['max_subscribers_clean']}; late joiners connected p50 "
            f"{fmt(m['late_connected_ms_p50'], 0)} ms, first frame p50 "
            f"{fmt(m['late_first_frame_ms_p50'], 0)} ms, p95 "
            f"{fmt(m['late_first_frame_ms_p95'], 0)} ms, {m['late_missing']} without a frame"
        )
    out.append(
        "single-port over port-range: marginal cost "
        f"{fmt(s['single_vs_range_marginal_ratio'], 2)}x, "
        f"node cores at N = {s['ratio_at_subscribers']} "
        f"{fmt(s['single_vs_range_cores_ratio'], 2)}x"
    )
    for mode, reason in (s.get("stopped") or {}).items():
        out.append(f"{mode}: stopped before its next step: {reason}")
    load = result.get("load", {})
    out.append(
        f"load average before / after: {load.get('loadavg_before')} / {load.get('loadavg_after')}"
    )
    for mode, sample in (s.get("decoded_sample") or {}).items():
        if isinstance(sample, dict):
            out.append(
                f"decoded sample ({mode}): first decoded frame "
                f"{fmt(sample.get('first_decoded_ms'), 0)} ms after joining, test pattern "
                f"intact: {fmt(sample.get('pattern_ok'))}"
            )
    return "\n".join(out)

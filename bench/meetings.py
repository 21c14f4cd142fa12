"""Meetings: k spaces of 5 participants on one media node, everyone publishing audio and video
and receiving everyone else. k grows until the node loses packets (or the machine runs out);
the result is participants per core of the node at zero loss.

Each participant publishes a VP8 640x480 30 fps stream at 1 Mbps and a 20 ms Opus stream, both
encoded once when the load generator starts and then looped (aiortc only packetizes them), so
that dozens of publishers fit on a small machine. A keyframe request restarts the video loop at
its keyframe, the way a browser answers a PLI; audio packets carry an audio level, as browsers'
do. Every participant counts each incoming track's packets by sequence number and its frames."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.cluster import Admin, Cluster, metric, scrape
from bench.common import CpuWindow, fmt, say, table, wait_quiet
from bench.ipc import Channel, Worker, stop_all
from bench.media_roles import until
from bench.peers import (
    PacketLoopTrack,
    PacketStats,
    SendRecorder,
    Window,
    encode_opus_loop,
    encode_vp8_loop,
    now_ns,
    ratio_lost,
    window_loss,
    wire_audio_level,
    wire_keyframe_requests,
)
from spaces.sdk.client import Space

NAME = "meetings"
SUMMARY = "k meetings of 5 participants (audio + video each): participants per core at 0 loss"


@dataclass(frozen=True)
class Plan:
    size: int
    steps: tuple[int, ...]
    window_s: float
    warmup_s: float
    loop_s: float
    workers: int
    quick: bool = False


FULL = Plan(
    size=5, steps=(1, 2, 3, 4, 5, 6, 8, 10), window_s=10.0, warmup_s=3.0, loop_s=10.0, workers=2
)
QUICK = Plan(size=2, steps=(1,), window_s=2.0, warmup_s=1.0, loop_s=2.0, workers=1, quick=True)


# --- participants (a worker process) --------------------------------------------------------


@dataclass
class Participant:
    space: Space
    video: PacketLoopTrack
    audio: PacketLoopTrack
    sent: SendRecorder
    incoming: dict[str, PacketStats] = field(default_factory=dict)
    """remote track id -> what this participant receives of it."""

    def attach(self) -> None:
        for remote in self.space.participants.values():
            for track in remote.tracks.values():
                if track.id not in self.incoming:
                    stats = PacketStats(now_ns(), video=track.kind == "video")
                    self.incoming[track.id] = stats
                    track.packet_listeners.append(stats.on_packet)


async def run_participants(config: dict[str, Any], channel: Channel) -> None:
    video_loop = await encode_vp8_loop(float(config["loop_s"]))
    audio_loop = encode_opus_loop(1.0)
    participants: list[Participant] = []
    channel.send({"ready": True})

    async def join(token: str) -> Participant:
        space = Space(token, config["address"], decode=False)
        me = await space.join()
        video = PacketLoopTrack("video", video_loop, 1 / 30, 90_000)
        audio = PacketLoopTrack("audio", audio_loop, 0.02, 48_000)
        local_video = await me.publish(video, "camera", width=640, height=480)
        local_audio = await me.publish(audio, "microphone")
        wire_keyframe_requests(local_video._transceiver.sender, video)
        wire_audio_level(local_audio._transceiver.sender)
        sent = SendRecorder()
        assert space._publisher_pc is not None
        sent.install(space._publisher_pc)
        return Participant(space, video, audio, sent)

    async def add(request: dict[str, Any]) -> dict[str, Any]:
        """Join one meeting (its tokens), then wait until everyone receives everyone."""
        members = [await join(token) for token in request["tokens"]]
        participants.extend(members)
        expected_tracks = 2 * (len(members) - 1)

        def everyone_flowing() -> bool:
            for p in members:
                p.attach()
                if len(p.incoming) < expected_tracks:
                    return False
                if not all(s.first_packet_ns for s in p.incoming.values()):
                    return False
            return True

        if not await until(everyone_flowing, 30.0, 0.05):
            raise RuntimeError("a meeting did not start flowing within 30 s")
        return {"participants": len(participants)}

    async def mark(_: dict[str, Any]) -> dict[str, Any]:
        for p in participants:
            p.attach()
            for stats in p.incoming.values():
                stats.start_window()
        return {"published": _published()}

    def _published() -> int:
        return sum(p.sent.frames for p in participants)

    async def report(_: dict[str, Any]) -> dict[str, Any]:
        total = Window()
        worst = 0.0
        for p in participants:
            for stats in p.incoming.values():
                window = stats.end_window()
                total.add(window)
                worst = max(worst, window_loss(window))
        return {"total": asdict(total), "worst_track_loss": worst, "published": _published()}

    async def stop(_: dict[str, Any]) -> dict[str, Any]:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(p.space.leave() for p in participants), return_exceptions=True),
                20,
            )
        return {}

    await channel.serve({"add": add, "mark": mark, "report": report, "stop": stop})


# --- the orchestrator -----------------------------------------------------------------------


async def measure(
    workers: list[Worker], pids: dict[str, int], plan: Plan, metrics_port: int
) -> dict[str, Any]:
    quiet = await wait_quiet(pids, plan.quick)
    before = scrape(metrics_port)
    marks = await asyncio.gather(*(w.call("mark") for w in workers))
    cpu = CpuWindow(pids).start()
    await asyncio.sleep(plan.window_s)
    cpu.stop()
    reports = await asyncio.gather(*(w.call("report") for w in workers))
    after = scrape(metrics_port)
    total = Window()
    for r in reports:
        total.add(Window(**r["total"]))
    return {
        "cpu": cpu,
        "total": total,
        "published_frames": sum(r["published"] for r in reports)
        - sum(m["published"] for m in marks),
        "worst_track_loss": max(r["worst_track_loss"] for r in reports),
        "forwarded": metric(after, "spaces_forwarded_packets_total")
        - metric(before, "spaces_forwarded_packets_total"),
        "dropped": metric(after, "spaces_dropped_packets_total")
        - metric(before, "spaces_dropped_packets_total"),
        "foreign_cores_before": quiet,
    }


async def run_plane(plan: Plan, plane: str) -> list[dict[str, Any]]:
    """Meetings through a node with one data plane (``SPACES_MEDIA_DATAPLANE``)."""
    cluster = Cluster()
    workers: list[Worker] = []
    rows: list[dict[str, Any]] = []
    try:
        redis_pid = cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node", SPACES_MEDIA_DATAPLANE=plane)
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        await asyncio.sleep(0.5)
        config = {"address": api.address, "loop_s": plan.loop_s}
        workers = list(
            await asyncio.gather(
                *(
                    Worker.start(f"meeting-{plane}-{i}", "meeting", config, cluster.workdir)
                    for i in range(plan.workers)
                )
            )
        )
        pids = {"node": node.pid, "api": api.pid, "redis": redis_pid}
        pids.update({f"generator-{i}": w.pid for i, w in enumerate(workers)})
        meetings = 0
        for k in plan.steps:
            say(f"meetings ({plane} plane): {k} meeting(s) of {plan.size}")
            while meetings < k:
                space_id = await admin.space()
                tokens = [key.token(space_id) for _ in range(plan.size)]
                await workers[meetings % len(workers)].call("add", limit_s=120, tokens=tokens)
                meetings += 1
            await asyncio.sleep(plan.warmup_s)
            m = await measure(workers, pids, plan, node.metrics_port)
            row = step_row(k, plan.size, m)
            row["plane"] = plane
            rows.append(row)
            say(
                f"  node {row['node_cores']:.3f} cores, {row['forwarded_pps']:.0f} pkt/s, "
                f"loss {row['loss']:.4%}, frame delivery {row['frame_delivery']:.2%}, "
                f"generators {row['generator_cores']:.2f} cores"
            )
            limit = step_limit(row)
            if limit:
                row["limit"] = limit
                say(f"  stopping: {limit}")
                break
        await admin.close()
    finally:
        await stop_all(workers)
        cluster.close()
    return rows


def plane_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    clean = [r for r in rows if r["zero_loss"]]
    best = max(clean, key=lambda r: r["participants"]) if clean else None
    return {
        "largest_zero_loss_step": best["meetings"] if best else 0,
        "participants_at_zero_loss": best["participants"] if best else 0,
        "node_cores_at_zero_loss": best["node_cores"] if best else math.nan,
        "participants_per_core": best["participants_per_core"] if best else math.nan,
        "node_cores_per_participant": best["node_cores_per_participant"] if best else math.nan,
        "generator_cores_at_zero_loss": best["generator_cores"] if best else math.nan,
        "machine_busy_at_zero_loss": best["machine_busy"] if best else math.nan,
        "foreign_cores_at_zero_loss": best["foreign_cores"] if best else math.nan,
        "limit": rows[-1].get("limit", "") if rows else "",
    }


async def run(quick: bool) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    rows = await run_plane(plan, "native")
    python_rows = await run_plane(plan, "python")
    summary = plane_summary(rows)
    python_summary = plane_summary(python_rows)
    per_core = summary["participants_per_core"]
    return {
        "config": {
            "participants_per_meeting": plan.size,
            "steps": list(plan.steps),
            "window_s": plan.window_s,
            "generator_processes": plan.workers,
            "media": "each participant: VP8 640x480@30 1 Mbps (pre-encoded loop) + Opus 20 ms",
        },
        "steps": rows,
        "python_plane": python_rows,
        "summary": summary,
        "planes": {"native": summary, "python": python_summary},
        "targets": [
            {
                "target": "5-person meetings >=100 participants per core (at 0 loss)",
                "value": per_core,
                "met": per_core >= 100,
            }
        ],
    }


def step_row(k: int, size: int, m: dict[str, Any]) -> dict[str, Any]:
    cpu: CpuWindow = m["cpu"]
    total: Window = m["total"]
    node_cores = cpu.cores("node")
    participants = k * size
    wall = cpu.wall
    expected_frames = m["published_frames"] * (size - 1)
    loss = ratio_lost(total.packets_expected, total.packets_received)
    frame_loss = ratio_lost(total.frames_expected, total.frames_received)
    return {
        "meetings": k,
        "participants": participants,
        "node_cores": node_cores,
        "node_cores_per_participant": node_cores / participants,
        "participants_per_core": participants / node_cores if node_cores else math.nan,
        "forwarded_pps": m["forwarded"] / wall,
        "pps_per_core": m["forwarded"] / wall / node_cores if node_cores else math.nan,
        "loss": loss,
        "frame_loss": frame_loss,
        "worst_track_loss": m["worst_track_loss"],
        "frame_delivery": total.frames_completed / expected_frames if expected_frames else math.nan,
        "node_dropped": m["dropped"],
        "zero_loss": loss == 0 and frame_loss == 0 and m["dropped"] == 0,
        "generator_cores": cpu.group("generator-"),
        "foreign_cores": cpu.foreign_cores(),
        "foreign_cores_before": m["foreign_cores_before"],
        "machine_busy": cpu.machine_busy,
        "own_busy": cpu.own_busy(),
        "steal": cpu.steal,
    }


def step_limit(row: dict[str, Any]) -> str:
    if not row["zero_loss"]:
        return (
            f"loss: packets {row['loss']:.3%}, frames {row['frame_loss']:.3%}, "
            f"node skipped {row['node_dropped']:.0f}"
        )
    if row["node_cores"] > 0.9:
        return f"node saturated ({row['node_cores']:.2f} cores)"
    if row["own_busy"] > 0.95:
        # The benchmark's own processes: other work on a shared machine is recorded in
        # foreign_cores (and shows as loss if it starves them).
        return f"machine busy ({row['own_busy']:.0%} of all cores by the benchmark)"
    return ""


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            r.get("plane", "native"),
            r["meetings"],
            r["participants"],
            f"{r['node_cores']:.3f}",
            f"{r['node_cores_per_participant'] * 1000:.1f}",
            fmt(r["participants_per_core"], 1),
            fmt(r["forwarded_pps"], 0),
            fmt(r["pps_per_core"], 0),
            f"{r['loss']:.3%}",
            f"{r['frame_loss']:.3%}",
            f"{r['frame_delivery']:.1%}",
            f"{r['generator_cores']:.2f}",
            f"{r['machine_busy']:.0%}",
        ]
        for r in result["steps"] + result.get("python_plane", [])
    ]
    s = result["summary"]
    planes = "".join(
        f"\n{name} plane: {fmt(p['participants_per_core'], 1)} participants per core at 0 loss "
        f"({p['participants_at_zero_loss']} participants on {fmt(p['node_cores_at_zero_loss'], 3)} "
        f"node cores, generators {fmt(p['generator_cores_at_zero_loss'], 2)} cores, machine "
        f"{fmt(p['machine_busy_at_zero_loss'] * 100, 0)}% busy, other work "
        f"{fmt(p['foreign_cores_at_zero_loss'], 2)} cores; stopped by: {p['limit'] or '-'})"
        for name, p in result.get("planes", {}).items()
    )
    return (
        table(
            [
                "plane",
                "meetings",
                "participants",
                "node cores",
                "millicores/participant",
                "participants/core",
                "pkt/s out",
                "pkt/s per core",
                "packet loss",
                "frame loss",
                "frames delivered",
                "generator cores",
                "machine busy",
            ],
            rows,
        )
        + f"\n\nparticipants per core at 0 loss: {fmt(s['participants_per_core'], 1)} "
        f"({s['participants_at_zero_loss']} participants in {s['largest_zero_loss_step']} "
        f"meetings on {fmt(s['node_cores_at_zero_loss'], 3)} node cores)" + planes
    )

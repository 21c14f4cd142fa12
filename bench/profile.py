"""Where the time goes: ``python -m bench profile <target> [--quick]`` puts a representative
load on one process and samples it with py-spy (a dev dependency), then writes the functions
that hold the CPU to bench/results/profile-<target>.txt.

Profiling is a separate run from the measurements: py-spy pauses the process it samples, which
would distort the benchmark's own figures.

targets:
  node        the media node forwarding one publisher to N subscribers (fanout)
  generator   one subscriber load-generator process in that same run
  presence    one presence process under closed-loop joins
  meetings    the media node carrying 5-person meetings (audio + video, everyone to everyone)

--native also samples C frames, which shows the system calls (sendto, send) and SRTP.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    CpuWindow,
    describe_machine,
    machine,
    say,
    source_version,
)

TARGETS = ("node", "generator", "presence", "meetings")
MAIN_THREAD_MARKERS = ("cli.py", "bench/worker.py")
IDLE_LEAVES = (
    "EpollSelector.select",
    "_PollLikeSelector.select",
    "select.epoll.poll",
    "epoll_wait",
    "poll (libc",
)
"""py-spy cannot always tell that a thread blocked in epoll is idle: such samples are idle."""
"""A stack that passes through the process's entry point is the event loop's thread; the rest
are gRPC and metrics threads, mostly idle in select/poll."""


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install -e '.[dev]'`")
    return found


NATIVE = False
"""--native: also sample C frames (system calls, SRTP, grpc's core), named by library."""


async def record(pid: int, seconds: float, out: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        py_spy(),
        "record",
        *(["--native"] if NATIVE else []),
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0 or not await asyncio.to_thread(out.exists):
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")


_LOCATION = re.compile(r" \((?:[^()]*/)?(site-packages/|lib/python3\.\d+/)?([^()]*?)(?::\d+)?\)$")


def function_name(frame: str) -> str:
    """'DownTrack.forward (/work/main/media-node/spaces/media/forwarding.py:211)' ->
    'DownTrack.forward (forwarding.py)'."""
    match = _LOCATION.search(frame)
    if not match:
        return frame
    path = match.group(2)
    name = frame[: match.start()]
    if name.startswith("0x"):  # an unsymbolized native frame: its library is enough
        name = "?"
    return f"{name} ({path.rsplit('/', 1)[-1]})"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    main = other = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if not any(marker in stack for marker in MAIN_THREAD_MARKERS):
            other += count
            continue
        frames = [function_name(f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        main += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {
        "samples_main_thread": main,
        "samples_idle": idle,
        "samples_other_threads": other,
        "self": [(name, n / main) for name, n in self_time.most_common(top)] if main else [],
        # Frames on every stack (the entry point, the event loop) say nothing: left out.
        "inclusive": [(name, n / main) for name, n in inclusive.most_common() if n < 0.98 * main][
            : top + 10
        ]
        if main
        else [],
    }


def render(target: str, load: str, cpu: dict[str, float], summary: dict[str, Any]) -> str:
    lines = [
        f"profile: {target}",
        f"command: python -m bench profile {target}{' --native' if NATIVE else ''}",
        f"machine: {describe_machine(machine())}",
        f"commit: {source_version()['commit']}",
        f"load: {load}",
        "CPU during the profile (cores): "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(cpu.items())),
        f"samples: {summary['samples_main_thread']} busy on the event loop thread at 100 Hz "
        f"(idle in epoll: {summary['samples_idle']}; other threads: "
        f"{summary['samples_other_threads']}; neither counted below)",
        "",
        "self time (share of event-loop samples):",
    ]
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["self"]]
    lines += ["", "inclusive time (share of event-loop samples):"]
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["inclusive"]]
    return "\n".join(lines) + "\n"


async def profile_fanout(
    target: str, subscribers: int, seconds: float, raw: Path
) -> tuple[str, dict[str, float]]:
    from bench.cluster import Admin, Cluster
    from bench.fanout import QUICK, System

    cluster = Cluster()
    system = System("profile", cluster, replace(QUICK, workers=1 if subscribers <= 2 else 2))
    try:
        cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node")
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        space_id = await admin.space(max_participants=1000)
        await admin.close()
        await asyncio.sleep(0.5)
        system.tokens = lambda: key.token(space_id, role="subscriber")
        system.sub_config = {"mode": "spaces", "address": api.address}
        await system.start_generators(
            {"mode": "spaces", "token": key.token(space_id), "address": api.address}
        )
        await system.grow(subscribers)
        await asyncio.sleep(3)
        pids = {"node": node.pid, **system.pids}
        pid = node.pid if target == "node" else system.pids["generator-0"]
        cpu = CpuWindow(pids).start()
        await record(pid, seconds, raw)
        cpu.stop()
        return f"one publisher (VP8 1 Mbps) to {subscribers} subscribers", dict(cpu.result)
    finally:
        await system.close()
        cluster.close()


async def profile_presence(seconds: float, raw: Path) -> tuple[str, dict[str, float]]:
    from bench.join import Setup

    setup = Setup(1)
    try:
        await setup.start(1, 8)
        pid = setup.pids["presence-0"]
        joins = asyncio.create_task(
            setup.generators[0].call(
                "closed", tokens=setup.tokens, duration_s=seconds + 3, concurrency=32
            )
        )
        await asyncio.sleep(1.0)
        cpu = CpuWindow(dict(setup.pids)).start()
        await record(pid, seconds, raw)
        cpu.stop()
        reply = await joins
        rate = len(reply["latency_ms"]) / reply["wall_s"]
        return f"closed-loop joins, 32 in flight: {rate:.0f} joins/s", dict(cpu.result)
    finally:
        await setup.close()


async def profile_meetings(
    meetings: int, seconds: float, raw: Path
) -> tuple[str, dict[str, float]]:
    from bench.cluster import Admin, Cluster
    from bench.ipc import Worker, stop_all
    from bench.meetings import FULL

    cluster = Cluster()
    workers: list[Worker] = []
    try:
        redis_pid = cluster.start_redis()
        api = cluster.start_spaces("api", "serve", "--services", "control,auth,presence")
        node = cluster.start_spaces("node", "media-node")
        await asyncio.gather(cluster.wait_serving(api), cluster.wait_serving(node))
        admin = Admin(api.address, cluster.admin_key)
        key = await admin.signing_key()
        config = {"address": api.address, "loop_s": FULL.loop_s}
        workers = list(
            await asyncio.gather(
                *(
                    Worker.start(f"meeting-{i}", "meeting", config, cluster.workdir)
                    for i in range(FULL.workers)
                )
            )
        )
        for k in range(meetings):
            space_id = await admin.space()
            tokens = [key.token(space_id) for _ in range(FULL.size)]
            await workers[k % len(workers)].call("add", limit_s=120, tokens=tokens)
        await admin.close()
        await asyncio.sleep(3)
        pids = {"node": node.pid, "api": api.pid, "redis": redis_pid}
        pids.update({f"generator-{i}": w.pid for i, w in enumerate(workers)})
        cpu = CpuWindow(pids).start()
        await record(node.pid, seconds, raw)
        cpu.stop()
        return f"{meetings} meetings of {FULL.size} (audio + video)", dict(cpu.result)
    finally:
        await stop_all(workers)
        cluster.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--quick", action="store_true", help="a few seconds, small load")
    parser.add_argument("--subscribers", type=int, default=40, help="fanout load (node, generator)")
    parser.add_argument("--meetings", type=int, default=2, help="meetings load")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--native", action="store_true", help="include C frames (system calls, SRTP, grpc core)"
    )
    args = parser.parse_args(argv)
    global NATIVE
    NATIVE = args.native
    seconds = 3.0 if args.quick else 15.0
    subscribers = 2 if args.quick else args.subscribers
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"profile-{args.target}.raw"
    started = time.monotonic()
    say(f"profile {args.target}: setting up the load")
    if args.target == "presence":
        load, cpu = asyncio.run(profile_presence(seconds, raw))
    elif args.target == "meetings":
        load, cpu = asyncio.run(profile_meetings(1 if args.quick else args.meetings, seconds, raw))
    else:
        load, cpu = asyncio.run(profile_fanout(args.target, subscribers, seconds, raw))
    text = render(args.target, load, cpu, summarize(raw))
    raw.unlink()
    suffix = ("-native" if args.native else "") + (".quick" if args.quick else "")
    path = args.out / f"profile-{args.target}{suffix}.txt"
    path.write_text(text)
    print(text)
    say(f"written: {path} ({time.monotonic() - started:.0f} s)")
    return 0

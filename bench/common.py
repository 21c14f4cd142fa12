"""Shared pieces of the benchmarks: the machine description, CPU accounting from /proc,
percentiles, result files and the printed tables."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it, with family/model when the name is vague."""
    name, family, model = "unknown", "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and name == "unknown":
                name = value
            elif key == "cpu family" and not family:
                family = value
            elif key == "model" and not model:
                model = value
    except OSError:
        pass
    if family:
        name += f" (family {family}, model {model})"
    return name


def hypervisor() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    if " hypervisor" not in flags:
        return ""
    try:
        out = subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "yes"
    for line in out.splitlines():
        if line.startswith("Hypervisor vendor:"):
            return line.split(":", 1)[1].strip()
    return "yes"


def machine() -> dict[str, Any]:
    import aiortc
    import grpc

    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cores": os.cpu_count() or 0,
        "cpu_model": cpu_model(),
        "hypervisor": hypervisor(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "grpcio": grpc.__version__,
    }


def describe_machine(info: dict[str, Any]) -> str:
    vm = f", {info['hypervisor']} guest" if info.get("hypervisor") else ""
    return (
        f"{info['cores']} cores, {info['cpu_model']}{vm}, {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}, aiortc {info['aiortc']}"
    )


# --- CPU accounting -------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces; fields after it are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from /proc/stat.
    Busy excludes idle, iowait and steal (time the hypervisor gave to someone else)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    steal = values[7]
    total = sum(values)
    return (total - idle - steal) / CLOCK_TICKS, steal / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class CpuWindow:
    """CPU used by named processes (and the whole machine) over a window of wall time."""

    pids: dict[str, int]
    started: float = 0.0
    _start: dict[str, float] = field(default_factory=dict)
    _machine: tuple[float, float, float] = (0.0, 0.0, 0.0)
    result: dict[str, float] = field(default_factory=dict)
    """name -> cores used on average (CPU seconds per wall second)."""
    wall: float = 0.0
    machine_busy: float = 0.0
    """Busy fraction of all cores together (0..1), by every process on the machine."""
    steal: float = 0.0
    """Fraction of all cores' time the hypervisor gave to other guests."""

    def start(self) -> CpuWindow:
        self.started = time.monotonic()
        self._start = {name: _cpu_or_zero(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu_seconds()
        return self

    def stop(self) -> CpuWindow:
        self.wall = time.monotonic() - self.started
        for name, pid in self.pids.items():
            used = _cpu_or_zero(pid) - self._start[name]
            self.result[name] = used / self.wall if self.wall > 0 else 0.0
        busy, steal, total = machine_cpu_seconds()
        spent_total = total - self._machine[2]
        if spent_total > 0:
            self.machine_busy = (busy - self._machine[0]) / spent_total
            self.steal = (steal - self._machine[1]) / spent_total
        return self

    def foreign_cores(self) -> float:
        """Cores busy with processes other than the measured ones (other work on the
        machine competing with the benchmark)."""
        cores = os.cpu_count() or 1
        return max(0.0, self.machine_busy * cores - sum(self.result.values()))

    def own_busy(self) -> float:
        """Busy fraction of all cores, counting only the measured processes: what the
        benchmark itself asks of the machine, whatever else runs beside it."""
        cores = os.cpu_count() or 1
        return min(1.0, sum(self.result.values()) / cores)

    def cores(self, *names: str) -> float:
        return sum(self.result.get(n, 0.0) for n in names)

    def group(self, prefix: str) -> float:
        return sum(v for k, v in self.result.items() if k.startswith(prefix))


QUIET_FOREIGN_CORES = 0.15
"""Before a measurement window, wait until other work on the machine uses less than this."""
QUIET_WAIT_S = float(os.environ.get("SPACES_BENCH_QUIET_WAIT_S", "30"))
"""How long to wait for a quiet machine; ``SPACES_BENCH_QUIET_WAIT_S`` shortens it on a
machine that other work keeps busy (the wait would only add to every step)."""


async def wait_quiet(
    pids: dict[str, int], quick: bool, threshold: float = QUIET_FOREIGN_CORES
) -> float:
    """The machine may be shared (other test runs, builds): before measuring, wait up to
    ``QUIET_WAIT_S`` for processes other than ``pids`` to use less than ``threshold`` cores,
    sampled over one second. Returns the last sample; results record it either way."""
    import asyncio

    deadline = time.monotonic() + (0 if quick else QUIET_WAIT_S)
    waited = False
    while True:
        window = CpuWindow(pids).start()
        await asyncio.sleep(0.1 if quick else 1.0)
        foreign = window.stop().foreign_cores()
        if foreign < threshold or time.monotonic() > deadline:
            if waited:
                say(f"  other work on the machine now {foreign:.2f} cores: measuring")
            return foreign
        if not waited:
            say(f"  other work on the machine uses {foreign:.2f} cores: waiting for it to settle")
            waited = True


def _cpu_or_zero(pid: int) -> float:
    try:
        return process_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return 0.0


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


# --- results --------------------------------------------------------------------------------


def source_version() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it (read-only git)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if len(line) > 3]
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_product_files": sorted(
            f for f in changed if not f.startswith(("bench/", "docs/", "tests/"))
        ),
    }


def command_line(name: str, quick: bool) -> str:
    return f"python -m bench {name}" + (" --quick" if quick else "")


def write_result(
    out_dir: Path,
    name: str,
    quick: bool,
    data: dict[str, Any],
    started: float,
    source: dict[str, Any] | None = None,
) -> Path:
    """bench/results/<name>.json (<name>.quick.json for --quick, so that a quick run never
    overwrites the recorded full run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}.quick.json" if quick else f"{name}.json")
    document = {
        "benchmark": name,
        "command": command_line(name, quick),
        "quick": quick,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "source": source or source_version(),
        **data,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(document), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# --- tables ---------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into docs)."""
    cells = [[str(h) for h in headers]] + [
        [c if isinstance(c, str) else fmt(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")
        if n == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def say(message: str) -> None:
    """Progress goes to stderr; tables and results to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)

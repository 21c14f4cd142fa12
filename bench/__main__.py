"""``python -m bench <name> [--quick]``: run one benchmark (or ``all``), print its table and
write bench/results/<name>.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    describe_machine,
    machine,
    say,
    source_version,
    write_result,
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    run: Callable[[bool], Coroutine[Any, Any, dict[str, Any]]]
    render: Callable[[dict[str, Any]], str]


def benchmarks() -> dict[str, Benchmark]:
    from bench import (
        broadcast,
        browser_join,
        dataplane,
        fanout,
        join,
        latency,
        meetings,
        redis_ceiling,
        simulcast,
        single_port,
    )

    return {
        m.NAME: Benchmark(m.NAME, m.SUMMARY, m.run, m.render)
        for m in (
            join,
            fanout,
            single_port,
            latency,
            meetings,
            dataplane,
            simulcast,
            broadcast,
            browser_join,
            redis_ceiling,
        )
    }


def render_targets(result: dict[str, Any]) -> str:
    lines = []
    for t in result.get("targets", []):
        value = t["value"]
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: measured {shown}")
    return "\n".join(lines)


def run_one(bench: Benchmark, quick: bool, out_dir: Path) -> dict[str, Any]:
    started = time.time()
    source = source_version()  # what the processes about to start will load
    say(f"{bench.name}: {bench.summary}{' (quick)' if quick else ''}")
    result = asyncio.run(bench.run(quick))
    path = write_result(out_dir, bench.name, quick, result, started, source)
    print(f"\n## {bench.name}{' (quick)' if quick else ''}\n")
    print(bench.render(result))
    targets = render_targets(result)
    if targets:
        print("\ntargets:\n" + targets)
    print(f"\nwritten: {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "profile":
        from bench import profile

        return profile.main(argv[1:])
    known = benchmarks()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Spaces benchmarks. Each prints a table and writes "
        "bench/results/<name>.json (<name>.quick.json with --quick).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks:\n"
        + "\n".join(f"  {b.name:<12} {b.summary}" for b in known.values())
        + "\n  all          every benchmark above, in this order"
        + "\n\nwhere the time goes: python -m bench profile {node,generator,presence,meetings}",
    )
    parser.add_argument("name", choices=[*known, "all"], help="which benchmark to run")
    parser.add_argument(
        "--quick", action="store_true", help="smallest configuration (seconds, for tests)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    say(f"machine: {describe_machine(machine())}")
    chosen = list(known.values()) if args.name == "all" else [known[args.name]]
    failed = []
    for bench in chosen:
        try:
            run_one(bench, args.quick, args.out)
        except Exception as exc:
            logging.getLogger("bench").exception("%s failed", bench.name)
            failed.append(f"{bench.name}: {exc}")
    if failed:
        print(json.dumps({"failed": failed}, indent=2), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

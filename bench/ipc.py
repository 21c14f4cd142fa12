"""Load generators run as separate processes (`python -m bench.worker ROLE`), driven over
their stdin/stdout with one JSON object per line: the orchestrator sends ``{"cmd": ...}`` and
reads exactly one reply per command. The first line a worker writes is ``{"ready": ...}``.
Everything else a worker prints (logs, library chatter) goes to its stderr, into a log file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from bench.common import ROOT

REPLY_TIMEOUT_S = 120.0


class WorkerError(RuntimeError):
    pass


class Worker:
    """The orchestrator's handle on one worker process."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.ready: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @classmethod
    async def start(
        cls, name: str, role: str, config: dict[str, Any], logdir: Path, limit_s: float = 180.0
    ) -> Worker:
        log = logdir / f"{name}.log"
        handle = log.open("wb")
        env = dict(os.environ)
        env.setdefault("SPACES_ICE_BIND", "127.0.0.1")
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.worker",
            role,
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=handle,
            cwd=ROOT,
            env=env,
            limit=64 * 1024 * 1024,
        )
        handle.close()
        worker = cls(name, proc, log)
        worker.ready = await worker._read(limit_s)
        return worker

    async def _read(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        except TimeoutError as exc:
            raise WorkerError(f"{self.name}: no reply in {limit_s:.0f}s\n{self.tail()}") from exc
        if not line:
            await self.proc.wait()
            raise WorkerError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {reply['error']}\n{self.tail()}")
        return reply

    async def call(self, cmd: str, limit_s: float = REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        async with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            return await self._read(limit_s)

    async def stop(self, limit_s: float = 20.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("stop", limit_s=limit_s)
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 5)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def stop_all(workers: list[Worker]) -> None:
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    workers.clear()


# --- the worker side ------------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Channel:
    """stdin commands in, JSON replies out on the real stdout (sys.stdout is sent to stderr so
    that nothing else can corrupt the protocol)."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        sys.stdout = sys.stderr

    def send(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()

    async def serve(self, handlers: dict[str, Handler]) -> None:
        """Answer commands until ``stop`` (which replies, then returns) or end of input."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return
            request = json.loads(line)
            cmd = request.pop("cmd")
            if cmd == "stop":
                stop = handlers.get("stop")
                reply = await stop(request) if stop else {}
                self.send({"ok": True, **reply})
                return
            handler = handlers.get(cmd)
            if handler is None:
                self.send({"error": f"unknown command {cmd!r}"})
                continue
            try:
                self.send({"ok": True, **(await handler(request))})
            except Exception as exc:  # reported to the orchestrator, which fails the run
                import traceback

                traceback.print_exc()
                self.send({"error": f"{cmd}: {type(exc).__name__}: {exc}"})

"""The broadcaster worker: claims broadcasts with a lease and runs a composer process for each.

* **Claim**: every ``poll_interval`` a worker with free capacity reads the due broadcasts
  (every shard's keys.broadcast_queue_key) and claims some with SET NX PX on their lease. A
  worker that dies stops renewing; its lease lapses after ``lease_ms`` and another worker claims
  the broadcast, so a stream resumes within one lease period plus start-up.
* **Renew**: every ``renew_interval`` it renews each lease and reports whether frames reach the
  RTMP server and the last error. "stopped" (StopBroadcast, the space went idle) ends the
  composer gracefully; "lost" (another worker holds it now) kills it at once. If Redis cannot be
  reached for about a lease period, the composer is killed too: this worker can no longer prove
  it holds the broadcast, and two composers must never push one stream.
* **Composer**: one child process per broadcast (spaces.broadcast.composer). A composer that
  exits (its RTMP server stalled, it crashed) or stops reporting for ``watchdog_ms`` is killed
  and started again with backoff. Its hidden subscriber tickets come from here (the store's
  JOIN_HIDDEN, which only the lease holder can use): composers hold no credentials at all.
* **Drain**: on SIGTERM a worker takes no new broadcasts, stops its composers and releases their
  leases (due at once), so other workers take them over without waiting for a lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2

from spaces import errors, ids, metrics
from spaces.broadcast.composer import EXIT_STALLED, Job
from spaces.config import ServerConfig
from spaces.presence import credentials
from spaces.routing.registry import NodeDirectory
from spaces.store.base import BroadcastJob, HiddenReservation, Store
from spaces.tasks import cancel_and_wait, spawn

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "spaces.broadcaster"
"""gRPC health name: SERVING while this worker takes broadcasts, NOT_SERVING once it drains."""
STOP_GRACE_S = 5.0
COMPOSER_STARTUP_S = 30.0
"""How long a new composer may take to send its first status (the watchdog applies after)."""
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (Linux /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class BroadcasterPool:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        *,
        health: Any = None,
        local_address: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.broadcast
        self.store = store
        self.worker_id = self.settings.worker_id or f"broadcaster-{ids.new_node_suffix()}"
        self.directory = NodeDirectory(store, config.registry)
        self.runs: dict[tuple[str, str], BroadcastRun] = {}
        self._health = health
        self._draining = False
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever(), name="broadcast-claims")
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "broadcaster %s taking up to %d broadcast(s)",
            self.worker_id,
            self.settings.max_broadcasts,
        )

    async def _set_health(self, status: int) -> None:
        if self._health is not None:
            await self._health.set(HEALTH_SERVICE, status)

    async def _poll_forever(self) -> None:
        interval = self.settings.poll_interval_ms / 1000
        while not self._draining:
            try:
                await self.claim_some()
            except errors.StoreUnavailable:
                pass
            except Exception:
                logger.exception("broadcaster %s: claiming failed", self.worker_id)
            # Jitter spreads broadcasts over workers that poll at the same moment.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    async def claim_some(self) -> int:
        free = self.settings.max_broadcasts - len(self.runs)
        if free <= 0 or self._draining:
            return 0
        due = [d for d in await self.store.broadcasts_due(free * 4) if d not in self.runs]
        random.shuffle(due)
        claimed = 0
        for space_id, broadcast_id in due:
            if claimed >= free or self._draining:
                break
            holder = f"{self.worker_id} {secrets.token_hex(8)}"
            job = await self.store.claim_broadcast(
                space_id, broadcast_id, holder, self.worker_id, self.settings.lease_ms
            )
            if job is None:
                continue
            claimed += 1
            metrics.BROADCAST_CLAIMS.inc()
            run = BroadcastRun(self, job)
            self.runs[(space_id, broadcast_id)] = run
            run.start()
            logger.info(
                "broadcaster %s took broadcast %s of space %s (run %s)",
                self.worker_id,
                broadcast_id,
                space_id,
                job.run,
            )
        metrics.BROADCASTS_ACTIVE.set(len(self.runs))
        return claimed

    def run_ended(self, run: BroadcastRun) -> None:
        key = (run.job.space_id, run.job.broadcast_id)
        if self.runs.get(key) is run:
            del self.runs[key]
        metrics.BROADCASTS_ACTIVE.set(len(self.runs))

    async def drain(self) -> None:
        """Take nothing new; hand every broadcast over (stop its composer, release its lease)."""
        if not self._draining:
            self._draining = True
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            logger.info("broadcaster %s draining: %d broadcast(s)", self.worker_id, len(self.runs))
        await asyncio.gather(
            *(run.stop(release=True) for run in list(self.runs.values())), return_exceptions=True
        )

    async def stop(self) -> None:
        await self.drain()
        await cancel_and_wait(self._poller)


class BroadcastRun:
    """One claimed broadcast: its lease renewal and its composer process."""

    def __init__(self, pool: BroadcasterPool, job: BroadcastJob) -> None:
        self.pool = pool
        self.job = job
        self.settings = pool.settings
        self.status: dict[str, Any] = {}
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._ended = asyncio.Event()
        self._graceful = True
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._last_counts: dict[str, int] = {}
        self._cpu: tuple[float, float] | None = None
        self._label = job.broadcast_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"broadcast-{self._label}")
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"lease-{self._label}")

    def end(self, graceful: bool) -> None:
        if not self._ended.is_set():
            self._graceful = graceful
            self._ended.set()

    async def stop(self, release: bool) -> None:
        self.end(graceful=True)
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
        await cancel_and_wait(self._renewer)
        if release:
            try:
                await self.pool.store.release_broadcast(
                    self.job.space_id, self.job.broadcast_id, self.job.holder
                )
                metrics.BROADCAST_HANDOVERS.inc()
            except errors.StoreUnavailable:
                pass  # the lease lapses instead

    # --- the lease ------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        interval = self.settings.renew_interval_ms / 1000
        lease_s = self.settings.lease_ms / 1000
        last_ok = time.monotonic()
        while not self._ended.is_set():
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                result = await self.pool.store.renew_broadcast(
                    self.job.space_id,
                    self.job.broadcast_id,
                    self.job.holder,
                    self.settings.lease_ms,
                    self.job.run,
                    bool(self.status.get("streaming")),
                    str(self.status.get("error", ""))[:500],
                )
            except errors.StoreUnavailable:
                # Measured from before the last successful renewal was sent: never outlive it.
                if time.monotonic() - last_ok > lease_s - interval:
                    logger.warning("broadcast %s: lease unconfirmed; stopping", self._label)
                    self.end(graceful=False)
                continue
            if result == "ok":
                last_ok = sent
            else:
                logger.info("broadcast %s: %s; ending its composer", self._label, result)
                self.end(graceful=result == "stopped")

    # --- the composer -----------------------------------------------------------------------

    def _job(self) -> Job:
        width, _, height = self.job.resolution.partition("x")
        key = self.job.stream_key
        return Job(
            broadcast_id=self.job.broadcast_id,
            space_id=self.job.space_id,
            layout=self.job.layout,
            width=int(width),
            height=int(height),
            rtmp_url=f"{self.job.rtmp_url}/{key}" if key else self.job.rtmp_url,
            background=self.job.background,
            encoder=self.settings.video_encoder,
            encoder_options=dict(self.settings.video_options),
            video_kbps=self.settings.video_kbps,
            audio_kbps=self.settings.audio_kbps,
            rtmp_timeout_s=self.settings.rtmp_timeout_ms / 1000,
            retry_initial_s=self.settings.retry_initial_ms / 1000,
            retry_max_s=self.settings.retry_max_ms / 1000,
            ice_addresses=list(self.pool.config.node.ice_bind_addresses),
        )

    async def _supervise(self) -> None:
        backoff = self.settings.retry_initial_ms / 1000
        try:
            while not self._ended.is_set():
                started = time.monotonic()
                code = await self._run_composer()
                if self._ended.is_set():
                    break
                if code == EXIT_STALLED:
                    metrics.BROADCAST_ERRORS.labels(kind="rtmp_stall").inc()
                else:
                    metrics.BROADCAST_ERRORS.labels(kind="composer_exit").inc()
                    logger.warning("broadcast %s: composer exited with %s", self._label, code)
                self.restarts += 1
                if time.monotonic() - started > 60:
                    backoff = self.settings.retry_initial_ms / 1000
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * random.uniform(0.8, 1.2)):
                        await self._ended.wait()
                backoff = min(backoff * 2, self.settings.retry_max_ms / 1000)
        finally:
            with contextlib.suppress(KeyError):
                metrics.BROADCAST_CPU.remove(self._label)
            self.pool.run_ended(self)

    async def _run_composer(self) -> int | None:
        env = {**os.environ, "SPACES_COMPOSER_PARENT": str(os.getpid())}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spaces.broadcast.composer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=1024 * 1024,
        )
        self.process = process
        self._cpu = None
        assert process.stdin is not None and process.stdout is not None
        self._write(process, self._job().to_json())
        reader = asyncio.create_task(self._read(process), name=f"composer-out-{self._label}")
        ended = asyncio.create_task(self._ended.wait())
        try:
            await asyncio.wait({reader, ended}, return_when=asyncio.FIRST_COMPLETED)
            if self._ended.is_set():
                await self._end_composer(process)
            return await process.wait()
        finally:
            ended.cancel()
            reader.cancel()
            if process.returncode is None:
                process.kill()
                await process.wait()
            self.process = None

    async def _end_composer(self, process: asyncio.subprocess.Process) -> None:
        if self._graceful and process.returncode is None:
            self._write(process, {"type": "stop"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        if process.returncode is None:
            process.kill()

    def _write(self, process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert process.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write((json.dumps(message) + "\n").encode())

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        """Status lines and ticket requests, until the composer exits or goes silent."""
        assert process.stdout is not None
        watchdog = self.settings.watchdog_ms / 1000
        # A new composer imports PyAV, numpy and aiortc first: seconds on a busy machine (8 s
        # measured at load 18 on 2 cores), which must not count as hanging.
        limit = max(watchdog, COMPOSER_STARTUP_S)
        while True:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), limit)
            except TimeoutError:
                logger.warning(
                    "broadcast %s: composer silent for %.0fs; killing", self._label, limit
                )
                metrics.BROADCAST_ERRORS.labels(kind="watchdog").inc()
                process.kill()
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("type") == "status":
                limit = watchdog
                self._on_status(process, message)
            elif message.get("type") == "ticket_request":
                spawn(self._send_ticket(process), name=f"ticket-{self._label}")

    def _on_status(self, process: asyncio.subprocess.Process, status: dict[str, Any]) -> None:
        self.status = status
        for name, counter in (
            ("frames_composed", metrics.BROADCAST_FRAMES.labels(result="composed")),
            ("frames_dropped", metrics.BROADCAST_FRAMES.labels(result="dropped")),
            ("encoder_errors", metrics.BROADCAST_ERRORS.labels(kind="encoder")),
            ("rtmp_errors", metrics.BROADCAST_ERRORS.labels(kind="rtmp")),
        ):
            value = int(status.get(name, 0))
            delta = value - self._last_counts.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._last_counts[name] = value
        cpu, now = process_cpu_seconds(process.pid), time.monotonic()
        if cpu is not None:
            if self._cpu is not None and now > self._cpu[1]:
                cores = (cpu - self._cpu[0]) / (now - self._cpu[1])
                metrics.BROADCAST_CPU.labels(broadcast_id=self._label).set(round(cores, 3))
                self.status["cpu_cores"] = cores
            self._cpu = (cpu, now)

    async def _send_ticket(self, process: asyncio.subprocess.Process) -> None:
        try:
            reply = await self._mint_ticket()
        except errors.SpacesError as exc:
            if isinstance(exc, errors.BroadcastLeaseLost):
                self.end(graceful=False)
            reply = {"type": "ticket_error", "message": exc.message}
        except Exception as exc:
            logger.exception("broadcast %s: ticket failed", self._label)
            reply = {"type": "ticket_error", "message": str(exc)}
        if process.returncode is None:
            self._write(process, reply)

    async def _mint_ticket(self) -> dict[str, Any]:
        job = self.job
        connection_id = ids.new_connection_id()
        participant_id = f"broadcast-{job.broadcast_id}-{ids.new_node_suffix()}"
        ticket = credentials.issue(job.space_id, connection_id)
        node_id, _ = await self.pool.store.join_hidden(
            HiddenReservation(
                space_id=job.space_id,
                connection_id=connection_id,
                participant_id=participant_id,
                display_name="broadcast",
                ticket_hash=ticket.hash,
                pending_ms=self.pool.config.leases.pending_ms,
                broadcast_id=job.broadcast_id,
                holder=job.holder,
            )
        )
        node = await self.pool.directory.get(node_id)
        if node is None:
            raise errors.NoMediaNode()
        return {
            "type": "ticket",
            "space_id": job.space_id,
            "participant_id": participant_id,
            "connection_id": connection_id,
            "media_address": node.address,
            "node_id": node_id,
            "ticket": ticket.secret,
        }

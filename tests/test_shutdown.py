"""Stopping a server with people connected, as a developer at a terminal does it.

`make run` (one process, in-memory store) has no other media node to move sessions to: Ctrl-C
ends them at once as "server stopping", and clients do not retry. A distributed server drains
for SPACES_DRAIN_GRACE_SECONDS on the first interrupt; a second one stops it at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack
from spaces.store.redis import RedisStore
from spaces.v1 import node_pb2
from tests.support.redis_server import RedisServer
from tests.support.system import (
    Admin,
    Process,
    Tenant,
    eventually,
    free_port,
    wait_serving,
)

ROOT = Path(__file__).resolve().parent.parent
DRAIN_GRACE_S = 30.0


def events_of(stream: sdk.EventStream) -> list[sdk.SpaceEvent]:
    seen = []
    while (event := stream.get_nowait()) is not None:
        seen.append(event)
    return seen


async def test_ctrl_c_on_make_run_ends_sessions_as_server_stopping(tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115, ASYNC230
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything awaits
        ["make", "-s", "run"],
        cwd=ROOT,
        env={
            **os.environ,
            "SPACES_ADMIN_KEY": "test-admin-key",
            "SPACES_GRPC_ADDR": f"127.0.0.1:{port}",
            "SPACES_METRICS_ADDR": "",
            "SPACES_DRAIN_GRACE_SECONDS": str(DRAIN_GRACE_S),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    space: sdk.Space | None = None
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, timeout=60)
        admin = Admin(address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        await admin.close()
        space = sdk.Space(tenant.token(space_id, "alice"), address)
        events = space.events()
        await space.join()
        await space.local.publish(TestPatternTrack((10, 200, 10)), "camera")

        # Ctrl-C at the terminal: SIGINT to the whole foreground group (make and spaces).
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        await eventually(lambda: space.state == "closed", timeout=10)
        ended = [e for e in events_of(events) if isinstance(e, sdk.Disconnected)]
        assert [e.reason for e in ended] == ["server_stopping"], ended
        assert await asyncio.to_thread(proc.wait, 15) is not None
        # Far sooner than the drain grace, which a single process has no use for.
        assert time.monotonic() - interrupted < 10
        await asyncio.sleep(1.0)  # the SDK would have tried again by now
        assert not [e for e in events_of(events) if isinstance(e, sdk.Reconnecting)]
        assert space.reconnects == 0
    finally:
        if space is not None:
            await space.leave()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


async def test_a_second_interrupt_stops_a_draining_server_at_once(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = Process(
        ["serve"],
        {
            "SPACES_REDIS_URL": private_redis.url,
            "SPACES_ADMIN_KEY": "test-admin-key",
            "SPACES_GRPC_ADDR": address,
            "SPACES_METRICS_ADDR": "",
            "SPACES_NODE_ID": "only-node",
            "SPACES_DRAIN_GRACE_SECONDS": str(DRAIN_GRACE_S),
        },
        tmp_path / "serve.log",
    ).start()
    store = RedisStore(private_redis.url)
    space: sdk.Space | None = None
    try:
        await wait_serving(address, timeout=30)
        admin = Admin(address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        await admin.close()
        space = sdk.Space(tenant.token(space_id, "alice"), address, reconnect_attempts=0)
        await space.join()

        server.signal(signal.SIGINT)

        async def draining() -> bool:
            view = await store.list_nodes(60_000)
            return any(n.state == node_pb2.NODE_STATE_DRAINING for n in view.nodes)

        await eventually(draining, timeout=5)
        # The first interrupt drains: the session goes on, the process waits out the grace.
        await asyncio.sleep(1.5)
        assert server.alive() and space.state == "joined"

        server.signal(signal.SIGINT)
        second = time.monotonic()
        assert await asyncio.to_thread(server.wait, 10) is not None, server.log()
        assert time.monotonic() - second < 4.0, server.log()
        assert "stopping now" in server.log()
        # Still an orderly stop: the session was told to move and the node left the registry
        # (its connection stays resumable until its lease lapses, as after any drain).
        assert space.state != "joined"
        assert (await store.list_nodes(60_000)).nodes == []
    finally:
        if space is not None:
            await space.leave()
        server.kill()
        await store.close()

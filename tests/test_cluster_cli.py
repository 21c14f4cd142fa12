"""`make cluster` (`spaces cluster`) as an operator uses it: it prints one API address, and the
README quickstart works against that address unchanged (every admin service answers there)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

from tests.test_grpcurl_and_readme import quickstart_block, run

SPACES = str(Path(sys.executable).parent / "spaces")


async def read_until(stream: asyncio.StreamReader, pattern: str, timeout: float) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen, re.M):
        line = await asyncio.wait_for(stream.readline(), max(0.1, deadline - time.monotonic()))
        if not line:
            raise AssertionError(f"spaces cluster ended early:\n{seen}")
        seen += line.decode()
    return seen


async def test_make_cluster_prints_one_api_address_that_serves_the_quickstart(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        SPACES, "cluster", "--base-port", "0", "--nodes", "1", "--replicas", "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        banner = await read_until(proc.stdout, r"Ctrl-C stops everything", timeout=90)
        api = re.findall(r"^API address\s+(\S+)", banner, re.M)
        assert len(api) == 1, banner
        admin_key = re.search(r"^admin key\s+(\S+)", banner, re.M)
        assert admin_key, banner
        replicas = re.findall(r"^api-\d+\s+(\S+)", banner, re.M)
        assert len(replicas) == 2 and api[0] in replicas, banner

        work = tmp_path / "user"
        work.mkdir()
        (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
        script = (
            quickstart_block()
            .replace("127.0.0.1:50051", api[0])
            .replace("export ADMIN_KEY=dev-admin-key", f"export ADMIN_KEY={admin_key.group(1)}")
        )
        code, out, err = await run("bash", "-euo", "pipefail", "-c", script, cwd=work)
        assert code == 0, f"quickstart against the API address failed:\n{out}\n{err}"
        assert '"status": "SPACE_STATUS_IDLE"' in out
        # Presence and webhooks admin calls answer there too.
        space_id = json.loads((work / "space.json").read_text())["id"]
        auth = f"authorization: Bearer {admin_key.group(1)}"
        grpcurl = str(work / ".venv" / "bin" / "grpcurl")
        for method, body in (
            ("spaces.v1.WebhookService/ListWebhookEndpoints", "{}"),
            ("spaces.v1.PresenceService/ListParticipants", json.dumps({"space_id": space_id})),
        ):
            code, out, err = await run(
                grpcurl, "-plaintext", "-H", auth, "-d", body, api[0], method, cwd=work
            )
            assert code == 0, (method, err)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    assert proc.returncode == 0
    # Ctrl-C stopped the processes it started: nothing listens on their ports any more.
    for address in replicas:
        host, _, port = address.rpartition(":")
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{address} still listening"

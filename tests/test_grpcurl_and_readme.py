"""What a newcomer does: grpcurl against a running server, the README quickstart verbatim against
`make run`, and two `spaces join` processes that see each other."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest

from spaces.server import SpacesServer
from tests.support.system import ADMIN_KEY, eventually, free_port, wait_serving

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SPACES = str(Path(sys.executable).parent / "spaces")


async def run(
    *args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), 120
    )
    return proc.returncode or 0, out.decode(), err.decode()


async def test_grpcurl_lists_services_and_creates_a_key_and_a_space(server: SpacesServer) -> None:
    code, out, err = await run(GRPCURL, "-plaintext", server.address, "list")
    assert code == 0, err
    for name in (
        "spaces.v1.SpaceService",
        "spaces.v1.SigningKeyService",
        "spaces.v1.PresenceService",
        "grpc.health.v1.Health",
    ):
        assert name in out.split()
    auth = f"authorization: Bearer {ADMIN_KEY}"
    code, out, err = await run(
        GRPCURL,
        "-plaintext",
        "-H",
        auth,
        server.address,
        "spaces.v1.SigningKeyService/CreateSigningKey",
    )
    assert code == 0, err
    key = json.loads(out)
    assert key["id"] and key["private_key"]
    code, out, err = await run(
        GRPCURL,
        "-plaintext",
        "-H",
        auth,
        "-d",
        '{"passthrough": "from grpcurl"}',
        server.address,
        "spaces.v1.SpaceService/CreateSpace",
    )
    assert code == 0, err
    space = json.loads(out)
    assert space["passthrough"] == "from grpcurl"
    assert space["status"] == "SPACE_STATUS_IDLE"
    # Describe works through reflection, as a debugging user would use it.
    code, out, err = await run(
        GRPCURL, "-plaintext", server.address, "describe", "spaces.v1.PresenceService"
    )
    assert code == 0 and "rpc Join ( .spaces.v1.JoinRequest )" in out, err
    code, out, err = await run(
        GRPCURL, "-plaintext", server.address, "describe", "spaces.v1.JoinRequest"
    )
    assert code == 0 and "resume_secret" in out, err
    # Without the admin header: a clear status, not a crash.
    code, out, err = await run(
        GRPCURL, "-plaintext", server.address, "spaces.v1.SpaceService/ListSpaces"
    )
    assert code != 0
    assert "Unauthenticated" in err and "authorization: Bearer" in err


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(
        r"<!-- quickstart:begin -->\s*```sh\n(.*?)```\s*<!-- quickstart:end -->", text, re.S
    )
    assert match, "README.md lost its quickstart block"
    return match.group(1)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class MakeRun(NamedTuple):
    address: str
    """The gRPC address (127.0.0.1:50051, the README's, when it was free)."""
    work: Path
    """A fresh working directory, with the repo's .venv linked in."""
    web_port: int
    """The signaling service's port (8080, the README's, when it was free)."""
    log: Path
    """What `make run` printed (stdout and stderr)."""


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    """`SPACES_ADMIN_KEY=dev-admin-key make run`, as the README says, in a fresh working dir
    (with the repo's .venv linked in). On 127.0.0.1:50051 and 127.0.0.1:8080 when those ports
    are free, otherwise on other ports substituted into the commands."""
    port = 50051 if port_is_free(50051) else free_port()
    web_port = 8080 if port_is_free(8080) else free_port()
    env = {
        **os.environ,
        "SPACES_ADMIN_KEY": "dev-admin-key",
        "SPACES_GRPC_ADDR": f"127.0.0.1:{port}",
        "SPACES_SIGNAL_ADDR": f"127.0.0.1:{web_port}",
        "SPACES_METRICS_ADDR": "",
    }
    if port == 50051:
        env.pop("SPACES_GRPC_ADDR")
    if web_port == 8080:
        env.pop("SPACES_SIGNAL_ADDR")
    log_path = tmp_path / "make-run.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["make", "-s", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    work = tmp_path / "user"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", timeout=60))
        yield MakeRun(f"127.0.0.1:{port}", work, web_port, log_path)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()


async def test_readme_quickstart_works_verbatim_against_make_run(make_run: MakeRun) -> None:
    address, work = make_run.address, make_run.work
    script = quickstart_block().replace("127.0.0.1:50051", address)
    code, out, err = await run("bash", "-euo", "pipefail", "-c", script, cwd=work)
    assert code == 0, f"quickstart failed:\n{out}\n{err}"
    key = json.loads((work / "key.json").read_text())
    space = json.loads((work / "space.json").read_text())
    assert key["private_key"] and space["passthrough"] == "my first space"
    token = (work / "alice.jwt").read_text().strip()
    assert token.count(".") == 2
    assert '"status": "SPACE_STATUS_IDLE"' in out
    assert space["id"] in out


async def test_make_run_prints_the_meeting_page_url_and_serves_the_page_there(
    make_run: MakeRun,
) -> None:
    url = f"http://127.0.0.1:{make_run.web_port}/"

    def printed() -> bool:
        return f"meeting page: {url}" in make_run.log.read_text(errors="replace")

    try:
        await eventually(printed, timeout=30, interval=0.2)
    except AssertionError:
        raise AssertionError(make_run.log.read_text(errors="replace")) from None
    # The README tells a newcomer to open that address.
    if make_run.web_port == 8080:
        assert f"open {url} in two browser" in (ROOT / "README.md").read_text()
    async with aiohttp.ClientSession() as http, http.get(url) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/html"
        assert await reply.read() == (ROOT / "web" / "index.html").read_bytes()


async def test_spaces_join_prints_frames_from_a_test_pattern_publisher(make_run: MakeRun) -> None:
    address, work = make_run.address, make_run.work
    code, out, err = await run(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        quickstart_block().replace("127.0.0.1:50051", address),
        cwd=work,
    )
    assert code == 0, err
    publisher_token = (
        await run(
            SPACES,
            "token",
            "--key",
            "key.json",
            "--space",
            "space.json",
            "--participant-id",
            "bob",
            cwd=work,
        )
    )[1].strip()
    publisher = await asyncio.create_subprocess_exec(
        SPACES,
        "join",
        "--server",
        address,
        "--token",
        publisher_token,
        "--test-pattern",
        "--duration",
        "12",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=work,
    )
    await asyncio.sleep(1.5)
    code, out, err = await run(
        SPACES,
        "join",
        "--server",
        address,
        "--token",
        (work / "alice.jwt").read_text().strip(),
        "--duration",
        "6",
        cwd=work,
    )
    await publisher.communicate()
    assert code == 0, err
    assert "TrackSubscribed bob camera" in out
    frames = dict(
        (m.group(1), int(m.group(2)))
        for m in re.finditer(r"bob (camera|microphone)\s+\w+\s+frames=(\d+)", out)
    )
    # About 30 fps of video and 50 audio frames per second for ~5 s: far more than zero.
    assert frames.get("camera", 0) > 30, out
    assert frames.get("microphone", 0) > 50, out

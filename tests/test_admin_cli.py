"""The `spaces` admin commands, run as an operator runs them (the installed `spaces` command, a
subprocess) against a real server: spaces, keys, participants, webhooks, the event stream, and
what a refused call looks like."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from spaces.config import WebhookConfig
from spaces.sdk import client as sdk
from spaces.server import SpacesServer
from tests.support.system import ADMIN_KEY, eventually, free_port, make_config, start_server

SPACES = str(Path(sys.executable).parent / "spaces")


@pytest.fixture
async def api() -> AsyncIterator[SpacesServer]:
    """Every service, and a webhook endpoint from config that nothing answers: one attempt,
    then a dead letter."""
    dead_port = free_port()
    srv = await start_server(
        make_config(
            services=("control", "auth", "presence", "media", "webhooks"),
            webhooks=WebhookConfig(
                url=f"http://127.0.0.1:{dead_port}/hook",
                secret="s3cret",
                max_attempts=1,
                initial_backoff_ms=50,
                max_backoff_ms=100,
                timeout_ms=1_000,
                lease_ms=1_000,
                claim_idle_ms=1_000,
                poll_interval_ms=50,
            ),
        )
    )
    yield srv
    await srv.stop()


async def spaces(
    server: SpacesServer | str, *args: str, key: str | None = ADMIN_KEY, cwd: Path | None = None
) -> tuple[int, str, str]:
    address = server if isinstance(server, str) else server.address
    env = {k: v for k, v in os.environ.items() if k not in ("SPACES_ADMIN_KEY", "SPACES_SERVER")}
    env["SPACES_SERVER"] = address  # the environment variable, as an operator would set it
    if key is not None:
        env["SPACES_ADMIN_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        SPACES, *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def ok_json(server: SpacesServer, *args: str) -> Any:
    code, out, err = await spaces(server, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_space_create_get_list_update_delete(api: SpacesServer) -> None:
    created = await ok_json(api, "space", "create", "--passthrough", "standup")
    assert created["passthrough"] == "standup" and created["status"] == "SPACE_STATUS_IDLE"
    space_id = created["id"]

    code, out, err = await spaces(api, "space", "get", space_id)
    assert code == 0, err
    assert space_id in out and "idle" in out and "standup" in out

    listed = await ok_json(api, "space", "list", "--all")
    assert [s["id"] for s in listed["spaces"]] == [space_id]
    code, out, _ = await spaces(api, "space", "list")
    assert out.splitlines()[0].split()[:2] == ["ID", "STATUS"] and space_id in out

    updated = await ok_json(api, "space", "update", space_id, "--max-participants", "7")
    assert updated["max_participants"] == 7 and updated["passthrough"] == "standup"

    assert await ok_json(api, "space", "delete", space_id) == {"disconnected": 0}
    code, out, err = await spaces(api, "space", "get", space_id)
    assert code == 1 and out == ""
    assert err.strip() == "spaces: NOT_FOUND: space not found"


async def test_space_list_pages(api: SpacesServer) -> None:
    ids = [(await ok_json(api, "space", "create"))["id"] for _ in range(3)]
    first = await ok_json(api, "space", "list", "--limit", "2")
    assert [s["id"] for s in first["spaces"]] == ids[:2] and first["next_page_token"]
    rest = await ok_json(api, "space", "list", "--page-token", first["next_page_token"])
    assert [s["id"] for s in rest["spaces"]] == ids[2:]
    everything = await ok_json(api, "space", "list", "--limit", "1", "--all")
    assert [s["id"] for s in everything["spaces"]] == ids


async def test_key_create_signs_tokens_and_delete_revokes_them(
    api: SpacesServer, tmp_path: Path
) -> None:
    code, out, err = await spaces(api, "key", "create", "--json")
    assert code == 0, err
    (tmp_path / "key.json").write_text(out)
    key = json.loads(out)
    assert key["id"] and key["private_key"]
    space = await ok_json(api, "space", "create")
    (tmp_path / "space.json").write_text(json.dumps(space))
    code, token, err = await spaces(
        api, "token", "--key", "key.json", "--space", "space.json", cwd=tmp_path
    )
    assert code == 0, err
    joined = sdk.Space(token.strip(), api.address, decode=False)
    await joined.join()
    await joined.leave()

    listed = await ok_json(api, "key", "list")
    assert [k["id"] for k in listed["signing_keys"]] == [key["id"]]
    assert all(k["private_key"] == "" for k in listed["signing_keys"])
    got = await ok_json(api, "key", "get", key["id"])
    assert got["id"] == key["id"] and got["private_key"] == ""

    code, out, err = await spaces(api, "key", "delete", key["id"])
    assert code == 0 and "deleted signing key" in out, err
    revoked = sdk.Space(token.strip(), api.address, decode=False)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await revoked.join()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await revoked.leave()


async def test_participant_list_get_remove(api: SpacesServer) -> None:
    key = await ok_json(api, "key", "create")
    space_id = (await ok_json(api, "space", "create"))["id"]
    from spaces.sdk.tokens import sign_token

    alice = sdk.Space(
        sign_token(key["id"], key["private_key"], space_id, participant_id="alice"),
        api.address,
        display_name="Alice",
        decode=False,
    )
    events = alice.events()
    await alice.join()
    try:
        listed = await ok_json(api, "participant", "list", "--space", space_id)
        assert [p["participant_id"] for p in listed["participants"]] == ["alice"]
        assert listed["participants"][0]["state"] == "PARTICIPANT_STATE_CONNECTED"
        code, out, _ = await spaces(api, "participant", "list", "--space", space_id)
        assert "alice" in out and "connected" in out and "Alice" in out
        got = await ok_json(api, "participant", "get", "--space", space_id, "alice")
        assert got["display_name"] == "Alice" and got["role"] == "ROLE_PUBLISHER"

        code, out, err = await spaces(api, "participant", "remove", "--space", space_id, "alice")
        assert code == 0, err
        await eventually(lambda: alice.state == "closed", timeout=10)
        gone = []
        while (event := events.get_nowait()) is not None:
            gone.append(event)
        assert [e.reason for e in gone if isinstance(e, sdk.Disconnected)] == ["removed"]
        assert (await ok_json(api, "participant", "list", "--space", space_id)) == {
            "participants": []
        }
        code, _, err = await spaces(api, "participant", "get", "--space", space_id, "alice")
        assert code == 1 and err.strip() == "spaces: NOT_FOUND: participant not found"
    finally:
        await alice.leave()


async def test_webhook_commands_and_dead_letters(api: SpacesServer) -> None:
    created = await ok_json(
        api, "webhook", "create", "--url", "https://example.invalid/hook",
        "--event", "video.space.idle", "--event", "video.space.active",
    )  # fmt: skip
    assert created["secret"] and created["event_types"] == [
        "video.space.idle",
        "video.space.active",
    ]
    listed = await ok_json(api, "webhook", "list")
    ids = {e["id"]: e for e in listed["endpoints"]}
    assert created["id"] in ids and ids["config"]["from_config"] is True
    code, out, _ = await spaces(api, "webhook", "list")
    assert "https://example.invalid/hook" in out and "yes" in out

    assert await ok_json(api, "webhook", "delete", created["id"]) == {}
    code, _, err = await spaces(api, "webhook", "delete", "config")
    assert code == 1 and err.startswith("spaces: FAILED_PRECONDITION: this endpoint comes from")

    # The config endpoint answers nothing and gets one attempt: video.space.created dies.
    await ok_json(api, "space", "create")

    async def dead_letters() -> list[dict[str, Any]]:
        return list((await ok_json(api, "webhook", "dead-letters"))["dead_letters"])

    letters = await eventually(dead_letters, timeout=15, interval=0.3)
    assert letters[0]["event_type"] == "video.space.created"
    assert letters[0]["endpoint_id"] == "config" and letters[0]["attempts"] == 1
    code, out, _ = await spaces(api, "webhook", "dead-letters")
    assert letters[0]["id"] in out and "video.space.created" in out
    replayed = await ok_json(api, "webhook", "replay", letters[0]["id"])
    assert replayed == {"replayed": 1}


async def test_events_follows_the_stream(api: SpacesServer) -> None:
    space_id = (await ok_json(api, "space", "create"))["id"]
    # From the latest event on, so that neither follower misses what comes next however long
    # its process takes to start and subscribe.
    after = await api.store.latest_event_id()
    env = {**os.environ, "SPACES_ADMIN_KEY": ADMIN_KEY}
    follower = await asyncio.create_subprocess_exec(
        SPACES, "events", "--server", api.address, "--space", space_id, "--json",
        "--after", after,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    human = await asyncio.create_subprocess_exec(
        SPACES, "events", "--server", api.address, "--space", space_id, "--count", "2",
        "--after", after,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert follower.stdout is not None and human.stdout is not None
    try:
        await ok_json(api, "space", "update", space_id, "--passthrough", "one")
        await ok_json(api, "space", "update", space_id, "--passthrough", "two")
        lines = [
            json.loads(await asyncio.wait_for(follower.stdout.readline(), 10)) for _ in range(2)
        ]
        assert [e["type"] for e in lines] == ["EVENT_TYPE_SPACE_UPDATED"] * 2
        assert [e["space"]["passthrough"] for e in lines] == ["one", "two"]
        assert all(e["space_id"] == space_id for e in lines)
        # --count stops by itself; its lines are one event each.
        out, _ = await asyncio.wait_for(human.communicate(), 10)
        assert human.returncode == 0
        printed = out.decode().splitlines()
        assert len(printed) == 2 and all("space_updated" in line for line in printed)
        assert printed[0].split()[1] == lines[0]["id"]
        # It follows until interrupted, then exits cleanly.
        follower.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(follower.wait(), 10) == 0
    finally:
        for proc in (follower, human):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_refused_calls_print_the_code_and_message_and_exit_non_zero(
    api: SpacesServer,
) -> None:
    code, out, err = await spaces(api, "space", "list", key=None)
    assert code == 2 and out == "" and "SPACES_ADMIN_KEY" in err
    code, _, err = await spaces(api, "space", "list", key="wrong")
    assert code == 1 and err.strip() == "spaces: UNAUTHENTICATED: wrong admin key"
    code, _, err = await spaces(api, "space", "create", "--passthrough", "x" * 300)
    assert code == 1
    assert err.strip() == "spaces: INVALID_ARGUMENT: passthrough is longer than 255 characters"
    code, _, err = await spaces(api, "space", "get", "not an id")
    assert code == 1 and err.startswith("spaces: INVALID_ARGUMENT: ")
    # --admin-key wins over the environment.
    code, out, err = await spaces(api, "space", "list", "--admin-key", ADMIN_KEY, key="wrong")
    assert code == 0, err
    # Nobody listening: UNAVAILABLE, not a traceback.
    code, _, err = await spaces(f"127.0.0.1:{free_port()}", "space", "list")
    assert code == 1 and err.startswith("spaces: UNAVAILABLE: ") and "Traceback" not in err

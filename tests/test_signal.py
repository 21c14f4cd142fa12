"""The signaling service's WebSocket endpoint, driven by a raw WebSocket client speaking Mux's
web protocol: every refusal is an ``error`` message before the close, every bad message gets its
error with the right ``fatal``/``retry``, and the server keeps serving. Media-free: these checks
need no peer connection (the browser tests cover media)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from spaces.config import IceServerConfig
from spaces.server import SpacesServer
from spaces.session.mux_wire import MAX_MESSAGE_BYTES
from spaces.v1 import presence_pb2, space_pb2
from tests.support.system import Admin, Tenant, eventually, start_server, web_config
from tests.support.websocket import Replica, joined, refused


@pytest.fixture
async def web() -> AsyncIterator[tuple[SpacesServer, Admin, Tenant, str]]:
    server = await start_server(web_config())
    admin = Admin(server.address)
    tenant = Tenant(await admin.create_key())
    space_id = await admin.create_space()
    yield server, admin, tenant, space_id
    await admin.close()
    await server.stop()


async def test_a_join_gets_joined_with_everything_the_mux_sdk_requires(web: tuple) -> None:
    server, _, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"), display_name="Alice")
    message = socket.received[0]["joined"]
    assert message["participant_id"] == "alice"
    assert message["display_name"] == "Alice"
    assert message["connection_id"]
    assert message["participants"] == []
    assert message["simulcast"] == {"camera_encodings": [], "screenshare_encodings": []}
    assert message["ice_servers"] == []  # never a public STUN server by default
    assert message["limits"] == {
        "custom_events_per_second": 10,
        "default_track_limit": 1,
        "seconds_per_set_display_name": 1,
    }
    (sfu,) = message["sub_sfus"]
    # An offer with no m-lines must not carry a bare BUNDLE line: Chrome refuses it.
    assert sfu["sdp"].startswith("v=0") and "a=group:BUNDLE \r\n" not in sfu["sdp"]
    await socket.close()


async def test_configured_ice_servers_reach_joined_ice_servers_as_the_mux_sdk_reads_them() -> None:
    turn = IceServerConfig(
        urls=("turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349"),
        username="spaces-user",
        credential="s3cret",
    )
    stun = IceServerConfig(urls=("stun:stun.example.com:3478",))
    server = await start_server(web_config(ice_servers=(turn, stun)))
    admin = Admin(server.address)
    try:
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        socket = await joined(server, tenant.token(space_id, "alice"))
        assert socket.received[0]["joined"]["ice_servers"] == [
            {
                "urls": [
                    "turn:turn.example.com:3478?transport=udp",
                    "turns:turn.example.com:5349",
                ],
                "username": "spaces-user",
                "credential": "s3cret",
                "credential_type": "password",
            },
            {
                "urls": ["stun:stun.example.com:3478"],
                "username": "",
                "credential": "",
                "credential_type": "password",
            },
        ]
        await socket.close()
    finally:
        await admin.close()
        await server.stop()


async def admits_a_good_join(server: SpacesServer, token: str, participant_id: str) -> None:
    """The server keeps serving: a fresh socket with a good token gets ``joined``."""
    socket = await joined(server, token)
    assert socket.received[0]["joined"]["participant_id"] == participant_id
    await socket.close()


@pytest.mark.parametrize(
    ("case", "error_type"),
    [("garbage", 6), ("wrong_audience", 6), ("expired", 6), ("unknown_space", 6), ("none", 6)],
)
async def test_a_refused_token_gets_error_6_before_the_close(
    web: tuple, case: str, error_type: int
) -> None:
    server, _, tenant, space_id = web
    key = tenant.key
    tokens = {
        "garbage": "not.a.jwt",
        "wrong_audience": _token(key, space_id, aud="live"),
        "expired": _token(key, space_id, exp=int(time.time()) - 60),
        "unknown_space": tenant.token("SPunknown0000000000000000", "x"),
        "none": "",
    }
    query = {"token": tokens[case]} if tokens[case] else {}
    error, code = await refused(server, **query)
    assert error["type"] == error_type
    assert error["fatal"] is True and error["retry"] is False
    assert error["message"]
    assert code == 4000
    # The server keeps serving: a good join is admitted.
    good = await joined(server, tenant.token(space_id, "after-" + case))
    await good.close()


def _token(key: Any, space_id: str, **claims: Any) -> str:
    import jwt

    from spaces.sdk.tokens import load_private_key

    payload = {"sub": space_id, "aud": "rt", "kid": key.id, "exp": int(time.time()) + 60}
    payload.update(claims)
    return jwt.encode(payload, load_private_key(key.private_key), algorithm="RS256")


async def test_a_duplicate_participant_id_gets_error_3_and_the_first_stays(web: tuple) -> None:
    server, admin, tenant, space_id = web
    first = await joined(server, tenant.token(space_id, "alice"))
    error, code = await refused(server, token=tenant.token(space_id, "alice"))
    assert error["type"] == 3 and error["fatal"] is True and error["retry"] is False
    assert code == 4000
    assert [p.participant_id for p in await admin.participants(space_id)] == ["alice"]
    # The first connection is untouched: it still gets events.
    other = await joined(server, tenant.token(space_id, "bob"))
    connected = await first.until("participant_connected")
    assert connected["participant_connected"]["participant_id"] == "bob"
    await first.close()
    await other.close()


async def test_the_participant_limit_gets_error_7(web: tuple) -> None:
    server, admin, tenant, _ = web
    space_id = await admin.create_space(max_participants=1)
    first = await joined(server, tenant.token(space_id, "a"))
    error, code = await refused(server, token=tenant.token(space_id, "b"))
    assert error["type"] == 7 and error["fatal"] is True and error["retry"] is False
    assert code == 4000
    # The refused join left nothing behind: once the first has left, it is admitted.
    await first.close()
    await eventually(lambda: _participants(admin, space_id, []), timeout=10)
    await admits_a_good_join(server, tenant.token(space_id, "b"), "b")


async def test_bad_query_parameters_are_refused_with_an_error(web: tuple) -> None:
    server, _, tenant, space_id = web
    token = tenant.token(space_id)
    error, code = await refused(server, token=token, managed_subscriptions="99")
    assert "managed_subscriptions" in error["message"] and code == 4000
    error, code = await refused(server, token=token, display_name="x" * 65)
    assert "display_name" in error["message"] and code == 4000
    # The same token with good parameters is admitted.
    socket = await joined(server, token, managed_subscriptions="3", display_name="x" * 64)
    assert socket.received[0]["joined"]["display_name"] == "x" * 64
    await socket.close()


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ("{not json", "malformed"),
        ("[1, 2]", "json object"),
        ({"frobnicate": 1}, "unknown message"),
        ({"offer": "x", "mute_track": "y"}, "unknown message"),
        (
            {"pending_track": {"tid": "has spaces", "type": 2, "mid": "0", "source": "camera"}},
            "tid",
        ),
        ({"pending_track": {"tid": "t1", "type": 2, "mid": "0", "source": "webcam"}}, "source"),
        ({"custom_event": {"payload": 5}}, "payload"),
        ({"subscribe_tracks": {"connections": "all"}}, "connections"),
    ],
)
async def test_a_malformed_message_gets_a_non_fatal_error_and_the_session_continues(
    web: tuple, message: Any, words: str
) -> None:
    server, _, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    await socket.send(message if isinstance(message, str) else {**message, "request_id": "r1"})
    error = (await socket.until("error"))["error"]
    assert words in error["message"].lower()
    assert error["fatal"] is False
    if not isinstance(message, str):
        assert error["request_error"] == {"correlator": "r1"}
    # Still serving this session: a custom event is echoed.
    await socket.send({"custom_event": {"id": "e1", "payload": "hi", "scope": 1}, "request_id": 7})
    echo = await socket.until("custom_event")
    assert echo["request_id"] == 7 and echo["custom_event"]["payload"] == "hi"
    # And a fresh join is admitted beside it.
    await admits_a_good_join(server, tenant.token(space_id, "bob"), "bob")
    await socket.close()


async def test_an_oversized_message_gets_a_fatal_error_then_the_close(web: tuple) -> None:
    server, admin, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    await socket.send({"custom_event": {"payload": "x" * (MAX_MESSAGE_BYTES + 10)}})
    error = (await socket.until("error"))["error"]
    assert error["fatal"] is True and error["retry"] is False
    assert "larger" in error["message"]
    assert await socket.closed() == 4000
    await socket.close()
    await eventually(lambda: _participants(admin, space_id, []), timeout=10)
    good = await joined(server, tenant.token(space_id, "bob"))
    await good.close()


async def _participants(admin: Admin, space_id: str, expected: list[str]) -> bool:
    return [p.participant_id for p in await admin.participants(space_id)] == expected


async def test_garbage_sdp_in_an_offer_gets_a_fatal_retryable_error(web: tuple) -> None:
    server, _, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    await socket.send({"pending_track": {"tid": "t1", "type": 2, "mid": "0", "source": "camera"}})
    await socket.send({"offer": "this is not sdp"})
    error = (await socket.until("error"))["error"]
    assert error["type"] == 4  # PeerConnectionClosed: only a fresh connection can publish now
    assert error["fatal"] is True and error["retry"] is True
    assert "sdp" in error["message"]
    await socket.close()
    good = await joined(server, tenant.token(space_id, "bob"))
    await good.close()


async def test_a_missing_sub_answer_ends_the_session_with_a_retryable_error(web: tuple) -> None:
    server, admin, tenant, space_id = web
    # Never answers the subscriber offer that came with joined.
    socket = await joined(server, tenant.token(space_id, "silent"))
    error = (await socket.until("error", timeout=15))["error"]
    assert error["type"] == 4 and error["fatal"] is True and error["retry"] is True
    assert "answer" in error["message"]
    assert await socket.closed() == 4001
    await socket.close()
    await eventually(lambda: _participants(admin, space_id, []), timeout=10)
    # retry: the client reconnects fully, and the same participant is admitted again.
    await admits_a_good_join(server, tenant.token(space_id, "silent"), "silent")


async def test_a_garbage_sub_answer_ends_the_session_with_a_retryable_error(web: tuple) -> None:
    server, admin, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    await socket.send({"sub_answer": {"sfu_id": "x", "sdp": "garbage"}})
    error = (await socket.until("error"))["error"]
    assert error["fatal"] is True and error["retry"] is True
    assert await socket.closed() == 4001
    await socket.close()
    await eventually(lambda: _participants(admin, space_id, []), timeout=10)
    await admits_a_good_join(server, tenant.token(space_id, "alice"), "alice")


async def test_custom_events_are_numbered_and_rate_limited(web: tuple) -> None:
    server, _, tenant, space_id = web
    alice = await joined(server, tenant.token(space_id, "alice"))
    bob = await joined(server, tenant.token(space_id, "bob"))
    await alice.until("participant_connected")
    for i in range(12):  # the limit is 10 per second
        await alice.send({"custom_event": {"id": f"e{i}", "payload": f"p{i}"}, "request_id": i})
    errors = []
    echoes = []
    while len(errors) + len(echoes) < 12:
        message = await alice.next()
        assert message is not None
        if "error" in message:
            errors.append(message["error"])
        elif "custom_event" in message:
            echoes.append(message)
    assert len(echoes) == 10 and len(errors) == 2
    assert [e["request_id"] for e in echoes] == list(range(10))
    assert all(e["type"] == 6 and not e["fatal"] for e in errors)
    assert [e["request_error"]["correlator"] for e in errors] == ["10", "11"]
    seen = []
    while len(seen) < 10:
        message = await bob.until("custom_event")
        seen.append(message["custom_event"])
        assert "request_id" not in message  # only the sender's copy answers a request
    numbers = [e["sequence_num"] for e in seen]
    assert numbers == sorted(numbers) and numbers == list(range(numbers[0], numbers[0] + 10))
    assert [e["id"] for e in seen] == [f"e{i}" for i in range(10)]
    assert all(e["connection_id"] == alice.received[0]["joined"]["connection_id"] for e in seen)
    await alice.close()
    await bob.close()


async def test_display_names_are_announced_and_rate_limited(web: tuple) -> None:
    server, _, tenant, space_id = web
    alice = await joined(server, tenant.token(space_id, "alice"))
    bob = await joined(server, tenant.token(space_id, "bob"))
    await alice.send({"set_display_name": "Alice A.", "request_id": "n1"})
    echo = await alice.until("participant_update")
    assert echo["request_id"] == "n1"
    assert echo["participant_update"]["display_name"] == "Alice A."
    seen = await bob.until("participant_update")
    assert seen["participant_update"] == echo["participant_update"]
    await alice.send({"set_display_name": "Again", "request_id": "n2"})
    error = (await alice.until("error"))["error"]
    assert error["type"] == 8 and error["request_error"] == {"correlator": "n2"}
    await alice.send({"set_display_name": "x" * 65, "request_id": "n3"})
    error = (await alice.until("error"))["error"]
    assert error["type"] == 7
    await alice.close()
    await bob.close()


async def test_a_subscriber_role_cannot_send_custom_events(web: tuple) -> None:
    server, _, tenant, space_id = web
    viewer = await joined(server, tenant.token(space_id, "viewer", role="subscriber"))
    await viewer.send({"custom_event": {"payload": "hi"}, "request_id": 1})
    error = (await viewer.until("error"))["error"]
    assert error["type"] == 5 and "subscriber" in error["message"]
    await viewer.close()


async def test_manual_subscriptions_report_successes_and_failures(web: tuple) -> None:
    server, _, tenant, space_id = web
    alice = await joined(server, tenant.token(space_id, "alice"))
    bob = await joined(server, tenant.token(space_id, "bob"), managed_subscriptions="0")
    alice_conn = alice.received[0]["joined"]["connection_id"]
    await bob.send(
        {
            "subscribe_tracks": {
                "connections": [
                    {"connection_id": alice_conn, "track_ids": []},
                    {"connection_id": "nobody", "track_ids": []},
                ]
            },
            "request_id": "s1",
        }
    )
    reply = await bob.until("subscribe_tracks")
    assert reply["request_id"] == "s1"
    assert reply["subscribe_tracks"] == {
        "successes": [{"connection_id": alice_conn}],
        "failures": [{"connection_id": "nobody"}],
    }
    await bob.send(
        {"unsubscribe_tracks": {"connections": [{"connection_id": alice_conn}]}, "request_id": 2}
    )
    reply = await bob.until("unsubscribe_tracks")
    assert reply["unsubscribe_tracks"]["successes"] == [{"connection_id": alice_conn}]
    await alice.close()
    await bob.close()


async def test_participants_see_each_other_join_and_leave(web: tuple) -> None:
    server, _, tenant, space_id = web
    alice = await joined(server, tenant.token(space_id, "alice"), display_name="Alice")
    bob = await joined(server, tenant.token(space_id, "bob"), display_name="Bob")
    (entry,) = bob.received[0]["joined"]["participants"]
    assert entry["participant_id"] == "alice" and entry["display_name"] == "Alice"
    assert entry["role"] == 1 and entry["status"] == 1 and entry["tracks"] == []
    connected = (await alice.until("participant_connected"))["participant_connected"]
    assert connected["participant_id"] == "bob"
    await bob.close()
    left = (await alice.until("participant_disconnected"))["participant_disconnected"]
    assert left == {"connection_id": connected["connection_id"]}
    await alice.close()


@pytest.mark.parametrize("how", ["kick", "forced_delete"])
async def test_a_kick_or_a_forced_delete_closes_with_4000(web: tuple, how: str) -> None:
    server, admin, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    if how == "kick":
        await admin.presence.RemoveParticipant(
            presence_pb2.RemoveParticipantRequest(space_id=space_id, participant_id="alice"),
            metadata=admin.md,
        )
    else:
        await admin.spaces.DeleteSpace(
            space_pb2.DeleteSpaceRequest(id=space_id, force=True), metadata=admin.md
        )
    assert await socket.closed() == 4000
    await socket.close()


async def test_a_draining_node_closes_browsers_with_a_retryable_code(web: tuple) -> None:
    server, _, tenant, space_id = web
    socket = await joined(server, tenant.token(space_id, "alice"))
    drain = asyncio.create_task(server.media_node.drain(0.2))
    assert await socket.closed() == 4001
    await drain
    await socket.close()


async def test_a_reconnect_takes_its_own_connection_over_and_keeps_its_id(web: tuple) -> None:
    server, admin, tenant, space_id = web
    token = tenant.token(space_id)  # no participant_id: the server generates one
    first = await joined(server, token)
    pid = first.received[0]["joined"]["participant_id"]
    # The old socket still looks alive to the server (a half-open connection): the reconnect
    # with the same token is the same participant, not a duplicate.
    second = await joined(server, token, reconnect_id=pid, reconnect_attempt="1")
    assert second.received[0]["joined"]["participant_id"] == pid
    assert await first.closed() == 4000  # replaced: the old one must not come back
    assert [p.participant_id for p in await admin.participants(space_id)] == [pid]
    # After a clean drop, a reconnect gets the id back too.
    await second.close()
    await eventually(lambda: _participants(admin, space_id, []), timeout=10)
    third = await joined(server, token, reconnect_id=pid, reconnect_attempt="2")
    assert third.received[0]["joined"]["participant_id"] == pid
    await third.close()


async def test_a_reconnect_with_another_token_is_refused_as_a_duplicate(web: tuple) -> None:
    server, _, tenant, space_id = web
    first = await joined(server, tenant.token(space_id, "alice"))
    error, code = await refused(
        server, token=tenant.token(space_id, "alice", ttl=900), reconnect_id="alice"
    )
    assert error["type"] == 3 and code == 4000
    await first.close()


async def test_the_dev_token_helper_serves_only_loopback_in_embedded_mode(web: tuple) -> None:
    server, *_ = web
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.signal.port}"
        async with http.post(f"{base}/dev/token", json={"participant_id": "ann"}) as reply:
            assert reply.status == 200
            body = await reply.json()
        socket = await joined(server, body["token"])
        assert socket.received[0]["joined"]["participant_id"] == "ann"
        await socket.close()
        async with http.get(f"{base}/sdk/spaces.js") as reply:
            assert reply.status == 200
            assert "javascript" in reply.headers["Content-Type"]
        async with http.get(f"{base}/readyz") as reply:
            assert reply.status == 200


def test_dev_tokens_are_never_served_with_redis() -> None:
    from dataclasses import replace

    from spaces.signal.service import SignalComponent

    config = web_config()
    assert SignalComponent(config, "127.0.0.1:1").dev_tokens
    with_redis = replace(config, redis_url="redis://127.0.0.1:1")
    assert not SignalComponent(with_redis, "127.0.0.1:1").dev_tokens
    public = replace(config, signal=replace(config.signal, addr="0.0.0.0:8080"))
    assert not SignalComponent(public, "127.0.0.1:1").dev_tokens


async def test_signal_replicas_as_their_own_processes_reconnect_through_any_replica(
    private_redis: Any, tmp_path: Any
) -> None:
    """A distributed deployment: control/auth/presence, a media node and two `spaces serve
    --services signal` replicas (no Redis URL: they only reach presence) as processes on one
    Redis. A browser joins through replica A; when A goes away its reconnect through replica B
    is admitted as itself, and the other participant sees it come back."""
    from tests.support.system import ADMIN_KEY, Process, free_port, wait_serving

    api, node_port, sig_grpc, sig_http = (
        free_port(),
        free_port(),
        [free_port(), free_port()],
        [
            free_port(),
            free_port(),
        ],
    )
    env = {
        "SPACES_REDIS_URL": private_redis.url,
        "SPACES_ADMIN_KEY": ADMIN_KEY,
        "SPACES_METRICS_ADDR": "",
        "SPACES_ICE_BIND": "127.0.0.1",
    }
    processes = [
        Process(
            ["serve", "--services", "control,auth,presence"],
            {**env, "SPACES_GRPC_ADDR": f"127.0.0.1:{api}"},
            tmp_path / "api.log",
        ).start(),
        Process(
            ["media-node"],
            {**env, "SPACES_GRPC_ADDR": f"127.0.0.1:{node_port}", "SPACES_NODE_ID": "m1"},
            tmp_path / "node.log",
        ).start(),
    ]
    for i in range(2):
        processes.append(
            Process(
                ["serve", "--services", "signal"],
                {
                    "SPACES_METRICS_ADDR": "",
                    "SPACES_GRPC_ADDR": f"127.0.0.1:{sig_grpc[i]}",
                    "SPACES_SIGNAL_ADDR": f"127.0.0.1:{sig_http[i]}",
                    "SPACES_PRESENCE_ADDR": f"127.0.0.1:{api}",
                },
                tmp_path / f"signal-{i}.log",
            ).start()
        )
    try:
        for port in (api, node_port, *sig_grpc):
            await wait_serving(f"127.0.0.1:{port}", timeout=30)
        admin = Admin(f"127.0.0.1:{api}")
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()

        a, b = Replica(sig_http[0]), Replica(sig_http[1])
        bob = await joined(b, tenant.token(space_id, "bob"))
        token = tenant.token(space_id)
        alice = await joined(a, token)
        alice_id = alice.received[0]["joined"]["participant_id"]
        assert (await bob.until("participant_connected"))["participant_connected"][
            "participant_id"
        ] == alice_id
        # Replica A is killed: its browsers lose their sockets without a close.
        processes[2].kill()
        again = await joined(b, token, reconnect_id=alice_id, reconnect_attempt="1")
        assert again.received[0]["joined"]["participant_id"] == alice_id
        assert [p["participant_id"] for p in again.received[0]["joined"]["participants"]] == ["bob"]
        # Bob sees alice's old connection replaced by the new one, and alice once in the list.
        seen = await bob.until("participant_connected")
        assert seen["participant_connected"]["participant_id"] == alice_id
        assert sorted(p.participant_id for p in await admin.participants(space_id)) == sorted(
            [alice_id, "bob"]
        )
        for socket in (alice, again, bob):
            await socket.close()
        await admin.close()
    finally:
        for process in processes:
            process.stop()

"""The web wire in memory: Mux's JSON messages in, session events out, and back. No sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spaces.session import events as ev
from spaces.session.mux_wire import (
    CLOSE_NO_RECONNECT,
    CLOSE_RECONNECT,
    MAX_MESSAGE_BYTES,
    JoinInfo,
    MuxWire,
    ProtocolError,
    close_code,
    join_error,
)

OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        "a=sendonly",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=mid:1",
        "a=sendonly",
        "",
    ]
)


def joined_event(**kw: Any) -> ev.Joined:
    return ev.Joined(
        space_id="S",
        participant_id=kw.get("participant_id", "alice"),
        connection_id="c-alice",
        role="publisher",
        display_name="Alice",
        node_id="n1",
        active_session_id="sess",
        participants=kw.get("participants", ()),
        subscription_mode=ev.SUBSCRIPTION_AUTO,
        max_subscriptions=16,
    )


def wire_after_join(**kw: Any) -> MuxWire:
    wire = MuxWire(JoinInfo(ice_servers=(ev.IceServer(("turn:t:3478",), "u", "p"),)), sfu_id="n1")
    wire.send(joined_event(**kw))
    wire.send(ev.SubscriberOffered(1, "v=0\r\n", ()))
    return wire


def receive(wire: MuxWire, message: Any) -> list[ev.ClientEvent]:
    return wire.receive(json.dumps(message))


def test_joined_waits_for_the_first_subscriber_offer_and_what_came_meanwhile_follows() -> None:
    wire = MuxWire(JoinInfo(), sfu_id="n1")
    bob = ev.Participant("bob", "c-bob", "publisher", "Bob", (ev.Track("t1", "video", "camera"),))
    assert wire.send(joined_event(participants=(bob,))) == []
    assert wire.send(ev.BroadcastStateChanged(True)) == []
    held = ev.ParticipantJoined(ev.Participant("carol", "c-carol", "subscriber", "Carol"))
    assert wire.send(held) == []
    out = wire.send(ev.SubscriberOffered(1, "v=0\r\noffer", ()))
    assert [next(iter(m)) for m in out] == ["joined", "participant_connected"]
    joined = out[0]["joined"]
    assert joined["sub_sfus"] == [{"sfu_id": "n1", "sdp": "v=0\r\noffer"}]
    assert joined["broadcasting"] is True
    assert joined["watchrtc_token"] == ""
    assert joined["participants"][0]["tracks"][0] == {
        "tid": "t1",
        "type": 2,
        "name": "",
        "muted": False,
        "source": "camera",
        "width": 0,
        "height": 0,
        "metadata": {},
    }
    assert out[1]["participant_connected"]["role"] == 2
    # Later offers are sub_offers, and the answer goes to the latest version.
    assert wire.send(ev.SubscriberOffered(2, "v=0\r\nnext", ())) == [
        {"sub_offer": {"sfu_id": "n1", "sdp": "v=0\r\nnext"}}
    ]
    (answer,) = receive(wire, {"sub_answer": {"sfu_id": "n1", "sdp": "v=0\r\nanswer"}})
    assert answer == ev.AnswerSubscriber(version=2, sdp="v=0\r\nanswer")


def test_broadcast_state_updates_use_a_truthy_value_for_both_states() -> None:
    wire = wire_after_join()
    assert wire.send(ev.BroadcastStateChanged(True)) == [{"broadcast_state_update": 1}]
    assert wire.send(ev.BroadcastStateChanged(False)) == [{"broadcast_state_update": 2}]


def test_an_offer_publishes_the_pending_tracks_of_its_sending_m_sections() -> None:
    wire = wire_after_join()
    pending = [
        {"tid": "mic-1", "type": 1, "name": "mic", "muted": False, "source": "microphone",
         "mid": "0"},
        {"tid": "cam-1", "type": 2, "name": "cam", "muted": True, "source": "camera",
         "mid": "1", "width": 640, "height": 360},
    ]  # fmt: skip
    for track in pending:
        assert receive(wire, {"pending_track": track}) == []
    (publish,) = receive(wire, {"offer": OFFER})
    assert isinstance(publish, ev.Publish)
    assert [(d.mid, d.track_id, d.source, d.muted) for d in publish.tracks] == [
        ("0", "mic-1", "microphone", False),
        ("1", "cam-1", "camera", True),
    ]
    assert publish.tracks[1].width == 640
    # Unmuting is remembered for later offers; an inactive m-section unpublishes its track.
    (unmute,) = receive(wire, {"unmute_track": "cam-1", "request_id": 3})
    assert unmute == ev.SetMuted(unmute.request_id, "cam-1", False)
    (reoffer,) = receive(
        wire, {"offer": OFFER.replace("a=mid:0\r\na=sendonly", "a=mid:0\r\na=inactive")}
    )
    assert isinstance(reoffer, ev.Publish)
    assert [(d.track_id, d.muted) for d in reoffer.tracks] == [("cam-1", False)]
    assert wire.send(ev.PublishAnswered(reoffer.request_id, "v=0\r\nans", ())) == [
        {"answer": "v=0\r\nans"}
    ]


def test_answers_carry_the_clients_request_ids_and_errors_their_types() -> None:
    wire = wire_after_join()
    (send,) = receive(wire, {"custom_event": {"id": "e1", "payload": "hi", "scope": 1},
                             "request_id": "abc"})  # fmt: skip
    assert isinstance(send, ev.SendCustomEvent) and send.event_id == "e1"
    echo = ev.CustomEventDelivered("alice", "c-alice", "hi", 7, "e1", send.request_id)
    assert wire.send(echo) == [
        {
            "custom_event": {"id": "e1", "payload": "hi", "scope": 1, "connection_id": "c-alice",
                             "sequence_num": 7},
            "request_id": "abc",
        }
    ]  # fmt: skip
    (again,) = receive(wire, {"custom_event": {"payload": "x"}, "request_id": 9})
    limited = wire.send(ev.RequestFailed(again.request_id, "RESOURCE_EXHAUSTED", "slow down"))
    assert limited[0]["error"]["type"] == 6
    assert limited[0]["error"]["request_error"] == {"correlator": "9"}
    (name,) = receive(wire, {"set_display_name": "x", "request_id": 10})
    failed = wire.send(ev.RequestFailed(name.request_id, "INVALID_ARGUMENT", "too long"))
    assert failed[0]["error"]["type"] == 7 and failed[0]["error"]["fatal"] is False
    (name2,) = receive(wire, {"set_display_name": "y", "request_id": 11})
    limited = wire.send(ev.RequestFailed(name2.request_id, "RESOURCE_EXHAUSTED", "wait"))
    assert limited[0]["error"]["type"] == 8
    (offer,) = receive(wire, {"offer": "garbage"})
    bad = wire.send(ev.RequestFailed(offer.request_id, "INVALID_ARGUMENT", "invalid sdp: x"))
    assert bad[0]["error"]["type"] == 4
    assert bad[0]["error"]["fatal"] is True and bad[0]["error"]["retry"] is True


def test_manual_subscriptions_are_a_set_and_replies_name_only_the_requests_connections() -> None:
    wire = wire_after_join()
    (first,) = receive(
        wire,
        {"subscribe_tracks": {"connections": [{"connection_id": "c-bob", "track_ids": ["a"]}]},
         "request_id": 1},
    )  # fmt: skip
    assert isinstance(first, ev.SetSubscription)
    assert first.mode == ev.SUBSCRIPTION_MANUAL
    assert first.entries == (ev.SubscriptionEntry(connection_id="c-bob", track_ids=("a",)),)
    (more,) = receive(
        wire,
        {"subscribe_tracks": {"connections": [{"connection_id": "c-bob", "track_ids": ["b"]},
                                              {"connection_id": "c-carol"}]}},
    )  # fmt: skip
    assert isinstance(more, ev.SetSubscription)
    assert set(more.entries) == {
        ev.SubscriptionEntry(connection_id="c-bob", track_ids=("a", "b")),
        ev.SubscriptionEntry(connection_id="c-carol", track_ids=()),
    }
    reply = wire.send(
        ev.SubscriptionUpdated(
            more.request_id,
            successes=(ev.SubscriptionEntry(connection_id="c-bob"),),
            failures=(ev.SubscriptionEntry(connection_id="c-carol"),),
        )
    )
    assert reply == [
        {
            "subscribe_tracks": {
                "successes": [{"connection_id": "c-bob"}],
                "failures": [{"connection_id": "c-carol"}],
            }
        }
    ]
    (less,) = receive(
        wire,
        {"unsubscribe_tracks": {"connections": [{"connection_id": "c-bob", "track_ids": ["a"]}]}},
    )
    assert isinstance(less, ev.SetSubscription)
    assert set(less.entries) == {
        ev.SubscriptionEntry(connection_id="c-bob", track_ids=("b",)),
        ev.SubscriptionEntry(connection_id="c-carol", track_ids=()),
    }


def test_candidates_name_their_peer_connection_and_empty_ones_are_dropped() -> None:
    wire = wire_after_join()
    candidate = {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdp_mid": "0",
                 "sdp_mline_index": 0}  # fmt: skip
    (sub,) = receive(wire, {"candidate": {"candidate": candidate, "type": 1, "sfu_id": "n1"}})
    (pub,) = receive(wire, {"candidate": {"candidate": candidate, "type": 2}})
    assert isinstance(sub, ev.AddIceCandidate) and sub.connection == ev.SUBSCRIBER_CONNECTION
    assert isinstance(pub, ev.AddIceCandidate) and pub.connection == ev.PUBLISHER_CONNECTION
    assert receive(wire, {"candidate": {"candidate": {"candidate": ""}, "type": 2}}) == []


@pytest.mark.parametrize(
    ("text", "fatal"),
    [
        ("{", False),
        ("42", False),
        (json.dumps({"nope": 1}), False),
        (json.dumps({"custom_event": {"payload": "x"}, "offer": "y"}), False),
        (
            json.dumps({"pending_track": {"tid": "t", "type": 3, "mid": "0", "source": "camera"}}),
            False,
        ),
        (json.dumps({"offer": 5}), True),
        (json.dumps({"sub_answer": {}}), True),
        ("x" * (MAX_MESSAGE_BYTES + 1), True),
    ],
)
def test_bad_messages_raise_protocol_errors(text: str, fatal: bool) -> None:
    wire = wire_after_join()
    with pytest.raises(ProtocolError) as raised:
        wire.receive(text)
    assert raised.value.fatal is fatal
    assert raised.value.payload()["error"]["message"]


def test_close_codes_and_join_errors() -> None:
    assert close_code(ev.Closing(ev.CLOSE_REMOVED)) == CLOSE_NO_RECONNECT
    assert close_code(ev.Closing(ev.CLOSE_SPACE_DELETED)) == CLOSE_NO_RECONNECT
    assert close_code(ev.Closing(ev.CLOSE_REPLACED)) == CLOSE_NO_RECONNECT
    assert close_code(ev.Closing(ev.CLOSE_MIGRATE)) == CLOSE_RECONNECT
    assert close_code(ev.Closing(ev.CLOSE_ERROR)) == CLOSE_RECONNECT
    assert join_error("ALREADY_EXISTS", "dup")["error"]["type"] == 3
    assert join_error("UNAUTHENTICATED", "bad")["error"]["type"] == 6
    assert join_error("NOT_FOUND", "space not found")["error"]["type"] == 6
    assert (
        join_error("RESOURCE_EXHAUSTED", "space is full: participant limit reached")["error"][
            "type"
        ]
        == 7
    )
    unavailable = join_error("UNAVAILABLE", "no media node")["error"]
    assert unavailable["type"] == 0 and unavailable["retry"] is True

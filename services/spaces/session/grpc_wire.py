"""The gRPC wire of a media session: ``spaces.v1.MediaService.Session`` messages <-> events.

Both directions of both sides: a media node decodes ClientMessages and encodes ServerMessages;
the signaling service, a client of the node, encodes ClientMessages and decodes ServerMessages.
Nothing here holds state.
"""

from __future__ import annotations

from spaces.session import events as ev
from spaces.v1 import media_pb2, participant_pb2

_SOURCES = {
    media_pb2.TRACK_SOURCE_CAMERA: "camera",
    media_pb2.TRACK_SOURCE_MICROPHONE: "microphone",
    media_pb2.TRACK_SOURCE_SCREENSHARE: "screenshare",
    media_pb2.TRACK_SOURCE_SCREENSHAREAUDIO: "screenshareaudio",
    media_pb2.TRACK_SOURCE_OTHER: "other",
}
_SOURCE_VALUES = {v: k for k, v in _SOURCES.items()}
_KINDS = {media_pb2.TRACK_KIND_AUDIO: "audio", media_pb2.TRACK_KIND_VIDEO: "video"}
_KIND_VALUES = {v: k for k, v in _KINDS.items()}
_ROLES = {
    participant_pb2.ROLE_PUBLISHER: "publisher",
    participant_pb2.ROLE_SUBSCRIBER: "subscriber",
}
_ROLE_VALUES = {v: k for k, v in _ROLES.items()}
_MODES = {
    media_pb2.SUBSCRIPTION_MODE_AUTO: ev.SUBSCRIPTION_AUTO,
    media_pb2.SUBSCRIPTION_MODE_MANUAL: ev.SUBSCRIPTION_MANUAL,
}
_MODE_VALUES = {v: k for k, v in _MODES.items()}
_CONNECTIONS = {
    media_pb2.PEER_CONNECTION_ROLE_PUBLISHER: ev.PUBLISHER_CONNECTION,
    media_pb2.PEER_CONNECTION_ROLE_SUBSCRIBER: ev.SUBSCRIBER_CONNECTION,
}
_CONNECTION_VALUES = {v: k for k, v in _CONNECTIONS.items()}


def source_name(value: int) -> str:
    """TRACK_SOURCE_CAMERA -> "camera"; "" for an unknown or unset source."""
    return _SOURCES.get(value, "")  # type: ignore[call-overload]


def source_value(name: str) -> int:
    return _SOURCE_VALUES.get(name, media_pb2.TRACK_SOURCE_UNSPECIFIED)


def close_reason_name(value: int) -> str:
    """CLOSE_REASON_MIGRATE -> "migrate"."""
    try:
        name = media_pb2.CloseReason.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return ev.CLOSE_ERROR
    return name.removeprefix("CLOSE_REASON_").lower()


def close_reason_value(name: str) -> int:
    try:
        return int(media_pb2.CloseReason.Value("CLOSE_REASON_" + name.upper()))
    except ValueError:
        return media_pb2.CLOSE_REASON_ERROR


# --- values ---------------------------------------------------------------------------------


def track_to_pb(track: ev.Track) -> media_pb2.Track:
    return media_pb2.Track(
        id=track.id,
        kind=_KIND_VALUES.get(track.kind, media_pb2.TRACK_KIND_UNSPECIFIED),
        source=source_value(track.source),  # type: ignore[arg-type]
        muted=track.muted,
        width=track.width,
        height=track.height,
        codec=track.codec,
        name=track.name,
    )


def track_from_pb(track: media_pb2.Track) -> ev.Track:
    return ev.Track(
        id=track.id,
        kind=_KINDS.get(track.kind, ""),
        source=source_name(track.source),
        muted=track.muted,
        width=track.width,
        height=track.height,
        codec=track.codec,
        name=track.name,
    )


def participant_to_pb(p: ev.Participant) -> media_pb2.RemoteParticipant:
    return media_pb2.RemoteParticipant(
        participant_id=p.participant_id,
        connection_id=p.connection_id,
        role=_ROLE_VALUES.get(p.role, 0),  # type: ignore[arg-type]
        display_name=p.display_name,
        tracks=[track_to_pb(t) for t in p.tracks],
        joined_at_ms=p.joined_at_ms,
    )


def participant_from_pb(p: media_pb2.RemoteParticipant) -> ev.Participant:
    return ev.Participant(
        participant_id=p.participant_id,
        connection_id=p.connection_id,
        role=_ROLES.get(p.role, "publisher"),
        display_name=p.display_name,
        tracks=tuple(track_from_pb(t) for t in p.tracks),
        joined_at_ms=p.joined_at_ms,
    )


def entry_to_pb(e: ev.SubscriptionEntry) -> media_pb2.SubscriptionEntry:
    return media_pb2.SubscriptionEntry(
        participant_id=e.participant_id, connection_id=e.connection_id, track_ids=e.track_ids
    )


def entry_from_pb(e: media_pb2.SubscriptionEntry) -> ev.SubscriptionEntry:
    return ev.SubscriptionEntry(
        participant_id=e.participant_id,
        connection_id=e.connection_id,
        track_ids=tuple(e.track_ids),
    )


# --- client messages ------------------------------------------------------------------------


def session_options(hello: media_pb2.Hello) -> ev.SessionOptions:
    return ev.SessionOptions(
        subscription_mode=_MODES.get(hello.subscription_mode, ev.SUBSCRIPTION_AUTO),
        max_subscriptions=hello.max_subscriptions,
        offer_subscriber_at_join=hello.offer_subscriber_at_join,
        client=hello.client,
    )


def hello_message(ticket: str, options: ev.SessionOptions) -> media_pb2.ClientMessage:
    return media_pb2.ClientMessage(
        hello=media_pb2.Hello(
            ticket=ticket,
            client=options.client,
            subscription_mode=_MODE_VALUES.get(
                options.subscription_mode, media_pb2.SUBSCRIPTION_MODE_UNSPECIFIED
            ),
            max_subscriptions=options.max_subscriptions,
            offer_subscriber_at_join=options.offer_subscriber_at_join,
        )
    )


_QUALITIES = {
    media_pb2.VIDEO_QUALITY_UNSPECIFIED: "",
    media_pb2.VIDEO_QUALITY_LOW: "low",
    media_pb2.VIDEO_QUALITY_MEDIUM: "medium",
    media_pb2.VIDEO_QUALITY_HIGH: "high",
    media_pb2.VIDEO_QUALITY_OFF: "off",
}
_QUALITY_VALUES = {name: value for value, name in _QUALITIES.items()}


def client_event(message: media_pb2.ClientMessage) -> ev.ClientEvent:
    """Decode one ClientMessage (after Hello) into the event the session core handles."""
    rid = message.request_id
    kind = message.WhichOneof("message")
    if kind == "publish_offer":
        offer = message.publish_offer
        return ev.Publish(
            request_id=rid,
            sdp=offer.offer.sdp,
            sdp_type=offer.offer.type,
            tracks=tuple(
                ev.TrackDeclaration(
                    mid=t.mid,
                    source=source_name(t.source),
                    muted=t.muted,
                    width=t.width,
                    height=t.height,
                    name=t.name,
                    track_id=t.track_id,
                )
                for t in offer.tracks
            ),
        )
    if kind == "subscriber_answer":
        answer = message.subscriber_answer
        return ev.AnswerSubscriber(
            version=answer.version, sdp=answer.answer.sdp, sdp_type=answer.answer.type
        )
    if kind == "ice_candidate":
        c = message.ice_candidate
        return ev.AddIceCandidate(
            connection=_CONNECTIONS.get(c.connection, ""),
            candidate=c.candidate,
            sdp_mid=c.sdp_mid,
            sdp_mline_index=c.sdp_mline_index,
        )
    if kind == "set_muted":
        return ev.SetMuted(rid, message.set_muted.track_id, message.set_muted.muted)
    if kind == "set_subscription":
        s = message.set_subscription
        if s.mode not in (*_MODES, media_pb2.SUBSCRIPTION_MODE_UNSPECIFIED):
            return ev.Unknown(rid, "unknown subscription mode")
        return ev.SetSubscription(
            request_id=rid,
            mode=_MODES.get(s.mode, ""),
            participant_ids=tuple(s.participant_ids),
            entries=tuple(entry_from_pb(e) for e in s.entries),
            max_subscriptions=s.max_subscriptions,
        )
    if kind == "custom_event":
        return ev.SendCustomEvent(
            rid, message.custom_event.payload, event_id=message.custom_event.event_id
        )
    if kind == "set_display_name":
        return ev.SetDisplayName(rid, message.set_display_name.display_name)
    if kind == "set_video_quality":
        q = message.set_video_quality
        quality = _QUALITIES.get(q.quality)
        if quality is None:
            return ev.Unknown(rid, "unknown video quality")
        return ev.SetVideoQuality(rid, q.track_id, quality, q.width, q.height)
    if kind == "leave":
        return ev.Leave(rid)
    if kind == "hello":
        return ev.Unknown(rid, "already joined: hello is only sent once")
    return ev.Unknown(rid)


def client_message(event: ev.ClientEvent) -> media_pb2.ClientMessage:
    """Encode a client event (the signaling service speaking to a node)."""
    if isinstance(event, ev.Publish):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            publish_offer=media_pb2.PublishOffer(
                offer=media_pb2.SessionDescription(type=event.sdp_type, sdp=event.sdp),
                tracks=[
                    media_pb2.PublishedTrack(
                        mid=t.mid,
                        source=source_value(t.source),  # type: ignore[arg-type]
                        muted=t.muted,
                        width=t.width,
                        height=t.height,
                        name=t.name,
                        track_id=t.track_id,
                    )
                    for t in event.tracks
                ],
            ),
        )
    if isinstance(event, ev.AnswerSubscriber):
        return media_pb2.ClientMessage(
            subscriber_answer=media_pb2.SubscriberAnswer(
                answer=media_pb2.SessionDescription(type=event.sdp_type, sdp=event.sdp),
                version=event.version,
            )
        )
    if isinstance(event, ev.AddIceCandidate):
        return media_pb2.ClientMessage(
            ice_candidate=media_pb2.IceCandidate(
                connection=_CONNECTION_VALUES.get(
                    event.connection, media_pb2.PEER_CONNECTION_ROLE_UNSPECIFIED
                ),
                candidate=event.candidate,
                sdp_mid=event.sdp_mid,
                sdp_mline_index=event.sdp_mline_index,
            )
        )
    if isinstance(event, ev.SetMuted):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            set_muted=media_pb2.SetMuted(track_id=event.track_id, muted=event.muted),
        )
    if isinstance(event, ev.SetSubscription):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            set_subscription=media_pb2.SetSubscription(
                mode=_MODE_VALUES.get(event.mode, media_pb2.SUBSCRIPTION_MODE_UNSPECIFIED),
                participant_ids=event.participant_ids,
                max_subscriptions=event.max_subscriptions,
                entries=[entry_to_pb(e) for e in event.entries],
            ),
        )
    if isinstance(event, ev.SendCustomEvent):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            custom_event=media_pb2.CustomEventRequest(
                payload=event.payload, event_id=event.event_id
            ),
        )
    if isinstance(event, ev.SetDisplayName):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            set_display_name=media_pb2.SetDisplayName(display_name=event.display_name),
        )
    if isinstance(event, ev.SetVideoQuality):
        return media_pb2.ClientMessage(
            request_id=event.request_id,
            set_video_quality=media_pb2.SetVideoQuality(
                track_id=event.track_id,
                quality=_QUALITY_VALUES.get(event.quality, media_pb2.VIDEO_QUALITY_UNSPECIFIED),
                width=event.width,
                height=event.height,
            ),
        )
    if isinstance(event, ev.Leave):
        return media_pb2.ClientMessage(request_id=event.request_id, leave=media_pb2.LeaveSession())
    return media_pb2.ClientMessage(request_id=event.request_id)


# --- server messages ------------------------------------------------------------------------


def server_message(event: ev.ServerEvent) -> media_pb2.ServerMessage:
    """Encode one event of the session core for the gRPC stream."""
    M = media_pb2.ServerMessage
    if isinstance(event, ev.Joined):
        return M(
            joined=media_pb2.Joined(
                space_id=event.space_id,
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                role=_ROLE_VALUES.get(event.role, 0),  # type: ignore[arg-type]
                display_name=event.display_name,
                node_id=event.node_id,
                active_session_id=event.active_session_id,
                participants=[participant_to_pb(p) for p in event.participants],
                subscription_mode=_MODE_VALUES.get(
                    event.subscription_mode, media_pb2.SUBSCRIPTION_MODE_AUTO
                ),
                max_subscriptions=event.max_subscriptions,
            )
        )
    if isinstance(event, ev.Ack):
        return M(request_id=event.request_id, ack=media_pb2.Ack())
    if isinstance(event, ev.RequestFailed):
        return M(
            request_id=event.request_id,
            error=media_pb2.SessionError(code=event.code, message=event.message, fatal=event.fatal),
        )
    if isinstance(event, ev.PublishAnswered):
        return M(
            request_id=event.request_id,
            publish_answer=media_pb2.PublishAnswer(
                answer=media_pb2.SessionDescription(type="answer", sdp=event.sdp),
                tracks=[
                    media_pb2.PublishedTrackResult(mid=mid, track=track_to_pb(track))
                    for mid, track in event.tracks
                ],
            ),
        )
    if isinstance(event, ev.SubscriberOffered):
        return M(
            subscriber_offer=media_pb2.SubscriberOffer(
                offer=media_pb2.SessionDescription(type="offer", sdp=event.sdp),
                tracks=[
                    media_pb2.SubscribedTrack(
                        mid=t.mid,
                        participant_id=t.participant_id,
                        connection_id=t.connection_id,
                        track_id=t.track_id,
                        kind=_KIND_VALUES.get(t.kind, media_pb2.TRACK_KIND_UNSPECIFIED),
                        source=source_value(t.source),  # type: ignore[arg-type]
                    )
                    for t in event.tracks
                ],
                version=event.version,
            )
        )
    if isinstance(event, ev.ParticipantJoined):
        return M(
            participant_joined=media_pb2.ParticipantJoined(
                participant=participant_to_pb(event.participant)
            )
        )
    if isinstance(event, ev.ParticipantLeft):
        return M(
            participant_left=media_pb2.ParticipantLeft(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                reason=event.reason,
            )
        )
    if isinstance(event, ev.TrackPublished):
        return M(
            track_published=media_pb2.TrackPublished(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                track=track_to_pb(event.track),
            )
        )
    if isinstance(event, ev.TrackUnpublished):
        return M(
            track_unpublished=media_pb2.TrackUnpublished(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                track_id=event.track_id,
            )
        )
    if isinstance(event, ev.TrackMuted):
        return M(
            track_muted=media_pb2.TrackMuted(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                track_id=event.track_id,
                muted=event.muted,
            )
        )
    if isinstance(event, ev.ActiveSpeakers):
        return M(
            active_speakers=media_pb2.ActiveSpeakers(
                speakers=[
                    media_pb2.Speaker(
                        participant_id=s.participant_id,
                        connection_id=s.connection_id,
                        track_id=s.track_id,
                        level=s.level,
                    )
                    for s in event.speakers
                ]
            )
        )
    if isinstance(event, ev.CustomEventDelivered):
        return M(
            request_id=event.request_id,
            custom_event=media_pb2.CustomEvent(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                payload=event.payload,
                seq=event.seq,
                event_id=event.event_id,
            ),
        )
    if isinstance(event, ev.DisplayNameChanged):
        return M(
            request_id=event.request_id,
            display_name_changed=media_pb2.DisplayNameChanged(
                participant_id=event.participant_id,
                connection_id=event.connection_id,
                display_name=event.display_name,
            ),
        )
    if isinstance(event, ev.SubscriptionUpdated):
        return M(
            request_id=event.request_id,
            subscription_updated=media_pb2.SubscriptionUpdated(
                successes=[entry_to_pb(e) for e in event.successes],
                failures=[entry_to_pb(e) for e in event.failures],
            ),
        )
    if isinstance(event, ev.Closing):
        return M(
            closing=media_pb2.Closing(
                reason=close_reason_value(event.reason),  # type: ignore[arg-type]
                message=event.message,
                rejoin=event.rejoin,
            )
        )
    if isinstance(event, ev.BroadcastStateChanged):
        return M(
            broadcast_state=media_pb2.BroadcastState(
                broadcasting=event.broadcasting, broadcast_ids=list(event.broadcast_ids)
            )
        )
    if isinstance(event, ev.AudioOnly):
        return M(
            audio_only=media_pb2.AudioOnly(
                active=event.active, estimated_bitrate=event.estimated_bitrate
            )
        )
    if isinstance(event, ev.LayersWanted):
        return M(
            layers_wanted=media_pb2.LayersWanted(track_id=event.track_id, rids=list(event.rids))
        )
    raise TypeError(f"not a server event: {event!r}")


def server_event(message: media_pb2.ServerMessage) -> ev.ServerEvent | None:
    """Decode a ServerMessage (the signaling service reading a node's stream); None for a
    message this version does not know."""
    rid = message.request_id
    kind = message.WhichOneof("message")
    if kind == "broadcast_state":
        return ev.BroadcastStateChanged(
            message.broadcast_state.broadcasting, tuple(message.broadcast_state.broadcast_ids)
        )
    if kind == "joined":
        j = message.joined
        return ev.Joined(
            space_id=j.space_id,
            participant_id=j.participant_id,
            connection_id=j.connection_id,
            role=_ROLES.get(j.role, "publisher"),
            display_name=j.display_name,
            node_id=j.node_id,
            active_session_id=j.active_session_id,
            participants=tuple(participant_from_pb(p) for p in j.participants),
            subscription_mode=_MODES.get(j.subscription_mode, ev.SUBSCRIPTION_AUTO),
            max_subscriptions=j.max_subscriptions,
        )
    if kind == "ack":
        return ev.Ack(rid)
    if kind == "error":
        e = message.error
        return ev.RequestFailed(rid, e.code, e.message, e.fatal)
    if kind == "publish_answer":
        a = message.publish_answer
        return ev.PublishAnswered(
            request_id=rid,
            sdp=a.answer.sdp,
            tracks=tuple((t.mid, track_from_pb(t.track)) for t in a.tracks),
        )
    if kind == "subscriber_offer":
        o = message.subscriber_offer
        return ev.SubscriberOffered(
            version=o.version,
            sdp=o.offer.sdp,
            tracks=tuple(
                ev.SubscribedTrack(
                    mid=t.mid,
                    participant_id=t.participant_id,
                    connection_id=t.connection_id,
                    track_id=t.track_id,
                    kind=_KINDS.get(t.kind, ""),
                    source=source_name(t.source),
                )
                for t in o.tracks
            ),
        )
    if kind == "participant_joined":
        return ev.ParticipantJoined(participant_from_pb(message.participant_joined.participant))
    if kind == "participant_left":
        left = message.participant_left
        return ev.ParticipantLeft(left.participant_id, left.connection_id, left.reason)
    if kind == "track_published":
        pub = message.track_published
        return ev.TrackPublished(pub.participant_id, pub.connection_id, track_from_pb(pub.track))
    if kind == "track_unpublished":
        unpub = message.track_unpublished
        return ev.TrackUnpublished(unpub.participant_id, unpub.connection_id, unpub.track_id)
    if kind == "track_muted":
        m = message.track_muted
        return ev.TrackMuted(m.participant_id, m.connection_id, m.track_id, m.muted)
    if kind == "active_speakers":
        return ev.ActiveSpeakers(
            tuple(
                ev.Speaker(s.participant_id, s.connection_id, s.level, s.track_id)
                for s in message.active_speakers.speakers
            )
        )
    if kind == "custom_event":
        c = message.custom_event
        return ev.CustomEventDelivered(
            c.participant_id, c.connection_id, c.payload, c.seq, c.event_id, rid
        )
    if kind == "display_name_changed":
        d = message.display_name_changed
        return ev.DisplayNameChanged(d.participant_id, d.connection_id, d.display_name, rid)
    if kind == "subscription_updated":
        u = message.subscription_updated
        return ev.SubscriptionUpdated(
            rid,
            tuple(entry_from_pb(e) for e in u.successes),
            tuple(entry_from_pb(e) for e in u.failures),
        )
    if kind == "closing":
        return ev.Closing(close_reason_name(message.closing.reason), message.closing.message)
    if kind == "audio_only":
        return ev.AudioOnly(message.audio_only.active, message.audio_only.estimated_bitrate)
    if kind == "layers_wanted":
        wanted = message.layers_wanted
        return ev.LayersWanted(wanted.track_id, tuple(wanted.rids))
    return None

"""The `spaces` admin commands: spaces, signing keys, participants, webhooks and the event
stream, over gRPC with the admin key, so that an operator never writes grpcurl JSON by hand.

    spaces space create --passthrough "standup"
    spaces space list --json
    spaces participant list --space SPACE_ID
    spaces events --space SPACE_ID

Every command takes ``--server`` (or SPACES_SERVER; default 127.0.0.1:50051), ``--admin-key``
(or SPACES_ADMIN_KEY), ``--tls``/``--ca-file`` and ``--json``. ``--json`` prints the reply as
grpcurl does (proto field names), so its output feeds ``spaces token --key``/``--space``. A
refused call prints ``spaces: <CODE>: <message>`` on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from spaces.v1 import (
    event_pb2,
    node_pb2,
    participant_pb2,
    presence_pb2,
    presence_pb2_grpc,
    signing_key_pb2,
    signing_key_pb2_grpc,
    space_pb2,
    space_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

DEFAULT_SERVER = "127.0.0.1:50051"
TIMEOUT_S = 20.0
PAGE = 100

Handler = Callable[[argparse.Namespace, grpc.Channel, tuple[tuple[str, str], ...]], int]


class UsageError(Exception):
    pass


# --- output ------------------------------------------------------------------------------------


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Message | dict[str, Any]) -> None:
    data = as_dict(value) if isinstance(value, Message) else value
    print(json.dumps(data, indent=2))


def when(unix_s: float) -> str:
    if not unix_s:
        return "-"
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not cells:
        print("(none)")


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def space_status(value: int) -> str:
    return enum_name(space_pb2.SpaceStatus, value, "SPACE_STATUS_")


def show_space(space: space_pb2.Space) -> None:
    for label, value in (
        ("id", space.id),
        ("status", space_status(space.status)),
        ("created", when(space.created_at)),
        ("participants", space.participant_count),
        ("max participants", space.max_participants or "server default"),
        ("active session", space.active_session_id or "-"),
        ("passthrough", space.passthrough or "-"),
    ):
        print(f"{label + ':':<18}{value}")


def show_participant(p: participant_pb2.Participant) -> None:
    for label, value in (
        ("participant id", p.participant_id),
        ("space", p.space_id),
        ("connection", p.connection_id),
        ("role", enum_name(participant_pb2.Role, p.role, "ROLE_")),
        ("state", enum_name(participant_pb2.ParticipantState, p.state, "PARTICIPANT_STATE_")),
        ("display name", p.display_name or "-"),
        ("node", p.node_id or "-"),
        ("joined", when(p.joined_at_ms / 1000)),
    ):
        print(f"{label + ':':<18}{value}")


# --- spaces ------------------------------------------------------------------------------------


def space_create(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = space_pb2_grpc.SpaceServiceStub(channel).CreateSpace(
        space_pb2.CreateSpaceRequest(
            passthrough=args.passthrough, max_participants=args.max_participants
        ),
        metadata=md,
        timeout=TIMEOUT_S,
    )
    print_json(reply) if args.json else show_space(reply)
    return 0


def space_get(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = space_pb2_grpc.SpaceServiceStub(channel).GetSpace(
        space_pb2.GetSpaceRequest(id=args.id), metadata=md, timeout=TIMEOUT_S
    )
    print_json(reply) if args.json else show_space(reply)
    return 0


def space_update(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    request = space_pb2.UpdateSpaceRequest(id=args.id)
    if args.passthrough is not None:
        request.passthrough = args.passthrough
    if args.max_participants is not None:
        request.max_participants = args.max_participants
    if not request.HasField("passthrough") and not request.HasField("max_participants"):
        raise UsageError("give --passthrough and/or --max-participants")
    reply = space_pb2_grpc.SpaceServiceStub(channel).UpdateSpace(
        request, metadata=md, timeout=TIMEOUT_S
    )
    print_json(reply) if args.json else show_space(reply)
    return 0


def space_list(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    stub = space_pb2_grpc.SpaceServiceStub(channel)
    spaces: list[space_pb2.Space] = []
    token = args.page_token
    while True:
        reply = stub.ListSpaces(
            space_pb2.ListSpacesRequest(limit=args.limit, page_token=token),
            metadata=md,
            timeout=TIMEOUT_S,
        )
        spaces += reply.spaces
        token = reply.next_page_token
        if not token or not args.all:
            break
    if args.json:
        print_json(
            {"spaces": [as_dict(s) for s in spaces], "next_page_token": "" if args.all else token}
        )
        return 0
    table(
        ["ID", "STATUS", "PARTICIPANTS", "CREATED", "PASSTHROUGH"],
        [
            (s.id, space_status(s.status), s.participant_count, when(s.created_at), s.passthrough)
            for s in spaces
        ],
    )
    if token and not args.all:
        print(f"more: --page-token {token} (or --all)")
    return 0


def space_delete(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = space_pb2_grpc.SpaceServiceStub(channel).DeleteSpace(
        space_pb2.DeleteSpaceRequest(id=args.id, force=args.force), metadata=md, timeout=TIMEOUT_S
    )
    if args.json:
        print_json(reply)
    else:
        print(f"deleted space {args.id}" + (f"; disconnected {reply.disconnected}" * args.force))
    return 0


# --- signing keys ------------------------------------------------------------------------------


def key_create(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = signing_key_pb2_grpc.SigningKeyServiceStub(channel).CreateSigningKey(
        signing_key_pb2.CreateSigningKeyRequest(), metadata=md, timeout=TIMEOUT_S
    )
    if args.json:
        print_json(reply)
    else:
        print(f"id:          {reply.id}")
        print(f"created:     {when(reply.created_at)}")
        print(f"private_key: {reply.private_key}")
        print(
            "the private key is shown once and not stored: keep it on your backend "
            "(--json > key.json saves it for `spaces token --key key.json`)",
            file=sys.stderr,
        )
    return 0


def key_get(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = signing_key_pb2_grpc.SigningKeyServiceStub(channel).GetSigningKey(
        signing_key_pb2.GetSigningKeyRequest(id=args.id), metadata=md, timeout=TIMEOUT_S
    )
    if args.json:
        print_json(reply)
    else:
        print(f"id:      {reply.id}\ncreated: {when(reply.created_at)}")
    return 0


def key_list(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    stub = signing_key_pb2_grpc.SigningKeyServiceStub(channel)
    keys: list[signing_key_pb2.SigningKey] = []
    token = ""
    while True:
        reply = stub.ListSigningKeys(
            signing_key_pb2.ListSigningKeysRequest(limit=PAGE, page_token=token),
            metadata=md,
            timeout=TIMEOUT_S,
        )
        keys += reply.signing_keys
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        print_json({"signing_keys": [as_dict(k) for k in keys]})
    else:
        table(["ID", "CREATED"], [(k.id, when(k.created_at)) for k in keys])
    return 0


def key_delete(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = signing_key_pb2_grpc.SigningKeyServiceStub(channel).DeleteSigningKey(
        signing_key_pb2.DeleteSigningKeyRequest(id=args.id), metadata=md, timeout=TIMEOUT_S
    )
    print_json(reply) if args.json else print(
        f"deleted signing key {args.id}: tokens signed with it no longer join"
    )
    return 0


# --- participants ------------------------------------------------------------------------------


def participant_list(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    stub = presence_pb2_grpc.PresenceServiceStub(channel)
    people: list[participant_pb2.Participant] = []
    token = ""
    while True:
        reply = stub.ListParticipants(
            presence_pb2.ListParticipantsRequest(space_id=args.space, limit=PAGE, page_token=token),
            metadata=md,
            timeout=TIMEOUT_S,
        )
        people += reply.participants
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        print_json({"participants": [as_dict(p) for p in people]})
        return 0
    table(
        ["PARTICIPANT", "STATE", "ROLE", "CONNECTION", "NODE", "DISPLAY NAME"],
        [
            (
                p.participant_id,
                enum_name(participant_pb2.ParticipantState, p.state, "PARTICIPANT_STATE_"),
                enum_name(participant_pb2.Role, p.role, "ROLE_"),
                p.connection_id,
                p.node_id,
                p.display_name,
            )
            for p in people
        ],
    )
    return 0


def participant_get(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = presence_pb2_grpc.PresenceServiceStub(channel).GetParticipant(
        presence_pb2.GetParticipantRequest(space_id=args.space, participant_id=args.participant),
        metadata=md,
        timeout=TIMEOUT_S,
    )
    print_json(reply) if args.json else show_participant(reply)
    return 0


def participant_remove(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = presence_pb2_grpc.PresenceServiceStub(channel).RemoveParticipant(
        presence_pb2.RemoveParticipantRequest(space_id=args.space, participant_id=args.participant),
        metadata=md,
        timeout=TIMEOUT_S,
    )
    print_json(reply) if args.json else print(f"removed {args.participant} from space {args.space}")
    return 0


# --- webhooks ----------------------------------------------------------------------------------


def webhook_create(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = webhook_pb2_grpc.WebhookServiceStub(channel).CreateWebhookEndpoint(
        webhook_pb2.CreateWebhookEndpointRequest(
            url=args.url, secret=args.secret or "", event_types=args.event or []
        ),
        metadata=md,
        timeout=TIMEOUT_S,
    )
    if args.json:
        print_json(reply)
    else:
        print(f"id:     {reply.id}\nurl:    {reply.url}")
        print(f"events: {', '.join(reply.event_types) or 'all'}")
        print(f"secret: {reply.secret}   (shown only now: verify mux-signature with it)")
    return 0


def webhook_list(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = webhook_pb2_grpc.WebhookServiceStub(channel).ListWebhookEndpoints(
        webhook_pb2.ListWebhookEndpointsRequest(), metadata=md, timeout=TIMEOUT_S
    )
    if args.json:
        print_json(reply)
        return 0
    table(
        ["ID", "URL", "EVENTS", "CREATED", "FROM CONFIG"],
        [
            (
                e.id,
                e.url,
                ",".join(e.event_types) or "all",
                when(e.created_at),
                "yes" if e.from_config else "",
            )
            for e in reply.endpoints
        ],
    )
    return 0


def webhook_delete(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = webhook_pb2_grpc.WebhookServiceStub(channel).DeleteWebhookEndpoint(
        webhook_pb2.DeleteWebhookEndpointRequest(id=args.id), metadata=md, timeout=TIMEOUT_S
    )
    print_json(reply) if args.json else print(f"deleted webhook endpoint {args.id}")
    return 0


def webhook_dead_letters(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = webhook_pb2_grpc.WebhookServiceStub(channel).ListDeadLetters(
        webhook_pb2.ListDeadLettersRequest(limit=args.limit), metadata=md, timeout=TIMEOUT_S
    )
    if args.json:
        print_json(reply)
        return 0
    table(
        ["ID", "ENDPOINT", "EVENT", "TYPE", "ATTEMPTS", "FAILED", "LAST ERROR"],
        [
            (
                d.id,
                d.endpoint_id,
                d.event_id,
                d.event_type,
                d.attempts,
                when(d.failed_at_ms / 1000),
                d.last_error[:60],
            )
            for d in reply.dead_letters
        ],
    )
    return 0


def webhook_replay(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    reply = webhook_pb2_grpc.WebhookServiceStub(channel).ReplayDeadLetters(
        webhook_pb2.ReplayDeadLettersRequest(ids=args.ids), metadata=md, timeout=TIMEOUT_S
    )
    print_json(reply) if args.json else print(f"queued {reply.replayed} dead letter(s) again")
    return 0


# --- events ------------------------------------------------------------------------------------


def describe_event(event: event_pb2.Event) -> str:
    kind = enum_name(event_pb2.EventType, event.type, "EVENT_TYPE_")
    subject = event.WhichOneof("subject")
    detail = ""
    if subject == "participant":
        detail = f"{event.participant.participant_id} ({event.participant.connection_id})"
    elif subject == "space":
        detail = space_status(event.space.status)
    elif subject == "node":
        detail = f"{event.node.id} {enum_name(node_pb2.NodeState, event.node.state, 'NODE_STATE_')}"
    stamp = datetime.fromtimestamp(event.created_at_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
    reason = f" reason={event.reason}" if event.reason else ""
    return f"{stamp} {event.id} {kind} space={event.space_id or '-'} {detail}{reason}".rstrip()


def events(args: argparse.Namespace, channel: grpc.Channel, md: Any) -> int:
    """Follows WatchEvents until interrupted (or --count events)."""
    stream = presence_pb2_grpc.PresenceServiceStub(channel).WatchEvents(
        presence_pb2.WatchEventsRequest(space_id=args.space or "", after_id=args.after or ""),
        metadata=md,
    )
    seen = 0
    try:
        for event in stream:
            if args.json:
                print(json.dumps(as_dict(event)), flush=True)
            else:
                print(describe_event(event), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                stream.cancel()
                return 0
    except KeyboardInterrupt:
        stream.cancel()
        return 0
    return 0


# --- wiring ------------------------------------------------------------------------------------


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("SPACES_SERVER", DEFAULT_SERVER),
        help="API address host:port (or SPACES_SERVER)",
    )
    parser.add_argument(
        "--admin-key",
        default=None,
        help="admin credential (default: SPACES_ADMIN_KEY)",
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument("--ca-file", help="CA bundle for --tls (default: the system's)")


def add_admin_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    def command(
        parent: Any, name: str, handler: Handler, help_text: str
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text, formatter_class=formatter
        )
        common(parser)
        parser.set_defaults(func=lambda args: run(args, handler))
        return parser

    def group(name: str, help_text: str) -> Any:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    spaces = group("space", "manage spaces (SpaceService)")
    p = command(spaces, "create", space_create, "create a space")
    p.add_argument("--passthrough", default="", help="your data, at most 255 characters")
    p.add_argument(
        "--max-participants", type=int, default=0, help="participant limit (0: server default)"
    )
    p = command(spaces, "get", space_get, "show a space")
    p.add_argument("id")
    p = command(spaces, "list", space_list, "list spaces in creation order")
    p.add_argument("--limit", type=int, default=25, help="page size (at most 100)")
    p.add_argument("--page-token", default="", help="next_page_token of the previous page")
    p.add_argument("--all", action="store_true", help="follow every page")
    p = command(spaces, "update", space_update, "change a space's passthrough or limit")
    p.add_argument("id")
    p.add_argument("--passthrough")
    p.add_argument("--max-participants", type=int)
    p = command(spaces, "delete", space_delete, "delete a space")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="delete while active: disconnects everyone")

    keys = group("key", "manage signing keys (SigningKeyService)")
    command(keys, "create", key_create, "create a signing key (its private key is shown once)")
    p = command(keys, "get", key_get, "show a signing key")
    p.add_argument("id")
    command(keys, "list", key_list, "list signing keys")
    p = command(keys, "delete", key_delete, "delete a signing key: its tokens stop working")
    p.add_argument("id")

    people = group("participant", "list and remove participants (PresenceService)")
    p = command(people, "list", participant_list, "list a space's participants")
    p.add_argument("--space", required=True, help="space id")
    p = command(people, "get", participant_get, "show one participant")
    p.add_argument("--space", required=True, help="space id")
    p.add_argument("participant", help="participant id")
    p = command(people, "remove", participant_remove, "disconnect a participant (no rejoin)")
    p.add_argument("--space", required=True, help="space id")
    p.add_argument("participant", help="participant id")

    hooks = group("webhook", "manage webhook endpoints and dead letters (WebhookService)")
    p = command(hooks, "create", webhook_create, "add an endpoint")
    p.add_argument("--url", required=True, help="http:// or https:// URL")
    p.add_argument("--secret", help="signing secret (default: generated)")
    p.add_argument(
        "--event",
        action="append",
        help="a Mux event name to receive (repeat; default: all), e.g. video.space.idle",
    )
    command(hooks, "list", webhook_list, "list endpoints")
    p = command(hooks, "delete", webhook_delete, "remove an endpoint")
    p.add_argument("id")
    p = command(hooks, "dead-letters", webhook_dead_letters, "deliveries that failed every try")
    p.add_argument("--limit", type=int, default=100, help="at most this many (up to 1000)")
    p = command(hooks, "replay", webhook_replay, "queue dead letters for delivery again")
    p.add_argument("ids", nargs="*", help="dead letter ids (default: all)")

    p = command(sub, "events", events, "follow the event stream (WatchEvents) until Ctrl-C")
    p.add_argument("--space", help="only this space's events (default: every space)")
    p.add_argument("--after", help="resume after this event id (default: new events only)")
    p.add_argument("--count", type=int, default=0, help="stop after this many (0: follow)")


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls:
        root = Path(args.ca_file).read_bytes() if args.ca_file else None
        return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root))
    return grpc.insecure_channel(args.server)


def run(args: argparse.Namespace, handler: Handler) -> int:
    key = args.admin_key if args.admin_key is not None else os.environ.get("SPACES_ADMIN_KEY", "")
    if not key:
        print(
            "spaces: no admin key: pass --admin-key or set SPACES_ADMIN_KEY "
            "(make run logs a generated one as 'admin key')",
            file=sys.stderr,
        )
        return 2
    metadata = (("authorization", f"Bearer {key}"),)
    try:
        with open_channel(args) as channel:
            return handler(args, channel, metadata)
    except grpc.RpcError as exc:
        code = exc.code()
        details = exc.details()
        print(f"spaces: {code.name}: {details}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"spaces: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"spaces: {exc}", file=sys.stderr)
        return 2

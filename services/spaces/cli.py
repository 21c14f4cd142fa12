"""The `spaces` command: serve, media-node, token, join, drain, cluster, and the admin commands
(space, key, participant, webhook, events: see spaces.admin_cli)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from spaces.config import ServerConfig
from spaces.logs import setup_logging

logger = logging.getLogger("spaces")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


HURRY_EXIT_S = 5.0
"""After a second interrupt, the process exits by force if stopping takes longer than this."""


def _run_server(config: ServerConfig) -> int:
    from spaces.server import serve

    setup_logging(config.log_format, config.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        drain = asyncio.Event()
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()

        def interrupted() -> None:
            if not stop.is_set():
                stop.set()
                return
            # A second interrupt: stop at once, and never hang on the way out.
            hurry.set()
            loop.call_later(HURRY_EXIT_S, os._exit, 130)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, interrupted)
        loop.add_signal_handler(signal.SIGUSR1, drain.set)
        await serve(config, stop, drain, hurry)

    try:
        asyncio.run(main())
    except (OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_env(services=args.services)
    except ValueError as exc:
        print(f"spaces: {exc}", file=sys.stderr)
        return 2
    return _run_server(config)


def cmd_media_node(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_env(services="media")
    except ValueError as exc:
        print(f"spaces: {exc}", file=sys.stderr)
        return 2
    if not config.redis_url:
        print("spaces: media-node needs SPACES_REDIS_URL (or use `spaces serve`)", file=sys.stderr)
        return 2
    return _run_server(config)


def cmd_broadcaster(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_env(services="broadcaster")
    except ValueError as exc:
        print(f"spaces: {exc}", file=sys.stderr)
        return 2
    if not config.redis_url:
        print(
            "spaces: broadcaster needs SPACES_REDIS_URL (`spaces serve` runs one)", file=sys.stderr
        )
        return 2
    return _run_server(config)


def _read_json_or_value(value: str, *fields: str) -> str:
    """``value`` itself, or the first of ``fields`` in a JSON file (e.g. grpcurl's output)."""
    path = Path(value)
    if value.endswith(".json") or (len(value) < 4096 and path.is_file()):
        data = json.loads(path.read_text())
        for name in fields:
            if name in data:
                return str(data[name])
        raise ValueError(f"{value} has no {fields[0]!r}")
    return value


def cmd_token(args: argparse.Namespace) -> int:
    from spaces.sdk.tokens import sign_token

    try:
        if args.key:
            key_id = _read_json_or_value(args.key, "id")
            private_key = _read_json_or_value(args.key, "private_key", "privateKey")
        else:
            key_id = args.key_id or os.environ.get("SPACES_SIGNING_KEY_ID", "")
            private_key = args.private_key or os.environ.get("SPACES_SIGNING_KEY_PRIVATE", "")
            if args.private_key_file:
                private_key = Path(args.private_key_file).read_text()
        if not key_id or not private_key:
            print(
                "spaces token: give --key key.json, or --key-id and --private-key", file=sys.stderr
            )
            return 2
        space_id = _read_json_or_value(args.space, "id")
        token = sign_token(
            key_id,
            private_key,
            space_id,
            role=args.role,
            participant_id=args.participant_id,
            ttl=args.ttl,
        )
    except (OSError, ValueError) as exc:
        print(f"spaces token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_drain(args: argparse.Namespace) -> int:
    """Start draining a local media node (SIGUSR1) and wait until it is ready to exit: the
    Kubernetes preStop hook. Exits 0 once drained, 1 on timeout."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        os.kill(args.pid, signal.SIGUSR1)
    except OSError as exc:
        print(f"spaces drain: cannot signal pid {args.pid}: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="spaces.v1.MediaService"), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    print("drained")
                    return 0
            except grpc.RpcError as exc:
                # Only a node that stopped listening counts as gone; anything else (a TLS port,
                # a wrong address) must not end the preStop hook early.
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not _process_alive(args.pid):
                    print("drained (node is gone)")
                    return 0
            time.sleep(1)
    print("spaces drain: timed out; the node will be stopped anyway", file=sys.stderr)
    return 1


def cmd_join(args: argparse.Namespace) -> int:
    from spaces.sdk.join_cli import run_join

    setup_logging("text", "WARNING")
    return asyncio.run(run_join(args))


def cmd_cluster(args: argparse.Namespace) -> int:
    from spaces.cluster import run_cluster

    setup_logging("text", "INFO")
    return run_cluster(args)


def cmd_redis_migrate(args: argparse.Namespace) -> int:
    from spaces.store import migrate
    from spaces.store.router import is_cluster_url

    url = args.redis_url or os.environ.get("SPACES_REDIS_URL", "")
    if not url or is_cluster_url(url):
        print(
            "redis-migrate needs the standalone Redis to migrate (--redis-url or SPACES_REDIS_URL)"
        )
        return 2
    return asyncio.run(migrate.run(url, args.dry_run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spaces", description="Self-hosted real-time video spaces."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the services (all of them, with an embedded media node, by default)",
        description="Configuration comes from SPACES_* variables; see the README.",
    )
    serve.add_argument(
        "--services",
        help="comma-separated subset of control,auth,presence,media,webhooks (default: all)",
    )
    serve.set_defaults(func=cmd_serve)

    node = sub.add_parser("media-node", help="run a media node (needs SPACES_REDIS_URL)")
    node.set_defaults(func=cmd_media_node)

    broadcaster = sub.add_parser(
        "broadcaster", help="run a broadcaster worker (needs SPACES_REDIS_URL)"
    )
    broadcaster.set_defaults(func=cmd_broadcaster)

    token = sub.add_parser(
        "token",
        help="sign a join token (JWT) with a signing key",
        formatter_class=DefaultsFormatter,
    )
    token.add_argument("--key", help="JSON file from CreateSigningKey (id and privateKey)")
    token.add_argument("--key-id", help="signing key id (or SPACES_SIGNING_KEY_ID)")
    token.add_argument(
        "--private-key", help="base64 PEM from CreateSigningKey (or SPACES_SIGNING_KEY_PRIVATE)"
    )
    token.add_argument("--private-key-file", help="file holding the private key")
    token.add_argument(
        "--space", "--space-id", dest="space", required=True, help="space id, or its JSON file"
    )
    token.add_argument("--role", choices=["publisher", "subscriber"], default="publisher")
    token.add_argument("--participant-id", help="fixed participant id (default: server-generated)")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.set_defaults(func=cmd_token)

    drain = sub.add_parser(
        "drain", help="drain a local media node and wait until it is ready to exit (preStop)"
    )
    drain.add_argument("--pid", type=int, default=1, help="the media node's process id")
    drain.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="its plaintext gRPC health address (SPACES_HEALTH_ADDR when TLS is on)",
    )
    drain.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    drain.set_defaults(func=cmd_drain)

    join = sub.add_parser(
        "join",
        help="join a space, print its events and the frames received (publish with "
        "--test-pattern or --file)",
        description="Join a space with a token, print every event, and on leaving print how "
        "many frames arrived per remote track. Publishes nothing unless --test-pattern or "
        "--file is given.",
        formatter_class=DefaultsFormatter,
    )
    join.add_argument("--token", required=True, help="join token (JWT), e.g. from `spaces token`")
    join.add_argument("--server", default="127.0.0.1:50051", help="presence address host:port")
    media = join.add_mutually_exclusive_group()
    media.add_argument(
        "--test-pattern",
        action="store_true",
        help="publish a generated camera track (640x480, 30 fps, in a colour derived from the "
        "participant id) and a microphone tone",
    )
    media.add_argument("--file", help="publish the video and audio of a media file (e.g. a.mp4)")
    join.add_argument("--duration", type=float, default=10.0, help="seconds to stay (0: forever)")
    join.add_argument("--display-name", default="", help="display name shown to others")
    join.add_argument("--tls", action="store_true", help="use TLS to reach the servers")
    join.add_argument("--ca-file", help="CA bundle for --tls (default: the system's)")
    join.add_argument(
        "--relay",
        action="store_true",
        help="send media only through the TURN server Join hands out (checks TURN end to end)",
    )
    join.set_defaults(func=cmd_join)

    cluster = sub.add_parser(
        "cluster",
        help="local cluster: Redis, 2 API processes (one address for every service), 2 media nodes",
        formatter_class=DefaultsFormatter,
    )
    cluster.add_argument("--base-port", type=int, default=50100, help="first port to use")
    cluster.add_argument("--nodes", type=int, default=2, help="media nodes")
    cluster.add_argument("--replicas", type=int, default=2, help="processes per API role")
    cluster.add_argument(
        "--split",
        action="store_true",
        help="run control, auth, presence and webhooks as separate processes (as on Kubernetes)",
    )
    cluster.add_argument("--broadcasters", type=int, default=1, help="broadcaster workers")
    cluster.add_argument("--signals", type=int, default=1, help="signaling services for browsers")
    cluster.set_defaults(func=cmd_cluster)

    migrate = sub.add_parser(
        "redis-migrate",
        help="move a Redis from the unsharded key layout to the sharded one (Spaces stopped)",
        description="Keeps spaces (with their broadcasts), signing keys and webhook endpoints; "
        "see docs/operations.md.",
        formatter_class=DefaultsFormatter,
    )
    migrate.add_argument("--redis-url", help="the Redis to migrate (default: SPACES_REDIS_URL)")
    migrate.add_argument("--dry-run", action="store_true", help="only count what would move")
    migrate.set_defaults(func=cmd_redis_migrate)

    from spaces.admin_cli import add_admin_commands

    add_admin_commands(sub, DefaultsFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

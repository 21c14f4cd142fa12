"""Entry point of a load-generator process: ``python -m bench.worker ROLE CONFIG_JSON``."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bench.ipc import Channel

Role = Callable[[dict[str, Any], Channel], Awaitable[None]]


def roles() -> dict[str, Role]:
    from bench import join, media_roles, meetings, redis_ceiling, relay

    return {
        "publisher": media_roles.run_publisher,
        "subscribers": media_roles.run_subscribers,
        "relay": relay.run,
        "joiner": join.run_joiner,
        "meeting": meetings.run_participants,
        "redis-load": redis_ceiling.run_generator,
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    channel = Channel()
    role, config = argv[0], json.loads(argv[1])
    run = roles()[role]

    async def go() -> None:
        try:
            await run(config, channel)
        except Exception as exc:
            logging.getLogger("bench.worker").exception("%s failed", role)
            channel.send({"error": f"{type(exc).__name__}: {exc}"})

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

from __future__ import annotations

from typing import Any

from bench.ipc import Channel


async def run_participants(config: dict[str, Any], channel: Channel) -> None:
    raise NotImplementedError

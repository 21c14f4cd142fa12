"""Which spaces on this node are being broadcast, told to their sessions (BroadcastState).

The truth is the broadcasts' status in the store. A node re-reads a space's broadcasts when its
room opens, when BroadcastService nudges it (NodeCommand broadcasts_changed, on start and
stop), and every ``REFRESH_S`` (so a lost nudge only delays the news); it sends BroadcastState to
the room when the set of ACTIVE broadcasts changes, and to each session right after Joined while
it is not empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from spaces import errors
from spaces.session import events as ev
from spaces.tasks import spawn
from spaces.v1 import broadcast_pb2

if TYPE_CHECKING:
    from spaces.media.room import Room
    from spaces.media.session import Session
    from spaces.store.base import Store

logger = logging.getLogger(__name__)

REFRESH_S = 5.0


class BroadcastStates:
    def __init__(self, store: Store, rooms: dict[str, Room]) -> None:
        self._store = store
        self._rooms = rooms
        self._active: dict[str, list[str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def message(active: list[str]) -> ev.BroadcastStateChanged:
        return ev.BroadcastStateChanged(bool(active), tuple(active))

    def greet(self, session: Session) -> None:
        active = self._active.get(session.space_id)
        if active:
            session.send(self.message(active))

    def refresh_soon(self, space_id: str) -> None:
        spawn(self.refresh(space_id), name=f"broadcast-state-{space_id}")

    async def refresh(self, space_id: str) -> None:
        lock = self._locks.setdefault(space_id, asyncio.Lock())
        async with lock:  # one read at a time per space, so the last read is the newest
            try:
                found = await self._store.list_broadcasts(space_id)
            except errors.SpaceNotFound:
                found = []
            except errors.StoreUnavailable:
                return
            active = [b.id for b in found if b.status == broadcast_pb2.BROADCAST_STATUS_ACTIVE]
            room = self._rooms.get(space_id)
            if room is None:
                self._active.pop(space_id, None)
                self._locks.pop(space_id, None)
                return
            if active != self._active.get(space_id, []):
                self._active[space_id] = active
                room.broadcast(self.message(active))

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            for space_id in [s for s in self._active if s not in self._rooms]:
                self._active.pop(space_id, None)
                self._locks.pop(space_id, None)
            for space_id in list(self._rooms):
                try:
                    await self.refresh(space_id)
                except Exception:
                    logger.exception("space %s: broadcast state refresh failed", space_id)

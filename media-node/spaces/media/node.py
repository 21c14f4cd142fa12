"""The media node: one asyncio process hosting rooms, registered in the registry.

It heartbeats its record (address, state, load) every ``heartbeat_ms``; renews its sessions'
leases and its spaces' placements every ``renew_interval_ms`` (re-asserting them if Redis lost
its data); obeys kick and close commands; and drains on shutdown: DRAINING first so no new
spaces come, sessions continue up to the grace period, then they are told to join again
elsewhere. Its health goes NOT_SERVING only when it is ready to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiortc import RTCPeerConnection
from grpc_health.v1 import health_pb2

from spaces import errors, ids, logs, metrics, turn
from spaces.config import ServerConfig
from spaces.media.aiortc_adapter import (
    IcePolicy,
    TurnServer,
    apply_ice_policy,
    install_codec_counters,
    send_remb,
    turn_server_from_url,
)
from spaces.media.allocator import Trimmer
from spaces.media.broadcasts import BroadcastStates
from spaces.media.dataplane import NativePlane
from spaces.media.room import Room
from spaces.media.session import Session, close_reason_for
from spaces.media.udp_mux import UdpMux
from spaces.presence import credentials
from spaces.routing.registry import NodeHeartbeat
from spaces.session import events as ev
from spaces.store.base import Claim, Store
from spaces.tasks import cancel_and_wait, spawn, wait_event
from spaces.v1 import media_pb2, node_pb2

logger = logging.getLogger(__name__)

REMB_INTERVAL_S = 1.0
NATIVE_SYNC_INTERVAL_S = 0.2
MEDIA_SERVICE = media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name
VERSION = "0.1.0"


MAX_GAUGED_LAYERS = 4
"""Simulcast layers (lowest first) with a subscriber gauge each."""


class MediaNode:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        *,
        health: Any = None,
        public_address: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.node_id = config.node.node_id or f"node-{os.getpid()}"
        self._health = health
        self._public_address = public_address or (lambda: config.node.advertise_address)
        self.state = node_pb2.NODE_STATE_STARTING
        self.rooms: dict[str, Room[Session]] = {}
        self.sessions: dict[str, Session] = {}
        self.ice_policy = IcePolicy(
            bind_addresses=config.node.ice_bind_addresses,
            advertise_ip=config.node.ice_advertise_ip,
            port_min=config.node.udp_port_min,
            port_max=config.node.udp_port_max,
            turn=self._turn_server(),
            relay_only=config.turn.media == "relay",
            advertise_port=config.node.udp_advertise_port,
        )
        self.udp_muxes: tuple[UdpMux, ...] = ()
        """Single-port mode (``SPACES_MEDIA_UDP_PORT``): one shared socket per ICE address."""
        self._heartbeat = NodeHeartbeat(store, config.registry, self.record)
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at_ms = int(time.time() * 1000)
        self._cpu = (time.process_time(), time.monotonic())
        self.load = 0.0
        self._drained = asyncio.Event()
        self.broadcasts = BroadcastStates(store, self.rooms)
        self.trimmer = Trimmer(config.node.malloc_trim_interval_s, self._trimmed)
        self.dataplane: NativePlane | None = (
            NativePlane() if config.node.dataplane == "native" else None
        )
        """The native data plane (SPACES_MEDIA_DATAPLANE=native), or None for Python's."""
        install_codec_counters(metrics.DECODERS_CREATED.inc, metrics.ENCODERS_CREATED.inc)

    # --- wiring ----------------------------------------------------------------------------

    def _turn_server(self) -> TurnServer | None:
        """With SPACES_MEDIA_TURN on or relay, the node gathers from the TURN server too, with
        a credential of its own, fresh for every peer connection."""
        config = self.config.turn
        if config.media == "off":
            return None
        url = next(u for u in config.urls if u.startswith(("turn:", "turns:")))

        def credentials() -> tuple[str, str]:
            minted = turn.mint(
                config.secret, f"node-{self.node_id}", turn.expiry(config, time.time())
            )
            return minted.username, minted.credential

        return turn_server_from_url(url, credentials)

    @staticmethod
    def _trimmed(seconds: float) -> None:
        metrics.MALLOC_TRIMS.inc()
        metrics.MALLOC_TRIM_SECONDS.inc(seconds)

    def apply_ice_policy(self, pc: RTCPeerConnection) -> None:
        """Prepare a peer connection before it connects: ICE policy and the data plane."""
        apply_ice_policy(pc, self.ice_policy)
        if self.dataplane is not None:
            self.dataplane.prepare(pc)

    def record(self) -> node_pb2.Node:
        self._sample_load()
        return node_pb2.Node(
            id=self.node_id,
            address=self._public_address(),
            state=self.state,
            load=self.load,
            sessions=len(self.sessions),
            max_sessions=self.config.node.max_sessions,
            spaces=len(self.rooms),
            started_at_ms=self._started_at_ms,
            version=VERSION,
        )

    def _sample_load(self) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        last_cpu, last_wall = self._cpu
        if wall - last_wall >= 0.5:
            busy = (cpu - last_cpu) / (wall - last_wall)
            self._cpu = (cpu, wall)
            capacity = len(self.sessions) / max(1, self.config.node.max_sessions)
            self.load = round(min(1.0, max(busy, capacity)), 3)
            metrics.NODE_LOAD.set(self.load)

    async def _bind_single_port(self) -> None:
        port = self.config.node.udp_port
        if not port:
            return
        hosts = self.config.node.ice_bind_addresses or ("0.0.0.0",)
        muxes = []
        try:
            for host in hosts:
                muxes.append(await UdpMux.bind(host, port, on_drop=self._count_mux_drop))
        except OSError as exc:
            for mux in muxes:
                mux.close()
            raise OSError(f"cannot bind the media UDP port {port} on {host}: {exc}") from exc
        self.udp_muxes = tuple(muxes)
        self.ice_policy = replace(self.ice_policy, muxes=self.udp_muxes)
        metrics.UDP_MUX_ENDPOINTS.set_function(lambda: sum(m.endpoints for m in self.udp_muxes))
        metrics.UDP_MUX_ADDRESSES.set_function(lambda: sum(m.addresses for m in self.udp_muxes))

    def _simulcast_gauges(self) -> None:
        """Subscriptions per simulcast layer and audio-only subscribers, counted at scrape."""
        for index in range(MAX_GAUGED_LAYERS):
            metrics.LAYER_SUBSCRIBERS.labels(str(index)).set_function(
                lambda index=index: self._layer_subscribers(index)
            )
        metrics.AUDIO_ONLY_SUBSCRIBERS.set_function(
            lambda: sum(1 for s in self.sessions.values() if s.audio_only)
        )
        metrics.PAUSED_LAYERS.set_function(self._paused_layers)

    def _paused_layers(self) -> int:
        return sum(
            track.dynacast.paused
            for room in self.rooms.values()
            for track in room.tracks.values()
            if track.dynacast is not None
        )

    def _layer_subscribers(self, index: int) -> int:
        return sum(
            len(track.layers[index].downtracks)
            for room in self.rooms.values()
            for track in room.tracks.values()
            if len(track.layers) > index
        )

    @staticmethod
    def _count_mux_drop(reason: str) -> None:
        metrics.UDP_MUX_DROPPED.labels(reason).inc()

    async def start(self) -> None:
        logs.bind_process(node_id=self.node_id)
        await self._bind_single_port()
        self._simulcast_gauges()
        self.state = node_pb2.NODE_STATE_SERVING
        self._heartbeat.start()
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="lease-renewal"),
            asyncio.create_task(self._commands_forever(), name="node-commands"),
            asyncio.create_task(self._announce_bitrate_forever(), name="remb"),
            asyncio.create_task(self._native_forever(), name="dataplane"),
            asyncio.create_task(self.broadcasts.forever(), name="broadcast-state"),
            asyncio.create_task(self.trimmer.forever(), name="malloc-trim"),
        ]
        logger.info("media node %s serving at %s", self.node_id, self._public_address())

    # --- sessions --------------------------------------------------------------------------

    async def admit(self, ticket: str, options: ev.SessionOptions | None = None) -> Session:
        """Claim the reservation named by a Join ticket and make its session (the caller seats
        it in its room, with no await in between: see ``enter``)."""
        if self.state != node_pb2.NODE_STATE_SERVING:
            raise errors.NodeDraining()
        credential = credentials.parse(ticket)
        if credential is None:
            raise errors.InvalidTicket()
        leases = self.config.leases
        try:
            claim: Claim = await self.store.claim(
                credential.space_id,
                credential.connection_id,
                credential.hash,
                self.node_id,
                leases.session_ms,
                leases.placement_ms,
                ids.new_session_id(),
            )
        except errors.SpaceNotFound as exc:
            # A ticket for a space that does not exist (any more) is just an invalid ticket.
            raise errors.InvalidTicket() from exc
        if self.state != node_pb2.NODE_STATE_SERVING:
            # Drain began while the claim was in flight, possibly after drain() looked at the
            # sessions: hand the connection back (resumable) and send the client elsewhere.
            await self.release(credential.space_id, credential.connection_id, "disconnected")
            raise errors.NodeDraining()
        room = self.rooms.get(claim.participant.space_id)
        if room is None:
            room = self.rooms[claim.participant.space_id] = Room[Session](
                claim.participant.space_id, self._room_empty
            )
            self.broadcasts.refresh_soon(room.space_id)
        room.epoch = claim.epoch
        room.space_record = claim.space_record
        room.active_session_id = claim.space.active_session_id
        session = Session(self, room, claim, options)
        self.sessions[session.connection_id] = session
        self._update_gauges()
        return session

    async def release(self, space_id: str, connection_id: str, reason: str) -> None:
        """Free a connection (and its participant_id) in the store now; if the store cannot be
        reached, its lease lapses instead."""
        try:
            await self.store.leave(space_id, connection_id, reason, node_id=self.node_id)
        except errors.StoreUnavailable:
            logger.warning("could not release %s: its lease will lapse", connection_id)

    def enter(self, session: Session) -> ev.Joined:
        """Seat an admitted session in its room and start it; returns its Joined event.

        The snapshot and the seat in the room in one step, with no await between them (nor
        since ``admit`` picked the room): whoever arrives later is announced to this session,
        and the room cannot be emptied and dropped while this session is on its way in."""
        for earlier in list(session.room.sessions.values()):
            if earlier.participant_id == session.participant_id and isinstance(earlier, Session):
                # This connection resumed that one: the store has already let it go, and its
                # kick may still be on the way. Close it here; until then the room never shows
                # this participant its own earlier connection (Room.others, desired_tracks).
                spawn(earlier.close(ev.CLOSE_REPLACED, "resumed elsewhere"))
        session.start()
        joined = session.joined_event()
        session.room.add(session)
        self.broadcasts.greet(session)
        return joined

    def session_closed(self, session: Session) -> None:
        self.sessions.pop(session.connection_id, None)
        self.trimmer.freed()
        self._update_gauges()
        if not self.sessions and self.state == node_pb2.NODE_STATE_DRAINING:
            self._drained.set()

    def _room_empty(self, room: Room[Session]) -> None:
        if self.rooms.get(room.space_id) is room:
            del self.rooms[room.space_id]
            room.close()
        self._update_gauges()

    def _update_gauges(self) -> None:
        metrics.SESSIONS.set(len(self.sessions))
        metrics.ROOMS.set(len(self.rooms))
        metrics.PARTICIPANTS.set(sum(len(r.sessions) for r in self.rooms.values()))

    # --- leases ----------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        interval = self.config.leases.renew_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            for room in list(self.rooms.values()):
                try:
                    await self.renew_room(room)
                except errors.StoreUnavailable:
                    logger.warning("space %s: lease renewal failed; retrying", room.space_id)
                except Exception:
                    logger.exception("space %s: lease renewal failed", room.space_id)

    async def renew_room(self, room: Room[Session]) -> None:
        sessions = [s for s in room.sessions.values() if not s.closed]
        if not sessions:
            return
        leases = self.config.leases
        result = await self.store.renew(
            room.space_id,
            self.node_id,
            leases.session_ms,
            leases.placement_ms,
            room.epoch,
            room.space_record,
            [s.record for s in sessions],
        )
        if result.epoch != room.epoch and room.epoch:
            logger.warning("space %s: store lost its data; sessions re-asserted", room.space_id)
            metrics.STORE_EPOCH_CHANGES.inc()
        room.epoch = result.epoch
        with contextlib.suppress(ValueError):
            metrics.STORE_EPOCH.set(float(result.epoch))
        metrics.LEASE_RENEWALS.inc(len(sessions) - len(result.lost))
        for connection_id, reason in result.lost.items():
            session = room.sessions.get(connection_id)
            if session is not None:
                await session.close(close_reason_for(reason), f"connection {reason}")
        if result.moved:
            for session in list(room.sessions.values()):
                await session.close(ev.CLOSE_MIGRATE, "space moved to another media node")

    # --- publisher bitrate ------------------------------------------------------------------

    async def _announce_bitrate_forever(self) -> None:
        cap = self.config.node.max_publish_bitrate
        while True:
            await asyncio.sleep(REMB_INTERVAL_S)
            for room in list(self.rooms.values()):
                for track in list(room.tracks.values()):
                    if track.kind == "video" and track.receiver is not None:
                        send_remb(track.receiver, track.forwarder.ssrc, cap)

    async def _native_forever(self) -> None:
        """With the native plane: bring its counts into the metrics, and follow ICE pair
        changes, a few times a second."""
        if self.dataplane is None:
            return
        while True:
            await asyncio.sleep(NATIVE_SYNC_INTERVAL_S)
            try:
                self.dataplane.refresh()
                for room in list(self.rooms.values()):
                    for track in list(room.tracks.values()):
                        for forwarder in track.forwarders:
                            forwarder.sync_metrics()
            except Exception:
                logger.exception("native data plane sync failed")

    # --- commands --------------------------------------------------------------------------

    async def _commands_forever(self) -> None:
        async for command in self.store.node_commands(self.node_id):
            try:
                await self.apply_command(command)
            except Exception:
                logger.exception("node command failed")

    async def apply_command(self, command: node_pb2.NodeCommand) -> None:
        which = command.WhichOneof("command")
        if which == "kick":
            session = self.sessions.get(command.kick.connection_id)
            if session is not None and session.space_id == command.kick.space_id:
                await session.close(close_reason_for(command.kick.reason), command.kick.reason)
        elif which == "broadcasts_changed":
            if command.broadcasts_changed.space_id in self.rooms:
                await self.broadcasts.refresh(command.broadcasts_changed.space_id)
        elif which == "close_space":
            room = self.rooms.get(command.close_space.space_id)
            if room is not None:
                for session in list(room.sessions.values()):
                    await session.close(ev.CLOSE_SPACE_DELETED, "space deleted")

    # --- drain -----------------------------------------------------------------------------

    async def drain(self, grace_s: float | None = None) -> None:
        """DRAINING: no new spaces; sessions may finish for up to the grace period; then the
        rest are told to join again (they land on another node)."""
        grace_s = self.config.node.drain_grace_s if grace_s is None else grace_s
        if self.state != node_pb2.NODE_STATE_DRAINING:
            self.state = node_pb2.NODE_STATE_DRAINING
            try:
                await self._heartbeat.beat_once()
            except errors.StoreUnavailable:
                pass
            logger.info(
                "media node %s draining: %d session(s), grace %.0fs",
                self.node_id,
                len(self.sessions),
                grace_s,
            )
        if self.sessions:
            await wait_event(self._drained, grace_s)
        for session in list(self.sessions.values()):
            await session.close(ev.CLOSE_MIGRATE, "media node is shutting down: join again")
        # Ready to exit: `spaces drain` (the Kubernetes preStop hook) waits for this.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        if self._health is None:
            return
        names = [MEDIA_SERVICE]
        if self.config.services == {"media"}:
            names.append("")
        for name in names:
            await self._health.set(name, status)

    def hurry(self) -> None:
        """Cut a drain short (a second interrupt): sessions are told to move now."""
        self._drained.set()

    async def stop(self) -> None:
        if self.config.embedded:
            # A single-process server has no other node to send its sessions to: end them
            # now, and tell clients not to rejoin.
            self.state = node_pb2.NODE_STATE_DRAINING
            for session in list(self.sessions.values()):
                await session.close(ev.CLOSE_SERVER_STOPPING, "server is stopping")
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        else:
            await self.drain()
        await self._heartbeat.stop()
        for task in self._tasks:
            await cancel_and_wait(task)
        for mux in self.udp_muxes:
            mux.close()
        try:
            await self.store.remove_node(self.record())
        except errors.StoreUnavailable:
            pass
        logger.info("media node %s stopped", self.node_id)

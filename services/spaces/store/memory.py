"""The in-memory store: the embedded single-process mode (``make run`` with no Redis URL).

It is a product feature, not a test double: it keeps the same records as the Redis store
(spaces.store.keys documents them) and mirrors each Lua script step for step, so that the shared
contract suite (tests/test_store_contract.py) holds for both. Every method runs without awaiting
in the middle, which makes it atomic on the event loop, as a script is on Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from spaces import errors
from spaces.store import keys
from spaces.store.base import (
    Admission,
    BroadcastJob,
    BroadcastSpec,
    Claim,
    DeadLetterRecord,
    HiddenReservation,
    JoinContext,
    NodeView,
    PlacementMoved,
    RenewResult,
    Reservation,
    SigningKeyRecord,
    SpaceDeletion,
    WebhookBacklog,
    WebhookDelivery,
    WebhookEndpointRecord,
    WebhookJob,
)
from spaces.store.codec import (
    broadcast_from_record,
    event_from_entry,
    node_from_text,
    node_to_text,
    participant_from_record,
    space_from_record,
)
from spaces.tasks import wait_event
from spaces.v1 import broadcast_pb2, event_pb2, node_pb2, participant_pb2, space_pb2

Hash = dict[str, str]
NOT_RESUMABLE = frozenset({"removed", "replaced", "space_deleted", "left", "duplicate"})
"""Reasons after which a connection cannot be resumed (see keys.resumable_key)."""


@dataclass
class _Expiring:
    value: str
    expires_ms: int


@dataclass
class _SpaceState:
    record: Hash
    leases: dict[str, int] = field(default_factory=dict)
    """connection_id -> lease expiry."""
    conns: dict[str, Hash] = field(default_factory=dict)
    pids: dict[str, _Expiring] = field(default_factory=dict)
    placement: _Expiring | None = None
    broadcasts: dict[str, Hash] = field(default_factory=dict)
    """broadcast_id -> record (keys.broadcast_key), in creation order."""
    backgrounds: dict[str, bytes] = field(default_factory=dict)
    broadcast_leases: dict[str, _Expiring] = field(default_factory=dict)
    """broadcast_id -> lease holder ("<worker_id> <token>")."""

    def visible_count(self) -> int:
        return len(self.leases) - int(self.record.get("hidden", "0") or 0)


class MemoryStore:
    """Single-process store with Redis-equivalent semantics."""

    def __init__(
        self,
        *,
        event_maxlen: int = 100_000,
        gone_ttl_ms: int = 120_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._maxlen = event_maxlen
        self._gone_ttl_ms = gone_ttl_ms
        self._spaces: dict[str, _SpaceState] = {}
        self._space_seq: dict[str, int] = {}
        self._next_space_seq = 0
        self._gone: dict[str, dict[str, _Expiring]] = {}
        self._resumable: dict[str, dict[str, _Expiring]] = {}
        self._lease_index: dict[str, int] = {}
        self._keys: dict[str, SigningKeyRecord] = {}
        self._key_seq: dict[str, int] = {}
        self._next_key_seq = 0
        self._nodes: dict[str, tuple[str, str, int, int]] = {}
        """node_id -> (base64 record, state name, heartbeat ms, record expiry ms)."""
        self._subscribers: dict[str, list[asyncio.Queue[node_pb2.NodeCommand]]] = {}
        self._events: deque[tuple[tuple[int, int], event_pb2.Event]] = deque()
        self._last_event: tuple[int, int] = (0, 0)
        self._event_signal = asyncio.Event()
        self._epoch = str(int(self._clock() * 1_000_000))
        self._broadcast_queue: dict[tuple[str, str], int] = {}
        """(space_id, broadcast_id) -> when a worker may claim it (keys.broadcast_queue_key)."""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._event_signal.set()

    async def ping(self) -> None:
        return None

    async def now_ms(self) -> int:
        return self._now()

    def _now(self) -> int:
        return int(self._clock() * 1000)

    # --- the script library, step for step ------------------------------------------------

    def _emit(
        self, etype: str, space_id: str, now: int, reason: str, kind: str, subject: Hash
    ) -> None:
        ms, seq = self._last_event
        entry = (now, 0) if now > ms else (ms, seq + 1)
        self._last_event = entry
        fields = {"t": etype, "s": space_id, "ts": str(now), "r": reason, "k": kind}
        fields.update({f"x.{k}": v for k, v in subject.items()})
        entry_id = f"{entry[0]}-{entry[1]}"
        self._events.append((entry, event_from_entry(entry_id, fields)))
        while len(self._events) > self._maxlen:
            self._events.popleft()
        self._event_signal.set()
        self._event_signal = asyncio.Event()

    def _emit_space(self, etype: str, state: _SpaceState, space_id: str, now: int) -> None:
        subject = dict(state.record)
        subject["count"] = str(state.visible_count())
        if state.broadcasts:
            subject["broadcasts"] = json.dumps([_public(b) for b in state.broadcasts.values()])
        self._emit(etype, space_id, now, "", "space", subject)

    def _emit_broadcast(
        self, etype: str, state: _SpaceState, space_id: str, bid: str, now: int, reason: str
    ) -> None:
        self._emit(etype, space_id, now, reason, "broadcast", _public(state.broadcasts[bid]))

    def _broadcast_idle(
        self, state: _SpaceState, space_id: str, bid: str, now: int, reason: str
    ) -> None:
        state.broadcasts[bid].update(status="idle", worker="", streaming="0")
        state.broadcast_leases.pop(bid, None)
        self._broadcast_queue.pop((space_id, bid), None)
        self._emit_broadcast("broadcast_idle", state, space_id, bid, now, reason)

    def _lease_holder(self, state: _SpaceState, bid: str, now: int) -> str | None:
        lease = state.broadcast_leases.get(bid)
        if lease is None or lease.expires_ms <= now:
            state.broadcast_leases.pop(bid, None)
            return None
        return lease.value

    def _broadcast_view(self, state: _SpaceState, bid: str, now: int) -> broadcast_pb2.Broadcast:
        holder = self._lease_holder(state, bid, now) or ""
        return broadcast_from_record(state.broadcasts[bid], holder)

    def _space_view(self, state: _SpaceState) -> space_pb2.Space:
        space = space_from_record(state.record, state.visible_count())
        now = self._now()
        space.broadcasts.extend(self._broadcast_view(state, b, now) for b in state.broadcasts)
        return space

    def _pid_holder(self, state: _SpaceState, pid: str, now: int) -> str | None:
        guard = state.pids.get(pid)
        if guard is None:
            return None
        if guard.expires_ms <= now:
            del state.pids[pid]
            return None
        return guard.value

    def _drop_conn(
        self,
        state: _SpaceState,
        space_id: str,
        conn: str,
        reason: str,
        now: int,
        keep_count: bool = False,
    ) -> Hash | None:
        state.leases.pop(conn, None)
        h = state.conns.pop(conn, None)
        if h is None:
            return None
        if self._pid_holder(state, h["pid"], now) == conn:
            del state.pids[h["pid"]]
        self._gone.setdefault(space_id, {})[conn] = _Expiring(reason, now + self._gone_ttl_ms)
        if reason not in NOT_RESUMABLE and h.get("resume"):
            self._resumable.setdefault(space_id, {})[conn] = _Expiring(
                f"{h['pid']} {h['resume']}", now + self._gone_ttl_ms
            )
        if reason not in NOT_RESUMABLE and h.get("tokres"):
            self._resumable.setdefault(space_id, {})["t:" + h["pid"]] = _Expiring(
                h["tokres"], now + self._gone_ttl_ms
            )
        if h.get("counted") == "1" and not keep_count:
            state.record["connected"] = str(int(state.record.get("connected", "0")) - 1)
        if h.get("hidden") == "1":
            state.record["hidden"] = str(int(state.record.get("hidden", "0")) - 1)
        elif h.get("state") == "connected":
            self._emit("participant_left", space_id, now, reason, "participant", h)
        return h

    def _settle(self, space_id: str, now: int) -> None:
        state = self._spaces.get(space_id)
        if state is None:
            self._lease_index.pop(space_id, None)
            return
        if int(state.record.get("connected", "0")) <= 0 and state.record["status"] == "active":
            state.record.update(status="idle", session="", connected="0")
            # A broadcast follows its space: it stops in the same step as the space goes idle.
            for bid, b in state.broadcasts.items():
                if b["status"] == "active":
                    self._broadcast_idle(state, space_id, bid, now, "space_idle")
            self._emit_space("space_idle", state, space_id, now)
        if state.leases:
            self._lease_index[space_id] = min(state.leases.values())
        else:
            self._lease_index.pop(space_id, None)
            state.placement = None

    def _reap_space(self, state: _SpaceState, space_id: str, now: int) -> int:
        expired = sorted((exp, c) for c, exp in state.leases.items() if exp <= now)
        for _, conn in expired:
            self._drop_conn(state, space_id, conn, "lease_expired", now)
        return len(expired)

    def _activate(self, state: _SpaceState, space_id: str, now: int, session_id: str) -> None:
        if state.record["status"] != "active":
            state.record.update(status="active", session=session_id)
            self._emit_space("space_active", state, space_id, now)

    def _placement(self, state: _SpaceState, now: int) -> str:
        if state.placement is None or state.placement.expires_ms <= now:
            state.placement = None
            return ""
        return state.placement.value

    def _gone_reason(self, space_id: str, conn: str, now: int) -> str | None:
        entry = self._gone.get(space_id, {}).get(conn)
        if entry is None or entry.expires_ms <= now:
            return None
        return entry.value

    def _state(self, space_id: str) -> _SpaceState:
        state = self._spaces.get(space_id)
        if state is None:
            raise errors.SpaceNotFound()
        return state

    # --- spaces ----------------------------------------------------------------------------

    async def create_space(
        self, space_id: str, passthrough: str, max_participants: int
    ) -> space_pb2.Space:
        now = self._now()
        self._next_space_seq += 1
        seq = self._next_space_seq
        state = _SpaceState(
            record={
                "id": space_id,
                "created_at": str(now // 1000),
                "passthrough": passthrough,
                "status": "idle",
                "session": "",
                "max": str(max_participants),
                "seq": str(seq),
                "connected": "0",
            }
        )
        self._spaces[space_id] = state
        self._space_seq[space_id] = seq
        self._emit_space("space_created", state, space_id, now)
        return space_from_record(state.record, 0)

    async def get_space(self, space_id: str) -> space_pb2.Space:
        return self._space_view(self._state(space_id))

    async def list_spaces(
        self, limit: int, after_seq: int
    ) -> tuple[list[space_pb2.Space], int | None]:
        ordered = sorted((seq, sid) for sid, seq in self._space_seq.items() if seq > after_seq)
        page = ordered[:limit]
        spaces = [self._space_view(self._spaces[sid]) for _, sid in page]
        return spaces, (page[-1][0] if len(ordered) > limit else None)

    async def update_space(
        self, space_id: str, passthrough: str | None, max_participants: int | None
    ) -> space_pb2.Space:
        state = self._state(space_id)
        if passthrough is not None:
            state.record["passthrough"] = passthrough
        if max_participants is not None:
            state.record["max"] = str(max_participants)
        self._emit_space("space_updated", state, space_id, self._now())
        return self._space_view(state)

    async def delete_space(self, space_id: str, force: bool) -> SpaceDeletion:
        state = self._state(space_id)
        now = self._now()
        self._reap_space(state, space_id, now)
        if state.record["status"] == "active" and not force:
            self._settle(space_id, now)
            raise errors.SpaceActive()
        node = self._placement(state, now)
        removed: list[tuple[str, str]] = []
        for conn in sorted(state.leases, key=lambda c: (state.leases[c], c)):
            h = self._drop_conn(state, space_id, conn, "space_deleted", now)
            if h is not None:
                removed.append((conn, h.get("node", "")))
        self._settle(space_id, now)
        for bid, b in list(state.broadcasts.items()):
            if b["status"] == "active":
                self._broadcast_idle(state, space_id, bid, now, "space_deleted")
            self._emit_broadcast("broadcast_deleted", state, space_id, bid, now, "space_deleted")
        state.broadcasts.clear()
        self._emit_space("space_deleted", state, space_id, now)
        del self._spaces[space_id]
        self._resumable.pop(space_id, None)
        self._space_seq.pop(space_id, None)
        self._lease_index.pop(space_id, None)
        return SpaceDeletion(node_id=node, removed=removed)

    # --- signing keys ----------------------------------------------------------------------

    async def create_signing_key(self, key_id: str, public_key_pem: bytes) -> SigningKeyRecord:
        self._next_key_seq += 1
        record = SigningKeyRecord(
            id=key_id, created_at=self._now() // 1000, public_key_pem=public_key_pem
        )
        self._keys[key_id] = record
        self._key_seq[key_id] = self._next_key_seq
        return record

    async def get_signing_key(self, key_id: str) -> SigningKeyRecord | None:
        return self._keys.get(key_id)

    async def list_signing_keys(
        self, limit: int, after_seq: int
    ) -> tuple[list[SigningKeyRecord], int | None]:
        ordered = sorted((seq, kid) for kid, seq in self._key_seq.items() if seq > after_seq)
        page = ordered[:limit]
        return [self._keys[kid] for _, kid in page], (page[-1][0] if len(ordered) > limit else None)

    async def delete_signing_key(self, key_id: str) -> bool:
        self._key_seq.pop(key_id, None)
        return self._keys.pop(key_id, None) is not None

    # --- presence --------------------------------------------------------------------------

    async def join_context(self, space_id: str, key_id: str) -> JoinContext:
        state = self._spaces.get(space_id)
        return JoinContext(
            self._keys.get(key_id),
            self._placement(state, self._now()) if state else "",
            state is not None,
        )

    async def join(self, r: Reservation) -> Admission:
        state = self._state(r.space_id)
        if r.signing_key_id and r.signing_key_id not in self._keys:
            raise errors.TokenUnknownKey()
        sid = r.space_id
        now = self._now()
        self._reap_space(state, sid, now)
        current = self._placement(state, now)
        if current != r.expected_node_id:
            self._settle(sid, now)
            raise PlacementMoved(current)
        pid = r.participant_id
        counted = "0"
        replaced_conn = replaced_node = ""
        if r.resume_connection_id:
            old = state.conns.get(r.resume_connection_id)
            if old is not None:
                if old["resume"] != r.presented_resume_hash:
                    raise errors.BadResumeSecret()
                if not r.generated_participant_id and old["pid"] != pid:
                    raise errors.BadResumeSecret()
                pid = old["pid"]
                counted = old.get("counted", "0")
                replaced_conn, replaced_node = r.resume_connection_id, old.get("node", "")
                self._drop_conn(state, sid, replaced_conn, "replaced", now, keep_count=True)
            else:
                gone = self._resumable.get(sid, {}).get(r.resume_connection_id)
                if gone is not None and gone.expires_ms > now:
                    gone_pid, _, gone_hash = gone.value.partition(" ")
                    if gone_hash != r.presented_resume_hash:
                        raise errors.BadResumeSecret()
                    if not r.generated_participant_id and gone_pid != pid:
                        raise errors.BadResumeSecret()
                    pid = gone_pid
                    del self._resumable[sid][r.resume_connection_id]
        elif (
            r.reconnect_participant_id
            and r.token_hash
            and (r.generated_participant_id or r.reconnect_participant_id == pid)
        ):
            wanted = r.reconnect_participant_id
            holder = self._pid_holder(state, wanted, now)
            old = state.conns.get(holder) if holder is not None else None
            if old is not None and old.get("tokres") == r.token_hash:
                # Its own connection, still held: take it over.
                pid = wanted
                counted = old.get("counted", "0")
                replaced_conn, replaced_node = old["cid"], old.get("node", "")
                self._drop_conn(state, sid, replaced_conn, "replaced", now, keep_count=True)
            elif holder is None:
                gone = self._resumable.get(sid, {}).get("t:" + wanted)
                if gone is not None and gone.expires_ms > now and gone.value == r.token_hash:
                    pid = wanted
                    del self._resumable[sid]["t:" + wanted]
        if self._pid_holder(state, pid, now) is not None:
            self._settle(sid, now)
            raise errors.DuplicateParticipant()
        limit = int(state.record.get("max", "0") or 0) or r.default_max_participants
        if state.visible_count() >= limit:
            self._settle(sid, now)
            raise errors.ParticipantLimitReached()
        expires = now + r.pending_ms
        state.conns[r.connection_id] = {
            "pid": pid,
            "cid": r.connection_id,
            "role": r.role,
            "name": r.display_name,
            "state": "pending",
            "node": r.node_id,
            "joined": str(now),
            "ticket": r.ticket_hash,
            "resume": r.resume_hash,
            "gen": "1" if r.generated_participant_id else "0",
            "counted": counted,
            "resumed": "1" if replaced_conn else "0",
            "tokres": r.token_hash,
        }
        state.pids[pid] = _Expiring(r.connection_id, expires)
        state.leases[r.connection_id] = expires
        state.placement = _Expiring(r.node_id, now + r.placement_ms)
        self._settle(sid, now)
        return Admission(
            participant_id=pid,
            joined_at_ms=now,
            expires_at_ms=expires,
            replaced_connection_id=replaced_conn,
            replaced_node_id=replaced_node,
        )

    async def claim(
        self,
        space_id: str,
        connection_id: str,
        ticket_hash: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        session_id: str,
    ) -> Claim:
        state = self._state(space_id)
        now = self._now()
        self._reap_space(state, space_id, now)
        h = state.conns.get(connection_id)
        if h is None or h["state"] != "pending" or not h["ticket"] or h["ticket"] != ticket_hash:
            self._settle(space_id, now)
            raise errors.InvalidTicket()
        if h["node"] != node_id or self._placement(state, now) != node_id:
            self._settle(space_id, now)
            raise errors.TicketWrongNode()
        expires = now + session_ms
        h.update(state="connected", ticket="")
        state.leases[connection_id] = expires
        if self._pid_holder(state, h["pid"], now) == connection_id:
            state.pids[h["pid"]].expires_ms = now + session_ms
        hidden = h.get("hidden") == "1"
        if h.get("counted") != "1" and not hidden:
            state.record["connected"] = str(int(state.record.get("connected", "0")) + 1)
            h["counted"] = "1"
        if not hidden:
            self._activate(state, space_id, now, session_id)
        assert state.placement is not None
        state.placement.expires_ms = now + placement_ms
        if not hidden:
            reason = "resumed" if h.get("resumed") == "1" else "joined"
            self._emit("participant_joined", space_id, now, reason, "participant", h)
        self._settle(space_id, now)
        return Claim(
            participant=participant_from_record(space_id, h, expires),
            space=space_from_record(state.record, state.visible_count()),
            epoch=self._epoch,
            lease_expires_at_ms=expires,
            connection_record=dict(h),
            space_record=dict(state.record),
        )

    async def renew(
        self,
        space_id: str,
        node_id: str,
        session_ms: int,
        placement_ms: int,
        epoch: str,
        space_record: dict[str, str],
        connection_records: list[dict[str, str]],
    ) -> RenewResult:
        # The in-memory store lives and dies with its process: its epoch never changes, so
        # there is nothing to re-assert.
        now = self._now()
        state = self._spaces.get(space_id)
        if state is None:
            gone = {
                c["cid"]: self._gone_reason(space_id, c["cid"], now) or "space_deleted"
                for c in connection_records
            }
            return RenewResult(epoch=self._epoch, moved=False, lost=gone)
        self._reap_space(state, space_id, now)
        placed = self._placement(state, now)
        moved = False
        if placed in (node_id, ""):
            state.placement = _Expiring(node_id, now + placement_ms)
        else:
            moved = True
        lost: dict[str, str] = {}
        expires = now + session_ms
        for c in connection_records:
            cid = c["cid"]
            h = state.conns.get(cid)
            if h is None:
                lost[cid] = self._gone_reason(space_id, cid, now) or "lease_expired"
                continue
            if h["node"] != node_id or h["state"] != "connected":
                lost[cid] = "moved"
                continue
            state.leases[cid] = expires
            holder = self._pid_holder(state, h["pid"], now)
            if holder == cid:
                state.pids[h["pid"]].expires_ms = expires
            elif holder is None:
                state.pids[h["pid"]] = _Expiring(cid, expires)
            else:
                lost[cid] = "duplicate"
                self._drop_conn(state, space_id, cid, "duplicate", now)
        self._settle(space_id, now)
        return RenewResult(epoch=self._epoch, moved=moved, lost=lost)

    async def leave(
        self,
        space_id: str,
        connection_id: str,
        reason: str,
        node_id: str = "",
        resume_hash: str = "",
    ) -> participant_pb2.Participant | None:
        state = self._spaces.get(space_id)
        h = state.conns.get(connection_id) if state else None
        if state is None or h is None:
            return None
        if node_id and h["node"] != node_id:
            return None
        if resume_hash and h["resume"] != resume_hash:
            raise errors.BadResumeSecret()
        now = self._now()
        snapshot = dict(h)
        self._drop_conn(state, space_id, connection_id, reason, now)
        self._settle(space_id, now)
        return participant_from_record(space_id, snapshot)

    async def remove_participant(
        self, space_id: str, participant_id: str, reason: str
    ) -> participant_pb2.Participant:
        state = self._state(space_id)
        now = self._now()
        conn = self._pid_holder(state, participant_id, now)
        if conn is None or state.conns.get(conn, {}).get("hidden") == "1":
            raise errors.ParticipantNotFound()
        snapshot = dict(state.conns.get(conn, {}))
        self._drop_conn(state, space_id, conn, reason, now)
        self._settle(space_id, now)
        return participant_from_record(space_id, snapshot)

    async def get_participant(
        self, space_id: str, participant_id: str
    ) -> participant_pb2.Participant:
        state = self._state(space_id)
        conn = self._pid_holder(state, participant_id, self._now())
        h = state.conns.get(conn) if conn else None
        if conn is None or h is None or h.get("hidden") == "1":
            raise errors.ParticipantNotFound()
        return participant_from_record(space_id, h, state.leases.get(conn, 0))

    async def list_participants(self, space_id: str) -> list[participant_pb2.Participant]:
        state = self._state(space_id)
        found = [
            participant_from_record(space_id, h, state.leases.get(cid, 0))
            for cid, h in state.conns.items()
            if h.get("hidden") != "1"
        ]
        found.sort(key=lambda p: (p.joined_at_ms, p.connection_id))
        return found

    async def set_display_name(self, space_id: str, connection_id: str, name: str) -> bool:
        state = self._spaces.get(space_id)
        h = state.conns.get(connection_id) if state else None
        if h is None:
            return False
        h["name"] = name
        return True

    async def reap(self, max_spaces: int = 100) -> int:
        now = self._now()
        due = sorted((exp, sid) for sid, exp in self._lease_index.items() if exp <= now)
        removed = 0
        for _, sid in due[:max_spaces]:
            state = self._spaces.get(sid)
            if state is not None:
                removed += self._reap_space(state, sid, now)
            self._settle(sid, now)
        return removed

    # --- registry --------------------------------------------------------------------------

    async def heartbeat(self, node: node_pb2.Node, record_ttl_ms: int) -> int:
        now = self._now()
        state = node_pb2.NodeState.Name(node.state)
        text = node_to_text(node)
        previous = self._nodes.get(node.id)
        if previous is not None and previous[3] <= now:
            previous = None
        self._nodes[node.id] = (text, state, now, now + record_ttl_ms)
        if previous is None or previous[1] != state:
            self._emit("node_state_changed", "", now, state, "node", {"pb": text, "at": str(now)})
        return now

    async def remove_node(self, node: node_pb2.Node) -> None:
        now = self._now()
        self._nodes.pop(node.id, None)
        final = node_pb2.Node()
        final.CopyFrom(node)
        final.state = node_pb2.NODE_STATE_STOPPED
        self._emit(
            "node_state_changed",
            "",
            now,
            "NODE_STATE_STOPPED",
            "node",
            {"pb": node_to_text(final), "at": str(now)},
        )

    async def list_nodes(self, record_ttl_ms: int) -> NodeView:
        now = self._now()
        for node_id in [n for n, v in self._nodes.items() if v[2] <= now - record_ttl_ms]:
            del self._nodes[node_id]
        nodes = [node_from_text(text, at) for text, _, at, _ in self._nodes.values()]
        return NodeView(now_ms=now, nodes=nodes)

    async def publish_node_command(self, node_id: str, command: node_pb2.NodeCommand) -> None:
        for queue in self._subscribers.get(node_id, []):
            queue.put_nowait(command)

    async def node_commands(self, node_id: str) -> AsyncIterator[node_pb2.NodeCommand]:
        queue: asyncio.Queue[node_pb2.NodeCommand] = asyncio.Queue()
        self._subscribers.setdefault(node_id, []).append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers[node_id].remove(queue)

    # --- broadcasts (mirrors keys.py, "broadcasts") ------------------------------------------

    def _broadcast_state(self, space_id: str, bid: str) -> _SpaceState:
        state = self._state(space_id)
        if bid not in state.broadcasts:
            raise errors.BroadcastNotFound()
        return state

    async def create_broadcast(self, spec: BroadcastSpec, limit: int) -> broadcast_pb2.Broadcast:
        state = self._state(spec.space_id)
        if len(state.broadcasts) >= limit:
            raise errors.BroadcastLimitReached()
        now = self._now()
        state.record["bcseq"] = str(int(state.record.get("bcseq", "0")) + 1)
        state.broadcasts[spec.broadcast_id] = {
            "id": spec.broadcast_id,
            "space": spec.space_id,
            "created_at": str(now // 1000),
            "status": "idle",
            "layout": spec.layout,
            "res": spec.resolution,
            "url": spec.rtmp_url,
            "key": spec.stream_key,
            "bg": spec.background_source,
            "bgsha": spec.background_sha256,
            "pass": spec.passthrough,
            "started": "0",
            "run": "0",
            "worker": "",
            "err": "",
            "streaming": "0",
        }
        if spec.background:
            state.backgrounds[spec.broadcast_id] = spec.background
        self._emit_broadcast("broadcast_created", state, spec.space_id, spec.broadcast_id, now, "")
        return broadcast_from_record(state.broadcasts[spec.broadcast_id])

    async def get_broadcast(self, space_id: str, broadcast_id: str) -> broadcast_pb2.Broadcast:
        state = self._broadcast_state(space_id, broadcast_id)
        return self._broadcast_view(state, broadcast_id, self._now())

    async def list_broadcasts(self, space_id: str) -> list[broadcast_pb2.Broadcast]:
        return list(self._space_view(self._state(space_id)).broadcasts)

    async def delete_broadcast(self, space_id: str, broadcast_id: str) -> None:
        state = self._broadcast_state(space_id, broadcast_id)
        if state.broadcasts[broadcast_id]["status"] == "active":
            raise errors.BroadcastActive()
        self._emit_broadcast("broadcast_deleted", state, space_id, broadcast_id, self._now(), "")
        del state.broadcasts[broadcast_id]
        state.backgrounds.pop(broadcast_id, None)
        state.broadcast_leases.pop(broadcast_id, None)

    async def start_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        state = self._broadcast_state(space_id, broadcast_id)
        now = self._now()
        self._reap_space(state, space_id, now)
        self._settle(space_id, now)
        if state.record["status"] != "active":
            raise errors.SpaceIdle()
        b = state.broadcasts[broadcast_id]
        if b["status"] != "active":
            b.update(status="active", started=str(now), err="", streaming="0", worker="")
            b["run"] = str(int(b["run"]) + 1)
            self._broadcast_queue[(space_id, broadcast_id)] = now
            self._emit_broadcast("broadcast_active", state, space_id, broadcast_id, now, "started")
        return broadcast_from_record(b), self._placement(state, now)

    async def stop_broadcast(
        self, space_id: str, broadcast_id: str
    ) -> tuple[broadcast_pb2.Broadcast, str]:
        state = self._broadcast_state(space_id, broadcast_id)
        now = self._now()
        if state.broadcasts[broadcast_id]["status"] == "active":
            self._broadcast_idle(state, space_id, broadcast_id, now, "stopped")
        return broadcast_from_record(state.broadcasts[broadcast_id]), self._placement(state, now)

    async def broadcasts_due(self, limit: int) -> list[tuple[str, str]]:
        now = self._now()
        due = sorted((at, key) for key, at in self._broadcast_queue.items() if at <= now)
        return [key for _, key in due[:limit]]

    async def claim_broadcast(
        self, space_id: str, broadcast_id: str, holder: str, worker_id: str, lease_ms: int
    ) -> BroadcastJob | None:
        state = self._spaces.get(space_id)
        b = state.broadcasts.get(broadcast_id) if state else None
        if state is None or b is None or b["status"] != "active":
            self._broadcast_queue.pop((space_id, broadcast_id), None)
            return None
        now = self._now()
        if self._lease_holder(state, broadcast_id, now) is not None:
            held = state.broadcast_leases[broadcast_id]
            self._broadcast_queue[(space_id, broadcast_id)] = held.expires_ms
            return None
        state.broadcast_leases[broadcast_id] = _Expiring(holder, now + lease_ms)
        b.update(worker=worker_id, streaming="0")
        self._broadcast_queue[(space_id, broadcast_id)] = now + lease_ms
        return BroadcastJob(
            space_id=space_id,
            broadcast_id=broadcast_id,
            run=b["run"],
            layout=b["layout"],
            resolution=b["res"],
            rtmp_url=b["url"],
            stream_key=b["key"],
            background=state.backgrounds.get(broadcast_id, b""),
            holder=holder,
        )

    async def renew_broadcast(
        self,
        space_id: str,
        broadcast_id: str,
        holder: str,
        lease_ms: int,
        run: str,
        streaming: bool,
        error: str,
    ) -> str:
        state = self._spaces.get(space_id)
        b = state.broadcasts.get(broadcast_id) if state else None
        if state is None or b is None:
            return "stopped"
        now = self._now()
        current = self._lease_holder(state, broadcast_id, now)
        if b["status"] != "active" or b["run"] != run:
            if current == holder:
                del state.broadcast_leases[broadcast_id]
            return "stopped"
        if current is not None and current != holder:
            return "lost"
        state.broadcast_leases[broadcast_id] = _Expiring(holder, now + lease_ms)
        self._broadcast_queue[(space_id, broadcast_id)] = now + lease_ms
        b.update(streaming="1" if streaming else "0", err=error)
        return "ok"

    async def release_broadcast(self, space_id: str, broadcast_id: str, holder: str) -> bool:
        state = self._spaces.get(space_id)
        b = state.broadcasts.get(broadcast_id) if state else None
        if state is None or b is None:
            return False
        now = self._now()
        if self._lease_holder(state, broadcast_id, now) != holder:
            return False
        del state.broadcast_leases[broadcast_id]
        b.update(worker="", streaming="0")
        if b["status"] == "active":
            self._broadcast_queue[(space_id, broadcast_id)] = now
        return True

    async def join_hidden(self, reservation: HiddenReservation) -> tuple[str, int]:
        r = reservation
        state = self._state(r.space_id)
        now = self._now()
        self._reap_space(state, r.space_id, now)
        self._settle(r.space_id, now)
        if self._lease_holder(state, r.broadcast_id, now) != r.holder:
            raise errors.BroadcastLeaseLost()
        node = self._placement(state, now)
        if state.record["status"] != "active" or not node:
            raise errors.SpaceIdle()
        expires = now + r.pending_ms
        state.conns[r.connection_id] = {
            "pid": r.participant_id,
            "cid": r.connection_id,
            "role": "subscriber",
            "name": r.display_name,
            "state": "pending",
            "node": node,
            "joined": str(now),
            "ticket": r.ticket_hash,
            "resume": "",
            "gen": "1",
            "counted": "0",
            "resumed": "0",
            "hidden": "1",
        }
        state.pids[r.participant_id] = _Expiring(r.connection_id, expires)
        state.leases[r.connection_id] = expires
        state.record["hidden"] = str(int(state.record.get("hidden", "0")) + 1)
        self._settle(r.space_id, now)
        return node, expires

    # --- events ----------------------------------------------------------------------------

    async def latest_event_id(self) -> str:
        return f"{self._last_event[0]}-{self._last_event[1]}"

    async def read_events(self, after_id: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        after = _parse_event_id(after_id) if after_id != "$" else self._last_event
        found = self._after(after, count)
        if found or block_ms <= 0:
            return found
        if not await wait_event(self._event_signal, block_ms / 1000):
            return []
        return self._after(after, count)

    def _after(self, after: tuple[int, int], count: int) -> list[event_pb2.Event]:
        out: list[event_pb2.Event] = []
        # Events are ordered: scan from the newest end for the common "tail" case.
        for key, event in reversed(self._events):
            if key <= after:
                break
            out.append(event)
        out.reverse()
        return out[:count]

    # --- webhooks ----------------------------------------------------------------------------
    # Mirrors the webhook scripts of keys.py step for step (see there for the design): a
    # consumer group over the event log, per-(endpoint, space) queues, leases and dead letters.

    _wh_state: _WebhookState | None = None

    @property
    def _wh(self) -> _WebhookState:
        if self._wh_state is None:
            self._wh_state = _WebhookState()
        return self._wh_state

    def _wh_drop_queue(self, endpoint_id: str, space_id: str) -> None:
        self._wh.queues.pop((endpoint_id, space_id), None)
        self._wh.ready.get(endpoint_id, {}).pop(space_id, None)

    def _wh_settle(self, endpoint_id: str, space_id: str, due: int) -> None:
        wh = self._wh
        if endpoint_id not in wh.endpoints:
            self._wh_drop_queue(endpoint_id, space_id)
        elif wh.queues.get((endpoint_id, space_id)):
            wh.ready.setdefault(endpoint_id, {})[space_id] = due

    def _wh_held(self, queue: str, token: str) -> bool:
        lease = self._wh.leases.get(queue)
        return lease is not None and lease[1] == token

    async def webhook_put_endpoint(self, endpoint: WebhookEndpointRecord) -> None:
        self._wh.endpoints[endpoint.id] = endpoint

    async def webhook_endpoints(self) -> list[WebhookEndpointRecord]:
        return sorted(self._wh.endpoints.values(), key=lambda e: (e.created_at, e.id))

    async def webhook_delete_endpoint(self, endpoint_id: str) -> bool:
        wh = self._wh
        if wh.endpoints.pop(endpoint_id, None) is None:
            return False
        for space_id in list(wh.ready.pop(endpoint_id, {})):
            self._wh_drop_queue(endpoint_id, space_id)
        for dead_id in [d for d in wh.dead if d.startswith(endpoint_id + ":")]:
            del wh.dead[dead_id]
        return True

    async def webhook_group_ensure(self) -> None:
        if self._wh.group_last is None:
            self._wh.group_last = self._last_event

    async def webhook_read(self, consumer: str, count: int, block_ms: int) -> list[event_pb2.Event]:
        wh = self._wh
        if wh.group_last is None:
            await self.webhook_group_ensure()
            return []
        found = self._wh_deliver_new(consumer, count)
        if found or block_ms <= 0:
            return found
        if not await wait_event(self._event_signal, block_ms / 1000):
            return []
        return self._wh_deliver_new(consumer, count)

    def _wh_deliver_new(self, consumer: str, count: int) -> list[event_pb2.Event]:
        wh = self._wh
        assert wh.group_last is not None
        now = self._now()
        wh.consumers[consumer] = now
        found = self._after(wh.group_last, count)
        for event in found:
            wh.pending[event.id] = _Pending(consumer, now, event)
        if found:
            wh.group_last = _parse_event_id(found[-1].id)
        return found

    async def webhook_claim_stale(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> list[event_pb2.Event]:
        wh = self._wh
        now = self._now()
        wh.consumers[consumer] = now
        stale = sorted(
            (p for p in wh.pending.items() if now - p[1].delivered_ms >= min_idle_ms),
            key=lambda p: _parse_event_id(p[0]),
        )[:count]
        for stream_id, pending in stale:
            wh.pending[stream_id] = _Pending(consumer, now, pending.event)
        return [pending.event for _, pending in stale]

    async def webhook_fan_out(self, jobs: Sequence[WebhookJob]) -> int:
        wh = self._wh
        now = self._now()
        enqueued = 0
        endpoints = list(wh.endpoints.values())
        for job in jobs:
            if wh.pending.pop(job.stream_id, None) is None or not job.event_type:
                continue
            key = keys.webhook_sort_key(job.stream_id)
            for e in endpoints:
                if e.event_types and job.event_type not in e.event_types:
                    continue
                wh.queues.setdefault((e.id, job.space_id), {})[key] = {
                    "event": job.stream_id,
                    "evid": job.envelope_id,
                    "space": job.space_id,
                    "type": job.event_type,
                    "body": job.body,
                    "n": "0",
                    "history": "[]",
                    "err": "",
                }
                if f"{e.id} {job.space_id}" not in wh.leases:
                    wh.ready.setdefault(e.id, {}).setdefault(job.space_id, now)
                enqueued += 1
        return enqueued

    async def webhook_take(
        self,
        owner: str,
        lease_ms: int,
        limit: int,
        default_slots: int,
        slots: Mapping[str, int],
        rotation: int = 0,
    ) -> tuple[list[WebhookDelivery], int]:
        wh = self._wh
        now = self._now()
        lapsed = sorted(q for q, (expires, _) in wh.leases.items() if expires <= now)
        for held in lapsed:
            del wh.leases[held]
            endpoint_id, _, space_id = held.partition(" ")
            self._wh_settle(endpoint_id, space_id, now)
        watermark = (
            keys.webhook_sort_key(min(wh.pending, key=_parse_event_id)) if wh.pending else None
        )
        ids = sorted(wh.endpoints)
        out: list[WebhookDelivery] = []
        for n in range(len(ids)):
            if len(out) >= limit:
                break
            endpoint = wh.endpoints[ids[(n + rotation) % len(ids)]]
            free = slots.get(endpoint.id, default_slots)
            ready = wh.ready.get(endpoint.id, {})
            due = sorted((at, s) for s, at in ready.items() if at <= now)[: max(free, 0) * 4]
            for _, space_id in due:
                if free <= 0 or len(out) >= limit:
                    break
                queue = wh.queues.get((endpoint.id, space_id))
                if not queue:
                    ready.pop(space_id, None)
                    continue
                head = min(queue)
                if watermark is not None and head >= watermark:
                    continue
                job = queue[head]
                free -= 1
                token = f"{owner}:{len(out) + 1}"
                del ready[space_id]
                wh.leases[f"{endpoint.id} {space_id}"] = (now + lease_ms, token)
                out.append(
                    WebhookDelivery(
                        endpoint_id=endpoint.id,
                        space_id=space_id,
                        token=token,
                        url=endpoint.url,
                        secret=endpoint.secret,
                        sort_key=head,
                        stream_id=job["event"],
                        envelope_id=job["evid"],
                        event_type=job["type"],
                        body=job["body"],
                        attempts=int(job["n"]),
                        history=job["history"],
                    )
                )
        return out, len(lapsed)

    async def webhook_renew(self, deliveries: Sequence[WebhookDelivery], lease_ms: int) -> set[str]:
        expires = self._now() + lease_ms
        lost: set[str] = set()
        for d in deliveries:
            if self._wh_held(d.queue, d.token):
                self._wh.leases[d.queue] = (expires, d.token)
            else:
                lost.add(d.token)
        return lost

    async def webhook_delivered(self, delivery: WebhookDelivery) -> bool:
        d = delivery
        wh = self._wh
        queue = wh.queues.get((d.endpoint_id, d.space_id))
        if queue is not None:
            queue.pop(d.sort_key, None)
            if not queue:
                del wh.queues[(d.endpoint_id, d.space_id)]
        if not self._wh_held(d.queue, d.token):
            return False
        del wh.leases[d.queue]
        self._wh_settle(d.endpoint_id, d.space_id, self._now())
        return True

    async def webhook_failed(
        self,
        delivery: WebhookDelivery,
        attempt: str,
        error: str,
        retry_in_ms: int | None,
        dead_letter_limit: int,
    ) -> str:
        d = delivery
        wh = self._wh
        if not self._wh_held(d.queue, d.token):
            return "lost"
        now = self._now()
        del wh.leases[d.queue]
        queue = wh.queues.get((d.endpoint_id, d.space_id), {})
        job = queue.get(d.sort_key)
        if job is None:
            self._wh_settle(d.endpoint_id, d.space_id, now)
            return "lost"
        history = job["history"]
        history = f"[{attempt}]" if history == "[]" else f"{history[:-1]},{attempt}]"
        attempts = int(job["n"]) + 1
        if retry_in_ms is not None:
            job.update(n=str(attempts), history=history, err=error)
            self._wh_settle(d.endpoint_id, d.space_id, now + max(0, retry_in_ms))
            return "retry"
        dead_id = f"{d.endpoint_id}:{job['event']}"
        record = dict(job, id=dead_id, ep=d.endpoint_id, key=d.sort_key, at=str(now))
        record.update(n=str(attempts), history=history, err=error)
        wh.dead.pop(dead_id, None)
        wh.dead[dead_id] = (now, record)
        while len(wh.dead) > dead_letter_limit:
            oldest = min(wh.dead, key=lambda i: (wh.dead[i][0], i))
            del wh.dead[oldest]
        del queue[d.sort_key]
        if not queue:
            wh.queues.pop((d.endpoint_id, d.space_id), None)
        self._wh_settle(d.endpoint_id, d.space_id, now)
        return "dead"

    async def webhook_release(self, deliveries: Sequence[WebhookDelivery]) -> int:
        now = self._now()
        released = 0
        for d in deliveries:
            if self._wh_held(d.queue, d.token):
                del self._wh.leases[d.queue]
                self._wh_settle(d.endpoint_id, d.space_id, now)
                released += 1
        return released

    async def webhook_dead_letters(self, limit: int) -> list[DeadLetterRecord]:
        newest = sorted(self._wh.dead.items(), key=lambda item: (item[1][0], item[0]))
        return [_dead_letter(record) for _, (_, record) in reversed(newest)][:limit]

    async def webhook_backlog(self) -> WebhookBacklog:
        wh = self._wh
        now = self._now()
        due = [t for ready in wh.ready.values() for t in ready.values() if t <= now]
        return WebhookBacklog(
            queues=len(wh.leases) + sum(len(r) for r in wh.ready.values()),
            oldest_due_ms=min(due, default=0),
            dead_letters=len(wh.dead),
            now_ms=now,
        )

    async def webhook_replay(self, ids: Sequence[str]) -> int:
        wh = self._wh
        now = self._now()
        chosen = list(ids) or [i for i, _ in sorted(wh.dead.items(), key=lambda x: (x[1][0], x[0]))]
        replayed = 0
        for dead_id in chosen:
            entry = wh.dead.get(dead_id)
            if entry is None or entry[1]["ep"] not in wh.endpoints:
                continue
            record = entry[1]
            endpoint_id, space_id = record["ep"], record["space"]
            job = {k: record[k] for k in ("event", "evid", "space", "type", "body", "history")}
            job.update(n="0", err="")
            wh.queues.setdefault((endpoint_id, space_id), {})[record["key"]] = job
            if f"{endpoint_id} {space_id}" not in wh.leases:
                wh.ready.setdefault(endpoint_id, {})[space_id] = now
            del wh.dead[dead_id]
            replayed += 1
        return replayed

    async def webhook_sync_endpoints(self) -> int:
        return 0  # one process, one copy

    async def webhook_prune_consumers(self, idle_ms: int, keep: str) -> int:
        wh = self._wh
        now = self._now()
        busy = {p.consumer for p in wh.pending.values()}
        idle = [
            c
            for c, seen in wh.consumers.items()
            if c != keep and c not in busy and now - seen >= idle_ms
        ]
        for consumer in idle:
            del wh.consumers[consumer]
        return len(idle)


def _public(broadcast: Hash) -> Hash:
    """A broadcast record without its stream key (what events carry)."""
    return {k: v for k, v in broadcast.items() if k != "key"}


def _parse_event_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError as exc:
        raise errors.InvalidArgument("malformed event id: pass an Event.id") from exc


# --- webhooks: state -----------------------------------------------------------------------------


@dataclass
class _Pending:
    """An event a consumer of the group read but has not fanned out (Redis: the PEL)."""

    consumer: str
    delivered_ms: int
    event: event_pb2.Event


@dataclass
class _WebhookState:
    group_last: tuple[int, int] | None = None
    """The group's last delivered event; None until the group exists."""
    pending: dict[str, _Pending] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)
    """consumer -> when it last read or claimed (ms)."""
    endpoints: dict[str, WebhookEndpointRecord] = field(default_factory=dict)
    queues: dict[tuple[str, str], dict[str, Hash]] = field(default_factory=dict)
    """(endpoint_id, space_id) -> sort key -> job record (keys.webhook_job_key's fields)."""
    ready: dict[str, dict[str, int]] = field(default_factory=dict)
    """endpoint_id -> space_id -> due (ms)."""
    leases: dict[str, tuple[int, str]] = field(default_factory=dict)
    """"<endpoint_id> <space_id>" -> (expiry ms, token)."""
    dead: dict[str, tuple[int, Hash]] = field(default_factory=dict)
    """dead_letter_id -> (failed at ms, record as in keys.webhook_dead_key)."""


def _dead_letter(record: Hash) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=record["id"],
        endpoint_id=record["ep"],
        envelope_id=record["evid"],
        event_type=record["type"],
        space_id=record["space"],
        attempts=int(record["n"]),
        last_error=record["err"],
        failed_at_ms=int(record["at"]),
    )

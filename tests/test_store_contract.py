"""One contract, two stores: every test here runs on the memory store and on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

import pytest

from spaces import errors
from spaces.store.base import (
    PlacementMoved,
    Reservation,
    Store,
    WebhookDelivery,
    WebhookEndpointRecord,
)
from spaces.store.memory import MemoryStore
from spaces.store.redis import RedisStore
from spaces.v1 import event_pb2, node_pb2, participant_pb2, space_pb2
from spaces.webhooks.envelope import job_for


def reservation(
    space_id: str,
    pid: str = "",
    *,
    node: str = "n1",
    expected: str = "",
    pending_ms: int = 20_000,
    limit: int = 100,
    role: str = "publisher",
    resume_conn: str = "",
    presented: str = "",
    conn: str | None = None,
    token: str = "",
    reconnect: str = "",
) -> Reservation:
    return Reservation(
        space_id=space_id,
        connection_id=conn or "c" + secrets.token_hex(6),
        participant_id=pid or "gen-" + secrets.token_hex(4),
        generated_participant_id=not pid,
        role=role,
        display_name="Ada",
        ticket_hash="t-" + secrets.token_hex(4),
        resume_hash="r-" + secrets.token_hex(4),
        node_id=node,
        expected_node_id=expected,
        pending_ms=pending_ms,
        placement_ms=15_000,
        default_max_participants=limit,
        resume_connection_id=resume_conn,
        presented_resume_hash=presented,
        token_hash=token or "tok-" + secrets.token_hex(4),
        reconnect_participant_id=reconnect,
    )


async def new_space(store: Store, passthrough: str = "", max_participants: int = 0) -> str:
    space_id = "s" + secrets.token_hex(6)
    await store.create_space(space_id, passthrough, max_participants)
    return space_id


EPOCHS: dict[str, str] = {}
"""connection_id -> the store epoch its claim returned (what a media node remembers)."""


async def connect(store: Store, space_id: str, pid: str = "", **kw: object) -> Reservation:
    """Join and claim, as Join plus a media node do."""
    placement = (await store.join_context(space_id, "none")).placement
    r = reservation(space_id, pid, expected=placement, **kw)  # type: ignore[arg-type]
    await store.join(r)
    claim = await store.claim(
        space_id, r.connection_id, r.ticket_hash, r.node_id, 10_000, 15_000, "sess"
    )
    EPOCHS[r.connection_id] = claim.epoch
    return r


async def events_after(store: Store, after: str) -> list[event_pb2.Event]:
    return await store.read_events(after, 1000, 0)


# --- spaces ---------------------------------------------------------------------------------


async def test_created_space_reads_back_idle_with_its_passthrough(store: Store) -> None:
    space_id = await new_space(store, "order-42", 7)
    space = await store.get_space(space_id)
    assert space.id == space_id
    assert space.passthrough == "order-42"
    assert space.max_participants == 7
    assert space.status == space_pb2.SPACE_STATUS_IDLE
    assert space.active_session_id == ""
    assert space.created_at > 1_600_000_000


async def test_unknown_space_is_not_found(store: Store) -> None:
    with pytest.raises(errors.SpaceNotFound):
        await store.get_space("nope")


async def test_list_spaces_pages_in_creation_order(store: Store) -> None:
    ids = [await new_space(store) for _ in range(7)]
    seen: list[str] = []
    cursor = 0
    pages = 0
    while True:
        page, nxt = await store.list_spaces(3, cursor)
        seen += [s.id for s in page]
        pages += 1
        if nxt is None:
            break
        cursor = nxt
    assert seen == ids
    assert pages == 3


async def test_list_spaces_is_stable_when_a_space_is_deleted_between_pages(store: Store) -> None:
    ids = [await new_space(store) for _ in range(6)]
    page, cursor = await store.list_spaces(3, 0)
    assert cursor is not None
    await store.delete_space(ids[1], force=False)
    rest, _ = await store.list_spaces(10, cursor)
    assert [s.id for s in page] + [s.id for s in rest] == ids


async def test_update_space_changes_only_given_fields(store: Store) -> None:
    space_id = await new_space(store, "a", 5)
    updated = await store.update_space(space_id, None, 9)
    assert updated.passthrough == "a"
    assert updated.max_participants == 9
    updated = await store.update_space(space_id, "b", None)
    assert (updated.passthrough, updated.max_participants) == ("b", 9)
    with pytest.raises(errors.SpaceNotFound):
        await store.update_space("nope", "x", None)


async def test_delete_idle_space_removes_it(store: Store) -> None:
    space_id = await new_space(store)
    deletion = await store.delete_space(space_id, force=False)
    assert deletion.removed == []
    with pytest.raises(errors.SpaceNotFound):
        await store.get_space(space_id)
    with pytest.raises(errors.SpaceNotFound):
        await store.delete_space(space_id, force=False)


async def test_delete_active_space_needs_force_and_then_removes_everyone(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    b = await connect(store, space_id, "bob")
    with pytest.raises(errors.SpaceActive):
        await store.delete_space(space_id, force=False)
    assert (await store.get_space(space_id)).participant_count == 2
    deletion = await store.delete_space(space_id, force=True)
    assert sorted(c for c, _ in deletion.removed) == sorted([a.connection_id, b.connection_id])
    assert {n for _, n in deletion.removed} == {"n1"}
    assert deletion.node_id == "n1"
    with pytest.raises(errors.SpaceNotFound):
        await store.get_space(space_id)
    # The node learns why its connections vanished.
    result = await store.renew(
        space_id, "n1", 10_000, 15_000, EPOCHS[a.connection_id], {}, [{"cid": a.connection_id}]
    )
    assert result.lost == {a.connection_id: "space_deleted"}


# --- signing keys ---------------------------------------------------------------------------


async def test_signing_keys_store_only_what_they_are_given_and_delete(store: Store) -> None:
    pem = b"-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n"
    created = await store.create_signing_key("k1", pem)
    await store.create_signing_key("k2", pem)
    got = await store.get_signing_key("k1")
    assert got is not None
    assert got.public_key_pem == pem
    assert got.created_at == created.created_at
    page, cursor = await store.list_signing_keys(1, 0)
    assert [k.id for k in page] == ["k1"]
    assert cursor is not None
    page, cursor = await store.list_signing_keys(5, cursor)
    assert [k.id for k in page] == ["k2"]
    assert cursor is None
    assert await store.delete_signing_key("k1") is True
    assert await store.get_signing_key("k1") is None
    assert await store.delete_signing_key("k1") is False


# --- presence -------------------------------------------------------------------------------


async def test_join_reserves_participant_id_and_a_second_join_is_refused(store: Store) -> None:
    space_id = await new_space(store)
    first = reservation(space_id, "alice")
    admission = await store.join(first)
    assert admission.participant_id == "alice"
    with pytest.raises(errors.DuplicateParticipant):
        await store.join(reservation(space_id, "alice", expected="n1"))
    participant = await store.get_participant(space_id, "alice")
    assert participant.connection_id == first.connection_id
    assert participant.state == participant_pb2.PARTICIPANT_STATE_PENDING


async def test_join_without_participant_id_can_repeat(store: Store) -> None:
    space_id = await new_space(store)
    pids = set()
    for i in range(5):
        admission = await store.join(reservation(space_id, expected="n1" if i else ""))
        pids.add(admission.participant_id)
    assert len(pids) == 5
    assert (await store.get_space(space_id)).participant_count == 5


async def test_join_can_require_the_signing_key_to_still_exist(store: Store) -> None:
    from dataclasses import replace

    space_id = await new_space(store)
    await store.create_signing_key("k1", b"pem")
    await store.join(replace(reservation(space_id, "a"), signing_key_id="k1"))
    await store.delete_signing_key("k1")
    with pytest.raises(errors.TokenUnknownKey):
        await store.join(replace(reservation(space_id, "b", expected="n1"), signing_key_id="k1"))


async def test_join_unknown_space_is_not_found(store: Store) -> None:
    with pytest.raises(errors.SpaceNotFound):
        await store.join(reservation("missing", "alice"))


async def test_participant_limit_uses_space_override_then_default(store: Store) -> None:
    space_id = await new_space(store, max_participants=2)
    await store.join(reservation(space_id, "a"))
    await store.join(reservation(space_id, "b", expected="n1"))
    with pytest.raises(errors.ParticipantLimitReached):
        await store.join(reservation(space_id, "c", expected="n1"))
    other = await new_space(store)
    await store.join(reservation(other, "a", limit=1))
    with pytest.raises(errors.ParticipantLimitReached):
        await store.join(reservation(other, "b", expected="n1", limit=1))


async def test_join_detects_a_placement_changed_since_it_was_read(store: Store) -> None:
    space_id = await new_space(store)
    await store.join(reservation(space_id, "a", node="n1"))
    with pytest.raises(PlacementMoved) as moved:
        await store.join(reservation(space_id, "b", node="n2", expected=""))
    assert moved.value.current_node_id == "n1"
    context = await store.join_context(space_id, "k")
    assert context.placement == "n1"
    assert context.space_exists
    assert not (await store.join_context("missing", "k")).space_exists


async def test_claim_connects_and_flips_space_active_with_a_new_session(store: Store) -> None:
    space_id = await new_space(store)
    r = reservation(space_id, "alice")
    await store.join(r)
    assert (await store.get_space(space_id)).status == space_pb2.SPACE_STATUS_IDLE
    claim = await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 10_000, 15_000, "S1")
    assert claim.participant.participant_id == "alice"
    assert claim.participant.state == participant_pb2.PARTICIPANT_STATE_CONNECTED
    assert claim.space.status == space_pb2.SPACE_STATUS_ACTIVE
    space = await store.get_space(space_id)
    assert space.status == space_pb2.SPACE_STATUS_ACTIVE
    assert space.active_session_id == "S1"
    # A ticket is single use.
    with pytest.raises(errors.InvalidTicket):
        await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 10_000, 15_000, "S2")


async def test_claim_refuses_wrong_ticket_and_wrong_node(store: Store) -> None:
    space_id = await new_space(store)
    r = reservation(space_id, "alice")
    await store.join(r)
    with pytest.raises(errors.InvalidTicket):
        await store.claim(space_id, r.connection_id, "bad", "n1", 10_000, 15_000, "S")
    with pytest.raises(errors.TicketWrongNode):
        await store.claim(space_id, r.connection_id, r.ticket_hash, "n2", 10_000, 15_000, "S")
    with pytest.raises(errors.InvalidTicket):
        await store.claim(space_id, "unknown", r.ticket_hash, "n1", 10_000, 15_000, "S")


async def test_last_leave_flips_idle_and_next_activation_gets_a_new_session(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    first_session = (await store.get_space(space_id)).active_session_id
    left = await store.leave(space_id, a.connection_id, "left")
    assert left is not None
    assert left.participant_id == "alice"
    space = await store.get_space(space_id)
    assert space.status == space_pb2.SPACE_STATUS_IDLE
    assert space.active_session_id == ""
    # The id is free at once, and the placement is released with the last connection.
    assert (await store.join_context(space_id, "k")).placement == ""
    r = reservation(space_id, "alice")
    await store.join(r)
    await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 10_000, 15_000, "S-next")
    space = await store.get_space(space_id)
    assert space.active_session_id == "S-next" != first_session


async def test_late_release_never_frees_someone_elses_reservation(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    assert await store.leave(space_id, a.connection_id, "left") is not None
    b = await connect(store, space_id, "alice")
    # The first connection's node releases again, late: compare-and-delete must not free bob's.
    assert await store.leave(space_id, a.connection_id, "left") is None
    participant = await store.get_participant(space_id, "alice")
    assert participant.connection_id == b.connection_id
    with pytest.raises(errors.DuplicateParticipant):
        await store.join(reservation(space_id, "alice", expected="n1"))


async def test_leave_checks_owning_node_and_resume_secret(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    assert await store.leave(space_id, a.connection_id, "left", node_id="n2") is None
    with pytest.raises(errors.BadResumeSecret):
        await store.leave(space_id, a.connection_id, "left", resume_hash="wrong")
    assert await store.leave(space_id, a.connection_id, "left", resume_hash=a.resume_hash)


async def test_pending_lease_lapses_and_the_id_can_join_again(store: Store) -> None:
    space_id = await new_space(store)
    await store.join(reservation(space_id, "alice", pending_ms=200))
    with pytest.raises(errors.DuplicateParticipant):
        await store.join(reservation(space_id, "alice", expected="n1"))
    await asyncio.sleep(0.3)
    # Join reaps lapsed leases of its space itself...
    placement = (await store.join_context(space_id, "k")).placement
    await store.join(reservation(space_id, "alice", expected=placement))
    # ...and the reaper does it for spaces nobody touches.
    other = await new_space(store)
    await store.join(reservation(other, "bob", pending_ms=200))
    await asyncio.sleep(0.3)
    assert await store.reap() >= 1
    assert (await store.get_space(other)).participant_count == 0
    with pytest.raises(errors.ParticipantNotFound):
        await store.get_participant(other, "bob")


async def test_unrenewed_session_is_reaped_with_left_event_and_idle(store: Store) -> None:
    space_id = await new_space(store)
    r = reservation(space_id, "alice")
    await store.join(r)
    mark = await store.latest_event_id()
    await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 200, 15_000, "S")
    await asyncio.sleep(0.3)
    assert await store.reap() == 1
    space = await store.get_space(space_id)
    assert space.status == space_pb2.SPACE_STATUS_IDLE
    assert space.participant_count == 0
    types = [(e.type, e.reason) for e in await events_after(store, mark)]
    assert types == [
        (event_pb2.EVENT_TYPE_SPACE_ACTIVE, ""),
        (event_pb2.EVENT_TYPE_PARTICIPANT_JOINED, "joined"),
        (event_pb2.EVENT_TYPE_PARTICIPANT_LEFT, "lease_expired"),
        (event_pb2.EVENT_TYPE_SPACE_IDLE, ""),
    ]


async def test_renew_keeps_a_session_alive_past_its_lease(store: Store) -> None:
    space_id = await new_space(store)
    r = reservation(space_id, "alice")
    await store.join(r)
    claim = await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 300, 15_000, "S")
    for _ in range(4):
        await asyncio.sleep(0.15)
        result = await store.renew(
            space_id,
            "n1",
            300,
            15_000,
            claim.epoch,
            claim.space_record,
            [claim.connection_record],
        )
        assert result.lost == {}
        assert not result.moved
        await store.reap()
    assert (await store.get_participant(space_id, "alice")).state == (
        participant_pb2.PARTICIPANT_STATE_CONNECTED
    )


async def test_renew_reports_removed_connections_and_moved_spaces(store: Store) -> None:
    space_id = await new_space(store)
    a = reservation(space_id, "alice")
    await store.join(a)
    claim = await store.claim(space_id, a.connection_id, a.ticket_hash, "n1", 10_000, 15_000, "S")
    b = await connect(store, space_id, "bob")
    removed = await store.remove_participant(space_id, "bob", "removed")
    assert removed.connection_id == b.connection_id
    result = await store.renew(
        space_id,
        "n1",
        10_000,
        15_000,
        claim.epoch,
        claim.space_record,
        [claim.connection_record, {"cid": b.connection_id}],
    )
    assert result.lost == {b.connection_id: "removed"}
    assert result.moved is False
    with pytest.raises(errors.ParticipantNotFound):
        await store.remove_participant(space_id, "bob", "removed")
    # Another node took the space over: this node's sessions must move.
    other = await store.renew(space_id, "n2", 10_000, 15_000, claim.epoch, claim.space_record, [])
    assert other.moved is True


async def test_resume_takes_over_the_connection_without_going_idle(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    session = (await store.get_space(space_id)).active_session_id
    mark = await store.latest_event_id()
    resumed = reservation(
        space_id, "alice", expected="n1", resume_conn=a.connection_id, presented=a.resume_hash
    )
    admission = await store.join(resumed)
    assert admission.replaced_connection_id == a.connection_id
    assert admission.replaced_node_id == "n1"
    space = await store.get_space(space_id)
    assert space.status == space_pb2.SPACE_STATUS_ACTIVE
    assert space.active_session_id == session
    await store.claim(
        space_id, resumed.connection_id, resumed.ticket_hash, "n1", 10_000, 15_000, "other"
    )
    assert (await store.get_space(space_id)).active_session_id == session
    events = [(e.type, e.reason) for e in await events_after(store, mark)]
    assert events == [
        (event_pb2.EVENT_TYPE_PARTICIPANT_LEFT, "replaced"),
        (event_pb2.EVENT_TYPE_PARTICIPANT_JOINED, "resumed"),
    ]
    # The replaced connection is told why.
    result = await store.renew(
        space_id, "n1", 10_000, 15_000, EPOCHS[a.connection_id], {}, [{"cid": a.connection_id}]
    )
    assert result.lost == {a.connection_id: "replaced"}


async def test_resume_with_a_wrong_secret_is_refused(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    with pytest.raises(errors.BadResumeSecret):
        await store.join(
            reservation(
                space_id, "alice", expected="n1", resume_conn=a.connection_id, presented="wrong"
            )
        )
    # A token for another participant cannot resume alice's connection.
    with pytest.raises(errors.BadResumeSecret):
        await store.join(
            reservation(
                space_id,
                "mallory",
                expected="n1",
                resume_conn=a.connection_id,
                presented=a.resume_hash,
            )
        )
    assert (await store.get_participant(space_id, "alice")).connection_id == a.connection_id


async def test_resume_keeps_a_generated_participant_id(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id)
    pid = (await store.list_participants(space_id))[0].participant_id
    admission = await store.join(
        reservation(space_id, expected="n1", resume_conn=a.connection_id, presented=a.resume_hash)
    )
    assert admission.participant_id == pid


async def test_a_released_connection_resumes_its_generated_participant_id(
    store: Store,
) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id)
    pid = (await store.list_participants(space_id))[0].participant_id
    await store.leave(space_id, a.connection_id, "disconnected")
    admission = await store.join(
        reservation(space_id, resume_conn=a.connection_id, presented=a.resume_hash)
    )
    assert admission.participant_id == pid
    assert admission.replaced_connection_id == ""


async def test_removed_or_deliberately_left_connections_cannot_be_resumed(store: Store) -> None:
    space_id = await new_space(store)
    for reason in ("removed", "left"):
        a = await connect(store, space_id)
        pid = (await store.list_participants(space_id))[0].participant_id
        await store.leave(space_id, a.connection_id, reason)
        admission = await store.join(
            reservation(space_id, resume_conn=a.connection_id, presented=a.resume_hash)
        )
        assert admission.participant_id != pid
        left = await store.list_participants(space_id)
        await store.leave(space_id, left[0].connection_id, "left")


async def test_resuming_a_released_connection_checks_the_secret(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    await store.leave(space_id, a.connection_id, "disconnected")
    with pytest.raises(errors.BadResumeSecret):
        await store.join(
            reservation(space_id, "alice", resume_conn=a.connection_id, presented="wrong")
        )


async def test_reconnect_with_the_same_token_takes_its_connection_over(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice", token="tok-a")
    admission = await store.join(
        reservation(space_id, "alice", expected="n1", token="tok-a", reconnect="alice")
    )
    assert admission.participant_id == "alice"
    assert admission.replaced_connection_id == a.connection_id
    assert (await store.get_space(space_id)).status == space_pb2.SPACE_STATUS_ACTIVE


async def test_reconnect_with_another_token_is_a_duplicate(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice", token="tok-a")
    with pytest.raises(errors.DuplicateParticipant):
        await store.join(
            reservation(space_id, "alice", expected="n1", token="tok-b", reconnect="alice")
        )
    assert (await store.get_participant(space_id, "alice")).connection_id == a.connection_id


async def test_reconnect_by_token_recovers_a_generated_participant_id(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, token="tok-a")
    pid = (await store.list_participants(space_id))[0].participant_id
    # Still held: taken over.
    b = reservation(space_id, expected="n1", token="tok-a", reconnect=pid)
    assert (await store.join(b)).replaced_connection_id == a.connection_id
    # Released by a disconnect: given back, once.
    await store.leave(space_id, b.connection_id, "disconnected")
    c = await store.join(reservation(space_id, token="tok-a", reconnect=pid))
    assert c.participant_id == pid
    assert c.replaced_connection_id == ""
    # Another token cannot claim the generated id, even when it is free.
    others = await store.list_participants(space_id)
    await store.leave(space_id, others[0].connection_id, "disconnected")
    d = await store.join(reservation(space_id, token="tok-other", reconnect=pid))
    assert d.participant_id != pid


async def test_reconnect_by_token_after_removal_gets_a_new_participant_id(store: Store) -> None:
    space_id = await new_space(store)
    await connect(store, space_id, token="tok-a")
    pid = (await store.list_participants(space_id))[0].participant_id
    await store.remove_participant(space_id, pid, "removed")
    admission = await store.join(reservation(space_id, token="tok-a", reconnect=pid))
    assert admission.participant_id != pid


async def test_list_participants_in_join_order(store: Store) -> None:
    space_id = await new_space(store)
    for pid in ("a", "b", "c"):
        await connect(store, space_id, pid)
        await asyncio.sleep(0.002)
    assert [p.participant_id for p in await store.list_participants(space_id)] == ["a", "b", "c"]
    with pytest.raises(errors.SpaceNotFound):
        await store.list_participants("missing")


async def test_display_name_updates_the_participant(store: Store) -> None:
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    assert await store.set_display_name(space_id, a.connection_id, "Alice B.")
    assert (await store.get_participant(space_id, "alice")).display_name == "Alice B."
    assert not await store.set_display_name(space_id, "gone", "x")


# --- events ---------------------------------------------------------------------------------


async def test_space_lifecycle_events_in_order(store: Store) -> None:
    mark = await store.latest_event_id()
    space_id = await new_space(store)
    a = await connect(store, space_id, "alice")
    await store.leave(space_id, a.connection_id, "left")
    await store.delete_space(space_id, force=False)
    events = await events_after(store, mark)
    assert [e.type for e in events] == [
        event_pb2.EVENT_TYPE_SPACE_CREATED,
        event_pb2.EVENT_TYPE_SPACE_ACTIVE,
        event_pb2.EVENT_TYPE_PARTICIPANT_JOINED,
        event_pb2.EVENT_TYPE_PARTICIPANT_LEFT,
        event_pb2.EVENT_TYPE_SPACE_IDLE,
        event_pb2.EVENT_TYPE_SPACE_DELETED,
    ]
    assert all(e.space_id == space_id for e in events)
    assert events[1].space.status == space_pb2.SPACE_STATUS_ACTIVE
    assert events[2].participant.participant_id == "alice"
    assert events[3].reason == "left"
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(int(x) for x in i.split("-")))
    # Reading after any id resumes exactly after it.
    assert [e.id for e in await events_after(store, ids[2])] == ids[3:]


async def test_read_events_blocks_until_an_event_arrives(store: Store) -> None:
    mark = await store.latest_event_id()

    async def later() -> None:
        await asyncio.sleep(0.1)
        await new_space(store)

    task = asyncio.create_task(later())
    got = await store.read_events(mark, 10, 2000)
    await task
    assert [e.type for e in got] == [event_pb2.EVENT_TYPE_SPACE_CREATED]


# --- registry -------------------------------------------------------------------------------


async def test_node_heartbeats_are_listed_with_store_time_and_state_changes_are_events(
    store: Store,
) -> None:
    mark = await store.latest_event_id()
    node = node_pb2.Node(id="n1", address="127.0.0.1:1", state=node_pb2.NODE_STATE_SERVING)
    at = await store.heartbeat(node, 60_000)
    await store.heartbeat(node, 60_000)
    view = await store.list_nodes(60_000)
    assert [n.id for n in view.nodes] == ["n1"]
    assert view.nodes[0].updated_at_ms >= at
    assert view.now_ms >= view.nodes[0].updated_at_ms
    node.state = node_pb2.NODE_STATE_DRAINING
    await store.heartbeat(node, 60_000)
    await store.remove_node(node)
    assert (await store.list_nodes(60_000)).nodes == []
    states = [e.node.state for e in await events_after(store, mark)]
    assert states == [
        node_pb2.NODE_STATE_SERVING,
        node_pb2.NODE_STATE_DRAINING,
        node_pb2.NODE_STATE_STOPPED,
    ]


async def test_node_commands_reach_the_subscribed_node_only(store: Store) -> None:
    received: list[node_pb2.NodeCommand] = []

    async def listen() -> None:
        async for command in store.node_commands("n1"):
            received.append(command)

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    command = node_pb2.NodeCommand(
        kick=node_pb2.KickConnection(space_id="s", connection_id="c", reason="removed")
    )
    await store.publish_node_command("n2", command)
    await store.publish_node_command("n1", command)
    for _ in range(50):
        if received:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert received == [command]


# --- the Redis store only: recovering from a Redis that lost its data ----------------------


async def test_renew_reasserts_live_sessions_after_redis_lost_its_data(redis_url: str) -> None:
    store = RedisStore(redis_url)
    space_id = await new_space(store, "keep-me", 5)
    a = reservation(space_id, "alice")
    await store.join(a)
    claim = await store.claim(space_id, a.connection_id, a.ticket_hash, "n1", 10_000, 15_000, "S")
    await store.client.flushall()
    result = await store.renew(
        space_id,
        "n1",
        10_000,
        15_000,
        claim.epoch,
        claim.space_record,
        [claim.connection_record],
    )
    assert result.lost == {}
    assert result.epoch != claim.epoch
    space = await store.get_space(space_id)
    assert (space.passthrough, space.max_participants) == ("keep-me", 5)
    assert space.status == space_pb2.SPACE_STATUS_ACTIVE
    # Uniqueness holds again.
    with pytest.raises(errors.DuplicateParticipant):
        await store.join(reservation(space_id, "alice", expected="n1"))
    await store.close()


async def test_memory_store_epoch_is_stable() -> None:
    store = MemoryStore()
    space_id = await new_space(store)
    r = reservation(space_id, "a")
    await store.join(r)
    claim = await store.claim(space_id, r.connection_id, r.ticket_hash, "n1", 10_000, 15_000, "S")
    result = await store.renew(space_id, "n1", 10_000, 15_000, claim.epoch, {}, [])
    assert result.epoch == claim.epoch


# --- webhooks -------------------------------------------------------------------------------


def _endpoint(endpoint_id: str, *event_types: str) -> WebhookEndpointRecord:
    return WebhookEndpointRecord(
        id=endpoint_id,
        url=f"http://127.0.0.1:9/{endpoint_id}",
        secret="s3cret",
        event_types=event_types,
        created_at=int(endpoint_id[-1]) if endpoint_id[-1].isdigit() else 0,
    )


async def _fan_out_all(store: Store, consumer: str = "a") -> int:
    """Read everything new through the group and fan it out, as a replica does."""
    events = await store.webhook_read(consumer, 1000, 0)
    return await store.webhook_fan_out([job_for(e) for e in events])


async def _take(
    store: Store, owner: str = "w", lease_ms: int = 10_000, **slots: int
) -> list[WebhookDelivery]:
    taken, _ = await store.webhook_take(owner + secrets.token_hex(3), lease_ms, 100, 8, slots)
    return taken


async def test_webhook_endpoints_are_listed_oldest_first_and_deleted(store: Store) -> None:
    await store.webhook_put_endpoint(_endpoint("ep2", "video.space.idle"))
    await store.webhook_put_endpoint(_endpoint("ep1"))
    listed = await store.webhook_endpoints()
    assert [e.id for e in listed] == ["ep1", "ep2"]
    assert listed[1] == _endpoint("ep2", "video.space.idle")
    assert await store.webhook_delete_endpoint("ep1") is True
    assert await store.webhook_delete_endpoint("ep1") is False
    assert [e.id for e in await store.webhook_endpoints()] == ["ep2"]


async def test_fan_out_enqueues_per_wanted_endpoint_and_only_once_per_event(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    await store.webhook_put_endpoint(_endpoint("idle2", "video.space.idle"))
    space_id = await new_space(store)
    events = await store.webhook_read("a", 100, 0)
    assert [e.type for e in events] == [event_pb2.EVENT_TYPE_SPACE_CREATED]
    jobs = [job_for(e) for e in events]
    assert await store.webhook_fan_out(jobs) == 1
    # A second fan-out of the same (already acknowledged) events enqueues nothing.
    assert await store.webhook_fan_out(jobs) == 0
    taken = await _take(store)
    assert [(d.endpoint_id, d.space_id, d.event_type) for d in taken] == [
        ("all1", space_id, "video.space.created")
    ]
    assert json.loads(taken[0].body)["object"] == {"id": space_id, "type": "space"}


async def test_node_events_are_acknowledged_but_never_enqueued(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    node = node_pb2.Node(id="n1", address="127.0.0.1:1", state=node_pb2.NODE_STATE_SERVING)
    await store.heartbeat(node, 60_000)
    assert await _fan_out_all(store) == 0
    # Nothing stays pending, so nothing holds deliveries back.
    await new_space(store)
    assert await _fan_out_all(store) == 1
    assert len(await _take(store)) == 1


async def test_one_queue_delivers_its_space_in_stream_order_while_others_proceed(
    store: Store,
) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    first = await new_space(store, "v0")
    for i in range(1, 12):
        await store.update_space(first, f"v{i}", None)
    second = await new_space(store)
    assert await _fan_out_all(store) == 13
    seen: list[str] = []
    while True:
        taken = await _take(store)
        # Never two deliveries of one (endpoint, space) queue at once.
        assert len({d.space_id for d in taken}) == len(taken)
        if not taken:
            break
        for d in taken:
            if d.space_id == first:
                seen.append(json.loads(d.body)["data"].get("passthrough"))
            assert await store.webhook_delivered(d) is True
    assert seen == [f"v{i}" for i in range(12)]
    assert second  # its created event went out alongside the first space's


async def test_deliveries_wait_for_older_events_another_consumer_is_fanning_out(
    store: Store,
) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    space_id = await new_space(store)
    slow = await store.webhook_read("slow", 1, 0)  # the created event, not fanned out yet
    await store.update_space(space_id, "later", None)
    assert await _fan_out_all(store, "fast") == 1
    assert await _take(store) == []
    assert await store.webhook_fan_out([job_for(e) for e in slow]) == 1
    order = []
    for _ in range(2):
        (d,) = await _take(store)
        order.append(d.event_type)
        await store.webhook_delivered(d)
    assert order == ["video.space.created", "video.space.updated"]


async def test_events_of_a_stalled_consumer_are_claimed_and_fanned_out_once(
    store: Store,
) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    await new_space(store)
    stalled = await store.webhook_read("dead", 10, 0)
    assert len(stalled) == 1
    assert await store.webhook_claim_stale("alive", 60_000, 10) == []
    await asyncio.sleep(0.12)
    claimed = await store.webhook_claim_stale("alive", 100, 10)
    assert [e.id for e in claimed] == [stalled[0].id]
    assert await store.webhook_fan_out([job_for(e) for e in claimed]) == 1
    # The stalled consumer wakes up and fans out its copy: nothing is enqueued twice.
    assert await store.webhook_fan_out([job_for(e) for e in stalled]) == 0
    assert len(await _take(store)) == 1
    assert await store.webhook_prune_consumers(0, "alive") == 1


async def test_failures_back_off_then_dead_letter_and_a_replay_delivers_again(
    store: Store,
) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    space_id = await new_space(store)
    await store.update_space(space_id, "next", None)
    await _fan_out_all(store)
    (d,) = await _take(store)
    record = json.dumps({"response_status_code": 503})
    assert await store.webhook_failed(d, record, "http 503", 250, 100) == "retry"
    assert await _take(store) == []  # in backoff, and later events of the space wait
    await asyncio.sleep(0.3)
    (again,) = await _take(store)
    assert (again.stream_id, again.attempts) == (d.stream_id, 1)
    assert json.loads(again.history) == [{"response_status_code": 503}]
    assert await store.webhook_failed(again, record, "http 500", None, 100) == "dead"
    (dead,) = await store.webhook_dead_letters(10)
    assert dead.endpoint_id == "all1"
    assert dead.envelope_id == d.envelope_id
    assert (dead.event_type, dead.space_id) == ("video.space.created", space_id)
    assert (dead.attempts, dead.last_error) == (2, "http 500")
    assert dead.failed_at_ms > 0
    # The queue moves on past the dead letter.
    (following,) = await _take(store)
    assert following.event_type == "video.space.updated"
    await store.webhook_delivered(following)
    assert await store.webhook_replay([]) == 1
    assert await store.webhook_dead_letters(10) == []
    (replayed,) = await _take(store)
    assert (replayed.stream_id, replayed.attempts) == (d.stream_id, 0)
    assert len(json.loads(replayed.history)) == 2
    assert await store.webhook_replay(["all1:0-1"]) == 0


async def test_dead_letters_are_capped_and_listed_newest_first(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    spaces = [await new_space(store) for _ in range(3)]
    await _fan_out_all(store)
    for d in sorted(await _take(store), key=lambda d: d.stream_id):
        assert await store.webhook_failed(d, "{}", "down", None, 2) == "dead"
        await asyncio.sleep(0.002)
    listed = await store.webhook_dead_letters(10)
    assert [d.space_id for d in listed] == [spaces[2], spaces[1]]
    assert len(await store.webhook_dead_letters(1)) == 1


async def test_a_lapsed_lease_is_taken_over_and_the_old_holder_is_fenced(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    await new_space(store)
    await _fan_out_all(store)
    (held,) = await _take(store, "dead", lease_ms=100)
    assert await _take(store, "alive") == []
    await asyncio.sleep(0.15)
    taken, reclaimed = await store.webhook_take("alive-1", 10_000, 10, 8, {})
    assert reclaimed == 1
    (mine,) = taken
    assert mine.stream_id == held.stream_id
    assert await store.webhook_renew([held, mine], 10_000) == {held.token}
    assert await store.webhook_failed(held, "{}", "late", 1, 100) == "lost"
    assert await store.webhook_delivered(mine) is True
    assert await store.webhook_delivered(held) is False
    assert await _take(store) == []


async def test_take_respects_per_endpoint_slots(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("one1"))
    await store.webhook_put_endpoint(_endpoint("two2"))
    for _ in range(3):
        await new_space(store)
    assert await _fan_out_all(store) == 6
    taken, _ = await store.webhook_take("w1", 10_000, 100, 2, {"one1": 0})
    assert sorted(d.endpoint_id for d in taken) == ["two2", "two2"]
    taken, _ = await store.webhook_take("w2", 10_000, 1, 8, {})
    assert len(taken) == 1


async def test_release_hands_a_queue_back_due_at_once(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("all1"))
    await new_space(store)
    await _fan_out_all(store)
    (d,) = await _take(store)
    assert await store.webhook_release([d]) == 1
    assert await store.webhook_release([d]) == 0
    (again,) = await _take(store)
    assert again.stream_id == d.stream_id


async def test_deleting_an_endpoint_drops_its_queues_and_dead_letters(store: Store) -> None:
    await store.webhook_group_ensure()
    await store.webhook_put_endpoint(_endpoint("gone1"))
    await store.webhook_put_endpoint(_endpoint("kept2"))
    held_space = await new_space(store)
    await new_space(store)
    await _fan_out_all(store)
    taken = await _take(store, one1=0)
    gone = [d for d in taken if d.endpoint_id == "gone1"]
    await store.webhook_failed(gone[0], "{}", "down", None, 100)
    assert len(await store.webhook_dead_letters(10)) == 1
    await store.update_space(held_space, "x", None)
    await _fan_out_all(store)
    assert await store.webhook_delete_endpoint("gone1") is True
    assert await store.webhook_dead_letters(10) == []
    # The queue a worker still holds is dropped when it finishes with it.
    await store.webhook_delivered(gone[1])
    for d in taken:
        if d.endpoint_id == "kept2":
            await store.webhook_delivered(d)
    remaining = await _take(store)
    assert [(d.endpoint_id, d.event_type) for d in remaining] == [("kept2", "video.space.updated")]


async def test_a_cancelled_store_call_stops_at_once(store: Store) -> None:
    """Shutdown and client disconnects rely on cancellation. redis-py 8.0/8.1 swallowed it in
    most calls (a background loop then never stopped), which is why redis is pinned below 8."""
    import random

    space_id = await new_space(store)
    ignored = 0
    for _ in range(40):

        async def busy() -> None:
            while True:
                await store.get_space(space_id)
                await store.reap()
                await asyncio.sleep(0)  # the memory store never suspends on its own

        task = asyncio.create_task(busy())
        await asyncio.sleep(random.random() * 0.01)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        if not done:
            ignored += 1
            task.cancel()
            await asyncio.wait({task}, timeout=1)
    assert ignored == 0


# --- broadcasts -----------------------------------------------------------------------------

from spaces.store.base import BroadcastSpec, HiddenReservation  # noqa: E402
from spaces.v1 import broadcast_pb2  # noqa: E402


def broadcast_spec(space_id: str, bid: str = "", **kw: object) -> BroadcastSpec:
    values: dict[str, object] = {
        "space_id": space_id,
        "broadcast_id": bid or "b" + secrets.token_hex(6),
        "layout": "gallery",
        "resolution": "1280x720",
        "rtmp_url": "rtmp://127.0.0.1:1935/live",
        "stream_key": "secret-key",
        "background_source": "inline",
        "background": b"\x89PNG fake",
        "background_sha256": "ab" * 32,
        "passthrough": "show-1",
    }
    values.update(kw)
    return BroadcastSpec(**values)  # type: ignore[arg-type]


async def test_broadcast_reads_back_idle_without_its_stream_key(store: Store) -> None:
    space_id = await new_space(store)
    created = await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    got = await store.get_broadcast(space_id, "b1")
    assert created == got
    assert got.status == broadcast_pb2.BROADCAST_STATUS_IDLE
    assert got.layout == broadcast_pb2.BROADCAST_LAYOUT_GALLERY
    assert got.resolution == broadcast_pb2.BROADCAST_RESOLUTION_1280X720
    assert got.rtmp_url == "rtmp://127.0.0.1:1935/live"
    assert got.passthrough == "show-1"
    assert "secret-key" not in str(got)
    space = await store.get_space(space_id)
    assert [b.id for b in space.broadcasts] == ["b1"]
    with pytest.raises(errors.BroadcastNotFound):
        await store.get_broadcast(space_id, "nope")
    with pytest.raises(errors.SpaceNotFound):
        await store.get_broadcast("nope", "b1")


async def test_broadcast_limit_per_space_is_enforced(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 2)
    await store.create_broadcast(broadcast_spec(space_id, "b2"), 2)
    with pytest.raises(errors.BroadcastLimitReached):
        await store.create_broadcast(broadcast_spec(space_id, "b3"), 2)
    assert [b.id for b in await store.list_broadcasts(space_id)] == ["b1", "b2"]
    with pytest.raises(errors.SpaceNotFound):
        await store.create_broadcast(broadcast_spec("missing"), 2)


async def test_start_needs_an_active_space_and_delete_needs_an_idle_broadcast(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    with pytest.raises(errors.SpaceIdle):
        await store.start_broadcast(space_id, "b1")
    assert await store.broadcasts_due(10) == []
    await connect(store, space_id, "alice")
    started, node = await store.start_broadcast(space_id, "b1")
    assert started.status == broadcast_pb2.BROADCAST_STATUS_ACTIVE
    assert node == "n1"
    assert started.started_at_ms > 0
    again, _ = await store.start_broadcast(space_id, "b1")
    assert again.started_at_ms == started.started_at_ms  # starting an active one changes nothing
    with pytest.raises(errors.BroadcastActive):
        await store.delete_broadcast(space_id, "b1")
    stopped, _ = await store.stop_broadcast(space_id, "b1")
    assert stopped.status == broadcast_pb2.BROADCAST_STATUS_IDLE
    await store.delete_broadcast(space_id, "b1")
    assert await store.list_broadcasts(space_id) == []


async def test_broadcast_events_are_emitted_in_order_without_the_key(store: Store) -> None:
    space_id = await new_space(store)
    mark = await store.latest_event_id()
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    await store.stop_broadcast(space_id, "b1")
    await store.delete_broadcast(space_id, "b1")
    events = [e for e in await events_after(store, mark) if e.WhichOneof("subject") == "broadcast"]
    assert [(e.type, e.reason) for e in events] == [
        (event_pb2.EVENT_TYPE_BROADCAST_CREATED, ""),
        (event_pb2.EVENT_TYPE_BROADCAST_ACTIVE, "started"),
        (event_pb2.EVENT_TYPE_BROADCAST_IDLE, "stopped"),
        (event_pb2.EVENT_TYPE_BROADCAST_DELETED, ""),
    ]
    assert all(e.broadcast.id == "b1" and e.space_id == space_id for e in events)
    assert "secret-key" not in str(events)


async def test_space_going_idle_stops_its_broadcast_in_the_same_step(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    r = await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    assert await store.broadcasts_due(10) == [(space_id, "b1")]
    mark = await store.latest_event_id()
    await store.leave(space_id, r.connection_id, "left")
    got = await store.get_broadcast(space_id, "b1")
    assert got.status == broadcast_pb2.BROADCAST_STATUS_IDLE
    events = await events_after(store, mark)
    kinds = [e.type for e in events]
    idle = kinds.index(event_pb2.EVENT_TYPE_BROADCAST_IDLE)
    assert events[idle].reason == "space_idle"
    assert kinds.index(event_pb2.EVENT_TYPE_SPACE_IDLE) > idle
    space_idle = events[kinds.index(event_pb2.EVENT_TYPE_SPACE_IDLE)]
    assert [b.status for b in space_idle.space.broadcasts] == [broadcast_pb2.BROADCAST_STATUS_IDLE]
    assert await store.broadcasts_due(10) == []


async def test_a_broadcast_lease_is_exclusive_until_it_lapses(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    job = await store.claim_broadcast(space_id, "b1", "w1 t1", "w1", 300)
    assert job is not None
    assert (job.rtmp_url, job.stream_key, job.background, job.run) == (
        "rtmp://127.0.0.1:1935/live",
        "secret-key",
        b"\x89PNG fake",
        "1",
    )
    assert await store.claim_broadcast(space_id, "b1", "w2 t2", "w2", 300) is None
    assert (await store.get_broadcast(space_id, "b1")).worker_id == "w1"
    assert await store.broadcasts_due(10) == []
    assert await store.renew_broadcast(space_id, "b1", "w1 t1", 300, "1", True, "") == "ok"
    assert (await store.get_broadcast(space_id, "b1")).streaming
    await asyncio.sleep(0.45)  # w1 stops renewing (it died): its lease lapses
    lapsed = await store.get_broadcast(space_id, "b1")
    assert lapsed.worker_id == "" and not lapsed.streaming
    assert await store.broadcasts_due(10) == [(space_id, "b1")]
    assert await store.claim_broadcast(space_id, "b1", "w2 t2", "w2", 5_000) is not None
    assert await store.renew_broadcast(space_id, "b1", "w1 t1", 300, "1", True, "") == "lost"
    assert not await store.release_broadcast(space_id, "b1", "w1 t1")
    assert (await store.get_broadcast(space_id, "b1")).worker_id == "w2"


async def test_release_hands_a_broadcast_over_at_once(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    assert await store.claim_broadcast(space_id, "b1", "w1 t1", "w1", 60_000) is not None
    assert await store.broadcasts_due(10) == []
    assert await store.release_broadcast(space_id, "b1", "w1 t1")
    assert await store.broadcasts_due(10) == [(space_id, "b1")]
    assert await store.claim_broadcast(space_id, "b1", "w2 t2", "w2", 60_000) is not None


async def test_stopped_or_restarted_broadcast_tells_its_worker_to_stop(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    job = await store.claim_broadcast(space_id, "b1", "w1 t1", "w1", 60_000)
    assert job is not None
    await store.stop_broadcast(space_id, "b1")
    assert await store.renew_broadcast(space_id, "b1", "w1 t1", 60_000, job.run, True, "") == (
        "stopped"
    )
    await store.start_broadcast(space_id, "b1")  # a new run, due for any worker
    assert await store.renew_broadcast(space_id, "b1", "w1 t1", 60_000, job.run, True, "") == (
        "stopped"
    )
    again = await store.claim_broadcast(space_id, "b1", "w1 t9", "w1", 60_000)
    assert again is not None and again.run == "2"


async def test_hidden_subscriber_is_invisible_and_counts_for_nothing(store: Store) -> None:
    space_id = await new_space(store, max_participants=1)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    r = await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    with pytest.raises(errors.BroadcastLeaseLost):
        await store.join_hidden(
            HiddenReservation(space_id, "chid", "bcaster", "broadcast", "tk", 5_000, "b1", "w1 t1")
        )
    await store.claim_broadcast(space_id, "b1", "w1 t1", "w1", 60_000)
    mark = await store.latest_event_id()
    node, _ = await store.join_hidden(
        HiddenReservation(space_id, "chid", "bcaster", "broadcast", "tk", 5_000, "b1", "w1 t1")
    )
    assert node == "n1"
    claim = await store.claim(space_id, "chid", "tk", "n1", 10_000, 15_000, "sess")
    assert claim.connection_record["hidden"] == "1"
    assert [p.participant_id for p in await store.list_participants(space_id)] == ["alice"]
    assert (await store.get_space(space_id)).participant_count == 1
    with pytest.raises(errors.ParticipantNotFound):
        await store.get_participant(space_id, "bcaster")
    with pytest.raises(errors.ParticipantNotFound):
        await store.remove_participant(space_id, "bcaster", "removed")
    # The space is full for participants (limit 1), the hidden subscriber notwithstanding.
    with pytest.raises(errors.ParticipantLimitReached):
        await connect(store, space_id, "bob")
    # The last participant leaving makes the space idle although the hidden one is still there.
    await store.leave(space_id, r.connection_id, "left")
    assert (await store.get_space(space_id)).status == space_pb2.SPACE_STATUS_IDLE
    await store.leave(space_id, "chid", "left")
    events = await events_after(store, mark)
    assert not [e for e in events if e.participant.participant_id == "bcaster"]
    # The broadcast stopped with its space, and its lease with it: no more hidden joins.
    with pytest.raises(errors.BroadcastLeaseLost):
        await store.join_hidden(
            HiddenReservation(space_id, "chid2", "bc2", "broadcast", "tk2", 5_000, "b1", "w1 t1")
        )
    assert (await store.get_space(space_id)).status == space_pb2.SPACE_STATUS_IDLE


async def test_forced_delete_stops_and_deletes_broadcasts(store: Store) -> None:
    space_id = await new_space(store)
    await store.create_broadcast(broadcast_spec(space_id, "b1"), 1)
    await connect(store, space_id, "alice")
    await store.start_broadcast(space_id, "b1")
    mark = await store.latest_event_id()
    await store.delete_space(space_id, force=True)
    kinds = [e.type for e in await events_after(store, mark)]
    assert event_pb2.EVENT_TYPE_BROADCAST_IDLE in kinds
    assert kinds.index(event_pb2.EVENT_TYPE_BROADCAST_DELETED) < kinds.index(
        event_pb2.EVENT_TYPE_SPACE_DELETED
    )
    assert await store.broadcasts_due(10) == []
    assert await store.claim_broadcast(space_id, "b1", "w1 t1", "w1", 1000) is None

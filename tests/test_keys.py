"""The key layout that makes Redis Cluster possible: every key a script touches is in one slot,
the shards spread evenly over the slot space, and event ids are unique across streams."""

from __future__ import annotations

import re
import secrets

from spaces.store import keys


def test_each_shard_tag_owns_its_own_thirty_second_of_the_slot_space() -> None:
    width = 16384 // keys.SHARDS
    slots = [keys.key_slot(keys.tag_prefix(i)) for i in range(keys.SHARDS)]
    for index, slot in enumerate(slots):
        assert index * width <= slot < (index + 1) * width, (index, keys.SHARD_TAGS[index], slot)
    assert len(set(keys.TAGS)) == keys.STREAMS == keys.SHARDS + 1


def test_key_slot_matches_redis_cluster_keyslot() -> None:
    # Values from `redis-cli CLUSTER KEYSLOT` (Redis 7.0).
    assert keys.key_slot("{a}z") == 15495
    assert keys.key_slot("foo") == 12182
    assert keys.key_slot("{user1000}.following") == keys.key_slot("{user1000}.followers")
    # The tag rules (cluster spec): the first "{" up to the next "}", if not empty.
    assert keys.key_slot("foo{{bar}}zap") == keys.key_slot("{bar")
    assert keys.key_slot("foo{bar}{zap}") == keys.key_slot("bar")
    assert keys.key_slot("foo{}{bar}") != keys.key_slot("bar")


def test_every_key_of_a_space_is_in_its_shards_slot() -> None:
    for _ in range(200):
        space_id = "sp" + secrets.token_hex(6)
        shard = keys.shard_of(space_id)
        slot = keys.key_slot(keys.events_key(shard))
        per_space = [
            keys.space_key(space_id),
            keys.leases_key(space_id),
            keys.conn_key(space_id, "c1"),
            keys.pid_key(space_id, "alice"),
            keys.placement_key(space_id),
            keys.resumable_key(space_id),
            keys.gone_key(space_id),
            keys.webhook_queue_key("ep1", space_id),
            keys.webhook_job_key(space_id, "ep1", keys.webhook_sort_key("1-2")),
        ]
        per_shard = [
            keys.lease_index_key(shard),
            keys.spaces_key(shard),
            keys.spaces_seq_key(shard),
            keys.epoch_key(shard),
            keys.live_signing_keys_key(shard),
            keys.revoked_signing_keys_key(shard),
            keys.webhook_endpoints_key(shard),
            keys.webhook_deleted_endpoints_key(shard),
            keys.webhook_leases_key(shard),
            keys.webhook_owners_key(shard),
            keys.webhook_ready_key(shard, "ep1"),
            keys.webhook_dead_index_key(shard),
        ]
        assert {keys.key_slot(k) for k in per_space + per_shard} == {slot}


def test_global_keys_share_the_global_slot() -> None:
    slot = keys.key_slot(keys.GLOBAL_PREFIX)
    global_keys = [
        keys.SIGNING_KEYS,
        keys.SIGNING_KEYS_SEQ,
        keys.NODES,
        keys.LAYOUT,
        keys.WEBHOOK_ENDPOINTS_SEQ,
        keys.signing_key_key("k1"),
        keys.node_key("n1"),
        keys.node_commands_key("n1"),
        keys.events_key(keys.GLOBAL),
        keys.epoch_key(keys.GLOBAL),
        keys.webhook_endpoints_key(keys.GLOBAL),
    ]
    assert {keys.key_slot(k) for k in global_keys} == {slot}


def test_scripts_build_every_key_from_their_slots_tag() -> None:
    """A literal key name in a script would land in another slot on a cluster."""
    literal = re.compile(r"redis\.p?call\('[A-Z]+', '")
    for body in [
        keys.LIB,
        keys.WEBHOOK_LIB,
        *keys.ALL_SCRIPTS.values(),
        *keys.WEBHOOK_SCRIPTS.values(),
    ]:
        assert not literal.search(body), literal.search(body)
    rendered = keys.render_script(keys.REAP, maxlen=10, gone_ttl_ms=10)
    for index in range(keys.STREAMS):
        assert f"['{keys.tag_prefix(index)}'] = {index}" in rendered


def test_event_ids_name_their_stream() -> None:
    for index in range(keys.STREAMS):
        for n in (0, 1, 7):
            assert keys.event_stream_index(f"1700000000000-{n * keys.STREAMS + index}") == index
    dead = f"ep1:1700000000000-{2 * keys.STREAMS + 5}"
    assert keys.webhook_dead_key(dead).startswith(keys.tag_prefix(5))

"""Redis key names and Lua scripts, each documented with its data shape.

**Shards.** Every space belongs to one of ``SHARDS`` fixed shards (``shard_of``: CRC-32 of its
id), and every key of a space starts with its shard's hash tag, ``{<tag>}:``. Each shard also
has its own event stream, lease index, space list and epoch under the same tag, so every key a
script touches is in one slot: a state change and the event that reports it stay **one atomic
Lua step**, on a standalone Redis and on Redis Cluster alike. Keys that belong to no space (the
signing keys, the node registry and its command streams, the webhook endpoints' source of truth)
carry the global tag ``{g}``, which has its own event stream for node events. docs/architecture.md
("Shards and Redis Cluster") explains the design.

The tags are not ``s0``, ``s1``, ...: each was chosen so that its slot falls in its own 1/32 of
the slot space (``SHARD_TAGS`` lists the slots), so a cluster whose primaries own even slot
ranges (``redis-cli --cluster create`` does that) gets an even share of shards on each primary.

**Event ids** are unique across every stream: a script writes each entry with an explicit id
``<µs>-<n * STREAMS + index>`` (Redis time in microseconds; ``index`` is the stream's place in
``TAGS``). Readers merge the streams into one order by id (spaces.store.feed), which is the
order the changes happened in (to the microsecond, on one server; within the clock skew between
primaries on a cluster), and ``event_stream_index`` tells which stream an id came from.

Times in scripts are Redis server time (``TIME``), so replicas never disagree about a lease.

**Adding a key.** A per-space key is a function of the space id built on ``space_key`` (Lua:
``S .. ':suffix'``); a per-shard key is a function of the tag index built on ``tag_prefix``
(Lua: ``TAG .. 'name'``); a global key is a constant or a function built on ``GLOBAL_PREFIX``.
Scripts receive one key of their slot as ``KEYS[1]``; the library derives ``TAG`` from it.
"""

from __future__ import annotations

import zlib

# --- shards -----------------------------------------------------------------------------------

SHARDS = 32
"""Fixed for the life of a deployment: a space's shard is part of all its key names."""

SHARD_TAGS: tuple[str, ...] = (
    "s0fa",  # slot 263
    "s1dq",  # 612
    "s2as",  # 1155
    "s3bq",  # 1698
    "s4ds",  # 2518
    "s5fc",  # 2741
    "s6bs",  # 3344
    "s7aq",  # 3889
    "s8c",  # 4513
    "s9d",  # 4727
    "s10dp",  # 5589
    "s11fd",  # 5682
    "s12dc",  # 6631
    "s13fs",  # 6788
    "s14p",  # 7418
    "s15s",  # 8104
    "s16",  # 8553
    "s17db",  # 8758
    "s18bb",  # 9377
    "s19ad",  # 9732
    "s20r",  # 10540
    "s21q",  # 10878
    "s22a",  # 11548
    "s23b",  # 11854
    "s24dc",  # 12443
    "s25fs",  # 13304
    "s26",  # 13370
    "s27aa",  # 13948
    "s28ar",  # 14367
    "s29bp",  # 14910
    "s30a",  # 15438
    "s31b",  # 16156
)
"""Shard i's hash tag: the first of ``s<i>``, ``s<i>a``, ..., ``s<i>zz`` whose cluster slot is
in [i * 16384 / 32, (i + 1) * 16384 / 32) (tests/test_keys.py checks it)."""

GLOBAL_TAG = "g"
TAGS: tuple[str, ...] = (*SHARD_TAGS, GLOBAL_TAG)
"""Every hash tag Spaces uses: the shards, then the global tag. Each has an event stream."""
GLOBAL = SHARDS
"""The global tag's index in TAGS."""
STREAMS = len(TAGS)


def shard_of(space_id: str) -> int:
    """The shard a space lives in, for ever."""
    return zlib.crc32(space_id.encode()) % SHARDS


def tag_prefix(index: int) -> str:
    """``{<tag>}:``, the start of every key of that shard (or of the global keys)."""
    return "{" + TAGS[index] + "}:"


GLOBAL_PREFIX = tag_prefix(GLOBAL)


def event_stream_index(event_id: str) -> int:
    """Which stream (index in TAGS) an event id was written to."""
    _, _, seq = event_id.partition("-")
    return int(seq) % STREAMS


def key_slot(key: str) -> int:
    """Redis Cluster's slot of a key (CRC16/XMODEM of its hash tag, mod 16384)."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


# --- per space (all under the space's shard tag) ----------------------------------------------


def space_key(space_id: str) -> str:
    """HASH: id, created_at (unix s), passthrough, status ("idle"|"active"), session
    (active_session_id, "" while idle), max (participant limit, 0 = default), seq (creation
    order: the score in spaces_key), connected (count of connections counted as connected),
    hidden (count of hidden connections: broadcaster workers, which count for nothing), bcseq
    (broadcasts created)."""
    return f"{tag_prefix(shard_of(space_id))}sp:{space_id}"


def leases_key(space_id: str) -> str:
    """ZSET connection_id -> lease expiry (unix ms). Every admitted connection is here."""
    return f"{space_key(space_id)}:leases"


def conn_key(space_id: str, connection_id: str) -> str:
    """HASH: pid, cid, role ("publisher"|"subscriber"), name, state ("pending"|"connected"),
    node, joined (unix ms), ticket (sha256 hex, "" once used), resume (sha256 hex of the
    resume secret), gen ("1" when the server generated pid), counted ("1" when included in the
    space's connected count), resumed ("1" when it took over an earlier connection), tokres
    (sha256 hex of the join token: a reconnect with the same token may take it over), hidden
    ("1" for a broadcaster worker's subscriber: never listed, announced or counted)."""
    return f"{space_key(space_id)}:c:{connection_id}"


def pid_key(space_id: str, participant_id: str) -> str:
    """STRING connection_id, with PX = the holder's lease: the participant_id uniqueness guard.
    Written only with SET NX, deleted only by compare-and-delete on connection_id."""
    return f"{space_key(space_id)}:pid:{participant_id}"


def placement_key(space_id: str) -> str:
    """STRING node_id, with PX = placement lease: the sticky space -> media node mapping."""
    return f"{space_key(space_id)}:node"


def resumable_key(space_id: str) -> str:
    """HASH connection_id -> "<participant_id> <resume sha256>", and "t:<participant_id>" ->
    "<token sha256>", expiring like gone_key: lets a client that lost its connection (not one
    that was removed) resume it after its release, by its resume secret or by its token,
    keeping a server-generated participant_id."""
    return f"{space_key(space_id)}:resumable"


def broadcasts_key(space_id: str) -> str:
    """ZSET broadcast_id -> creation sequence (the space hash's ``bcseq``): the space's
    broadcasts, in creation order."""
    return f"{space_key(space_id)}:bcs"


def broadcast_key(space_id: str, broadcast_id: str) -> str:
    """HASH: id, space, created_at (unix s), status ("idle"|"active"), layout ("gallery"|
    "active-speaker"|"crop"), res ("1920x1080", ...), url (RTMP URL without the key), key (the
    stream key: never emitted in events), bg (background source: URL, path, "inline" or ""),
    bgsha (sha256 hex), pass (passthrough), started (unix ms of the last start), run (starts so
    far: a worker streams one run), worker (worker id of the last claim), err (the worker's last
    error), streaming ("1" while frames reach the RTMP server)."""
    return f"{space_key(space_id)}:bc:{broadcast_id}"


def broadcast_background_key(space_id: str, broadcast_id: str) -> str:
    """STRING: the background image (PNG or JPEG), base64; absent without a background."""
    return f"{space_key(space_id)}:bc:{broadcast_id}:bg"


def broadcast_lease_key(space_id: str, broadcast_id: str) -> str:
    """STRING "<worker_id> <token>", with PX = the broadcast lease: the worker streaming it.
    Written only with SET NX PX (claim) or by its holder (renew), deleted only by
    compare-and-delete on the whole value (release) or when the broadcast goes idle."""
    return f"{space_key(space_id)}:bc:{broadcast_id}:lease"


def gone_key(space_id: str) -> str:
    """HASH connection_id -> reason ("removed", "replaced", "lease_expired", "space_deleted",
    "left", "disconnected", ...), expiring: tells a media node why a connection disappeared."""
    return f"{space_key(space_id)}:gone"


# --- per shard (and, for events and epoch, the global tag too) --------------------------------


def events_key(index: int) -> str:
    """STREAM of events, capped (MAXLEN ~), ids as in the module doc. Fields: t (type),
    s (space_id), ts (unix ms), r (reason), k (subject kind: space|participant|node), then the
    subject's fields as "x.<name>". The shards' streams carry their spaces' events, the global
    one node events."""
    return f"{tag_prefix(index)}events"


def epoch_key(index: int) -> str:
    """STRING: Redis time (µs) when this shard's primary first saw Spaces data. A changed epoch
    tells media nodes that the shard lost its data, so they re-assert their live sessions."""
    return f"{tag_prefix(index)}epoch"


def broadcast_queue_key(index: int) -> str:
    """ZSET "<space_id> <broadcast_id>" -> when a worker may claim it (unix ms): every ACTIVE
    broadcast of the shard, scored by its lease's expiry (the start time while unclaimed).
    Workers read every shard's due ones (score <= now) and claim each with one per-space script
    (like lease_index_key for connections)."""
    return f"{tag_prefix(index)}broadcasts"


def lease_index_key(index: int) -> str:
    """ZSET space_id -> earliest lease expiry in that space (unix ms): what the reaper scans."""
    return f"{tag_prefix(index)}leases"


def spaces_key(index: int) -> str:
    """ZSET space_id -> creation sequence: Redis time in µs, made strictly increasing per shard
    by spaces_seq_key. ListSpaces merges the shards by (sequence, shard)."""
    return f"{tag_prefix(index)}spaces"


def spaces_seq_key(index: int) -> str:
    """STRING: the last creation sequence given out in this shard."""
    return f"{tag_prefix(index)}spaces:seq"


def live_signing_keys_key(index: int) -> str:
    """SET of signing key ids that exist: this shard's copy of SIGNING_KEYS, so that the join
    script can refuse a revoked key without leaving the shard's slot. Written before the global
    record on create and revoked before it on delete."""
    return f"{tag_prefix(index)}keyids"


def revoked_signing_keys_key(index: int) -> str:
    """SET of deleted signing key ids: a key id here is never added back to
    live_signing_keys_key (the join path restores lost copies; a deletion must win)."""
    return f"{tag_prefix(index)}keyids:revoked"


# --- global (the {g} tag) ---------------------------------------------------------------------

SIGNING_KEYS = f"{GLOBAL_PREFIX}keys"
"""ZSET key_id -> creation sequence number."""
SIGNING_KEYS_SEQ = f"{GLOBAL_PREFIX}keys:seq"
NODES = f"{GLOBAL_PREFIX}nodes"
"""ZSET node_id -> last heartbeat (Redis time, unix ms)."""
LAYOUT = f"{GLOBAL_PREFIX}layout"
"""STRING: the key layout version ("2" = sharded). Written on first start."""
LAYOUT_VERSION = "2"
LEGACY_KEYS = ("spaces", "keys", "events", "epoch", "nodes", "wh:endpoints", "broadcasts")
"""Global keys of the unsharded layout (before version 2): if Redis holds any, it has data
this version cannot see (docs/operations.md, "Upgrading to the sharded layout")."""


def signing_key_key(key_id: str) -> str:
    """HASH: id, created_at (unix s), public_key (PEM). The private key is never stored."""
    return f"{GLOBAL_PREFIX}key:{key_id}"


def node_key(node_id: str) -> str:
    """HASH: pb (base64 of spaces.v1.Node; updated_at filled from NODES on read), state (name)."""
    return f"{GLOBAL_PREFIX}node:{node_id}"


def node_commands_key(node_id: str) -> str:
    """STREAM of spaces.v1.NodeCommand (field c: base64) for one media node, capped, expiring
    NODE_COMMANDS_TTL_MS after the last command. A stream rather than pub/sub: it works the same
    on Redis Cluster, and a node that lost its connection reads what it missed."""
    return f"{GLOBAL_PREFIX}node:{node_id}:cmd"


NODE_COMMANDS_MAXLEN = 1_000
NODE_COMMANDS_TTL_MS = 600_000


# --- Lua --------------------------------------------------------------------------------------
# The library below is prepended to every script. {maxlen} and {gone_ttl} are filled in from
# the store's configuration when scripts are registered; {streams} and {indexes} from TAGS.

LIB = r"""
local TAG = string.match(KEYS[1], '^{[^}]*}:')
local INDEX = ({indexes})[TAG]
local STREAMS = {streams}
local EVENTS = TAG .. 'events'
local LEASE_INDEX = TAG .. 'leases'
local SPACES = TAG .. 'spaces'
local SPACES_SEQ = TAG .. 'spaces:seq'
local EPOCH = TAG .. 'epoch'
local LIVE_KEYS = TAG .. 'keyids'
local REVOKED_KEYS = TAG .. 'keyids:revoked'
local BROADCAST_QUEUE = TAG .. 'broadcasts'
local MAXLEN = {maxlen}
local GONE_TTL = {gone_ttl}
-- Removed, replaced, deleted or deliberately left connections cannot be resumed.
local NOT_RESUMABLE = {removed = true, replaced = true, space_deleted = true, left = true,
                       duplicate = true}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function epoch()
  local current = redis.call('GET', EPOCH)
  if current then return current end
  local t = redis.call('TIME')
  redis.call('SET', EPOCH, t[1] .. string.format('%06d', tonumber(t[2])), 'NX')
  return redis.call('GET', EPOCH)
end

-- The next creation sequence of this shard: Redis time in µs, strictly increasing.
local function next_space_seq()
  local seq = now_us()
  local last = tonumber(redis.call('GET', SPACES_SEQ) or '0')
  if seq <= last then seq = last + 1 end
  local text = string.format('%d', seq)
  redis.call('SET', SPACES_SEQ, text)
  return text
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h, flat
end

-- The id of this stream's next entry: "<µs>-<n * STREAMS + INDEX>" (Redis time in µs), after
-- its last entry, so that ids are unique across every stream, increase within each, and order
-- the changes of different shards by when they happened.
local function next_event_id()
  local us, n = now_us(), 0
  local last = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', 1)[1]
  if last then
    local sep = string.find(last[1], '-', 1, true)
    local last_us = tonumber(string.sub(last[1], 1, sep - 1))
    if last_us >= us then
      us = last_us
      n = math.floor(tonumber(string.sub(last[1], sep + 1)) / STREAMS) + 1
    end
  end
  return string.format('%d-%d', us, n * STREAMS + INDEX)
end

-- Append an event; `flat` is the subject's HGETALL list.
local function emit(etype, space_id, now, reason, kind, flat)
  local args = {'XADD', EVENTS, 'MAXLEN', '~', MAXLEN, next_event_id(),
                't', etype, 's', space_id, 'ts', now, 'r', reason, 'k', kind}
  for i = 1, #flat, 2 do
    args[#args + 1] = 'x.' .. flat[i]
    args[#args + 1] = flat[i + 1]
  end
  redis.call(unpack(args))
end

-- A broadcast's fields without its stream key (events and replies never carry the key).
local function broadcast_flat(bk)
  local flat = redis.call('HGETALL', bk)
  local out = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= 'key' then
      out[#out + 1] = flat[i]
      out[#out + 1] = flat[i + 1]
    end
  end
  return out
end

local function visible_count(S)
  return redis.call('ZCARD', S .. ':leases') - tonumber(redis.call('HGET', S, 'hidden') or '0')
end

local function emit_space(etype, S, space_id, now, reason)
  local _, flat = hgetall(S)
  flat[#flat + 1] = 'count'
  flat[#flat + 1] = tostring(visible_count(S))
  local list = {}
  for _, bid in ipairs(redis.call('ZRANGE', S .. ':bcs', 0, -1)) do
    local b = {}
    local bflat = broadcast_flat(S .. ':bc:' .. bid)
    for i = 1, #bflat, 2 do b[bflat[i]] = bflat[i + 1] end
    list[#list + 1] = b
  end
  if #list > 0 then
    flat[#flat + 1] = 'broadcasts'
    flat[#flat + 1] = cjson.encode(list)
  end
  emit(etype, space_id, now, reason, 'space', flat)
end

local function emit_broadcast(etype, S, space_id, bid, now, reason)
  emit(etype, space_id, now, reason, 'broadcast', broadcast_flat(S .. ':bc:' .. bid))
end

-- An ACTIVE broadcast stops: its lease and its place in the claim queue go with it, so the
-- worker streaming it learns at its next renewal.
local function broadcast_idle(S, space_id, bid, now, reason)
  local bk = S .. ':bc:' .. bid
  redis.call('HSET', bk, 'status', 'idle', 'worker', '', 'streaming', '0')
  redis.call('DEL', bk .. ':lease')
  redis.call('ZREM', BROADCAST_QUEUE, space_id .. ' ' .. bid)
  emit_broadcast('broadcast_idle', S, space_id, bid, now, reason)
end

-- Remove one connection. Compare-and-delete on the participant_id guard, so a late removal
-- never frees someone else's reservation. keep_count moves the connected count to a successor.
local function drop_conn(S, space_id, conn, reason, now, keep_count)
  local ck = S .. ':c:' .. conn
  local h, flat = hgetall(ck)
  redis.call('ZREM', S .. ':leases', conn)
  if h.pid == nil then return nil end
  redis.call('DEL', ck)
  local pk = S .. ':pid:' .. h.pid
  if redis.call('GET', pk) == conn then redis.call('DEL', pk) end
  redis.call('HSET', S .. ':gone', conn, reason)
  redis.call('PEXPIRE', S .. ':gone', GONE_TTL)
  if NOT_RESUMABLE[reason] == nil and h.resume then
    redis.call('HSET', S .. ':resumable', conn, h.pid .. ' ' .. h.resume)
    redis.call('PEXPIRE', S .. ':resumable', GONE_TTL)
  end
  if NOT_RESUMABLE[reason] == nil and h.tokres and h.tokres ~= '' then
    redis.call('HSET', S .. ':resumable', 't:' .. h.pid, h.tokres)
    redis.call('PEXPIRE', S .. ':resumable', GONE_TTL)
  end
  if h.counted == '1' and not keep_count then
    redis.call('HINCRBY', S, 'connected', -1)
  end
  if h.hidden == '1' then
    redis.call('HINCRBY', S, 'hidden', -1)
  elseif h.state == 'connected' then
    emit('participant_left', space_id, now, reason, 'participant', flat)
  end
  return h
end

-- After any change: flip to idle when nobody is connected, keep the lease index current, and
-- drop the placement once the space is empty so the next session is placed by load.
local function settle(S, space_id, now)
  if redis.call('EXISTS', S) == 1 then
    local connected = tonumber(redis.call('HGET', S, 'connected') or '0')
    if connected <= 0 and redis.call('HGET', S, 'status') == 'active' then
      redis.call('HSET', S, 'status', 'idle', 'session', '', 'connected', 0)
      -- A broadcast follows its space: it stops in the same step as the space goes idle.
      for _, bid in ipairs(redis.call('ZRANGE', S .. ':bcs', 0, -1)) do
        if redis.call('HGET', S .. ':bc:' .. bid, 'status') == 'active' then
          broadcast_idle(S, space_id, bid, now, 'space_idle')
        end
      end
      emit_space('space_idle', S, space_id, now, '')
    end
  end
  local first = redis.call('ZRANGE', S .. ':leases', 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', LEASE_INDEX, space_id)
    redis.call('DEL', S .. ':node')
  else
    redis.call('ZADD', LEASE_INDEX, first[2], space_id)
  end
end

local function reap(S, space_id, now)
  local expired = redis.call('ZRANGEBYSCORE', S .. ':leases', '-inf', now)
  for _, conn in ipairs(expired) do
    drop_conn(S, space_id, conn, 'lease_expired', now, false)
  end
  return #expired
end

local function activate(S, space_id, now, session_id)
  if redis.call('HGET', S, 'status') ~= 'active' then
    redis.call('HSET', S, 'status', 'active', 'session', session_id)
    emit_space('space_active', S, space_id, now, '')
  end
end
"""

CREATE_SPACE = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 passthrough, 3 max_participants
-- Returns the space's HGETALL list.
local S = KEYS[1]
local now = now_ms()
epoch()
local seq = next_space_seq()
redis.call('HSET', S, 'id', ARGV[1], 'created_at', math.floor(now / 1000),
           'passthrough', ARGV[2], 'status', 'idle', 'session', '', 'max', ARGV[3],
           'seq', seq, 'connected', 0)
redis.call('ZADD', SPACES, seq, ARGV[1])
emit_space('space_created', S, ARGV[1], now, '')
local _, flat = hgetall(S)
return flat
"""

UPDATE_SPACE = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 set_passthrough ("1"|"0"), 3 passthrough, 4 set_max ("1"|"0"), 5 max
-- Returns the space's HGETALL list, or {"err", "space_not_found"}.
local S = KEYS[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
if ARGV[2] == '1' then redis.call('HSET', S, 'passthrough', ARGV[3]) end
if ARGV[4] == '1' then redis.call('HSET', S, 'max', ARGV[5]) end
emit_space('space_updated', S, ARGV[1], now_ms(), '')
local _, flat = hgetall(S)
return flat
"""

DELETE_SPACE = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 force ("1"|"0")
-- Returns {"ok", node_id or "", conn_1, node_1, conn_2, node_2, ...} for the connections it
-- removed, or {"err", "space_not_found" | "space_active"}.
local S = KEYS[1]
local sid = ARGV[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local now = now_ms()
reap(S, sid, now)
if redis.call('HGET', S, 'status') == 'active' and ARGV[2] ~= '1' then
  settle(S, sid, now)
  return {'err', 'space_active'}
end
local node = redis.call('GET', S .. ':node') or ''
local out = {'ok', node}
for _, conn in ipairs(redis.call('ZRANGE', S .. ':leases', 0, -1)) do
  local h = drop_conn(S, sid, conn, 'space_deleted', now, false)
  if h then
    out[#out + 1] = conn
    out[#out + 1] = h.node or ''
  end
end
settle(S, sid, now)
for _, bid in ipairs(redis.call('ZRANGE', S .. ':bcs', 0, -1)) do
  local bk = S .. ':bc:' .. bid
  if redis.call('HGET', bk, 'status') == 'active' then
    broadcast_idle(S, sid, bid, now, 'space_deleted')
  end
  emit_broadcast('broadcast_deleted', S, sid, bid, now, 'space_deleted')
  redis.call('DEL', bk, bk .. ':bg', bk .. ':lease')
end
emit_space('space_deleted', S, sid, now, '')
redis.call('DEL', S, S .. ':leases', S .. ':node', S .. ':resumable', S .. ':bcs')
redis.call('ZREM', SPACES, sid)
redis.call('ZREM', LEASE_INDEX, sid)
return out
"""

JOIN = r"""
-- Admit one connection: the atomic participant_id set-if-absent, the participant limit and the
-- placement check, in one step.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 connection_id, 3 participant_id, 4 role, 5 display_name,
--       6 ticket sha256, 7 resume sha256, 8 generated pid ("1"|"0"), 9 node_id,
--       10 expected current placement ("" = none), 11 pending lease ms, 12 placement lease ms,
--       13 default participant limit, 14 connection to resume ("" = none),
--       15 sha256 of the presented resume secret, 16 signing key id that must still exist
--       ("" = not checked), 17 participant_id to reconnect by token ("" = none),
--       18 sha256 of the join token (kept as the connection's tokres)
-- Returns {"ok", participant_id, joined_ms, expires_ms, replaced_conn, replaced_node}
--      or {"moved", current_node} (placement changed since it was read: choose again)
--      or {"err", "space_not_found" | "unknown_key" | "duplicate" | "full" | "bad_resume"}.
local S = KEYS[1]
local sid = ARGV[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
if ARGV[16] ~= '' and redis.call('SISMEMBER', LIVE_KEYS, ARGV[16]) == 0 then
  return {'err', 'unknown_key'}
end
local now = now_ms()
reap(S, sid, now)
local current = redis.call('GET', S .. ':node') or ''
if current ~= ARGV[10] then
  settle(S, sid, now)
  return {'moved', current}
end
local pid = ARGV[3]
local counted = '0'
local replaced_conn, replaced_node = '', ''
if ARGV[14] ~= '' then
  local old = redis.call('HMGET', S .. ':c:' .. ARGV[14], 'resume', 'pid', 'node', 'counted')
  if old[1] then
    if old[1] ~= ARGV[15] then return {'err', 'bad_resume'} end
    if ARGV[8] == '0' and old[2] ~= pid then return {'err', 'bad_resume'} end
    pid = old[2]
    counted = old[4] or '0'
    replaced_conn, replaced_node = ARGV[14], old[3] or ''
    drop_conn(S, sid, ARGV[14], 'replaced', now, true)
  else
    -- Already released (disconnect, lapse): resume its participant_id if the secret matches.
    local gone = redis.call('HGET', S .. ':resumable', ARGV[14])
    if gone then
      local sep = string.find(gone, ' ', 1, true)
      local gone_pid, gone_hash = string.sub(gone, 1, sep - 1), string.sub(gone, sep + 1)
      if gone_hash ~= ARGV[15] then return {'err', 'bad_resume'} end
      if ARGV[8] == '0' and gone_pid ~= pid then return {'err', 'bad_resume'} end
      pid = gone_pid
      redis.call('HDEL', S .. ':resumable', ARGV[14])
    end
  end
elseif ARGV[17] ~= '' and ARGV[18] ~= '' and (ARGV[8] == '1' or ARGV[17] == pid) then
  -- Reconnect by token: its own connection (admitted with the same token) is taken over, or
  -- its participant_id given back once that connection is gone.
  local holder = redis.call('GET', S .. ':pid:' .. ARGV[17])
  if holder then
    local old = redis.call('HMGET', S .. ':c:' .. holder, 'tokres', 'node', 'counted')
    if old[1] and old[1] == ARGV[18] then
      pid = ARGV[17]
      counted = old[3] or '0'
      replaced_conn, replaced_node = holder, old[2] or ''
      drop_conn(S, sid, holder, 'replaced', now, true)
    end
  elseif redis.call('HGET', S .. ':resumable', 't:' .. ARGV[17]) == ARGV[18] then
    pid = ARGV[17]
    redis.call('HDEL', S .. ':resumable', 't:' .. ARGV[17])
  end
end
if redis.call('EXISTS', S .. ':pid:' .. pid) == 1 then
  settle(S, sid, now)
  return {'err', 'duplicate'}
end
local limit = tonumber(redis.call('HGET', S, 'max') or '0')
if limit == 0 then limit = tonumber(ARGV[13]) end
if visible_count(S) >= limit then
  settle(S, sid, now)
  return {'err', 'full'}
end
local expires = now + tonumber(ARGV[11])
redis.call('HSET', S .. ':c:' .. ARGV[2], 'pid', pid, 'cid', ARGV[2], 'role', ARGV[4],
           'name', ARGV[5], 'state', 'pending', 'node', ARGV[9], 'joined', now,
           'ticket', ARGV[6], 'resume', ARGV[7], 'gen', ARGV[8], 'counted', counted,
           'resumed', replaced_conn ~= '' and '1' or '0', 'tokres', ARGV[18])
redis.call('SET', S .. ':pid:' .. pid, ARGV[2], 'PX', ARGV[11])
redis.call('ZADD', S .. ':leases', expires, ARGV[2])
redis.call('SET', S .. ':node', ARGV[9], 'PX', ARGV[12])
settle(S, sid, now)
return {'ok', pid, now, expires, replaced_conn, replaced_node}
"""

CLAIM = r"""
-- A media node claims a connection with its single-use ticket.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 connection_id, 3 ticket sha256, 4 node_id, 5 session lease ms,
--       6 placement lease ms, 7 active_session_id to use if the space becomes active
-- Returns {"ok", epoch, expires_ms, <conn HGETALL...>, "|", <space HGETALL...>}
--      or {"err", "space_not_found" | "invalid_ticket" | "wrong_node" | "moved"}.
local S = KEYS[1]
local sid = ARGV[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local now = now_ms()
reap(S, sid, now)
local ck = S .. ':c:' .. ARGV[2]
local h = hgetall(ck)
if h.state ~= 'pending' or h.ticket ~= ARGV[3] or h.ticket == '' then
  settle(S, sid, now)
  return {'err', 'invalid_ticket'}
end
if h.node ~= ARGV[4] then
  settle(S, sid, now)
  return {'err', 'wrong_node'}
end
if (redis.call('GET', S .. ':node') or '') ~= ARGV[4] then
  settle(S, sid, now)
  return {'err', 'moved'}
end
local expires = now + tonumber(ARGV[5])
redis.call('HSET', ck, 'state', 'connected', 'ticket', '')
redis.call('ZADD', S .. ':leases', expires, ARGV[2])
local pk = S .. ':pid:' .. h.pid
if redis.call('GET', pk) == ARGV[2] then redis.call('PEXPIRE', pk, ARGV[5]) end
local hidden = h.hidden == '1'
if h.counted ~= '1' and not hidden then
  redis.call('HINCRBY', S, 'connected', 1)
  redis.call('HSET', ck, 'counted', '1')
end
if not hidden then activate(S, sid, now, ARGV[7]) end
redis.call('PEXPIRE', S .. ':node', ARGV[6])
local _, cflat = hgetall(ck)
if not hidden then
  emit('participant_joined', sid, now, h.resumed == '1' and 'resumed' or 'joined',
       'participant', cflat)
end
settle(S, sid, now)
local _, sflat = hgetall(S)
local out = {'ok', epoch(), expires}
for i = 1, #cflat do out[#out + 1] = cflat[i] end
out[#out + 1] = '|'
for i = 1, #sflat do out[#out + 1] = sflat[i] end
return out
"""

RENEW = r"""
-- A media node renews its live connections in one space and the space's placement. When the
-- epoch changed (Redis lost its data), it re-asserts them from the snapshot instead.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 node_id, 3 session lease ms, 4 placement lease ms,
--       5 JSON snapshot {"epoch": e, "space": {field: value}, "conns": [{field: value}]}
-- Returns {epoch, moved ("1"|"0"), lost_conn_1, reason_1, lost_conn_2, reason_2, ...}.
local S = KEYS[1]
local sid = ARGV[1]
local node = ARGV[2]
local snap = cjson.decode(ARGV[5])
local now = now_ms()
local current_epoch = epoch()
local reassert = current_epoch ~= snap['epoch']
local out = {current_epoch, '0'}
if redis.call('EXISTS', S) == 0 then
  if not reassert then
    for _, c in ipairs(snap['conns']) do
      out[#out + 1] = c['cid']
      out[#out + 1] = redis.call('HGET', S .. ':gone', c['cid']) or 'space_deleted'
    end
    return out
  end
  local sp = snap['space']
  -- Keep the space's place in ListSpaces when the snapshot knows it.
  local seq = tonumber(sp['seq'] or '') and sp['seq'] or next_space_seq()
  redis.call('HSET', S, 'id', sid, 'created_at', sp['created_at'] or math.floor(now / 1000),
             'passthrough', sp['passthrough'] or '', 'status', 'idle', 'session', '',
             'max', sp['max'] or '0', 'seq', seq, 'connected', 0)
  redis.call('ZADD', SPACES, seq, sid)
end
reap(S, sid, now)
local placed = redis.call('GET', S .. ':node')
if placed == node or not placed then
  redis.call('SET', S .. ':node', node, 'PX', ARGV[4])
else
  out[2] = '1'
end
local expires = now + tonumber(ARGV[3])
for _, c in ipairs(snap['conns']) do
  local cid = c['cid']
  local ck = S .. ':c:' .. cid
  -- Only three fields: a renewal is the most frequent script, and HGETALL costs a third more.
  local f = redis.call('HMGET', ck, 'pid', 'node', 'state')
  local h = {pid = f[1] or nil, node = f[2], state = f[3]}
  local lost = nil
  if h.pid ~= nil then
    if h.node ~= node or h.state ~= 'connected' then
      lost = 'moved'
    else
      redis.call('ZADD', S .. ':leases', expires, cid)
      local pk = S .. ':pid:' .. h.pid
      local holder = redis.call('GET', pk)
      if holder == cid then
        redis.call('PEXPIRE', pk, ARGV[3])
      elseif not holder then
        redis.call('SET', pk, cid, 'PX', ARGV[3])
      else
        lost = 'duplicate'
        drop_conn(S, sid, cid, 'duplicate', now, false)
      end
    end
  elseif reassert and c['pid'] then
    local pk = S .. ':pid:' .. c['pid']
    if redis.call('SET', pk, cid, 'NX', 'PX', ARGV[3]) then
      local hidden = c['hidden'] == '1'
      redis.call('HSET', ck, 'pid', c['pid'], 'cid', cid, 'role', c['role'], 'name', c['name'],
                 'state', 'connected', 'node', node, 'joined', c['joined'], 'ticket', '',
                 'resume', c['resume'], 'gen', c['gen'] or '0',
                 'counted', hidden and '0' or '1', 'resumed', '0', 'hidden', hidden and '1' or '0')
      redis.call('ZADD', S .. ':leases', expires, cid)
      if hidden then
        redis.call('HINCRBY', S, 'hidden', 1)
      else
        redis.call('HINCRBY', S, 'connected', 1)
        activate(S, sid, now, snap['space']['session'] or '')
      end
    else
      lost = 'duplicate'
    end
  else
    lost = redis.call('HGET', S .. ':gone', cid) or 'lease_expired'
  end
  if lost then
    out[#out + 1] = cid
    out[#out + 1] = lost
  end
end
settle(S, sid, now)
return out
"""

LEAVE = r"""
-- Compare-and-delete of one connection.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 connection_id, 3 reason, 4 node_id that must own it ("" = any),
--       5 sha256 of the resume secret that must match ("" = not checked)
-- Returns {"ok", <conn HGETALL...>} or {"gone"} or {"err", "bad_resume"}.
local S = KEYS[1]
local sid = ARGV[1]
local ck = S .. ':c:' .. ARGV[2]
local h = hgetall(ck)
if h.pid == nil then return {'gone'} end
if ARGV[4] ~= '' and h.node ~= ARGV[4] then return {'gone'} end
if ARGV[5] ~= '' and h.resume ~= ARGV[5] then return {'err', 'bad_resume'} end
local now = now_ms()
local _, flat = hgetall(ck)
drop_conn(S, sid, ARGV[2], ARGV[3], now, false)
settle(S, sid, now)
local out = {'ok'}
for i = 1, #flat do out[#out + 1] = flat[i] end
return out
"""

REMOVE_PARTICIPANT = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 participant_id, 3 reason
-- Returns {"ok", <conn HGETALL...>} or {"err", "space_not_found" | "participant_not_found"}.
local S = KEYS[1]
local sid = ARGV[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local conn = redis.call('GET', S .. ':pid:' .. ARGV[2])
if not conn or redis.call('HGET', S .. ':c:' .. conn, 'hidden') == '1' then
  return {'err', 'participant_not_found'}
end
local now = now_ms()
local _, flat = hgetall(S .. ':c:' .. conn)
drop_conn(S, sid, conn, ARGV[3], now, false)
settle(S, sid, now)
local out = {'ok'}
for i = 1, #flat do out[#out + 1] = flat[i] end
return out
"""

REAP = r"""
-- Reap lapsed leases in the shard's spaces whose earliest lease has expired.
-- KEYS[1] = the shard's lease index ({tag}:leases). ARGV: 1 max spaces to visit
-- Returns the number of connections removed.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', LEASE_INDEX, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local removed = 0
for _, sid in ipairs(due) do
  local S = TAG .. 'sp:' .. sid
  removed = removed + reap(S, sid, now)
  settle(S, sid, now)
end
return removed
"""

SET_DISPLAY_NAME = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 connection_id, 2 display_name
-- Returns 1 when the connection exists.
local ck = KEYS[1] .. ':c:' .. ARGV[1]
if redis.call('EXISTS', ck) == 0 then return 0 end
redis.call('HSET', ck, 'name', ARGV[2])
return 1
"""

HEARTBEAT = r"""
-- KEYS[1] = {g}:node:<id>
-- ARGV: 1 node_id, 2 base64 spaces.v1.Node, 3 state name, 4 record ttl ms
-- Returns the heartbeat's Redis time (unix ms). Emits node_state_changed on a state change.
local now = now_ms()
local previous = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], 'pb', ARGV[2], 'state', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', TAG .. 'nodes', now, ARGV[1])
if previous ~= ARGV[3] then
  emit('node_state_changed', '', now, ARGV[3], 'node', {'pb', ARGV[2], 'at', tostring(now)})
end
return now
"""

REMOVE_NODE = r"""
-- KEYS[1] = {g}:node:<id>
-- ARGV: 1 node_id, 2 final base64 spaces.v1.Node (state STOPPED)
local now = now_ms()
redis.call('DEL', KEYS[1])
redis.call('ZREM', TAG .. 'nodes', ARGV[1])
emit('node_state_changed', '', now, 'NODE_STATE_STOPPED', 'node',
     {'pb', ARGV[2], 'at', tostring(now)})
return now
"""

LIST_NODES = r"""
-- KEYS[1] = {g}:nodes. ARGV: 1 record ttl ms
-- Prunes nodes silent for longer than the record ttl, then returns
-- {now_ms, node_id_1, heartbeat_ms_1, pb_1, ...}.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
local out = {now}
local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local pb = redis.call('HGET', TAG .. 'node:' .. ids[i], 'pb')
  if pb then
    out[#out + 1] = ids[i]
    out[#out + 1] = ids[i + 1]
    out[#out + 1] = pb
  end
end
return out
"""

PREPARE_SHARD = r"""
-- A shard's bookkeeping keys (its epoch and its creation sequence), written when a process
-- starts, so that the keys Spaces keeps do not depend on which shards have had a space yet.
-- KEYS[1] = {tag}:epoch
epoch()
redis.call('SET', SPACES_SEQ, '0', 'NX')
return 1
"""

REVOKE_SIGNING_KEY = r"""
-- Remove this shard's copy of a deleted signing key id, for good.
-- KEYS[1] = {tag}:keyids. ARGV: 1 key id
redis.call('SREM', LIVE_KEYS, ARGV[1])
redis.call('SADD', REVOKED_KEYS, ARGV[1])
return 1
"""

RESTORE_SIGNING_KEY = r"""
-- Put back this shard's copy of a signing key id that still exists globally (the shard's
-- primary lost its data), unless the key was deleted meanwhile.
-- KEYS[1] = {tag}:keyids. ARGV: 1 key id
-- Returns 1 when the copy is there now.
if redis.call('SISMEMBER', REVOKED_KEYS, ARGV[1]) == 1 then return 0 end
redis.call('SADD', LIVE_KEYS, ARGV[1])
return 1
"""

# --- broadcasts ---------------------------------------------------------------------------------
# A broadcast's record, background and lease live under its space's hash tag; ACTIVE broadcasts
# are also in their shard's broadcast queue (broadcast_queue_key), which workers read to find
# work. Every state change
# emits its event in the same step. A broadcast stops by itself in settle() when its space goes
# idle, so "ACTIVE on an idle space" never exists, not even for an instant.

CREATE_BROADCAST = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id, 3 per-space limit, 4 layout, 5 resolution, 6 rtmp url,
--       7 stream key, 8 background source, 9 background sha256, 10 background base64 ("" = none),
--       11 passthrough
-- Returns the broadcast's fields (no key) or {"err", "space_not_found" | "broadcast_limit"}.
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
if redis.call('ZCARD', S .. ':bcs') >= tonumber(ARGV[3]) then return {'err', 'broadcast_limit'} end
local now = now_ms()
local bk = S .. ':bc:' .. bid
redis.call('HSET', bk, 'id', bid, 'space', sid, 'created_at', math.floor(now / 1000),
           'status', 'idle', 'layout', ARGV[4], 'res', ARGV[5], 'url', ARGV[6], 'key', ARGV[7],
           'bg', ARGV[8], 'bgsha', ARGV[9], 'pass', ARGV[11], 'started', 0, 'run', 0,
           'worker', '', 'err', '', 'streaming', '0')
if ARGV[10] ~= '' then redis.call('SET', bk .. ':bg', ARGV[10]) end
redis.call('ZADD', S .. ':bcs', redis.call('HINCRBY', S, 'bcseq', 1), bid)
emit_broadcast('broadcast_created', S, sid, bid, now, '')
return broadcast_flat(bk)
"""

START_BROADCAST = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id
-- Returns {"ok", node_id or "", <broadcast fields>}
--      or {"err", "space_not_found" | "broadcast_not_found" | "space_idle"}.
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local bk = S .. ':bc:' .. bid
if redis.call('EXISTS', bk) == 0 then return {'err', 'broadcast_not_found'} end
local now = now_ms()
-- Lapsed leases first: a space whose last participant's node died is idle, not active.
reap(S, sid, now)
settle(S, sid, now)
if redis.call('HGET', S, 'status') ~= 'active' then return {'err', 'space_idle'} end
if redis.call('HGET', bk, 'status') ~= 'active' then
  redis.call('HSET', bk, 'status', 'active', 'started', now, 'err', '', 'streaming', '0',
             'worker', '')
  redis.call('HINCRBY', bk, 'run', 1)
  redis.call('ZADD', BROADCAST_QUEUE, now, sid .. ' ' .. bid)
  emit_broadcast('broadcast_active', S, sid, bid, now, 'started')
end
local out = {'ok', redis.call('GET', S .. ':node') or ''}
for _, v in ipairs(broadcast_flat(bk)) do out[#out + 1] = v end
return out
"""

STOP_BROADCAST = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id
-- Returns {"ok", node_id or "", <broadcast fields>}
--      or {"err", "space_not_found" | "broadcast_not_found"}.
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local bk = S .. ':bc:' .. bid
if redis.call('EXISTS', bk) == 0 then return {'err', 'broadcast_not_found'} end
if redis.call('HGET', bk, 'status') == 'active' then
  broadcast_idle(S, sid, bid, now_ms(), 'stopped')
end
local out = {'ok', redis.call('GET', S .. ':node') or ''}
for _, v in ipairs(broadcast_flat(bk)) do out[#out + 1] = v end
return out
"""

DELETE_BROADCAST = r"""
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id
-- Returns {"ok"} or {"err", "space_not_found" | "broadcast_not_found" | "broadcast_active"}.
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local bk = S .. ':bc:' .. bid
if redis.call('EXISTS', bk) == 0 then return {'err', 'broadcast_not_found'} end
if redis.call('HGET', bk, 'status') == 'active' then return {'err', 'broadcast_active'} end
emit_broadcast('broadcast_deleted', S, sid, bid, now_ms(), '')
redis.call('DEL', bk, bk .. ':bg', bk .. ':lease')
redis.call('ZREM', S .. ':bcs', bid)
return {'ok'}
"""

DUE_BROADCASTS = r"""
-- KEYS[1] = the shard's broadcast queue ({tag}:broadcasts)
-- ARGV: 1 max entries
-- Returns the "<space_id> <broadcast_id>" members due for a claim (score <= now).
return redis.call('ZRANGEBYSCORE', BROADCAST_QUEUE, '-inf', now_ms(), 'LIMIT', 0,
                  tonumber(ARGV[1]))
"""

CLAIM_BROADCAST = r"""
-- A worker claims an ACTIVE broadcast: SET NX PX on its lease.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id, 3 holder ("<worker_id> <token>"), 4 worker_id, 5 lease ms
-- Returns {"ok", background base64 or "", <broadcast fields, with the key>}
--      or {"held"} (another worker holds it) or {"gone"} (no longer ACTIVE: off the queue).
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
local bk = S .. ':bc:' .. bid
local member = sid .. ' ' .. bid
if redis.call('HGET', bk, 'status') ~= 'active' then
  redis.call('ZREM', BROADCAST_QUEUE, member)
  return {'gone'}
end
local now = now_ms()
if not redis.call('SET', bk .. ':lease', ARGV[3], 'NX', 'PX', ARGV[5]) then
  local ttl = redis.call('PTTL', bk .. ':lease')
  redis.call('ZADD', BROADCAST_QUEUE, now + math.max(ttl, 0), member)
  return {'held'}
end
redis.call('HSET', bk, 'worker', ARGV[4], 'streaming', '0')
redis.call('ZADD', BROADCAST_QUEUE, now + tonumber(ARGV[5]), member)
local out = {'ok', redis.call('GET', bk .. ':bg') or ''}
for _, v in ipairs(redis.call('HGETALL', bk)) do out[#out + 1] = v end
return out
"""

RENEW_BROADCAST = r"""
-- The holder renews its lease and reports how the stream goes.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id, 3 holder, 4 lease ms, 5 run it streams, 6 streaming
--       ("1"|"0"), 7 last error ("" = none)
-- Returns "ok", "lost" (another worker holds it now) or "stopped" (idle, deleted, or started
-- again as a new run).
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
local bk = S .. ':bc:' .. bid
local lease = bk .. ':lease'
local current = redis.call('GET', lease)
local b = redis.call('HMGET', bk, 'status', 'run')
if b[1] ~= 'active' or b[2] ~= ARGV[5] then
  if current == ARGV[3] then redis.call('DEL', lease) end
  return 'stopped'
end
if current and current ~= ARGV[3] then return 'lost' end
-- Lapsed while nobody else claimed it (a slow renewal): the holder keeps it.
redis.call('SET', lease, ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', BROADCAST_QUEUE, now_ms() + tonumber(ARGV[4]), sid .. ' ' .. bid)
redis.call('HSET', bk, 'streaming', ARGV[6], 'err', ARGV[7])
return 'ok'
"""

RELEASE_BROADCAST = r"""
-- Compare-and-delete of a broadcast's lease: a draining worker hands it over (due at once).
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 broadcast_id, 3 holder
-- Returns 1 when it was released, 0 when the caller no longer held it.
local S = KEYS[1]
local sid, bid = ARGV[1], ARGV[2]
local bk = S .. ':bc:' .. bid
if redis.call('GET', bk .. ':lease') ~= ARGV[3] then return 0 end
redis.call('DEL', bk .. ':lease')
redis.call('HSET', bk, 'worker', '', 'streaming', '0')
if redis.call('HGET', bk, 'status') == 'active' then
  redis.call('ZADD', BROADCAST_QUEUE, now_ms(), sid .. ' ' .. bid)
end
return 1
"""

JOIN_HIDDEN = r"""
-- A broadcaster worker reserves a hidden subscriber connection on the space's current node: a
-- ticket only the lease holder can get. Hidden connections are never listed or announced, never
-- make a space active, and do not count against the participant limit.
-- KEYS[1] = {tag}:sp:<space_id>
-- ARGV: 1 space_id, 2 connection_id, 3 participant_id, 4 display name, 5 ticket sha256,
--       6 pending lease ms, 7 broadcast id, 8 broadcast lease holder
-- Returns {"ok", node_id, expires_ms}
--      or {"err", "space_not_found" | "space_idle" | "lease_lost"}.
local S = KEYS[1]
local sid = ARGV[1]
if redis.call('EXISTS', S) == 0 then return {'err', 'space_not_found'} end
local now = now_ms()
reap(S, sid, now)
settle(S, sid, now)
if redis.call('GET', S .. ':bc:' .. ARGV[7] .. ':lease') ~= ARGV[8] then
  return {'err', 'lease_lost'}
end
local node = redis.call('GET', S .. ':node')
if redis.call('HGET', S, 'status') ~= 'active' or not node then return {'err', 'space_idle'} end
local expires = now + tonumber(ARGV[6])
redis.call('HSET', S .. ':c:' .. ARGV[2], 'pid', ARGV[3], 'cid', ARGV[2], 'role', 'subscriber',
           'name', ARGV[4], 'state', 'pending', 'node', node, 'joined', now, 'ticket', ARGV[5],
           'resume', '', 'gen', '1', 'counted', '0', 'resumed', '0', 'hidden', '1')
redis.call('SET', S .. ':pid:' .. ARGV[3], ARGV[2], 'PX', ARGV[6])
redis.call('ZADD', S .. ':leases', expires, ARGV[2])
redis.call('HINCRBY', S, 'hidden', 1)
settle(S, sid, now)
return {'ok', node, expires}
"""

ALL_SCRIPTS = {
    "create_space": CREATE_SPACE,
    "update_space": UPDATE_SPACE,
    "delete_space": DELETE_SPACE,
    "join": JOIN,
    "claim": CLAIM,
    "renew": RENEW,
    "leave": LEAVE,
    "remove_participant": REMOVE_PARTICIPANT,
    "reap": REAP,
    "set_display_name": SET_DISPLAY_NAME,
    "heartbeat": HEARTBEAT,
    "remove_node": REMOVE_NODE,
    "list_nodes": LIST_NODES,
    "prepare_shard": PREPARE_SHARD,
    "revoke_signing_key": REVOKE_SIGNING_KEY,
    "restore_signing_key": RESTORE_SIGNING_KEY,
    "create_broadcast": CREATE_BROADCAST,
    "start_broadcast": START_BROADCAST,
    "stop_broadcast": STOP_BROADCAST,
    "delete_broadcast": DELETE_BROADCAST,
    "due_broadcasts": DUE_BROADCASTS,
    "claim_broadcast": CLAIM_BROADCAST,
    "renew_broadcast": RENEW_BROADCAST,
    "release_broadcast": RELEASE_BROADCAST,
    "join_hidden": JOIN_HIDDEN,
}


def _lua_indexes() -> str:
    """The Lua table {["{tag}:"] = index, ...} that lets a script know its stream's index."""
    return "{" + ", ".join(f"['{tag_prefix(i)}'] = {i}" for i in range(STREAMS)) + "}"


def render_script(body: str, *, maxlen: int, gone_ttl_ms: int) -> str:
    """The library with its constants filled in, followed by one script body."""
    lib = (
        LIB.replace("{maxlen}", str(int(maxlen)))
        .replace("{gone_ttl}", str(int(gone_ttl_ms)))
        .replace("{streams}", str(STREAMS))
        .replace("{indexes}", _lua_indexes())
    )
    return lib + body


# --- webhooks ---------------------------------------------------------------------------------
# Delivery runs in two stages. (1) Fan-out: replicas read every shard's EVENTS through the
# consumer group WEBHOOK_GROUP, and one script per shard and batch enqueues a job per matching
# endpoint into that (endpoint, space) queue and XACKs the entries in the same step. (2) Delivery:
# a replica leases a whole (endpoint, space) queue, posts its head, and only then moves on to the
# next job, so events of one space reach one endpoint in stream order while other queues proceed
# in parallel. A job is deliverable only when it is older than every entry still pending in its
# shard's group (the "fan-out watermark"): an older event of the same space, read by a slower
# replica, might not be in its queue yet. docs/webhooks.md walks through the design.
#
# Every delivery key of a space lives in the space's shard, next to the stream its events come
# from, so both stages stay one script in one slot. Each shard (and the global tag) keeps its own
# copy of the endpoints; the global tag's copy is the source of truth that the others follow.

WEBHOOK_GROUP = "webhooks"
"""Consumer group on each shard's EVENTS. Created at "$" the first time a webhooks service
starts."""


def webhook_endpoints_key(index: int) -> str:
    """HASH endpoint_id -> JSON {"id", "url", "secret", "event_types": [...], "created_at"
    (unix s), "from_config": bool, "v": version}. The global tag's hash is the list of
    endpoints; each shard's is the copy its scripts read (kept equal by
    RedisStore.webhook_sync_endpoints)."""
    return f"{tag_prefix(index)}wh:endpoints"


WEBHOOK_ENDPOINTS_SEQ = f"{GLOBAL_PREFIX}wh:endpoints:seq"
"""STRING counter: the version ("v" in the JSON) of each endpoint write."""


def webhook_deleted_endpoints_key(index: int) -> str:
    """SET of deleted endpoint ids: a repair never brings one back to this copy (a put of the
    same id does, e.g. the config endpoint when SPACES_WEBHOOK_URL is set again)."""
    return f"{tag_prefix(index)}wh:endpoints:deleted"


def webhook_leases_key(index: int) -> str:
    """ZSET "<endpoint_id> <space_id>" -> lease expiry (unix ms): queues a replica is
    delivering."""
    return f"{tag_prefix(index)}wh:leases"


def webhook_owners_key(index: int) -> str:
    """HASH "<endpoint_id> <space_id>" -> lease token of the replica holding that queue."""
    return f"{tag_prefix(index)}wh:owners"


def webhook_dead_index_key(index: int) -> str:
    """ZSET dead_letter_id -> failed_at (unix ms). dead_letter_id is "<endpoint_id>:<stream id>";
    the stream id tells the shard (event_stream_index)."""
    return f"{tag_prefix(index)}wh:dead"


def webhook_queue_key(endpoint_id: str, space_id: str) -> str:
    """ZSET of job sort keys (all scores 0, so ordered by the key): one endpoint's undelivered
    events of one space. The head is the next to deliver."""
    return f"{tag_prefix(shard_of(space_id))}wh:q:{endpoint_id}:{space_id}"


def webhook_job_key(space_id: str, endpoint_id: str, sort_key: str) -> str:
    """HASH: event (stream id), evid (envelope id), space, type (Mux event name), body (envelope
    JSON without attempts), n (failed attempts), history (JSON list of attempt records), err."""
    return f"{tag_prefix(shard_of(space_id))}wh:job:{endpoint_id}:{sort_key}"


def webhook_ready_key(index: int, endpoint_id: str) -> str:
    """ZSET space_id -> when that queue's head is due (unix ms): the endpoint's non-empty queues
    in this shard that no replica holds. A failed delivery puts its queue back with its backoff
    as the score."""
    return f"{tag_prefix(index)}wh:ready:{endpoint_id}"


def webhook_dead_key(dead_letter_id: str) -> str:
    """HASH: the job's fields (event, evid, space, type, body, n, history, err) plus id, ep
    (endpoint id), key (sort key) and at (failed at, unix ms)."""
    stream_id = dead_letter_id.rpartition(":")[2]
    return f"{tag_prefix(event_stream_index(stream_id))}wh:dead:{dead_letter_id}"


def webhook_sort_key(stream_id: str) -> str:
    """ "<ms>-<seq>" -> fixed-width text that sorts like the stream id (seq may exceed 9)."""
    ms, _, seq = stream_id.partition("-")
    return f"{int(ms):020d}-{int(seq or 0):020d}"


WEBHOOK_LIB = r"""
local TAG = string.match(KEYS[1], '^{[^}]*}:')
local EVENTS = TAG .. 'events'
local GROUP = 'webhooks'
local ENDPOINTS = TAG .. 'wh:endpoints'
local LEASES = TAG .. 'wh:leases'
local OWNERS = TAG .. 'wh:owners'
local DEAD = TAG .. 'wh:dead'
local DELETED = TAG .. 'wh:endpoints:deleted'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

local function queue_key(ep, space) return TAG .. 'wh:q:' .. ep .. ':' .. space end
local function job_key(ep, key) return TAG .. 'wh:job:' .. ep .. ':' .. key end
local function ready_key(ep) return TAG .. 'wh:ready:' .. ep end
local function dead_key(id) return TAG .. 'wh:dead:' .. id end

-- "<ms>-<seq>" -> the fixed-width form of keys.webhook_sort_key.
local function pad(id)
  local sep = string.find(id, '-', 1, true)
  local ms, seq = string.sub(id, 1, sep - 1), string.sub(id, sep + 1)
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end

local function drop_queue(ep, space)
  local q = queue_key(ep, space)
  for _, key in ipairs(redis.call('ZRANGE', q, 0, -1)) do
    redis.call('DEL', job_key(ep, key))
  end
  redis.call('DEL', q)
  redis.call('ZREM', ready_key(ep), space)
end

-- After a queue's lease ends (or lapses): due again at `due` if it still has jobs, dropped if
-- its endpoint was deleted meanwhile.
local function settle(ep, space, due)
  if redis.call('HEXISTS', ENDPOINTS, ep) == 0 then
    drop_queue(ep, space)
  elseif redis.call('ZCARD', queue_key(ep, space)) > 0 then
    redis.call('ZADD', ready_key(ep), due, space)
  end
end

local function release(lq)
  redis.call('ZREM', LEASES, lq)
  redis.call('HDEL', OWNERS, lq)
end
"""

WEBHOOK_FAN_OUT = r"""
-- Enqueue one batch of stream entries this consumer read, acknowledging each in the same step.
-- An entry that another consumer already acknowledged (it reclaimed the entry with XAUTOCLAIM
-- while this one was slow) enqueues nothing, so each entry is fanned out exactly once.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: groups of 6: stream id, sort key, envelope id, space id, event type ("" = not a webhook
--       event: only acknowledge it), envelope JSON without attempts
-- Returns the number of jobs enqueued.
local now = now_ms()
local endpoints = {}
local flat = redis.call('HGETALL', ENDPOINTS)
for i = 1, #flat, 2 do endpoints[#endpoints + 1] = cjson.decode(flat[i + 1]) end
local enqueued = 0
for i = 1, #ARGV, 6 do
  local sid, key, evid, space, etype, body =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if redis.call('XACK', EVENTS, GROUP, sid) == 1 and etype ~= '' then
    for _, e in ipairs(endpoints) do
      local wanted = #e.event_types == 0
      for _, t in ipairs(e.event_types) do
        if t == etype then wanted = true end
      end
      if wanted then
        redis.call('HSET', job_key(e.id, key), 'event', sid, 'evid', evid, 'space', space,
                   'type', etype, 'body', body, 'n', 0, 'history', '[]', 'err', '')
        redis.call('ZADD', queue_key(e.id, space), 0, key)
        -- A held queue is made due again by its holder; a queue in backoff keeps its time.
        if not redis.call('ZSCORE', LEASES, e.id .. ' ' .. space) then
          redis.call('ZADD', ready_key(e.id), 'NX', now, space)
        end
        enqueued = enqueued + 1
      end
    end
  end
end
return enqueued
"""

WEBHOOK_TAKE = r"""
-- Lease due queues for one replica: first return lapsed leases (their holder died) to the ready
-- sets, then take up to ARGV[3] queue heads, at most a given number per endpoint, visiting
-- endpoints from a rotating start so that none is starved.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: 1 token prefix (unique per call), 2 lease ms, 3 max deliveries, 4 default free slots
--       per endpoint, 5 rotation, then pairs: endpoint id, free slots on this replica
-- Returns {reclaimed, then per delivery 12 fields: endpoint id, space id, token, url, secret,
--          sort key, stream id, envelope id, type, body, failed attempts, history}.
local now = now_ms()
local lapsed = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)
for _, lq in ipairs(lapsed) do
  release(lq)
  local sep = string.find(lq, ' ', 1, true)
  settle(string.sub(lq, 1, sep - 1), string.sub(lq, sep + 1), now)
end
-- The fan-out watermark: only jobs older than every entry still pending in the group are
-- deliverable, since an older event of the same space may not be in its queue yet.
local watermark = nil
local summary = redis.pcall('XPENDING', EVENTS, GROUP)
if type(summary) == 'table' and not summary.err and tonumber(summary[1]) > 0 then
  watermark = pad(summary[2])
end
local slots = {}
for i = 6, #ARGV, 2 do slots[ARGV[i]] = tonumber(ARGV[i + 1]) end
local budget = tonumber(ARGV[3])
local lease = tonumber(ARGV[2])
local ids = redis.call('HKEYS', ENDPOINTS)
table.sort(ids)
local out = {#lapsed}
local taken = 0
for n = 0, #ids - 1 do
  if taken >= budget then break end
  local ep = ids[(n + tonumber(ARGV[5])) % #ids + 1]
  local free = slots[ep] or tonumber(ARGV[4])
  if free > 0 then
    local e = nil
    local due = redis.call('ZRANGEBYSCORE', ready_key(ep), '-inf', now, 'LIMIT', 0, free * 4)
    for _, space in ipairs(due) do
      if free <= 0 or taken >= budget then break end
      local q = queue_key(ep, space)
      local head = redis.call('ZRANGE', q, 0, 0)[1]
      if not head then
        redis.call('ZREM', ready_key(ep), space)
      elseif watermark == nil or head < watermark then
        local job = hgetall(job_key(ep, head))
        if job.event == nil then
          redis.call('ZREM', q, head)
        else
          e = e or cjson.decode(redis.call('HGET', ENDPOINTS, ep))
          taken = taken + 1
          free = free - 1
          local token = ARGV[1] .. ':' .. taken
          local lq = ep .. ' ' .. space
          redis.call('ZREM', ready_key(ep), space)
          redis.call('ZADD', LEASES, now + lease, lq)
          redis.call('HSET', OWNERS, lq, token)
          -- Fixed positions: a nil would end ipairs early and shift every later field.
          for _, v in ipairs({ep, space, token, e.url, e.secret, head, job.event,
                              job.evid or '', job.type or '', job.body or '{}', job.n or '0',
                              job.history or '[]'}) do
            out[#out + 1] = v
          end
        end
      end
    end
  end
end
return out
"""

WEBHOOK_DUE = r"""
-- Whether WEBHOOK_TAKE would find anything in this shard: queues due now, or lapsed leases.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- Returns the count (up to one per endpoint ready set, plus the lapsed leases).
local now = now_ms()
local due = redis.call('ZCOUNT', LEASES, '-inf', now)
for _, ep in ipairs(redis.call('HKEYS', ENDPOINTS)) do
  due = due + redis.call('ZCOUNT', ready_key(ep), '-inf', now)
end
return due
"""

WEBHOOK_RENEW = r"""
-- Extend the leases a replica still holds.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: 1 lease ms, then pairs: "<endpoint_id> <space_id>", token
-- Returns the tokens whose lease is no longer held (it lapsed and another replica took it).
local expires = now_ms() + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', OWNERS, ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', LEASES, expires, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i + 1]
  end
end
return lost
"""

WEBHOOK_DELIVERED = r"""
-- A job was delivered. Removed even if the lease lapsed meanwhile (it needs no more tries);
-- the lease is released only by its holder.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: 1 endpoint id, 2 space id, 3 sort key, 4 token
-- Returns 1 when the lease was still held, else 0.
local ep, space, key = ARGV[1], ARGV[2], ARGV[3]
redis.call('ZREM', queue_key(ep, space), key)
redis.call('DEL', job_key(ep, key))
local lq = ep .. ' ' .. space
if redis.call('HGET', OWNERS, lq) ~= ARGV[4] then return 0 end
release(lq)
settle(ep, space, now_ms())
return 1
"""

WEBHOOK_FAILED = r"""
-- A delivery attempt failed: record it, then either make the queue due again after a backoff
-- (its head stays the same job, so later events wait) or move the job to the dead letters and
-- go on with the next one.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: 1 endpoint id, 2 space id, 3 sort key, 4 token, 5 attempt record (JSON object),
--       6 error text, 7 retry delay ms ("-1" = dead-letter it), 8 dead-letter cap
-- Returns "retry", "dead" or "lost" (the lease was no longer held: nothing recorded).
local ep, space, key = ARGV[1], ARGV[2], ARGV[3]
local lq = ep .. ' ' .. space
if redis.call('HGET', OWNERS, lq) ~= ARGV[4] then return 'lost' end
local now = now_ms()
local jk = job_key(ep, key)
local job = hgetall(jk)
if job.event == nil then
  release(lq)
  settle(ep, space, now)
  return 'lost'
end
local history = job.history
if history == '[]' then
  history = '[' .. ARGV[5] .. ']'
else
  history = string.sub(history, 1, -2) .. ',' .. ARGV[5] .. ']'
end
local n = tonumber(job.n) + 1
release(lq)
if ARGV[7] ~= '-1' then
  redis.call('HSET', jk, 'n', n, 'history', history, 'err', ARGV[6])
  settle(ep, space, now + tonumber(ARGV[7]))
  return 'retry'
end
local id = ep .. ':' .. job.event
redis.call('HSET', dead_key(id), 'id', id, 'ep', ep, 'key', key, 'event', job.event,
           'evid', job.evid, 'space', space, 'type', job.type, 'body', job.body, 'n', n,
           'history', history, 'err', ARGV[6], 'at', now)
redis.call('ZADD', DEAD, now, id)
local excess = redis.call('ZCARD', DEAD) - tonumber(ARGV[8])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', DEAD, 0, excess - 1)) do
    redis.call('DEL', dead_key(old))
    redis.call('ZREM', DEAD, old)
  end
end
redis.call('DEL', jk)
redis.call('ZREM', queue_key(ep, space), key)
settle(ep, space, now)
return 'dead'
"""

WEBHOOK_RELEASE = r"""
-- A replica shutting down hands its queues back, due at once, instead of letting leases lapse.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: pairs: "<endpoint_id> <space_id>", token
-- Returns the number released.
local now = now_ms()
local released = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', OWNERS, ARGV[i]) == ARGV[i + 1] then
    release(ARGV[i])
    local sep = string.find(ARGV[i], ' ', 1, true)
    settle(string.sub(ARGV[i], 1, sep - 1), string.sub(ARGV[i], sep + 1), now)
    released = released + 1
  end
end
return released
"""

WEBHOOK_REPLAY = r"""
-- Put dead letters back in their queues (in stream order, so an old event goes first), with the
-- attempt count reset and the attempt history kept. Dead letters of deleted endpoints stay.
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: dead-letter ids; none = all
-- Returns the number replayed.
local ids = ARGV
if #ids == 0 then ids = redis.call('ZRANGE', DEAD, 0, -1) end
local now = now_ms()
local replayed = 0
for _, id in ipairs(ids) do
  local d = hgetall(dead_key(id))
  if d.ep ~= nil and redis.call('HEXISTS', ENDPOINTS, d.ep) == 1 then
    redis.call('HSET', job_key(d.ep, d.key), 'event', d.event, 'evid', d.evid, 'space', d.space,
               'type', d.type, 'body', d.body, 'n', 0, 'history', d.history, 'err', '')
    redis.call('ZADD', queue_key(d.ep, d.space), 0, d.key)
    if not redis.call('ZSCORE', LEASES, d.ep .. ' ' .. d.space) then
      redis.call('ZADD', ready_key(d.ep), now, d.space)
    end
    redis.call('DEL', dead_key(id))
    redis.call('ZREM', DEAD, id)
    replayed = replayed + 1
  end
end
return replayed
"""

WEBHOOK_DELETE_ENDPOINT = r"""
-- Delete an endpoint with its queued jobs and dead letters. Queues a replica holds right now
-- are dropped when that replica finishes with them (settle sees the endpoint gone).
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: 1 endpoint id
-- Returns 1 when this copy had it. Its queues and dead letters go either way (a copy that
-- was already dropped may leave them behind in a half-finished delete).
local ep = ARGV[1]
local existed = redis.call('HDEL', ENDPOINTS, ep)
redis.call('SADD', DELETED, ep)
for _, space in ipairs(redis.call('ZRANGE', ready_key(ep), 0, -1)) do
  drop_queue(ep, space)
end
redis.call('DEL', ready_key(ep))
local prefix = ep .. ':'
for _, id in ipairs(redis.call('ZRANGE', DEAD, 0, -1)) do
  if string.sub(id, 1, #prefix) == prefix then
    redis.call('DEL', dead_key(id))
    redis.call('ZREM', DEAD, id)
  end
end
return existed
"""

WEBHOOK_PUT_ENDPOINT = r"""
-- Write one copy of an endpoint, unless this copy already has a newer version of it (two
-- replicas writing the config endpoint at once, or a repair racing a change).
-- KEYS[1] = {tag}:wh:endpoints (a shard's copy, or the global list)
-- ARGV: 1 endpoint id, 2 endpoint JSON (with its version "v"), 3 version,
--       4 "1" = a put (it may re-create a deleted id), "0" = a repair (a deleted id stays deleted)
-- Returns 1 when it wrote.
local ep = ARGV[1]
if ARGV[4] == '1' then
  redis.call('SREM', DELETED, ep)
elseif redis.call('SISMEMBER', DELETED, ep) == 1 then
  return 0
end
local current = redis.call('HGET', ENDPOINTS, ep)
if current and (cjson.decode(current).v or 0) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', ENDPOINTS, ep, ARGV[2])
return 1
"""

WEBHOOK_DROP_DEAD = r"""
-- Drop dead letters (the oldest, when there are more than the cap across every shard).
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: dead-letter ids
-- Returns the number dropped.
local dropped = 0
for _, id in ipairs(ARGV) do
  redis.call('DEL', dead_key(id))
  dropped = dropped + redis.call('ZREM', DEAD, id)
end
return dropped
"""

WEBHOOK_BACKLOG = r"""
-- How far delivery is behind, for the metrics: queues with undelivered events (ready, in
-- backoff, or leased), the due time of the longest-waiting queue that is due now, and the
-- dead letters, in this shard. One call per shard every few seconds per webhooks replica;
-- O(endpoints).
-- KEYS[1] = {tag}:wh:endpoints (the shard's copy)
-- ARGV: none
-- Returns {queues, oldest due (unix ms; -1 when nothing is due), dead letters, now (unix ms)}.
local now = now_ms()
local queues = redis.call('ZCARD', LEASES)
local oldest = -1
for _, ep in ipairs(redis.call('HKEYS', ENDPOINTS)) do
  queues = queues + redis.call('ZCARD', ready_key(ep))
  local head = redis.call('ZRANGE', ready_key(ep), 0, 0, 'WITHSCORES')
  if head[2] then
    local due = tonumber(head[2])
    if due <= now and (oldest < 0 or due < oldest) then oldest = due end
  end
end
return {queues, oldest, redis.call('ZCARD', DEAD), now}
"""

WEBHOOK_SCRIPTS = {
    "webhook_backlog": WEBHOOK_BACKLOG,
    "webhook_fan_out": WEBHOOK_FAN_OUT,
    "webhook_take": WEBHOOK_TAKE,
    "webhook_due": WEBHOOK_DUE,
    "webhook_renew": WEBHOOK_RENEW,
    "webhook_delivered": WEBHOOK_DELIVERED,
    "webhook_failed": WEBHOOK_FAILED,
    "webhook_release": WEBHOOK_RELEASE,
    "webhook_replay": WEBHOOK_REPLAY,
    "webhook_delete_endpoint": WEBHOOK_DELETE_ENDPOINT,
    "webhook_drop_dead": WEBHOOK_DROP_DEAD,
    "webhook_put_endpoint": WEBHOOK_PUT_ENDPOINT,
}


def render_webhook_script(body: str) -> str:
    """The webhook library followed by one script body."""
    return WEBHOOK_LIB + body

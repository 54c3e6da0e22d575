"""The online feature layout in Redis, and the one-round-trip reader and atomic writer over it.

One hash per entity and view: key `fs:{<entity_type>:<entity_id>}:<view>` (the braces are a
Redis Cluster hash tag, so all views of an entity share a slot), field = feature name,
value = a one-byte dtype tag, the event time in microseconds since the epoch as 8 bytes
big-endian, then the value (see `encode_value`). The view definitions share the tag
`{views}`, so they sit in one slot and change in one transaction. Reads go through a Lua
script that answers the views epoch and each hash's fields and values (see
`RedisFeatureStore.read`); writes through one that keeps a stored value whose event time is
later than the new one's: one call for the whole batch, or in Redis Cluster one per slot
(see `RedisFeatureStore.write`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from modelserve_features.views import FeatureDtype, Value
from modelserve_runtime.redis_connect import RedisClient

KEY_PREFIX = "fs"
#: The hash of current view definitions: view id -> JSON. The definition keys share the hash
#: tag `{views}`: one slot in Redis Cluster, so a view change is one MULTI/EXEC.
VIEWS_KEY = "fs:{views}"
#: Incremented at every view change; readers compare it to know their cached views are current.
VIEWS_EPOCH_KEY = "fs:{views}:epoch"


def view_history_key(view: str) -> str:
    """The hash of every version of a view: version -> JSON."""
    return f"fs:{{views}}:history:{view}"


@dataclass(frozen=True, slots=True)
class EntityKey:
    """One entity: its type (`customer`) and id (`c-1001`)."""

    entity_type: str
    entity_id: str


def redis_key(entity: EntityKey, view: str | None = None) -> str:
    """The hash holding an entity's values of one view (by default the view named like its
    entity type); the braces are a Cluster hash tag shared by all the entity's views."""
    return f"{KEY_PREFIX}:{{{entity.entity_type}:{entity.entity_id}}}:{view or entity.entity_type}"


_TAGS: dict[FeatureDtype, bytes] = {
    FeatureDtype.INT64: b"i",
    FeatureDtype.DOUBLE: b"d",
    FeatureDtype.STRING: b"s",
    FeatureDtype.BOOL: b"b",
    FeatureDtype.FLOAT_VECTOR: b"v",
}
_DTYPES = {tag[0]: dtype for dtype, tag in _TAGS.items()}
_HEADER = struct.Struct(">cq")
_INT = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
#: A stored value's tag byte and event time.
_HEAD = struct.Struct(">Bq")
HEADER_SIZE = _HEADER.size
#: The first byte of a stored value of each dtype.
TAG_BYTES: dict[FeatureDtype, int] = {dtype: tag[0] for dtype, tag in _TAGS.items()}


def encode_value(dtype: FeatureDtype, value: Value, event_time_us: int) -> bytes:
    """Tag, event time and value: 9 bytes of header, then 8 bytes for int64 and double,
    1 for bool, UTF-8 for string, 4 per element (float32, little-endian) for a vector."""
    header = _HEADER.pack(_TAGS[dtype], event_time_us)
    if dtype is FeatureDtype.BOOL:
        return header + (b"\x01" if value else b"\x00")
    if dtype is FeatureDtype.INT64:
        return header + _INT.pack(value)
    if dtype is FeatureDtype.DOUBLE:
        return header + _DOUBLE.pack(value)
    if dtype is FeatureDtype.STRING:
        assert isinstance(value, str)
        return header + value.encode()
    assert isinstance(value, tuple)
    return header + struct.pack(f"<{len(value)}f", *value)


def _read_bool(raw: bytes) -> tuple[int, int, Value]:
    tag, event_time_us = _HEAD.unpack_from(raw)
    return tag, event_time_us, raw[HEADER_SIZE:] == b"\x01"


def _read_string(raw: bytes) -> tuple[int, int, Value]:
    tag, event_time_us = _HEAD.unpack_from(raw)
    return tag, event_time_us, raw[HEADER_SIZE:].decode()


def _read_vector(raw: bytes) -> tuple[int, int, Value]:
    tag, event_time_us = _HEAD.unpack_from(raw)
    body = raw[HEADER_SIZE:]
    return tag, event_time_us, struct.unpack(f"<{len(body) // 4}f", body)


#: Reads a stored value whole, by the dtype its reader expects: (its tag byte, its event time
#: in µs, its value); each raises ValueError (or struct.error) when the value does not decode
#: as that dtype, and answers the stored tag for the caller to compare (a value of another
#: dtype of the same size decodes). A fixed-size number is one struct call for all three,
#: which also refuses any other length: reading a double this way takes half the time of
#: slicing its body off, decoding it and the event time in calls of their own (170 vs 340 ns).
VALUE_READERS: dict[FeatureDtype, Callable[[bytes], tuple[int, int, Value]]] = {
    FeatureDtype.BOOL: _read_bool,
    FeatureDtype.INT64: struct.Struct(">Bqq").unpack,
    FeatureDtype.DOUBLE: struct.Struct(">Bqd").unpack,
    FeatureDtype.STRING: _read_string,
    FeatureDtype.FLOAT_VECTOR: _read_vector,
}


def decode_value(raw: bytes) -> tuple[FeatureDtype, Value, int]:
    """Inverse of encode_value: (dtype, value, event time in µs); ValueError when malformed."""
    if len(raw) < _HEADER.size or raw[0] not in _DTYPES:
        raise ValueError(f"unknown feature encoding {raw[:9]!r}")
    dtype = _DTYPES[raw[0]]
    try:
        _, event_time_us, value = VALUE_READERS[dtype](raw)
    except struct.error as exc:
        raise ValueError(f"malformed {dtype.value} value {raw!r}") from exc
    return dtype, value, event_time_us


# KEYS[1] is the views epoch key, KEYS[2..] one entity x view hash each. Returns the epoch, then
# each hash's fields and values, alternating, as HGETALL lists them: hiredis parses the nested
# arrays in C. (Each hash used to be packed into one string here, when redis-py's own parser
# cost more client CPU per string than the rest of a read; with hiredis, unpacking that string
# in Python cost the client more than the strings, and Redis more to pack them: see
# `RedisFeatureStore.read`.)
_READ_SCRIPT = """
local out = {redis.call('GET', KEYS[1]) or '0'}
for k = 2, #KEYS do
  out[k] = redis.call('HGETALL', KEYS[k])
end
return out
"""


# ARGV[1] is the epoch the batch was validated against, or '' for no check. With a check,
# KEYS[1] is the views epoch key and KEYS[2..] one entity x view hash each; without one (Redis
# Cluster, where the epoch lives in another slot) every key is a hash. Then, for each hash in
# turn, ARGV holds its number of values n and n pairs (field, encoded value). A value is written
# unless the stored one has a later event time. Returns {written, skipped as stale} for each
# hash in turn, or {-1} when the views changed since the batch was validated (nothing is
# written then).
_WRITE_SCRIPT = """
local first = 1
if ARGV[1] ~= '' then
  local epoch = redis.call('GET', KEYS[1]) or '0'
  if epoch ~= ARGV[1] then return {-1} end
  first = 2
end
-- A stored value too short to hold an event time is not one of ours: older than any write.
local function event_time(v)
  if #v < 9 then return -1 end
  local a, b, c, d, e, f, g, h = string.byte(v, 2, 9)
  return ((((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f) * 256 + g) * 256 + h
end
-- Every key must be a hash (or absent) before anything is written: Redis does not undo the
-- writes a script made before it failed, and the batch is all or nothing.
for k = first, #KEYS do
  local kind = redis.call('TYPE', KEYS[k]).ok
  if kind ~= 'hash' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. kind .. ', not a hash')
  end
end
local out, arg = {}, 2
for k = first, #KEYS do
  local n = tonumber(ARGV[arg])
  local fields, values = {}, {}
  for j = 1, n do
    fields[j] = ARGV[arg + 2 * j - 1]
    values[j] = ARGV[arg + 2 * j]
  end
  arg = arg + 1 + 2 * n
  local stored = redis.call('HMGET', KEYS[k], unpack(fields))
  local put, written, stale = {}, 0, 0
  for j = 1, n do
    if stored[j] and event_time(stored[j]) > event_time(values[j]) then
      stale = stale + 1
    else
      put[#put + 1] = fields[j]
      put[#put + 1] = values[j]
      written = written + 1
    end
  end
  if #put > 0 then redis.call('HSET', KEYS[k], unpack(put)) end
  out[#out + 1] = written
  out[#out + 1] = stale
end
return out
"""


class ViewsChangedError(Exception):
    """The views changed between validating a write and running it."""


def _script_arguments(
    writes: Sequence[tuple[str, Mapping[str, bytes]]], epoch: str
) -> tuple[list[str], list[str | bytes | int]]:
    keys = [VIEWS_EPOCH_KEY] if epoch else []
    args: list[str | bytes | int] = [epoch]
    for key, values in writes:
        keys.append(key)
        args.append(len(values))
        for name, raw in values.items():
            args.extend((name, raw))
    return keys, args


def _pairs(counts: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(counts[i]), int(counts[i + 1])) for i in range(0, len(counts), 2)]


class RedisFeatureStore:
    """Raw reads and writes of the layout; `read` costs one Redis round trip (in Redis Cluster
    one per node, all at once), `write` one (in Redis Cluster two: see `write`)."""

    def __init__(self, client: RedisClient) -> None:
        self._redis = client
        self._write_script = client.register_script(_WRITE_SCRIPT)
        self._read_script = client.register_script(_READ_SCRIPT)
        # The read script saves the client most of a pipeline's cost, at the price of a little
        # of Redis's CPU (see `read`). In Redis Cluster a script cannot span the entities'
        # slots: a pipeline there.
        self._pipelined = isinstance(client, RedisCluster)

    @property
    def client(self) -> RedisClient:
        """The Redis client."""
        return self._redis

    async def read(self, keys: Sequence[str]) -> tuple[str, list[dict[bytes, bytes]]]:
        """The views epoch and every hash in `keys`, in one round trip.

        One EVALSHA of the read script (loaded again when the server answers NOSCRIPT). With
        hiredis parsing replies, a pipeline of GET and one 20-field HGETALL cost the client
        about 50-70 µs and one of ten HGETALLs 150-250 µs; the script, packing each hash into
        one string then, cost it 35-50 and 75-90 µs, for 6 and 55 µs more of Redis's CPU.
        Answering the hashes as HGETALL lists them rather than packed costs the client a
        third less again for ten hashes (660,000 against 1,020,000 instructions; 110 against
        150 µs) and a ninth less for one (310,000 against 350,000), and Redis a third less for
        both. In Redis Cluster (one script's keys must share a slot), one pipeline of GET and
        HGETALLs; a cluster pipeline sends each node its share at the same time."""
        if self._pipelined:
            return await self._read_pipelined(keys)
        # EVALSHA by hand rather than through the Script object: a fifth of the client's cost
        # of the call went into Script's own bookkeeping.
        sha, count = self._read_script.sha, len(keys) + 1
        try:
            replies: list[Any] = await self._redis.evalsha(sha, count, VIEWS_EPOCH_KEY, *keys)
        except NoScriptError:  # a server that has not seen it yet (new, restarted, failed over)
            await self._redis.script_load(_READ_SCRIPT)
            replies = await self._redis.evalsha(sha, count, VIEWS_EPOCH_KEY, *keys)
        hashes: list[dict[bytes, bytes]] = []
        for items in replies[1:]:
            fields = iter(items)
            hashes.append(dict(zip(fields, fields, strict=True)))
        return _epoch(replies[0]), hashes

    async def _read_pipelined(self, keys: Sequence[str]) -> tuple[str, list[dict[bytes, bytes]]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(VIEWS_EPOCH_KEY)
            for key in keys:
                pipe.hgetall(key)
            replies: list[object] = await pipe.execute()
        epoch = replies[0]
        hashes: list[dict[bytes, bytes]] = replies[1:]  # type: ignore[assignment]
        return _epoch(epoch), hashes

    async def write(
        self, epoch: str, writes: Sequence[tuple[str, Mapping[str, bytes]]]
    ) -> list[tuple[int, int]]:
        """Writes encoded values per hash key unless a stored value is newer; for each key
        (values written, values skipped as stale).

        One EVALSHA, so all or nothing; in Redis Cluster, where one script's keys must share a
        slot, one EVALSHA per slot, each all or nothing (see `_write_per_slot`).
        Raises ViewsChangedError when the views epoch is no longer `epoch`.
        """
        if isinstance(self._redis, RedisCluster):
            return await self._write_per_slot(self._redis, epoch, writes)
        keys, args = _script_arguments(writes, epoch)
        counts: list[int] = await self._write_script(keys=keys, args=args)
        if counts and counts[0] < 0:
            raise ViewsChangedError
        return _pairs(counts)

    async def _write_per_slot(
        self, cluster: RedisCluster, epoch: str, writes: Sequence[tuple[str, Mapping[str, bytes]]]
    ) -> list[tuple[int, int]]:
        """The epoch is checked by a GET just before the scripts run (it lives in another slot
        than the values, so no script can check it); then one script per slot, all slots in
        one cluster pipeline (one round trip per node, all nodes at once). Each slot's script
        is atomic; the batch as a whole is not: when a node fails midway, the slots on the
        other nodes may stay written (the call fails, and sending the batch again is safe)."""
        if _epoch(await cluster.get(VIEWS_EPOCH_KEY)) != epoch:
            raise ViewsChangedError
        by_slot: dict[int, list[int]] = {}
        for i, (key, _) in enumerate(writes):
            by_slot.setdefault(key_slot(key.encode()), []).append(i)
        groups = list(by_slot.values())
        replies = await self._run_per_slot(cluster, writes, groups)
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # a node that has not seen the script yet (new, restarted, failed over)
            await cluster.script_load(_WRITE_SCRIPT)
            again = await self._run_per_slot(cluster, writes, [groups[n] for n in missing])
            for n, reply in zip(missing, again, strict=True):
                replies[n] = reply
        counts: list[tuple[int, int]] = [(0, 0)] * len(writes)
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            for i, pair in zip(group, _pairs(reply), strict=True):
                counts[i] = pair
        return counts

    async def _run_per_slot(
        self,
        cluster: RedisCluster,
        writes: Sequence[tuple[str, Mapping[str, bytes]]],
        groups: Sequence[Sequence[int]],
    ) -> list[Any]:
        async with cluster.pipeline(transaction=False) as pipe:
            for group in groups:
                keys, args = _script_arguments([writes[i] for i in group], "")
                # redis-py refuses `pipe.evalsha` in a cluster pipeline, yet routes the raw
                # command by its keys (one slot each, as here) like any other.
                pipe.execute_command("EVALSHA", self._write_script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def _epoch(raw: object) -> str:
    if raw is None:
        return "0"
    return raw.decode() if isinstance(raw, bytes) else str(raw)

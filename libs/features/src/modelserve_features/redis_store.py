"""The online feature layout in Redis, and the one-round-trip reader and atomic writer over it.

One hash per entity and view: key `fs:{<entity_type>:<entity_id>}:<view>` (the braces are a
Redis Cluster hash tag, so all views of an entity share a slot), field = feature name,
value = a one-byte dtype tag, the event time in microseconds since the epoch as 8 bytes
big-endian, then the value (see `encode_value`). The view definitions share the tag
`{views}`, so they sit in one slot and change in one transaction. Reads go through a Lua
script that answers the views epoch and each hash packed into one string (see
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


def _bool(body: bytes) -> Value:
    return body == b"\x01"


def _int(body: bytes) -> Value:
    value: int = _INT.unpack(body)[0]
    return value


def _double(body: bytes) -> Value:
    value: float = _DOUBLE.unpack(body)[0]
    return value


def _string(body: bytes) -> Value:
    return body.decode()


def _vector(body: bytes) -> Value:
    return struct.unpack(f"<{len(body) // 4}f", body)


#: The decoder of a value's body (what follows the 9-byte header), by dtype; each raises
#: ValueError (or struct.error) on a malformed body.
BODY_DECODERS: dict[FeatureDtype, Callable[[bytes], Value]] = {
    FeatureDtype.BOOL: _bool,
    FeatureDtype.INT64: _int,
    FeatureDtype.DOUBLE: _double,
    FeatureDtype.STRING: _string,
    FeatureDtype.FLOAT_VECTOR: _vector,
}
#: The event time (µs) of a stored value: bytes 1-8.
EVENT_TIME = _INT
HEADER_SIZE = _HEADER.size


def decode_value(raw: bytes) -> tuple[FeatureDtype, Value, int]:
    """Inverse of encode_value: (dtype, value, event time in µs); ValueError when malformed."""
    if len(raw) < _HEADER.size or raw[0] not in _DTYPES:
        raise ValueError(f"unknown feature encoding {raw[:9]!r}")
    dtype = _DTYPES[raw[0]]
    try:
        value = BODY_DECODERS[dtype](raw[_HEADER.size :])
    except struct.error as exc:
        raise ValueError(f"malformed {dtype.value} value {raw!r}") from exc
    return dtype, value, _INT.unpack_from(raw, 1)[0]


# KEYS[1] is the views epoch key, KEYS[2..] one entity x view hash each. Returns the epoch, then
# for each hash one string: its number of items n (fields and values alternating, as HGETALL
# lists them), the length of each item, all as 4-byte big-endian integers, then the n items
# themselves. One string per hash instead of two per feature: redis-py parses every string of
# a reply in Python, and that parsing cost more client CPU than everything else in a read.
_READ_SCRIPT = """
local out = {redis.call('GET', KEYS[1]) or '0'}
for k = 2, #KEYS do
  local items = redis.call('HGETALL', KEYS[k])
  local n = #items
  local parts = {struct.pack('>I4', n)}
  for first = 1, n, 200 do
    local last = math.min(first + 199, n)
    local lengths = {}
    for j = first, last do lengths[j - first + 1] = #items[j] end
    parts[#parts + 1] = struct.pack('>' .. string.rep('I4', last - first + 1), unpack(lengths))
  end
  parts[#parts + 1] = table.concat(items)
  out[k] = table.concat(parts)
end
return out
"""
_COUNT = struct.Struct(">I")
#: The struct that reads the item lengths of a hash, one per number of items seen.
_LENGTHS: dict[int, struct.Struct] = {}


def unpack_hash(packed: bytes) -> dict[bytes, bytes]:
    """A hash as the read script packs it, as a dict of field -> value."""
    (count,) = _COUNT.unpack_from(packed)
    if not count:
        return {}
    lengths = _LENGTHS.get(count)
    if lengths is None:
        lengths = _LENGTHS.setdefault(count, struct.Struct(f">{count}I"))
    items: list[bytes] = []
    start = 4 + 4 * count
    for length in lengths.unpack_from(packed, 4):
        end = start + length
        items.append(packed[start:end])
        start = end
    pairs = iter(items)
    return dict(zip(pairs, pairs, strict=True))


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
local function event_time(v)
  local a, b, c, d, e, f, g, h = string.byte(v, 2, 9)
  return ((((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f) * 256 + g) * 256 + h
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
        about 50-70 µs and one of ten HGETALLs 150-250 µs; the script costs it 35-50 and 75-90
        µs, for 6 and 55 µs more of Redis's CPU. In Redis Cluster (one script's keys must share
        a slot), one pipeline of GET and HGETALLs; a cluster pipeline sends each node its
        share at the same time."""
        if self._pipelined:
            return await self._read_pipelined(keys)
        # EVALSHA by hand rather than through the Script object: a fifth of the client's cost
        # of the call went into Script's own bookkeeping.
        sha, count = self._read_script.sha, len(keys) + 1
        try:
            replies: list[bytes] = await self._redis.evalsha(sha, count, VIEWS_EPOCH_KEY, *keys)
        except NoScriptError:  # a server that has not seen it yet (new, restarted, failed over)
            await self._redis.script_load(_READ_SCRIPT)
            replies = await self._redis.evalsha(sha, count, VIEWS_EPOCH_KEY, *keys)
        return _epoch(replies[0]), [unpack_hash(packed) for packed in replies[1:]]

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

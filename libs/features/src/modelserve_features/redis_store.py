"""The online feature layout in Redis, and the one-round-trip reader and atomic writer over it.

One hash per entity and view: key `fs:{<entity_type>:<entity_id>}:<view>` (the braces are a
Redis Cluster hash tag, so all views of an entity share a slot), field = feature name,
value = a one-byte dtype tag, the event time in microseconds since the epoch as 8 bytes
big-endian, then the value (see `encode_value`). Writes go through one Lua script (EVALSHA)
that keeps a stored value whose event time is later than the new one's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as redis

from modelserve_features.views import FeatureDtype, Value

KEY_PREFIX = "fs"
#: The hash of current view definitions: view id -> JSON.
VIEWS_KEY = "fs:views"
#: Incremented at every view change; readers compare it to know their cached views are current.
VIEWS_EPOCH_KEY = "fs:views:epoch"


def view_history_key(view: str) -> str:
    """The hash of every version of a view: version -> JSON."""
    return f"fs:views:history:{view}"


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


def decode_value(raw: bytes) -> tuple[FeatureDtype, Value, int]:
    """Inverse of encode_value: (dtype, value, event time in µs); ValueError when malformed."""
    if len(raw) < _HEADER.size or raw[0] not in _DTYPES:
        raise ValueError(f"unknown feature encoding {raw[:9]!r}")
    dtype = _DTYPES[raw[0]]
    event_time_us = _INT.unpack_from(raw, 1)[0]
    body = raw[_HEADER.size :]
    value: Value
    if dtype is FeatureDtype.BOOL:
        value = body == b"\x01"
    elif dtype is FeatureDtype.INT64:
        value = _INT.unpack(body)[0]
    elif dtype is FeatureDtype.DOUBLE:
        value = _DOUBLE.unpack(body)[0]
    elif dtype is FeatureDtype.STRING:
        value = body.decode()
    else:
        value = struct.unpack(f"<{len(body) // 4}f", body)
    return dtype, value, event_time_us


# KEYS[1] is the views epoch, KEYS[2..] one entity x view hash each. ARGV[1] is the epoch the
# batch was validated against; then, for each hash, its number of values n and n pairs
# (field, encoded value). A value is written unless the stored one has a later event time.
# Returns {written, skipped as stale} for each hash in turn, or {-1} when the views changed
# since the batch was validated (nothing is written then).
_WRITE_SCRIPT = """
local epoch = redis.call('GET', KEYS[1]) or '0'
if epoch ~= ARGV[1] then return {-1} end
local function event_time(v)
  local a, b, c, d, e, f, g, h = string.byte(v, 2, 9)
  return ((((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f) * 256 + g) * 256 + h
end
local out, arg = {}, 2
for k = 2, #KEYS do
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


class RedisFeatureStore:
    """Raw reads and writes of the layout; `read` and `write` each cost one Redis round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._write_script = client.register_script(_WRITE_SCRIPT)

    @property
    def client(self) -> redis.Redis:
        """The Redis client."""
        return self._redis

    async def read(self, keys: Sequence[str]) -> tuple[str, list[dict[bytes, bytes]]]:
        """The views epoch and every hash in `keys`, in one pipeline."""
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
        (values written, values skipped as stale). All in one EVALSHA, so all or nothing.

        Raises ViewsChangedError when the views epoch is no longer `epoch`.
        """
        keys = [VIEWS_EPOCH_KEY]
        args: list[str | bytes | int] = [epoch]
        for key, values in writes:
            keys.append(key)
            args.append(len(values))
            for name, raw in values.items():
                args.extend((name, raw))
        counts: list[int] = await self._write_script(keys=keys, args=args)
        if counts and counts[0] < 0:
            raise ViewsChangedError
        return [(int(counts[i]), int(counts[i + 1])) for i in range(0, len(counts), 2)]


def _epoch(raw: object) -> str:
    if raw is None:
        return "0"
    return raw.decode() if isinstance(raw, bytes) else str(raw)

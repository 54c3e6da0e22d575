"""The online feature layout in Redis, and the one-round-trip reader and atomic writer over it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as redis

#: A feature value as Python sees it; None is a missing value.
Value = int | float | str | bool

KEY_PREFIX = "fs"


@dataclass(frozen=True, slots=True)
class EntityKey:
    """One entity: its type (`customer`) and id (`c-1001`)."""

    entity_type: str
    entity_id: str


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """A stored feature, written `entity_type:name`."""

    entity_type: str
    name: str

    @classmethod
    def parse(cls, ref: str) -> FeatureRef:
        """Parses `entity_type:name`; raises ValueError on any other shape."""
        entity_type, sep, name = ref.partition(":")
        if not sep or not entity_type or not name or ":" in name:
            raise ValueError(f"feature reference {ref!r} is not of the form 'entity_type:name'")
        return cls(entity_type, name)

    def __str__(self) -> str:
        return f"{self.entity_type}:{self.name}"


def redis_key(entity: EntityKey) -> str:
    """The hash holding an entity's features; the braces are a Cluster hash tag."""
    return f"{KEY_PREFIX}:{{{entity.entity_type}:{entity.entity_id}}}"


def encode_value(value: Value) -> bytes:
    """Encodes a value with a one-letter type tag so reads return the written type."""
    if isinstance(value, bool):
        return b"b:1" if value else b"b:0"
    if isinstance(value, int):
        return b"i:" + str(value).encode()
    if isinstance(value, float):
        return b"d:" + repr(value).encode()
    return b"s:" + value.encode()


def decode_value(raw: bytes) -> Value:
    """Inverse of encode_value."""
    tag, body = raw[:2], raw[2:]
    if tag == b"d:":
        return float(body)
    if tag == b"i:":
        return int(body)
    if tag == b"b:":
        return body == b"1"
    if tag == b"s:":
        return body.decode()
    raise ValueError(f"unknown feature encoding {raw[:8]!r}")


class RedisFeatureStore:
    """Reads and writes online features; `read` costs one Redis round trip whatever its size."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def read(
        self, entities: Sequence[EntityKey], refs: Sequence[FeatureRef]
    ) -> list[dict[FeatureRef, Value | None]]:
        """For each entity, the value of every ref of its entity type (None when missing)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for entity in entities:
                pipe.hgetall(redis_key(entity))
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        results: list[dict[FeatureRef, Value | None]] = []
        for entity, stored in zip(entities, hashes, strict=True):
            values: dict[FeatureRef, Value | None] = {}
            for ref in refs:
                if ref.entity_type != entity.entity_type:
                    continue
                raw = stored.get(ref.name.encode())
                values[ref] = decode_value(raw) if raw is not None else None
            results.append(values)
        return results

    async def write(self, writes: Sequence[tuple[EntityKey, Mapping[str, Value]]]) -> int:
        """Writes every value in one MULTI/EXEC: all of it lands or none. Returns the count."""
        count = 0
        async with self._redis.pipeline(transaction=True) as pipe:
            for entity, values in writes:
                if values:
                    pipe.hset(
                        redis_key(entity), mapping={k: encode_value(v) for k, v in values.items()}
                    )
                    count += len(values)
            await pipe.execute()
        return count

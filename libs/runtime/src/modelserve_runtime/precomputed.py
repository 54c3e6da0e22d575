"""Predictions precomputed by batch jobs for the router's hybrid lookup: where they live in Redis,
what is stored, the pipelined writer that batch jobs call and the one-GET reader the router calls.

Contract (writers and the router share it, so both go through this module):

- key: `precomputed:{endpoint}:{entity_type}:{entity_id}`, a plain Redis string. Endpoint ids
  (`[a-z][a-z0-9-]{0,62}`) and entity types (`[a-z0-9_-]{1,63}`) hold no `:`, so the entity
  id, last, may hold anything. Each key hashes to its own slot, so a Redis Cluster spreads
  them over its nodes, and a read is one GET on one node.
- value: a serialized `modelserve.type.v1.PrecomputedPrediction`: the version that computed
  it, when, and the outputs for that one entity (a batch of one, as the model answers a
  single-row request online).
- the last write wins. The router measures freshness from `computed_at` and answers only
  with a prediction of the version the request is routed to, so a late write of an older
  run is never served past the deployment's `max_age`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from redis.asyncio import RedisCluster

from modelserve.type.v1 import precomputed_pb2
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError, ModelServeError
from modelserve_runtime.redis_connect import RedisClient

KEY_PREFIX = "precomputed"
#: A deployment id, as the registry accepts it.
_ENDPOINT = re.compile("[a-z][a-z0-9-]{0,62}")
#: An entity type, as the registry accepts it for `hybrid.entity_type`.
_ENTITY_TYPE = re.compile("[a-z0-9_-]{1,63}")
_MODEL_VERSION = re.compile("models/[a-z][a-z0-9-]{0,62}/versions/[1-9][0-9]{0,17}")


@dataclass(frozen=True, slots=True)
class Precomputed:
    """One stored prediction, decoded."""

    model_version: str
    computed_at_us: int
    """When it was computed, in microseconds since the Unix epoch."""
    outputs: dict[str, npt.NDArray[Any]]

    def age_s(self, now_s: float) -> float:
        """How old it is at `now_s` (seconds since the epoch); negative when the writer's clock
        is ahead."""
        return now_s - self.computed_at_us / 1e6


def precomputed_key(endpoint: str, entity_type: str, entity_id: str) -> str:
    """The Redis key of one entity's precomputed prediction at `endpoint`."""
    return f"{KEY_PREFIX}:{endpoint}:{entity_type}:{entity_id}"


def encode_precomputed(
    model_version: str, computed_at: datetime, outputs: Mapping[str, npt.NDArray[Any]]
) -> bytes:
    """The stored value: a serialized PrecomputedPrediction."""
    message = precomputed_pb2.PrecomputedPrediction(
        model_version=model_version,
        outputs=[numpy_to_tensor(name, np.asarray(array)) for name, array in outputs.items()],
    )
    message.computed_at.FromDatetime(computed_at)
    return message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (a string, a message or a packed list) of a message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


#: PrecomputedPrediction.outputs, Tensor.contents, and the packed TensorContents lists that
#: are an array's little-endian bytes as they are.
_OUTPUTS_FIELD, _CONTENTS_FIELD = 3, 4
_PACKED = {np.dtype(np.float32): (3, "<f4"), np.dtype(np.float64): (4, "<f8")}


class _RowEncoder:
    """Encodes the stored values of one batch, row by row, as `encode_precomputed` would,
    assembled from bytes: the version and time serialized once, each output's name, type
    and shape once, and per row only its values (float arrays as their bytes). A message's
    fields may be concatenated in any order; what comes out parses to the same message."""

    def __init__(
        self, model_version: str, computed_at: datetime, arrays: Mapping[str, npt.NDArray[Any]]
    ) -> None:
        head = precomputed_pb2.PrecomputedPrediction(model_version=model_version)
        head.computed_at.FromDatetime(computed_at)
        self._head = head.SerializeToString()
        self._outputs: list[tuple[npt.NDArray[Any], bytes, tuple[int, str] | None]] = []
        for name, array in arrays.items():
            template = numpy_to_tensor(name, array[:1])
            template.ClearField("contents")
            self._outputs.append((array, template.SerializeToString(), _PACKED.get(array.dtype)))

    def row(self, i: int) -> bytes:
        parts = [self._head]
        for array, template, packed in self._outputs:
            if packed is not None:
                number, layout = packed
                contents = _field(number, array[i].astype(layout, copy=False).tobytes())
            else:
                contents = numpy_to_tensor("", array[i : i + 1]).contents.SerializeToString()
            parts.append(_field(_OUTPUTS_FIELD, template + _field(_CONTENTS_FIELD, contents)))
        return b"".join(parts)


#: Sets KEYS[i] to ARGV[i], each expiring after the last ARGV in ms when it is not 0.
_SET_SCRIPT = """
local expire_ms = tonumber(ARGV[#ARGV])
for i, key in ipairs(KEYS) do
  if expire_ms > 0 then
    redis.call('SET', key, ARGV[i], 'PX', expire_ms)
  else
    redis.call('SET', key, ARGV[i])
  end
end
return #KEYS
"""


def decode_precomputed(raw: bytes) -> Precomputed:
    """A stored value decoded; ValueError when it is not a whole PrecomputedPrediction (no
    version, no time, no outputs, or a tensor whose shape and values disagree)."""
    try:
        message = precomputed_pb2.PrecomputedPrediction.FromString(raw)
    except DecodeError as exc:
        raise ValueError(f"not a PrecomputedPrediction: {exc}") from None
    if not message.model_version or not message.HasField("computed_at") or not message.outputs:
        raise ValueError("a PrecomputedPrediction needs model_version, computed_at and outputs")
    try:
        outputs = {t.name: tensor_to_numpy(t, f"outputs[{t.name}]") for t in message.outputs}
    except ModelServeError as exc:
        raise ValueError(exc.message) from None
    return Precomputed(message.model_version, message.computed_at.ToMicroseconds(), outputs)


async def read_precomputed(
    client: RedisClient, endpoint: str, entity_type: str, entity_id: str
) -> Precomputed | None:
    """The stored prediction of one entity at `endpoint` (one GET), None when there is none;
    ValueError when what is stored does not decode, the client's error when Redis fails."""
    raw = await client.get(precomputed_key(endpoint, entity_type, entity_id))
    if raw is None:
        return None
    if not isinstance(raw, bytes):
        raise ValueError("the Redis client decodes responses; the value is binary protobuf")
    return decode_precomputed(raw)


async def write_precomputed(
    client: RedisClient,
    *,
    endpoint: str,
    entity_type: str,
    model_version: str,
    entity_ids: Sequence[str],
    outputs: Mapping[str, npt.NDArray[Any]],
    computed_at: datetime | None = None,
    ttl_s: float | None = None,
    batch_size: int = 1000,
) -> int:
    """Stores the predictions of a scored batch: row i of every output (kept as a batch of one)
    for `entity_ids[i]`, made by `model_version` at `computed_at` (now when None). `batch_size`
    keys per Redis round trip (one script call that SETs them; on a Redis Cluster, whose keys
    lie in many slots, a pipeline of SETs), and no transaction across round trips: a failure
    part way leaves the earlier rows written, and rerunning the job writes them again.
    `ttl_s` lets each key expire (a little longer than the deployments' `hybrid.max_age`
    keeps Redis from holding predictions nobody may serve); None keeps them. Returns how many
    were written.

    InvalidArgumentError, before anything is written, naming each bad argument.
    """
    problems: list[FieldViolation] = []
    if not _ENDPOINT.fullmatch(endpoint):
        problems.append(FieldViolation("endpoint", "must be a deployment id: [a-z][a-z0-9-]*"))
    if not _ENTITY_TYPE.fullmatch(entity_type):
        problems.append(FieldViolation("entity_type", "must be an entity type: [a-z0-9_-]+"))
    if not _MODEL_VERSION.fullmatch(model_version):
        problems.append(
            FieldViolation("model_version", "must be models/{model}/versions/{version}")
        )
    if any(not entity_id for entity_id in entity_ids):
        problems.append(FieldViolation("entity_ids", "every entity id must be non-empty"))
    if not outputs:
        problems.append(FieldViolation("outputs", "at least one output is needed"))
    arrays = {name: np.asarray(array) for name, array in outputs.items()}
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != len(entity_ids):
            problems.append(
                FieldViolation(
                    f"outputs[{name}]",
                    f"needs one row per entity id ({len(entity_ids)}), has shape {array.shape}",
                )
            )
    if computed_at is not None and computed_at.tzinfo is None:
        problems.append(FieldViolation("computed_at", "must be timezone-aware"))
    if ttl_s is not None and ttl_s <= 0:
        problems.append(FieldViolation("ttl_s", "must be positive, or None to keep keys"))
    if batch_size < 1:
        problems.append(FieldViolation("batch_size", "must be at least 1"))
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    encoder = _RowEncoder(model_version, computed_at or datetime.now(UTC), arrays)
    expire_ms = 0 if ttl_s is None else max(1, round(ttl_s * 1000))
    prefix = precomputed_key(endpoint, entity_type, "")
    cluster = isinstance(client, RedisCluster)
    written = 0
    for start in range(0, len(entity_ids), batch_size):
        chunk = entity_ids[start : start + batch_size]
        keys = [prefix + entity_id for entity_id in chunk]
        values = [encoder.row(offset) for offset in range(start, start + len(chunk))]
        if cluster:
            # Each key is in its own slot: one SET per key, which the cluster pipeline
            # sends to each key's node. (`execute_command` rather than `set`, which checks a
            # dozen options per call.)
            expire = ("PX", expire_ms) if expire_ms else ()
            async with client.pipeline(transaction=False) as pipe:
                for key, value in zip(keys, values, strict=True):
                    pipe.execute_command("SET", key, value, *expire)
                await pipe.execute()
        else:
            # One script call for the chunk: one reply to read rather than one per key, which
            # was most of a batch job's Redis time.
            await client.eval(_SET_SCRIPT, len(keys), *keys, *values, expire_ms)
        written += len(chunk)
    return written

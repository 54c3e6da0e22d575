"""The precomputed-prediction contract: key layout, stored value, the pipelined writer batch jobs
call and the reader the router calls, against a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from modelserve.type.v1 import precomputed_pb2
from modelserve_runtime.errors import InvalidArgumentError
from modelserve_runtime.precomputed import (
    decode_precomputed,
    encode_precomputed,
    precomputed_key,
    read_precomputed,
    write_precomputed,
)

V1 = "models/fraud/versions/1"
LABELS = np.array([1, 0, 1], dtype=np.int64)
PROBABILITIES = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)


class TestLayout:
    def test_key_names_endpoint_entity_type_and_id(self) -> None:
        """The key is `precomputed:{endpoint}:{entity_type}:{entity_id}`; the id, last, may hold
        colons."""
        assert precomputed_key("fraud", "customer", "c-1") == "precomputed:fraud:customer:c-1"
        assert precomputed_key("fraud", "customer", "a:b") == "precomputed:fraud:customer:a:b"

    def test_value_round_trip(self) -> None:
        """A stored value decodes to its version, time (to the microsecond) and outputs."""
        at = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
        raw = encode_precomputed(V1, at, {"probabilities": PROBABILITIES[:1]})
        found = decode_precomputed(raw)
        assert found.model_version == V1
        assert found.computed_at_us == int(at.timestamp() * 1e6)
        np.testing.assert_array_equal(found.outputs["probabilities"], PROBABILITIES[:1])
        assert found.age_s(at.timestamp() + 30) == pytest.approx(30)
        message = precomputed_pb2.PrecomputedPrediction.FromString(raw)
        assert message.outputs[0].name == "probabilities"

    @pytest.mark.parametrize(
        "raw",
        [
            b"\xff\xff not protobuf",
            precomputed_pb2.PrecomputedPrediction().SerializeToString(),
            precomputed_pb2.PrecomputedPrediction(model_version=V1).SerializeToString(),
        ],
    )
    def test_what_is_no_whole_prediction_is_a_value_error(self, raw: bytes) -> None:
        """Bytes that do not parse, or a message without version, time or outputs, are
        ValueError, which the router treats as nothing stored."""
        with pytest.raises(ValueError, match="PrecomputedPrediction"):
            decode_precomputed(raw)


class TestWriteAndRead:
    async def test_each_row_is_stored_for_its_entity(self, redis_client: aioredis.Redis) -> None:
        """Row i of every output goes to entity i as a batch of one, across pipeline batches;
        an entity never written reads as None."""
        at = datetime.now(UTC) - timedelta(minutes=5)
        written = await write_precomputed(
            redis_client,
            endpoint="fraud",
            entity_type="customer",
            model_version=V1,
            entity_ids=["c-1", "c-2", "c:3"],
            outputs={"label": LABELS, "probabilities": PROBABILITIES},
            computed_at=at,
            batch_size=2,
        )
        assert written == 3
        for i, entity in enumerate(["c-1", "c-2", "c:3"]):
            found = await read_precomputed(redis_client, "fraud", "customer", entity)
            assert found is not None
            assert (found.model_version, found.computed_at_us) == (V1, int(at.timestamp() * 1e6))
            np.testing.assert_array_equal(found.outputs["label"], LABELS[i : i + 1])
            np.testing.assert_array_equal(found.outputs["probabilities"], PROBABILITIES[i : i + 1])
        assert await read_precomputed(redis_client, "fraud", "customer", "c-4") is None
        assert await read_precomputed(redis_client, "other", "customer", "c-1") is None

    async def test_stored_values_are_the_messages_encode_makes_for_every_dtype(
        self, redis_client: aioredis.Redis
    ) -> None:
        """The writer assembles each row's value from bytes (float arrays as they are): for
        outputs of every tensor dtype, what it stores parses to the very message
        `encode_precomputed` makes for that row, and decodes to the row's arrays."""
        at = datetime(2026, 5, 6, 7, 8, 9, 654321, tzinfo=UTC)
        outputs = {
            "probabilities": np.array([[0.1, 0.9], [-0.0, float("inf")]], dtype=np.float32),
            "score": np.array([1e-300, -2.5], dtype=np.float64),
            "label": np.array([-(2**62), 7], dtype=np.int64),
            "flags": np.array([[True, False], [False, True]]),
            "tag": np.array([b"a:b", b""], dtype="S3"),
            "count": np.array([3, -4], dtype=np.int32),
        }
        await write_precomputed(
            redis_client,
            endpoint="fraud",
            entity_type="customer",
            model_version=V1,
            entity_ids=["c-1", "c-2"],
            outputs=outputs,
            computed_at=at,
        )
        for i, entity in enumerate(["c-1", "c-2"]):
            raw = await redis_client.get(precomputed_key("fraud", "customer", entity))
            row = {name: array[i : i + 1] for name, array in outputs.items()}
            parse = precomputed_pb2.PrecomputedPrediction.FromString
            assert parse(raw) == parse(encode_precomputed(V1, at, row))
            found = decode_precomputed(raw)
            for name, array in row.items():
                np.testing.assert_array_equal(found.outputs[name], array)

    async def test_ttl_and_default_time(self, redis_client: aioredis.Redis) -> None:
        """`ttl_s` makes each key expire; without `computed_at` the time is now."""
        before = datetime.now(UTC).timestamp()
        await write_precomputed(
            redis_client,
            endpoint="fraud",
            entity_type="customer",
            model_version=V1,
            entity_ids=["c-1"],
            outputs={"label": LABELS[:1]},
            ttl_s=120,
        )
        ttl_ms = await redis_client.pttl(precomputed_key("fraud", "customer", "c-1"))
        assert 0 < ttl_ms <= 120_000
        found = await read_precomputed(redis_client, "fraud", "customer", "c-1")
        assert found is not None
        assert before <= found.computed_at_us / 1e6 <= datetime.now(UTC).timestamp()

    async def test_bad_arguments_are_named_and_nothing_is_written(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Each bad argument is a field violation of one INVALID_ARGUMENT, raised before any
        write."""
        with pytest.raises(InvalidArgumentError) as info:
            await write_precomputed(
                redis_client,
                endpoint="Fraud:1",
                entity_type="cust:omer",
                model_version="fraud/1",
                entity_ids=["c-1", ""],
                outputs={"label": LABELS},
                computed_at=datetime(2026, 1, 1),
                ttl_s=0,
                batch_size=0,
            )
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.field for v in info.value.violations) == [
            "batch_size",
            "computed_at",
            "endpoint",
            "entity_ids",
            "entity_type",
            "model_version",
            "outputs[label]",
            "ttl_s",
        ]
        with pytest.raises(InvalidArgumentError, match="outputs"):
            await write_precomputed(
                redis_client,
                endpoint="fraud",
                entity_type="customer",
                model_version=V1,
                entity_ids=["c-1"],
                outputs={},
                computed_at=datetime.now(timezone(timedelta(hours=2))),
            )
        assert await redis_client.keys("precomputed:*") == []

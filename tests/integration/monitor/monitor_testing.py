"""Helpers the monitor tests share: the test clock, prediction records, logging them."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_monitor.server import MonitorApp
from modelserve_runtime.prediction_log import PredictionLogWriter

#: How long the monitor may take to count what a test logged: seconds for the largest
#: batches (6,000 records) on a busy machine.
DRAIN_DEADLINE_S = 20.0

#: Midnight, 1 Jan 2026: a fixed start for the test clock.
T0 = 1_767_225_600.0


class TestClock:
    """A clock the test moves by hand."""

    __test__ = False

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def probabilities(probability: float) -> tensor_pb2.Tensor:
    """A binary classifier's `probabilities` output, [1 - p, p] as FP32."""
    return tensor_pb2.Tensor(
        name="probabilities",
        datatype=tensor_pb2.DATA_TYPE_FP32,
        shape=[1, 2],
        contents=tensor_pb2.TensorContents(fp32_contents=[1 - probability, probability]),
    )


def prediction_record(
    request_id: str,
    version: str,
    *,
    endpoint: str = "fraud",
    error: bool = False,
    latency_us: int = 2000,
    shadow: bool = False,
    outputs: Iterable[tensor_pb2.Tensor] = (),
) -> rec_pb.PredictionRecord:
    """The logged prediction of one request to `version`, failed or with its `outputs`."""
    record = rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint=endpoint,
        model_version=version,
        latency_us=latency_us,
        shadow=shadow,
        status=rec_pb.PREDICTION_STATUS_ERROR if error else rec_pb.PREDICTION_STATUS_OK,
    )
    record.outputs.extend(outputs)
    return record


async def log_and_count(
    redis_client: aioredis.Redis, app: MonitorApp, records: Iterable[rec_pb.PredictionRecord]
) -> None:
    """Appends the records to the prediction log and returns once the monitor has counted
    them."""
    writer = PredictionLogWriter(redis_client)
    for i, record in enumerate(records):
        writer.append(record)
        # Thousands of records at once would fill the writer's queue, which drops past it.
        if i % 500 == 499:
            await writer.flush()
    await writer.flush()
    assert writer.dropped == 0
    await app.consumer.drain(DRAIN_DEADLINE_S)

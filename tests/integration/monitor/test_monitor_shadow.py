"""Shadow pairing on a real Redis: a shadow copy joins the answer to the same request once,
whichever is counted first, whatever the batches; GetShadowReport through the service."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import pytest
import redis.asyncio as aioredis
from monitor_testing import TestClock, log_and_count, prediction_record, probabilities

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.monitor import Monitor
from modelserve_monitor.server import MonitorApp
from modelserve_monitor.store import AggregateStore, StoreTtls, Window
from modelserve_runtime.errors import decode_rpc_error
from modelserve_runtime.prediction_log import DEFAULT_STREAM, encode_record

PRIMARY = "models/fraud/versions/1"
SHADOW = "models/fraud/versions/2"
DEADLINE_S = 10.0


def _record(request_id: str, *, shadow: bool, probability: float | None) -> rec_pb.PredictionRecord:
    """The answer (PRIMARY) or the shadow copy (SHADOW) of a request; no probability: failed."""
    return prediction_record(
        request_id,
        SHADOW if shadow else PRIMARY,
        error=probability is None,
        latency_us=1500,
        shadow=shadow,
        outputs=[] if probability is None else [probabilities(probability)],
    )


def _answer(i: int) -> float | None:
    """The primary's probability for request i (multiples of 1/64: exact in float32);
    every 25th request failed."""
    return None if i % 25 == 24 else (i % 60 + 2) / 64


def _copy(i: int) -> float:
    """The shadow's probability: 1/16 above the answer, so some cross 0.5."""
    return (i % 60 + 6) / 64


def _pair(i: int, *, copy_first: bool) -> list[rec_pb.PredictionRecord]:
    answer = _record(f"r{i}", shadow=False, probability=_answer(i))
    copy = _record(f"r{i}", shadow=True, probability=_copy(i))
    return [copy, answer] if copy_first else [answer, copy]


def _expected(ids: Iterable[int]) -> tuple[int, int, float, float]:
    """Pairs, compared pairs, agreement rate and mean absolute difference of requests `ids`."""
    ids = list(ids)
    answers = {i: a for i in ids if (a := _answer(i)) is not None}
    agreeing = sum(1 for i, a in answers.items() if (a >= 0.5) == (_copy(i) >= 0.5))
    difference = sum(abs(_copy(i) - a) for i, a in answers.items())
    return len(ids), len(answers), agreeing / len(answers), difference / len(answers)


def _store(client: aioredis.Redis) -> AggregateStore:
    return AggregateStore(
        client, ttls=StoreTtls(seen_s=600, prediction_s=600), baseline_records=10_000
    )


async def _append(client: aioredis.Redis, records: Iterable[rec_pb.PredictionRecord]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for record in records:
            pipe.xadd(DEFAULT_STREAM, encode_record(record))
        await pipe.execute()


async def _waiting_copies(client: aioredis.Redis) -> list[bytes]:
    """The request ids whose shadow copies wait for their answer, as Redis keys."""
    return [key async for key in client.scan_iter("modelserve:monitor:shadow:*")]


class TestShadowPairing:
    async def _consume(self, consumer: PredictionLogConsumer) -> None:
        async with asyncio.timeout(DEADLINE_S):
            await consumer.process_available()

    async def test_pairs_in_either_order_in_any_batches_count_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Answer before copy, copy before answer, in separate batches or one, through the
        summed and the record-by-record scripts, and again as duplicates: each request pairs
        once, and agreement and mean absolute difference are those of the pairs."""
        consumer = PredictionLogConsumer(
            redis_client,
            _store(redis_client),
            stream=DEFAULT_STREAM,
            group="monitor",
            consumer="shadow-test",
            block_ms=100,
            batch_size=1000,
            claim_min_idle_ms=60_000,
        )
        await consumer.ensure_group()
        # Separate batches: answers first, then copies; then copies first, then answers.
        await _append(redis_client, (_pair(i, copy_first=False)[0] for i in range(50)))
        await self._consume(consumer)
        await _append(redis_client, (_pair(i, copy_first=False)[1] for i in range(50)))
        await self._consume(consumer)
        await _append(redis_client, (_pair(i, copy_first=True)[0] for i in range(50, 100)))
        await self._consume(consumer)
        await _append(redis_client, (_pair(i, copy_first=True)[1] for i in range(50, 100)))
        await self._consume(consumer)
        # One batch holding both records of each request, in both orders.
        await _append(
            redis_client,
            (r for i in range(100, 200) for r in _pair(i, copy_first=i % 2 == 0)),
        )
        await self._consume(consumer)
        # Duplicates of copies and answers, with new pairs in both orders in the same batch:
        # a record seen before sends the batch through the record-by-record script.
        duplicates = [_pair(i, copy_first=False)[1] for i in range(10)]
        duplicates += [_pair(i, copy_first=True)[1] for i in range(50, 60)]
        new = [r for i in range(200, 240) for r in _pair(i, copy_first=i % 2 == 1)]
        await _append(redis_client, [*duplicates, *new, *duplicates])
        await self._consume(consumer)
        assert consumer.duplicates == 40
        report = await Monitor(_store(redis_client)).shadow_report("fraud", SHADOW, Window.TOTAL)
        pairs, compared, agreement, difference = _expected(range(240))
        assert (report.pair_count, report.compared_count) == (pairs, compared)
        assert report.agreement_rate == pytest.approx(agreement)
        assert 0 < report.agreement_rate < 1
        assert report.mean_absolute_difference == pytest.approx(difference)
        assert (report.request_count, report.error_count) == (240, 0)
        primary = await Monitor(_store(redis_client)).shadow_report("fraud", PRIMARY, Window.TOTAL)
        assert primary.pair_count == 0
        assert await _waiting_copies(redis_client) == [], "a paired copy no longer waits"

    async def test_copy_without_answer_waits_and_non_finite_output_is_not_compared(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A copy whose answer has not been counted is not a pair yet; a NaN output neither
        stops the consumer nor counts as a prediction: the pair is counted, not compared."""
        store = _store(redis_client)
        consumer = PredictionLogConsumer(
            redis_client,
            store,
            stream=DEFAULT_STREAM,
            group="monitor",
            consumer="shadow-test",
            block_ms=100,
            batch_size=1000,
            claim_min_idle_ms=60_000,
        )
        await consumer.ensure_group()
        broken = _record("nan", shadow=True, probability=float("nan"))
        broken.features["amount"].CopyFrom(fv_pb.FeatureValue(double_value=float("inf")))
        await _append(
            redis_client,
            [
                _record("lonely", shadow=True, probability=0.9),
                broken,
                _record("nan", shadow=False, probability=0.2),
            ],
        )
        await self._consume(consumer)
        report = await Monitor(store).shadow_report("fraud", SHADOW, Window.TOTAL)
        assert (report.request_count, report.pair_count, report.compared_count) == (2, 1, 0)
        assert await _waiting_copies(redis_client) == [b"modelserve:monitor:shadow:lonely"]
        stats = await Monitor(store).endpoint_stats("fraud", Window.ONE_HOUR)
        shadow = next(v for v in stats.versions if v.model_version == SHADOW)
        assert shadow.predictions.count == 1
        [amount] = shadow.features
        assert (amount.count, amount.missing_rate) == (1, 1.0)
        await _append(redis_client, [_record("lonely", shadow=False, probability=0.7)])
        await self._consume(consumer)
        report = await Monitor(store).shadow_report("fraud", SHADOW, Window.TOTAL)
        assert (report.pair_count, report.compared_count, report.agreement_rate) == (2, 1, 1.0)
        assert await _waiting_copies(redis_client) == []
        assert report.mean_absolute_difference == pytest.approx(0.2, abs=1e-6)


@pytest.fixture
def monitor_settings(redis_url: str) -> MonitorSettings:
    """A monitor with the default settings."""
    return MonitorSettings(redis_url=redis_url, consumer_name="shadow-rpc-test", block_ms=100)


class TestGetShadowReport:
    async def test_report_covers_the_window(
        self,
        monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp],
        redis_client: aioredis.Redis,
        clock: TestClock,
    ) -> None:
        """Pairs are placed in the window they were joined in; the total keeps them."""
        stub, app = monitor
        records = (r for i in range(100) for r in _pair(i, copy_first=i % 3 == 0))
        await log_and_count(redis_client, app, records)
        request = pb.GetShadowReportRequest(
            endpoint="fraud", shadow_version=SHADOW, window=pb.WINDOW_ONE_MINUTE
        )
        report = await stub.GetShadowReport(request)
        pairs, compared, agreement, difference = _expected(range(100))
        assert (report.endpoint, report.shadow_version, report.window) == (
            "fraud",
            SHADOW,
            pb.WINDOW_ONE_MINUTE,
        )
        assert (report.request_count, report.pair_count, report.compared_count) == (
            100,
            pairs,
            compared,
        )
        assert report.agreement_rate == pytest.approx(agreement)
        assert report.mean_absolute_difference == pytest.approx(difference)
        clock.now += 120
        assert (await stub.GetShadowReport(request)).pair_count == 0
        total = await stub.GetShadowReport(
            pb.GetShadowReportRequest(endpoint="fraud", shadow_version=SHADOW)
        )
        assert (total.window, total.pair_count) == (pb.WINDOW_UNSPECIFIED, pairs)

    async def test_bad_requests(
        self, monitor: tuple[pb_grpc.MonitorServiceStub, MonitorApp]
    ) -> None:
        """Missing names are INVALID_ARGUMENT; a version never seen is NOT_FOUND."""
        stub, _ = monitor
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetShadowReport(pb.GetShadowReportRequest())
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["endpoint", "shadow_version"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetShadowReport(
                pb.GetShadowReportRequest(endpoint="fraud", shadow_version=SHADOW)
            )
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")

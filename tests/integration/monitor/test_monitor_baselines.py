"""Feature baselines from the model's validation set, asked of a real registry service, with
the monitor on a real Redis; first records when there is no set or no registry answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from integration.registry.registry_testing import signature, stream, tiny_onnx, upload_requests
from pki import certificate_authority, client_certificate, mutual_tls, server_certificate
from support import eventually, running

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.stack import free_port
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import MonitorApp
from modelserve_monitor.server import build_server as build_monitor
from modelserve_monitor.store import AggregateStore, BaselineSource, StoreTtls
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server as build_registry
from modelserve_runtime.auth import AuthSettings, Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ClientTlsSettings, ServerSettings
from modelserve_runtime.convert import numpy_to_tensor
from modelserve_runtime.prediction_log import PredictionLogWriter
from modelserve_runtime.server import GrpcServer, ServiceApp

SHIFTED, STEADY, OTHER = "request:shifted", "request:steady", "request:other"
FEATURE_REFS = (SHIFTED, STEADY, OTHER)
VALIDATION_ROWS = 1000
BASELINE_RECORDS = 200
DEADLINE_S = 30.0
Metadata = tuple[tuple[str, str], ...]


def _validation_set() -> registry_pb.ValidationSet:
    """1000 rows of the three features, each drawn from N(0, 1)."""
    rng = np.random.default_rng(11)
    rows = rng.normal(0.0, 1.0, (VALIDATION_ROWS, len(FEATURE_REFS))).astype(np.float32)
    return registry_pb.ValidationSet(
        inputs=[numpy_to_tensor("features", rows)],
        labels=numpy_to_tensor("labels", rng.integers(0, 2, VALIDATION_ROWS)),
        output="probabilities",
        metric=registry_pb.VALIDATION_METRIC_ACCURACY,
    )


async def _register(
    stub: registry_grpc.RegistryServiceAsyncStub,
    model_id: str,
    *,
    validation_set: bool,
    metadata: Metadata = (),
) -> str:
    """Creates `models/{model_id}` (with the validation set or without) and uploads version 1,
    whose signature names FEATURE_REFS; returns the version's name."""
    model = registry_pb.Model(validation_set=_validation_set() if validation_set else None)
    await stub.CreateModel(
        registry_pb.CreateModelRequest(model_id=model_id, model=model), metadata=metadata
    )
    sig = signature()
    sig.feature_refs.extend(FEATURE_REFS)
    requests = upload_requests(tiny_onnx(), parent=f"models/{model_id}", sig=sig)
    response = await stub.CreateModelVersion(stream(requests), metadata=metadata)
    return response.model_version.name


def _live_records(
    endpoint: str, version: str, count: int, *, seed: int, start: int = 0
) -> Iterable[rec_pb.PredictionRecord]:
    """Records whose SHIFTED feature comes from N(1, 1), the others from N(0, 1)."""
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        record = rec_pb.PredictionRecord(
            request_id=f"{endpoint}-{i}",
            endpoint=endpoint,
            model_version=version,
            latency_us=2000,
            status=rec_pb.PREDICTION_STATUS_OK,
        )
        for name, mean in ((SHIFTED, 1.0), (STEADY, 0.0), (OTHER, 0.0)):
            value = float(rng.normal(mean, 1.0))
            record.features[name].CopyFrom(fv_pb.FeatureValue(double_value=value))
        probability = float(rng.uniform(0.0, 1.0))
        record.outputs.append(
            tensor_pb2.Tensor(
                name="probabilities",
                datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=[1, 2],
                contents=tensor_pb2.TensorContents(fp32_contents=[1 - probability, probability]),
            )
        )
        yield record


async def _log(
    redis_client: aioredis.Redis, app: MonitorApp, records: Iterable[rec_pb.PredictionRecord]
) -> None:
    """Appends the records and returns once the monitor has counted them."""
    writer = PredictionLogWriter(redis_client)
    for record in records:
        writer.append(record)
    await writer.flush()
    assert writer.dropped == 0
    await app.consumer.drain(DEADLINE_S)


def _monitor_settings(redis_url: str, registry_target: str, **overrides: object) -> MonitorSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "registry_target": registry_target,
        "consumer_name": "baselines-test",
        "block_ms": 100,
        "baseline_records": BASELINE_RECORDS,
        "baseline_retry_s": 0.05,
        "baseline_retry_max_s": 0.2,
    }
    values.update(overrides)
    return MonitorSettings.model_validate(values)


def _registry(
    data_dir: Path, *, port: int = 0, auth: AuthSettings | None = None
) -> AbstractAsyncContextManager[tuple[GrpcServer, grpc.aio.Channel, ServiceApp]]:
    settings = RegistrySettings(
        production_traffic_only=False,
        data_dir=data_dir,
        server=ServerSettings(port=port),
        auth=auth or AuthSettings(),
    )
    return running(build_registry, settings)


async def _report(
    stub: pb_grpc.MonitorServiceAsyncStub, endpoint: str, version: str
) -> pb.GetDriftReportResponse:
    return await stub.GetDriftReport(
        pb.GetDriftReportRequest(endpoint=endpoint, model_version=version)
    )


async def _source_becomes(
    stub: pb_grpc.MonitorServiceAsyncStub, endpoint: str, version: str, source: str
) -> pb.GetDriftReportResponse:
    seen: list[pb.GetDriftReportResponse] = []

    async def check() -> bool:
        try:
            seen.append(await _report(stub, endpoint, version))
        except grpc.aio.AioRpcError as exc:
            # A first-records baseline that is not complete yet.
            assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION, exc
            return False
        return seen[-1].baseline_source == source

    await eventually(check, f"{endpoint} baseline from {source}", within_s=DEADLINE_S)
    return seen[-1]


def _drifted(report: pb.GetDriftReportResponse) -> dict[str, bool]:
    return {r.feature: r.drifted for r in report.results}


async def _refused_then_answered(
    redis_url: str,
    redis_client: aioredis.Redis,
    registry_target: str,
    records: list[rec_pb.PredictionRecord],
    **answered: object,
) -> None:
    """A monitor without the `answered` settings is refused by the registry and keeps the
    version's first records (300 of `records`); a second one with them gets the validation
    set on its first attempt (the other 100)."""
    endpoint, version = records[0].endpoint, records[0].model_version
    async with running(build_monitor, _monitor_settings(redis_url, registry_target)) as (
        _,
        channel,
        app,
    ):
        assert isinstance(app, MonitorApp)
        await _log(redis_client, app, records[:300])
        await eventually(lambda: app.baselines.deferrals >= 1, "a refused attempt")
        report = await _report(pb_grpc.MonitorServiceStub(channel), endpoint, version)
        assert report.baseline_source == "first_records"

    settings = _monitor_settings(redis_url, registry_target, **answered)
    async with running(build_monitor, settings) as (_, channel, app):
        assert isinstance(app, MonitorApp)
        await _log(redis_client, app, records[300:])
        monitor = pb_grpc.MonitorServiceStub(channel)
        await _source_becomes(monitor, endpoint, version, "validation_set")
        assert app.baselines.deferrals == 0


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[str, registry_grpc.RegistryServiceStub]]:
    """A registry service on port 0 (no auth), its target and a stub."""
    async with _registry(tmp_path / "registry") as (server, channel, _):
        yield f"127.0.0.1:{server.port}", registry_grpc.RegistryServiceStub(channel)


class TestValidationSetBaselines:
    async def test_the_validation_set_shows_drift_that_first_records_would_hide(
        self,
        registry: tuple[str, registry_grpc.RegistryServiceAsyncStub],
        redis_url: str,
        redis_client: aioredis.Redis,
    ) -> None:
        """A version whose model's validation set is N(0, 1) and whose live SHIFTED feature is
        N(1, 1) drifts on that feature only, against `validation_set`; a version of a model
        without a set keeps its first records, which carry the shift and so hide it."""
        target, stub = registry
        with_set = await _register(stub, "scored", validation_set=True)
        without_set = await _register(stub, "plain", validation_set=False)
        settings = _monitor_settings(redis_url, target)
        async with running(build_monitor, settings) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            monitor = pb_grpc.MonitorServiceStub(channel)
            await _log(redis_client, app, _live_records("scored", with_set, 1000, seed=1))
            await _log(redis_client, app, _live_records("plain", without_set, 1000, seed=2))

            scored = await _source_becomes(monitor, "scored", with_set, "validation_set")
            assert (scored.baseline_count, scored.window_count) == (VALIDATION_ROWS, 1000)
            assert _drifted(scored) == {
                "prediction": False,
                SHIFTED: True,
                STEADY: False,
                OTHER: False,
            }
            by_feature = {r.feature: r for r in scored.results}
            shifted_tests = {s.test: s for s in by_feature[SHIFTED].statistics}
            assert shifted_tests[pb.DRIFT_TEST_PSI].statistic > 0.5
            assert shifted_tests[pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV].p_value < 1e-6
            assert by_feature[SHIFTED].baseline_count == VALIDATION_ROWS
            # The prediction baseline is the version's first records, complete here.
            assert by_feature["prediction"].baseline_count == BASELINE_RECORDS
            assert len(by_feature["prediction"].statistics) == 2

            await eventually(lambda: app.baselines.waiting == 0, "both versions decided")
            store = AggregateStore(
                redis_client, ttls=StoreTtls(seen_s=60, prediction_s=60), baseline_records=1
            )
            decision = await store.baseline_decision("plain", without_set)
            assert decision is not None
            assert decision.source is BaselineSource.FIRST_RECORDS
            assert decision.reason == "the model has no validation set"
            plain = await _report(monitor, "plain", without_set)
            assert (plain.baseline_source, plain.baseline_count) == (
                "first_records",
                BASELINE_RECORDS,
            )
            assert _drifted(plain)[SHIFTED] is False

    async def test_features_are_compared_before_the_first_records_are_in(
        self,
        registry: tuple[str, registry_grpc.RegistryServiceAsyncStub],
        redis_url: str,
        redis_client: aioredis.Redis,
    ) -> None:
        """With a validation set the report answers from the first records on: the features
        against the set, the predictions without statistics until the first records are in."""
        target, stub = registry
        version = await _register(stub, "early", validation_set=True)
        settings = _monitor_settings(redis_url, target)
        async with running(build_monitor, settings) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            monitor = pb_grpc.MonitorServiceStub(channel)
            await _log(redis_client, app, _live_records("early", version, 50, seed=3))
            report = await _source_becomes(monitor, "early", version, "validation_set")
            prediction = next(r for r in report.results if r.feature == "prediction")
            assert (prediction.baseline_count, list(prediction.statistics)) == (50, [])
            assert {r.feature for r in report.results if r.statistics} == set(FEATURE_REFS)

    async def test_an_unreachable_registry_keeps_first_records_until_it_answers(
        self, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """While nothing listens at the registry's address the version keeps its first records
        and is asked about again; once the registry answers, its validation set applies.

        The version is registered before the monitor starts and the registry stopped, so that
        it comes back knowing the version: a retry that reached a registry not yet told about
        it would settle on the first records for good, as it should for an unknown version."""
        port = free_port()
        version = "models/late/versions/1"
        async with _registry(tmp_path / "registry", port=port) as (_, registry_channel, _):
            stub = registry_grpc.RegistryServiceStub(registry_channel)
            assert await _register(stub, "late", validation_set=True) == version
        settings = _monitor_settings(redis_url, f"127.0.0.1:{port}")
        async with running(build_monitor, settings) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            monitor = pb_grpc.MonitorServiceStub(channel)
            await _log(redis_client, app, _live_records("late", version, 300, seed=4))
            await eventually(lambda: app.baselines.deferrals >= 2, "two deferred attempts")
            report = await _report(monitor, "late", version)
            assert report.baseline_source == "first_records"
            assert _drifted(report)[SHIFTED] is False

            async with _registry(tmp_path / "registry", port=port):
                report = await _source_becomes(monitor, "late", version, "validation_set")
            assert _drifted(report)[SHIFTED] is True

    async def test_the_registry_api_key_is_sent(
        self, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Against a registry with auth on, a monitor without a key is refused and keeps the
        first records; one with a viewer's key gets the validation set."""
        admin_key, admin = new_api_key("ada", {Role.ADMIN}, n=16)
        viewer_key, viewer = new_api_key("vera", {Role.VIEWER}, n=16)
        auth = AuthSettings(enabled=True, keys=[admin, viewer])
        async with _registry(tmp_path / "registry", auth=auth) as (server, registry_channel, _):
            target = f"127.0.0.1:{server.port}"
            stub = registry_grpc.RegistryServiceStub(registry_channel)
            bearer = (("authorization", f"Bearer {admin_key}"),)
            version = await _register(stub, "guarded", validation_set=True, metadata=bearer)
            await _refused_then_answered(
                redis_url,
                redis_client,
                target,
                list(_live_records("guarded", version, 400, seed=5)),
                registry_api_key=viewer_key,
            )

    async def test_the_registry_is_asked_over_mutual_tls(
        self, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A registry that requires client certificates gives the validation set to a monitor
        whose `registry_tls` names the CA and a client certificate; without one the monitor
        keeps the first records."""
        ca = certificate_authority(tmp_path / "pki", "ca")
        server = server_certificate(tmp_path / "pki", "registry", ca)
        client = client_certificate(tmp_path / "pki", "monitor", ca)
        tls = ClientTlsSettings(
            enabled=True, ca_file=ca.cert, cert_file=client.cert, key_file=client.key
        )
        settings = RegistrySettings.model_validate(
            {
                "production_traffic_only": False,
                "data_dir": tmp_path / "registry",
                "server": {"tls": mutual_tls(server, ca)},
            }
        )
        async with running(build_registry, settings) as (registry, _, _):
            target = f"127.0.0.1:{registry.port}"
            async with create_channel(target, tls=tls) as channel:
                version = await _register(
                    registry_grpc.RegistryServiceStub(channel), "sealed", validation_set=True
                )
            await _refused_then_answered(
                redis_url,
                redis_client,
                target,
                list(_live_records("sealed", version, 400, seed=6)),
                registry_tls=tls,
            )

"""Model and version metadata through a real registry: labels, validation sets, sample
inputs, metrics, lineage and tags; model update and delete; per-deployment settings; and the
rule that only PRODUCTION versions take production traffic."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from registry_testing import (
    PRINCIPALS,
    AuthRegistry,
    RunningRegistry,
    create_model,
    failure,
    files_under,
    set_traffic,
    signature,
    stream,
    tiny_onnx,
    upload_requests,
    upload_version,
)
from support import running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp, build_server
from modelserve_runtime.auth import AuthSettings, new_api_key
from modelserve_runtime.convert import numpy_to_tensor

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"


def rows(count: int, width: int = 3) -> tensor_pb2.Tensor:
    return numpy_to_tensor("features", np.ones((count, width), dtype=np.float32))


def validation_set(count: int = 4) -> pb.ValidationSet:
    return pb.ValidationSet(
        inputs=[rows(count)],
        labels=numpy_to_tensor("labels", np.zeros(count, dtype=np.int64)),
        output="probabilities",
        metric=pb.VALIDATION_METRIC_ACCURACY,
    )


async def upload_with(
    stub: pb_grpc.RegistryServiceAsyncStub, extra: pb.ModelVersion, data: bytes | None = None
) -> pb.ModelVersion:
    """Uploads a tiny model whose metadata carries `extra`'s fields."""
    requests = upload_requests(data if data is not None else tiny_onnx())
    requests[0].upload.model_version.MergeFrom(extra)
    response = await stub.CreateModelVersion(stream(requests))
    return response.model_version


class TestModels:
    async def test_labels_and_validation_set_round_trip(self, registry: RunningRegistry) -> None:
        """A model keeps its labels and validation set; UpdateModel writes only masked fields
        and audits what changed."""
        created = await registry.stub.CreateModel(
            pb.CreateModelRequest(
                model_id="fraud",
                model=pb.Model(
                    description="card fraud",
                    labels={"team": "risk"},
                    validation_set=validation_set(),
                ),
            )
        )
        assert dict(created.model.labels) == {"team": "risk"}
        assert created.model.validation_set == validation_set()
        updated = await registry.stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/fraud", description="ignored", labels={"team": "ml"}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
                reason="team moved",
            )
        )
        assert (updated.model.description, dict(updated.model.labels)) == (
            "card fraud",
            {"team": "ml"},
        )
        assert updated.model.validation_set == validation_set()
        events = await registry.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource="models/fraud", page_size=1)
        )
        event = events.audit_events[0]
        assert (event.action, event.reason, dict(event.details)) == (
            "UpdateModel",
            "team moved",
            {"labels": '{"team": "ml"}'},
        )

    async def test_bad_model_fields_are_refused_whole(self, registry: RunningRegistry) -> None:
        """A validation set with mismatched rows, no metric and a bad label key is refused
        naming each field, and no model is created."""
        broken = validation_set(4)
        broken.labels.CopyFrom(numpy_to_tensor("labels", np.zeros(3, dtype=np.int64)))
        broken.metric = pb.VALIDATION_METRIC_UNSPECIFIED
        error = await failure(
            registry.stub.CreateModel(
                pb.CreateModelRequest(
                    model_id="fraud",
                    model=pb.Model(labels={"!bad": "x"}, validation_set=broken),
                )
            )
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.field for v in error.violations) == [
            "model.labels['!bad']",
            "model.validation_set.labels.shape",
            "model.validation_set.metric",
        ]
        listed = await registry.stub.ListModels(pb.ListModelsRequest())
        assert list(listed.models) == []

    async def test_update_refuses_unknown_paths(self, registry: RunningRegistry) -> None:
        """An update_mask path that is not a writable field is INVALID_ARGUMENT."""
        await create_model(registry.stub)
        error = await failure(
            registry.stub.UpdateModel(
                pb.UpdateModelRequest(
                    model=pb.Model(name="models/fraud"),
                    update_mask=field_mask_pb2.FieldMask(paths=["create_time"]),
                )
            )
        )
        assert [v.field for v in error.violations] == ["update_mask"]


class TestVersionMetadata:
    async def test_sample_inputs_metrics_lineage_and_tags_are_kept(
        self, registry: RunningRegistry
    ) -> None:
        """What the upload declares comes back with the version; tags change later, nothing
        else does."""
        await create_model(registry.stub)
        parent = await upload_version(registry.stub)
        dataset = hashlib.sha256(b"train.parquet").hexdigest()
        extra = pb.ModelVersion(
            sample_inputs=[rows(2)],
            metrics={"auc": 0.93},
            lineage=pb.Lineage(
                training_run_id="run-7",
                dataset_uri="file:///data/train.parquet",
                dataset_sha256=dataset,
                code_commit="abc123",
                parameters={"max_depth": "6"},
                feature_views=["customer_stats@2"],
                parent_version=parent.name,
            ),
            tags={"owner": "risk"},
        )
        created = await upload_with(registry.stub, extra, tiny_onnx(weight=3.0))
        assert list(created.sample_inputs) == [rows(2)]
        assert dict(created.metrics) == {"auc": pytest.approx(0.93)}
        assert created.lineage == extra.lineage
        assert dict(created.tags) == {"owner": "risk"}

        updated = await registry.stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=V2, tags={"owner": "ml"}, description="new"),
                update_mask=field_mask_pb2.FieldMask(paths=["tags"]),
            )
        )
        assert dict(updated.model_version.tags) == {"owner": "ml"}
        assert updated.model_version.description == ""
        assert updated.model_version.lineage == extra.lineage
        immutable = await failure(
            registry.stub.UpdateModelVersion(
                pb.UpdateModelVersionRequest(
                    model_version=pb.ModelVersion(name=V2, metrics={"auc": 1.0}),
                    update_mask=field_mask_pb2.FieldMask(paths=["metrics"]),
                )
            )
        )
        assert [v.field for v in immutable.violations] == ["update_mask"]

    async def test_sample_inputs_must_fit_the_signature(
        self, registry: RunningRegistry, registry_settings: RegistrySettings
    ) -> None:
        """Sample inputs of the wrong width, a NaN metric and a missing parent are refused,
        and neither a version nor an artifact file is left."""
        await create_model(registry.stub)
        wrong = pb.ModelVersion(sample_inputs=[rows(2, width=4)], metrics={"auc": float("nan")})
        error = await failure(upload_with(registry.stub, wrong))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        by_field = {v.field: v.description for v in error.violations}
        assert "[-1, 3]" in by_field["upload.model_version.sample_inputs[0].shape"]
        assert by_field["upload.model_version.metrics['auc']"] == "must be finite"
        orphan = pb.ModelVersion(lineage=pb.Lineage(parent_version="models/fraud/versions/9"))
        missing = await failure(upload_with(registry.stub, orphan))
        assert missing.code is grpc.StatusCode.NOT_FOUND
        listed = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud")
        )
        assert list(listed.model_versions) == []
        assert [
            p for p in files_under(registry_settings.artifacts_dir) if "sha256" in p.parts
        ] == []


class TestNonFiniteInputs:
    async def test_a_float_input_may_allow_nan_and_infinity(
        self, registry: RunningRegistry
    ) -> None:
        """A float input's `allow_non_finite` is kept and lets the version's sample inputs
        hold NaN and infinity; without it they are refused."""
        await create_model(registry.stub)
        odd = numpy_to_tensor("features", np.array([[np.nan, 1.0, np.inf]], np.float32))
        sig = signature()
        sig.inputs[0].allow_non_finite = True
        takes = upload_requests(tiny_onnx(), sig=sig)
        takes[0].upload.model_version.sample_inputs.append(odd)
        plain = upload_requests(tiny_onnx())
        plain[0].upload.model_version.sample_inputs.append(odd)

        created = (await registry.stub.CreateModelVersion(stream(takes))).model_version
        got = await registry.stub.GetModelVersion(pb.GetModelVersionRequest(name=created.name))
        error = await failure(registry.stub.CreateModelVersion(stream(plain)))

        assert created.signature.inputs[0].allow_non_finite
        assert got.model_version.signature.inputs[0].allow_non_finite
        assert not got.model_version.signature.outputs[0].allow_non_finite
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == [
            "upload.model_version.sample_inputs[0].contents"
        ]
        assert "must be finite" in error.violations[0].description

    async def test_it_is_refused_where_it_means_nothing(self, registry: RunningRegistry) -> None:
        """On an integer input or on an output, `allow_non_finite` is refused naming each
        field, and no version is created."""
        await create_model(registry.stub)
        sig = signature(input_type=tensor_pb2.DATA_TYPE_INT64)
        sig.inputs[0].allow_non_finite = True
        sig.outputs[0].allow_non_finite = True

        error = await failure(
            registry.stub.CreateModelVersion(stream(upload_requests(tiny_onnx(), sig=sig)))
        )
        listed = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud")
        )

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        by_field = {v.field: v.description for v in error.violations}
        assert by_field == {
            "upload.model_version.signature.inputs[0].allow_non_finite": (
                "only FP32 and FP64 inputs take NaN or inf"
            ),
            "upload.model_version.signature.outputs[0].allow_non_finite": (
                "is for inputs; an output is what it is"
            ),
        }
        assert list(listed.model_versions) == []


class TestDeleteModel:
    async def test_delete_removes_versions_and_unshared_artifacts(
        self, registry: RunningRegistry, registry_settings: RegistrySettings
    ) -> None:
        """Deleting a model drops its versions and its artifact files, except one that another
        model's version shares; it is refused while a deployment references the model."""
        await create_model(registry.stub)
        await create_model(registry.stub, "other")
        shared = tiny_onnx(weight=5.0)
        await upload_version(registry.stub, shared)
        await upload_version(registry.stub, tiny_onnx(weight=6.0))
        await upload_version(registry.stub, shared, parent="models/other")
        await set_traffic(registry.stub, "deployments/fraud", (V1, 100))
        in_use = await failure(
            registry.stub.DeleteModel(pb.DeleteModelRequest(name="models/fraud"))
        )
        assert (in_use.code, in_use.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_IN_USE")
        await set_traffic(registry.stub, "deployments/fraud", ("models/other/versions/1", 100))

        await registry.stub.DeleteModel(pb.DeleteModelRequest(name="models/fraud", reason="gone"))
        missing = await failure(registry.stub.GetModel(pb.GetModelRequest(name="models/fraud")))
        assert missing.code is grpc.StatusCode.NOT_FOUND
        stored = [p.name for p in files_under(registry_settings.artifacts_dir / "sha256")]
        assert stored == [hashlib.sha256(shared).hexdigest()]
        events = await registry.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource="models/fraud", page_size=1)
        )
        assert (events.audit_events[0].action, events.audit_events[0].reason) == (
            "DeleteModel",
            "gone",
        )
        again = await failure(registry.stub.DeleteModel(pb.DeleteModelRequest(name="models/fraud")))
        assert again.code is grpc.StatusCode.NOT_FOUND

    async def test_an_orphan_artifact_is_swept_at_start(self, tmp_path: Path) -> None:
        """An artifact file no version uses (a crash between a delete's commit and its file
        removal) is removed when the registry starts."""
        settings = RegistrySettings(data_dir=tmp_path / "registry")
        async with running(build_server, settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            await create_model(stub)
            kept = await upload_version(stub)
        orphan = settings.artifacts_dir / "sha256" / ("ab" * 32)[:2] / ("ab" * 32)
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"left by a crash")
        async with running(build_server, settings) as (_, _channel, app):
            assert isinstance(app, RegistryApp)
        assert not orphan.exists()
        assert [p.name for p in files_under(settings.artifacts_dir / "sha256")] == [kept.sha256]


class TestDeploymentSettings:
    async def test_inference_hybrid_and_strategy_round_trip(
        self, registry: RunningRegistry
    ) -> None:
        """Per-deployment inference settings, hybrid lookup and strategy are stored with the
        revision; a masked update keeps the fields it does not name."""
        await create_model(registry.stub)
        await upload_version(registry.stub)
        inference = pb.InferenceConfig(
            max_batch_size=64,
            preferred_batch_sizes=[8, 32],
            max_queue_delay_us=100,
            instance_count=2,
            device=pb.DEVICE_GPU,
            gpus=[1, 0],
        )
        hybrid = pb.HybridLookup(
            enabled=True, max_age=duration_pb2.Duration(seconds=3600), entity_type="customer"
        )
        strategy = pb.RolloutStrategy(
            canary=pb.CanaryStrategy(steps=[10, 100], interval=duration_pb2.Duration(seconds=60))
        )
        response = await registry.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(
                    name="deployments/fraud",
                    traffic=[pb.TrafficTarget(model_version=V1, percent=100)],
                    inference=inference,
                    hybrid=hybrid,
                    strategy=strategy,
                ),
                allow_missing=True,
            )
        )
        deployment = response.deployment
        assert (deployment.inference, deployment.hybrid, deployment.strategy) == (
            inference,
            hybrid,
            strategy,
        )
        masked = await registry.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(
                    name="deployments/fraud", inference=pb.InferenceConfig(max_batch_size=8)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["inference"]),
            )
        )
        assert masked.deployment.inference == pb.InferenceConfig(max_batch_size=8)
        assert (masked.deployment.hybrid, masked.deployment.strategy) == (hybrid, strategy)

    async def test_bad_settings_are_refused_naming_each_field(
        self, registry: RunningRegistry
    ) -> None:
        await create_model(registry.stub)
        await upload_version(registry.stub)
        error = await failure(
            _deploy_v1(
                registry,
                inference=pb.InferenceConfig(
                    max_batch_size=16, preferred_batch_sizes=[32], instance_count=99
                ),
                hybrid=pb.HybridLookup(enabled=True),
                strategy=pb.RolloutStrategy(canary=pb.CanaryStrategy(steps=[10, 50])),
            )
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.field for v in error.violations) == [
            "deployment.hybrid.entity_type",
            "deployment.hybrid.max_age",
            "deployment.inference.instance_count",
            "deployment.inference.preferred_batch_sizes[0]",
            "deployment.strategy.canary.interval",
            "deployment.strategy.canary.steps",
        ]
        missing = await failure(
            registry.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        )
        assert missing.code is grpc.StatusCode.NOT_FOUND

    @pytest.mark.parametrize(
        ("inference", "violations"),
        [
            (pb.InferenceConfig(gpus=[0]), {"deployment.inference.gpus": "only for device"}),
            (
                pb.InferenceConfig(device=pb.DEVICE_CPU, gpus=[0]),
                {"deployment.inference.gpus": "only for device"},
            ),
            (
                pb.InferenceConfig(device=pb.DEVICE_GPU, gpus=[0, 64, -1, 0]),
                {
                    "deployment.inference.gpus[1]": "0 to 63",
                    "deployment.inference.gpus[2]": "0 to 63",
                    "deployment.inference.gpus[3]": "repeats GPU 0",
                },
            ),
            (pb.InferenceConfig(device=7), {"deployment.inference.device": "known device"}),  # type: ignore[arg-type]
        ],
    )
    async def test_bad_device_settings_are_refused_naming_the_field(
        self,
        registry: RunningRegistry,
        inference: pb.InferenceConfig,
        violations: dict[str, str],
    ) -> None:
        await create_model(registry.stub)
        await upload_version(registry.stub)
        error = await failure(_deploy_v1(registry, inference=inference))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field: v.description for v in error.violations}.keys() == violations.keys()
        for violation in error.violations:
            assert violations[violation.field] in violation.description

    async def test_deployments_sharing_a_model_agree_on_inference(
        self, registry: RunningRegistry
    ) -> None:
        """A second deployment may not serve the same model with other Triton settings: Triton
        holds one config per model."""
        await create_model(registry.stub)
        await upload_version(registry.stub)
        await upload_version(registry.stub, tiny_onnx(weight=2.0))
        await set_traffic(registry.stub, "deployments/fraud", (V1, 100))
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=pb.Deployment(
                        name="deployments/fraud-eu",
                        traffic=[pb.TrafficTarget(model_version=V2, percent=100)],
                        inference=pb.InferenceConfig(instance_count=4),
                    ),
                    allow_missing=True,
                )
            )
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "INFERENCE_CONFIG_CONFLICT",
        )


def _deploy_v1(registry: RunningRegistry, **settings: Any) -> Awaitable[object]:
    """UpdateDeployment of `deployments/fraud` with all traffic on V1 and `settings`."""
    return registry.stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name="deployments/fraud",
                traffic=[pb.TrafficTarget(model_version=V1, percent=100)],
                **settings,
            ),
            allow_missing=True,
        )
    )


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[AuthRegistry]:
    """A registry with auth and the production traffic rule on, and validation not required
    (the validation path is tested with a real inference service elsewhere)."""
    keys: dict[str, str] = {}
    records = []
    for principal, roles in PRINCIPALS.items():
        keys[principal], record = new_api_key(principal, roles, n=16)
        records.append(record)
    settings = RegistrySettings(
        data_dir=tmp_path / "registry",
        require_validation=False,
        auth=AuthSettings(enabled=True, keys=records),
    )
    async with running(build_server, settings) as (_, channel, _app):
        yield AuthRegistry(pb_grpc.RegistryServiceStub(channel), channel, keys)


class TestProductionTrafficOnly:
    async def test_only_production_versions_take_traffic(self, strict: AuthRegistry) -> None:
        """A STAGING version with a share of traffic is FAILED_PRECONDITION naming it and the
        deployment is not created; once approved into PRODUCTION it may take traffic, and a
        version at 0 % (kept loaded for a rollback) needs no stage."""
        dan = strict.bearer("dan")
        await create_model(strict.stub, metadata=dan)
        await upload_version(strict.stub, metadata=dan)
        await upload_version(strict.stub, tiny_onnx(weight=2.0), metadata=dan)
        await strict.stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(name=V1, stage=pb.STAGE_STAGING), metadata=dan
        )
        error = await failure(
            set_traffic(strict.stub, "deployments/fraud", (V1, 100), metadata=dan)
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOT_IN_PRODUCTION",
        )
        assert (error.metadata["name"], error.metadata["stage"]) == (V1, "STAGING")
        assert error.metadata["unmet_condition"] == "traffic only to PRODUCTION versions"
        missing = await failure(
            strict.stub.GetDeployment(
                pb.GetDeploymentRequest(name="deployments/fraud"), metadata=dan
            )
        )
        assert missing.code is grpc.StatusCode.NOT_FOUND

        await strict.stub.ApproveModelVersion(
            pb.ApproveModelVersionRequest(name=V1), metadata=strict.bearer("april")
        )
        await strict.stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(name=V1, stage=pb.STAGE_PRODUCTION), metadata=dan
        )
        deployed = await set_traffic(
            strict.stub, "deployments/fraud", (V1, 100), (V2, 0), metadata=dan
        )
        assert {t.model_version: t.percent for t in deployed.traffic} == {V1: 100, V2: 0}
        canary = await failure(
            set_traffic(strict.stub, "deployments/fraud", (V1, 90), (V2, 10), metadata=dan)
        )
        assert (canary.reason, canary.metadata["name"]) == ("NOT_IN_PRODUCTION", V2)

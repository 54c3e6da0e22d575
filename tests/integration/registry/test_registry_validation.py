"""Validation runs through a real inference service on a real Triton: the smoke test, the
regression test against the PRODUCTION version, and PRODUCTION refused without a pass."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from registry_testing import PRINCIPALS, failure, stream
from support import eventually, running

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.stack import free_port
from modelserve_demo import fraud
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_runtime.auth import AuthSettings, new_api_key
from modelserve_runtime.config import ServerSettings
from modelserve_runtime.convert import TRITON_NAMES, numpy_to_tensor

V1, V2, V3 = (f"models/fraud/versions/{n}" for n in (1, 2, 3))
#: Loading into Triton and scoring a few hundred rows: generous on a loaded 2-core machine.
VALIDATE_TIMEOUT_S = 180.0
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}


def _spec(spec: object) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,  # type: ignore[attr-defined]
        datatype=_DATATYPES[spec.datatype],  # type: ignore[attr-defined]
        shape=spec.shape,  # type: ignore[attr-defined]
    )


@dataclass
class Validating:
    """A registry that validates through a real inference service, with keys per principal."""

    stub: pb_grpc.RegistryServiceAsyncStub
    inference: inference_grpc.InferenceServiceAsyncStub
    keys: dict[str, str]

    def bearer(self, principal: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[principal]}"),)

    async def validate(self, name: str) -> pb.ValidationRun:
        response = await self.stub.ValidateModelVersion(
            pb.ValidateModelVersionRequest(name=name, reason="pre-release"),
            metadata=self.bearer("dan"),
            timeout=VALIDATE_TIMEOUT_S,
        )
        return response.validation

    async def to_staging_approved(self, name: str) -> None:
        version = await self.stub.GetModelVersion(
            pb.GetModelVersionRequest(name=name), metadata=self.bearer("dan")
        )
        if version.model_version.stage == pb.STAGE_DEVELOPMENT:
            await self.stub.TransitionModelVersionStage(
                pb.TransitionModelVersionStageRequest(name=name, stage=pb.STAGE_STAGING),
                metadata=self.bearer("dan"),
            )
        await self.stub.ApproveModelVersion(
            pb.ApproveModelVersionRequest(name=name), metadata=self.bearer("april")
        )

    async def promote(self, name: str) -> pb.ModelVersion:
        response = await self.stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(name=name, stage=pb.STAGE_PRODUCTION),
            metadata=self.bearer("dan"),
        )
        return response.model_version


@pytest.fixture(scope="module")
async def validating(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Validating]:
    """Registry (auth on, validation required) and inference (its own Triton) wired to each
    other; `models/fraud` has a validation set and three versions: v1 and v2 trained on
    different seeds, v3 trained on shuffled labels."""
    keys: dict[str, str] = {}
    records = []
    for principal, roles in PRINCIPALS.items():
        keys[principal], record = new_api_key(principal, roles, n=16)
        records.append(record)
    inference_port = free_port()
    data_dir: Path = tmp_path_factory.mktemp("registry")
    settings = RegistrySettings(
        data_dir=data_dir,
        inference_target=f"127.0.0.1:{inference_port}",
        auth=AuthSettings(enabled=True, keys=records),
        validation_tolerance=0.02,
    )
    async with running(registry_server.build_server, settings) as (registry, channel, _):
        stub = pb_grpc.RegistryServiceStub(channel)
        admin = (("authorization", f"Bearer {keys['ada']}"),)
        features, labels = fraud.make_dataset(400, seed=11)
        await stub.CreateModel(
            pb.CreateModelRequest(
                model_id="fraud",
                model=pb.Model(
                    validation_set=pb.ValidationSet(
                        inputs=[numpy_to_tensor("features", features)],
                        labels=numpy_to_tensor("labels", labels),
                        output="probabilities",
                        metric=pb.VALIDATION_METRIC_ROC_AUC,
                    )
                ),
            ),
            metadata=admin,
        )
        samples = [numpy_to_tensor("features", fraud.make_dataset(4, seed=5)[0])]
        for trained in (
            fraud.train(seed=0, n=3000),
            fraud.train(seed=1, n=3000),
            fraud.train(seed=2, n=3000, shuffle_labels=True),
        ):
            upload = pb.ModelVersionUpload(
                parent="models/fraud",
                model_version=pb.ModelVersion(
                    format=pb.ARTIFACT_FORMAT_ONNX,
                    signature=pb.Signature(
                        inputs=[_spec(s) for s in trained.inputs],
                        outputs=[_spec(s) for s in trained.outputs],
                    ),
                    sample_inputs=samples,
                ),
                sha256=hashlib.sha256(trained.onnx_bytes).hexdigest(),
            )
            requests = [pb.CreateModelVersionRequest(upload=upload)] + [
                pb.CreateModelVersionRequest(chunk=trained.onnx_bytes[i : i + 65536])
                for i in range(0, len(trained.onnx_bytes), 65536)
            ]
            await stub.CreateModelVersion(stream(requests), metadata=admin)
        inference_settings = InferenceSettings(
            server=ServerSettings(port=inference_port),
            triton_mode="local",
            triton_work_dir=tmp_path_factory.mktemp("triton"),
            registry_target=f"127.0.0.1:{registry.port}",
            registry_api_key=keys["vera"],
            triton_poll_interval_s=0.1,
        )
        async with running(inference_server.build_server, inference_settings) as (
            _,
            inference_channel,
            _,
        ):
            yield Validating(stub, inference_grpc.InferenceServiceStub(inference_channel), keys)


async def _held(validating: Validating) -> set[str]:
    response = await validating.inference.ListModelVersions(inference_pb.ListModelVersionsRequest())
    return {v.name for v in response.model_versions}


class TestValidation:
    async def test_production_needs_a_passing_run_and_the_first_has_no_baseline(
        self, validating: Validating
    ) -> None:
        """An approved version without a validation run is refused PRODUCTION; its run loads
        it, answers its sample inputs, scores the validation set with nothing to compare to,
        passes, is recorded and audited, and the version may then be promoted."""
        await validating.to_staging_approved(V1)
        refused = await failure(validating.promote(V1))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "VALIDATION_REQUIRED",
        )
        assert "never been validated" in refused.message

        run = await validating.validate(V1)
        assert (run.state, run.smoke_passed) == (pb.VALIDATION_STATE_PASSED, True)
        assert run.metric == pb.VALIDATION_METRIC_ROC_AUC
        assert run.candidate_score > 0.75
        assert run.baseline_version == ""
        assert "smoke test passed on 4 sample rows" in run.reason
        assert run.principal == "dan"
        version = await validating.stub.GetModelVersion(
            pb.GetModelVersionRequest(name=V1), metadata=validating.bearer("vera")
        )
        assert version.model_version.validation == run
        promoted = await validating.promote(V1)
        assert promoted.stage == pb.STAGE_PRODUCTION
        # Loaded only for the run, the version is unloaded afterwards.
        await eventually(lambda: _not_held(validating, V1), f"{V1} unloaded after its run")

    async def test_a_worse_version_fails_the_regression_test(self, validating: Validating) -> None:
        """A version trained on shuffled labels scores far below the PRODUCTION version: the
        run FAILS naming both scores, is audited, and PRODUCTION stays closed to it; a
        comparable retrain passes against the same baseline."""
        worse = await validating.validate(V3)
        assert (worse.state, worse.smoke_passed) == (pb.VALIDATION_STATE_FAILED, True)
        assert worse.baseline_version == V1
        assert worse.candidate_score < worse.baseline_score - 0.02
        assert worse.reason.startswith("regression test: worse by")
        await validating.to_staging_approved(V3)
        refused = await failure(validating.promote(V3))
        assert refused.reason == "VALIDATION_REQUIRED"
        assert "latest validation run failed: regression test" in refused.message
        events = await validating.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource=V3), metadata=validating.bearer("vera")
        )
        runs = [e for e in events.audit_events if e.action == "ValidateModelVersion"]
        assert runs and runs[0].details["validation"] == "VALIDATION_STATE_FAILED"
        assert runs[0].details["baseline_version"] == V1

        comparable = await validating.validate(V2)
        assert comparable.state == pb.VALIDATION_STATE_PASSED, comparable.reason
        assert comparable.baseline_version == V1
        assert np.isclose(comparable.baseline_score, worse.baseline_score)


async def _not_held(validating: Validating, name: str) -> bool:
    return name not in await _held(validating)

"""RegistryService through a real gRPC server and channel, on real SQLite and real files."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from google.protobuf import field_mask_pb2
from registry_testing import (
    RunningRegistry,
    files_under,
    signature,
    stream,
    tiny_onnx,
    upload_requests,
)
from support import running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server
from modelserve_runtime.errors import DecodedError, decode_rpc_error

DOMAIN = "registry.modelserve"


async def create_model(stub: pb_grpc.RegistryServiceAsyncStub, model_id: str = "fraud") -> pb.Model:
    response = await stub.CreateModel(
        pb.CreateModelRequest(model_id=model_id, model=pb.Model(description="card fraud"))
    )
    return response.model


async def upload(
    stub: pb_grpc.RegistryServiceAsyncStub,
    data: bytes,
    *,
    parent: str = "models/fraud",
    sha256: str | None = None,
    chunk_bytes: int = 64,
    sig: pb.Signature | None = None,
) -> pb.ModelVersion:
    requests = upload_requests(data, parent=parent, sha256=sha256, chunk_bytes=chunk_bytes, sig=sig)
    return (await stub.CreateModelVersion(stream(requests))).model_version


async def failure(call: Awaitable[object]) -> DecodedError:
    """The decoded error of a call that must fail, checked to come from the registry."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    # The code and message too: a full run once saw an upload refusal arrive without the
    # registry's details (1 in 1,151 tests), and they say where such a status came from.
    assert error.domain == DOMAIN, (error.code, error.message, info.value.debug_error_string())
    return error


def deployment(name: str, *targets: tuple[str, int]) -> pb.Deployment:
    return pb.Deployment(
        name=name,
        traffic=[pb.TrafficTarget(model_version=v, percent=p) for v, p in targets],
    )


class TestCreateModel:
    async def test_creates_model(self, registry: RunningRegistry) -> None:
        """A created model comes back with its name, description and creation time."""
        model = await create_model(registry.stub)
        assert model.name == "models/fraud"
        assert model.description == "card fraud"
        assert model.create_time.seconds > 0

    async def test_duplicate_is_already_exists(self, registry: RunningRegistry) -> None:
        """Creating a model twice answers ALREADY_EXISTS."""
        await create_model(registry.stub)
        error = await failure(create_model(registry.stub))
        assert error.code is grpc.StatusCode.ALREADY_EXISTS
        assert error.reason == "MODEL_ALREADY_EXISTS"
        assert error.metadata == {"name": "models/fraud"}

    @pytest.mark.parametrize("model_id", ["", "Fraud", "1fraud", "fraud_v2", "a" * 64, "fraud\n"])
    async def test_bad_model_id_is_field_violation(
        self, registry: RunningRegistry, model_id: str
    ) -> None:
        """A model id outside `[a-z][a-z0-9-]{0,62}` is INVALID_ARGUMENT naming `model_id`."""
        error = await failure(create_model(registry.stub, model_id))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "INVALID_ARGUMENT"
        assert [v.field for v in error.violations] == ["model_id"]


class TestCreateModelVersion:
    async def test_upload_in_chunks_is_version_one(self, registry: RunningRegistry) -> None:
        """An upload in many chunks records version 1 with the artifact's digest and size."""
        await create_model(registry.stub)
        data = tiny_onnx()
        requests = upload_requests(data, chunk_bytes=50, description="first")
        assert len(requests) > 3
        version = (await registry.stub.CreateModelVersion(stream(requests))).model_version
        assert version.name == "models/fraud/versions/1"
        assert version.description == "first"
        assert version.format == pb.ARTIFACT_FORMAT_ONNX
        assert version.signature == signature()
        assert version.sha256 == hashlib.sha256(data).hexdigest()
        assert version.size_bytes == len(data)
        assert version.create_time.seconds > 0
        stored = Path(urlparse(version.artifact_uri).path)
        assert await asyncio.to_thread(stored.read_bytes) == data
        assert stored.parts[-3:] == ("sha256", version.sha256[:2], version.sha256)
        assert await registry.stub.GetModelVersion(
            pb.GetModelVersionRequest(name=version.name)
        ) == pb.GetModelVersionResponse(model_version=version)

    async def test_identical_bytes_reuse_the_artifact(self, registry: RunningRegistry) -> None:
        """A second upload is version 2; identical bytes share one artifact file."""
        await create_model(registry.stub)
        data = tiny_onnx()
        first = await upload(registry.stub, data)
        second = await upload(registry.stub, data, chunk_bytes=1000)
        assert second.name == "models/fraud/versions/2"
        assert second.artifact_uri == first.artifact_uri
        assert files_under(registry.settings.artifacts_dir) == [
            Path(urlparse(first.artifact_uri).path)
        ]
        third = await upload(registry.stub, tiny_onnx(weight=2.0))
        assert third.name == "models/fraud/versions/3"
        assert third.artifact_uri != first.artifact_uri
        assert len(files_under(registry.settings.artifacts_dir)) == 2

    async def test_sha256_mismatch_records_nothing(self, registry: RunningRegistry) -> None:
        """Bytes whose digest differs from the declared one are refused, and leave no row and no file."""
        await create_model(registry.stub)
        data = tiny_onnx()
        declared = hashlib.sha256(b"something else").hexdigest()
        error = await failure(upload(registry.stub, data, sha256=declared))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "SHA256_MISMATCH"
        assert error.metadata == {"expected": declared, "actual": hashlib.sha256(data).hexdigest()}
        assert [v.field for v in error.violations] == ["upload.sha256"]
        await self._assert_nothing_recorded(registry)

    async def test_signature_that_differs_from_the_graph_is_refused(
        self, registry: RunningRegistry
    ) -> None:
        """A signature whose input names differ from the graph's is refused, naming both tensors."""
        await create_model(registry.stub)
        error = await failure(
            upload(registry.stub, tiny_onnx(), sig=signature(input_name="inputs"))
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "SIGNATURE_MISMATCH"
        [violation] = error.violations
        assert violation.field == "upload.model_version.signature.inputs"
        assert "declared but not in the graph: inputs" in violation.description
        assert "in the graph but not declared: features" in violation.description
        await self._assert_nothing_recorded(registry)

    async def test_datatype_that_differs_from_the_graph_is_refused(
        self, registry: RunningRegistry
    ) -> None:
        """A declared data type that is not the graph's is refused, naming the tensor."""
        await create_model(registry.stub)
        sig = signature(input_type=tensor_pb2.DATA_TYPE_FP64)
        error = await failure(upload(registry.stub, tiny_onnx(), sig=sig))
        assert error.reason == "SIGNATURE_MISMATCH"
        [violation] = error.violations
        assert violation.field == "upload.model_version.signature.inputs[0].datatype"
        assert violation.description.startswith("features:")

    async def test_garbage_bytes_are_refused(self, registry: RunningRegistry) -> None:
        """Bytes that are not an ONNX model are refused and leave nothing behind."""
        await create_model(registry.stub)
        error = await failure(upload(registry.stub, b"\x00not an onnx model at all" * 10))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "INVALID_ONNX"
        assert [v.field for v in error.violations] == ["chunk"]
        await self._assert_nothing_recorded(registry)

    async def test_oversized_upload_stops_at_the_limit(self, tmp_path: Path) -> None:
        """Past max_artifact_bytes the upload ends RESOURCE_EXHAUSTED at once, not after the stream."""
        settings = RegistrySettings(
            production_traffic_only=False, data_dir=tmp_path, max_artifact_bytes=1000
        )
        total = 20_000
        sent = 0

        async def huge() -> AsyncIterator[pb.CreateModelVersionRequest]:
            # 6 MB in all: the client stops being asked for more once the server has answered.
            nonlocal sent
            yield upload_requests(b"")[0]
            for _ in range(total):
                sent += 1
                yield pb.CreateModelVersionRequest(chunk=b"x" * 300)

        async with running(build_server, settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            await create_model(stub)
            error = await failure(stub.CreateModelVersion(huge(), timeout=30))
            versions = await stub.ListModelVersions(
                pb.ListModelVersionsRequest(parent="models/fraud")
            )
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "ARTIFACT_TOO_LARGE"
        assert error.metadata == {"max_artifact_bytes": "1000"}
        assert sent < total
        assert list(versions.model_versions) == []
        assert files_under(settings.artifacts_dir) == []

    async def test_first_message_must_be_the_metadata(self, registry: RunningRegistry) -> None:
        """An upload that starts with a chunk is refused, naming `upload`."""
        await create_model(registry.stub)
        data = tiny_onnx()
        requests = upload_requests(data)
        error = await failure(registry.stub.CreateModelVersion(stream([requests[1], *requests])))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["upload"]
        await self._assert_nothing_recorded(registry)

    async def test_metadata_only_in_the_first_message(self, registry: RunningRegistry) -> None:
        """A second metadata message in the stream is refused, naming `upload`."""
        await create_model(registry.stub)
        requests = upload_requests(tiny_onnx())
        error = await failure(registry.stub.CreateModelVersion(stream([*requests, requests[0]])))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["upload"]
        await self._assert_nothing_recorded(registry)

    async def test_a_refused_large_upload_gets_its_refusal(self, registry: RunningRegistry) -> None:
        """Refused for what its first message says while the client still writes megabytes:
        the refusal reaches the client each time. Answered at once, grpcio's asyncio client
        reported INTERNAL "Internal error from Core" in about 3 of 100 such calls."""
        await create_model(registry.stub)
        missing = upload_requests(b"x" * (12 << 20), parent="models/missing", chunk_bytes=3 << 20)
        bad_first = [missing[1], *missing]
        for attempt in range(200):
            requests = missing if attempt % 2 else bad_first
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await registry.stub.CreateModelVersion(stream(requests), timeout=30)
            expected = (
                grpc.StatusCode.NOT_FOUND if attempt % 2 else grpc.StatusCode.INVALID_ARGUMENT
            )
            assert info.value.code() is expected, (attempt, info.value.details())
        await self._assert_nothing_recorded(registry)

    async def test_empty_stream_is_refused(self, registry: RunningRegistry) -> None:
        """An upload with no message at all is refused, naming `upload`."""
        error = await failure(registry.stub.CreateModelVersion(stream([])))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["upload"]

    async def test_bad_metadata_names_every_field(self, registry: RunningRegistry) -> None:
        """Metadata with several bad fields is refused with one violation per field."""
        await create_model(registry.stub)
        bad_signature = pb.Signature(
            inputs=[tensor_pb2.TensorSpec(name="features", shape=[-1, 0])],
            feature_refs=["customer:age", "no_entity"],
        )
        request = pb.CreateModelVersionRequest(
            upload=pb.ModelVersionUpload(
                parent="models/Fraud",
                model_version=pb.ModelVersion(signature=bad_signature),
                sha256="AB" * 32,
            )
        )
        error = await failure(registry.stub.CreateModelVersion(stream([request])))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == [
            "upload.parent",
            "upload.sha256",
            "upload.model_version.format",
            "upload.model_version.signature.inputs[0].datatype",
            "upload.model_version.signature.inputs[0].shape",
            "upload.model_version.signature.outputs",
            "upload.model_version.signature.feature_refs[1]",
            "upload.model_version.signature.feature_refs",
        ]

    async def test_unknown_model_is_not_found(self, registry: RunningRegistry) -> None:
        """Uploading to a model that does not exist answers NOT_FOUND naming it."""
        error = await failure(upload(registry.stub, tiny_onnx(), parent="models/nope"))
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "MODEL_NOT_FOUND"
        assert error.metadata == {"name": "models/nope"}

    @staticmethod
    async def _assert_nothing_recorded(registry: RunningRegistry) -> None:
        versions = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud")
        )
        assert list(versions.model_versions) == []
        assert files_under(registry.settings.artifacts_dir) == []


class TestReadAndListVersions:
    async def test_read_artifact_returns_the_exact_bytes(self, registry: RunningRegistry) -> None:
        """The artifact streams back byte for byte, in chunks of read_chunk_bytes."""
        await create_model(registry.stub)
        data = tiny_onnx()
        version = await upload(registry.stub, data)
        chunks = [
            response.chunk
            async for response in registry.stub.ReadModelVersionArtifact(
                pb.ReadModelVersionArtifactRequest(name=version.name)
            )
        ]
        assert b"".join(chunks) == data
        assert len(chunks) == -(-len(data) // registry.settings.read_chunk_bytes)
        assert all(len(c) == registry.settings.read_chunk_bytes for c in chunks[:-1])

    async def test_read_artifact_of_unknown_version_is_not_found(
        self, registry: RunningRegistry
    ) -> None:
        """Reading the artifact of a version that does not exist answers NOT_FOUND."""
        await create_model(registry.stub)
        call = registry.stub.ReadModelVersionArtifact(
            pb.ReadModelVersionArtifactRequest(name="models/fraud/versions/1")
        )

        async def drain() -> None:
            async for _ in call:
                pass

        error = await failure(drain())
        assert error.code is grpc.StatusCode.NOT_FOUND

    async def test_corrupted_artifact_fails_the_read(self, registry: RunningRegistry) -> None:
        """An artifact changed on disk after upload fails the read instead of passing as valid."""
        await create_model(registry.stub)
        data = tiny_onnx()
        version = await upload(registry.stub, data)
        stored = Path(urlparse(version.artifact_uri).path)
        await asyncio.to_thread(stored.write_bytes, data[:-1] + b"\x00")
        call = registry.stub.ReadModelVersionArtifact(
            pb.ReadModelVersionArtifactRequest(name=version.name)
        )

        async def drain() -> None:
            async for _ in call:
                pass

        error = await failure(drain())
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "ARTIFACT_CORRUPT"

    async def test_unknown_version_is_not_found(self, registry: RunningRegistry) -> None:
        """GetModelVersion of a version that does not exist answers NOT_FOUND naming it."""
        await create_model(registry.stub)
        error = await failure(
            registry.stub.GetModelVersion(pb.GetModelVersionRequest(name="models/fraud/versions/7"))
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "MODEL_VERSION_NOT_FOUND"
        assert error.metadata == {"name": "models/fraud/versions/7"}

    @pytest.mark.parametrize(
        "name",
        [
            "models/fraud/versions/0",
            "models/fraud/versions/x",
            "models/fraud",
            "fraud/versions/1",
            "models/fraud/versions/1/",
            "models/fraud/versions/01",
        ],
    )
    async def test_malformed_version_name_is_invalid(
        self, registry: RunningRegistry, name: str
    ) -> None:
        """A name that is not exactly models/{model}/versions/{n>=1} is INVALID_ARGUMENT on `name`."""
        error = await failure(registry.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["name"]

    async def test_list_is_newest_first_in_pages(self, registry: RunningRegistry) -> None:
        """Versions list newest first; page tokens walk every version exactly once."""
        await create_model(registry.stub)
        data = tiny_onnx()
        for _ in range(5):
            await upload(registry.stub, data, chunk_bytes=4096)
        pages: list[list[str]] = []
        token = ""
        while True:
            response = await registry.stub.ListModelVersions(
                pb.ListModelVersionsRequest(parent="models/fraud", page_size=2, page_token=token)
            )
            pages.append([v.name.rsplit("/", 1)[1] for v in response.model_versions])
            token = response.next_page_token
            if not token:
                break
        assert pages == [["5", "4"], ["3", "2"], ["1"]]
        everything = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud")
        )
        assert everything.model_versions[0].name == "models/fraud/versions/5"
        assert everything.next_page_token == ""
        exact = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud", page_size=5)
        )
        assert (len(exact.model_versions), exact.next_page_token) == (5, "")

    async def test_bad_page_token_is_invalid(self, registry: RunningRegistry) -> None:
        """A page token that no earlier call returned for this parent is INVALID_ARGUMENT."""
        await create_model(registry.stub)
        await create_model(registry.stub, "churn")
        for _ in range(2):
            await upload(registry.stub, tiny_onnx(), chunk_bytes=4096)
        page = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud", page_size=1)
        )
        assert page.next_page_token
        for token in ["not base64!", "MTI=", page.next_page_token]:
            error = await failure(
                registry.stub.ListModelVersions(
                    pb.ListModelVersionsRequest(parent="models/churn", page_token=token)
                )
            )
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in error.violations] == ["page_token"]

    async def test_list_of_unknown_model_is_not_found(self, registry: RunningRegistry) -> None:
        """Listing the versions of a model that does not exist answers NOT_FOUND."""
        error = await failure(
            registry.stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/nope"))
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "MODEL_NOT_FOUND"


class TestDeployments:
    @staticmethod
    async def two_versions(registry: RunningRegistry) -> None:
        await create_model(registry.stub)
        await upload(registry.stub, tiny_onnx())
        await upload(registry.stub, tiny_onnx(weight=3.0))

    async def test_create_with_allow_missing_then_get(self, registry: RunningRegistry) -> None:
        """allow_missing creates the deployment at revision 1, and GetDeployment returns it."""
        await self.two_versions(registry)
        created = (
            await registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment("deployments/fraud", ("models/fraud/versions/1", 100)),
                    allow_missing=True,
                )
            )
        ).deployment
        assert created.name == "deployments/fraud"
        assert created.revision == 1
        assert [(t.model_version, t.percent) for t in created.traffic] == [
            ("models/fraud/versions/1", 100)
        ]
        assert created.update_time.seconds > 0
        got = await registry.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert got.deployment == created

    async def test_every_change_is_a_new_revision(self, registry: RunningRegistry) -> None:
        """Changing the traffic bumps the revision; setting the same traffic again does not."""
        await self.two_versions(registry)
        stub = registry.stub
        await stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=deployment("deployments/fraud", ("models/fraud/versions/1", 100)),
                allow_missing=True,
            )
        )
        canary = deployment(
            "deployments/fraud", ("models/fraud/versions/1", 90), ("models/fraud/versions/2", 10)
        )
        changed = (
            await stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=canary, update_mask=field_mask_pb2.FieldMask(paths=["traffic"])
                )
            )
        ).deployment
        assert changed.revision == 2
        assert [(t.model_version, t.percent) for t in changed.traffic] == [
            ("models/fraud/versions/1", 90),
            ("models/fraud/versions/2", 10),
        ]
        reordered = deployment(
            "deployments/fraud", ("models/fraud/versions/2", 10), ("models/fraud/versions/1", 90)
        )
        same = (
            await stub.UpdateDeployment(pb.UpdateDeploymentRequest(deployment=reordered))
        ).deployment
        assert same == changed
        flipped = deployment("deployments/fraud", ("models/fraud/versions/2", 100))
        assert (
            await stub.UpdateDeployment(pb.UpdateDeploymentRequest(deployment=flipped))
        ).deployment.revision == 3

    @pytest.mark.parametrize(
        ("targets", "fields"),
        [
            (
                [("models/fraud/versions/1", 50), ("models/fraud/versions/2", 40)],
                ["deployment.traffic"],
            ),
            ([], ["deployment.traffic"]),
            (
                [("models/fraud/versions/1", 120), ("models/fraud/versions/2", -20)],
                ["deployment.traffic[0].percent", "deployment.traffic[1].percent"],
            ),
            (
                [("models/fraud/versions/1", 50), ("models/fraud/versions/1", 50)],
                ["deployment.traffic[1].model_version"],
            ),
            ([("fraud/1", 100)], ["deployment.traffic[0].model_version"]),
        ],
    )
    async def test_bad_traffic_is_field_violation(
        self, registry: RunningRegistry, targets: list[tuple[str, int]], fields: list[str]
    ) -> None:
        """Percents outside 0-100, not adding up to 100, or a version targeted twice are refused."""
        await self.two_versions(registry)
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment("deployments/fraud", *targets), allow_missing=True
                )
            )
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == fields
        missing = await failure(
            registry.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        )
        assert missing.code is grpc.StatusCode.NOT_FOUND

    async def test_unknown_version_is_not_found(self, registry: RunningRegistry) -> None:
        """A target version that does not exist answers NOT_FOUND naming it."""
        await self.two_versions(registry)
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment(
                        "deployments/fraud",
                        ("models/fraud/versions/1", 50),
                        ("models/fraud/versions/9", 50),
                    ),
                    allow_missing=True,
                )
            )
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "MODEL_VERSION_NOT_FOUND"
        assert error.metadata == {"name": "models/fraud/versions/9"}

    async def test_missing_deployment_without_allow_missing_is_not_found(
        self, registry: RunningRegistry
    ) -> None:
        """Updating a deployment that does not exist, without allow_missing, answers NOT_FOUND."""
        await self.two_versions(registry)
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment("deployments/fraud", ("models/fraud/versions/1", 100))
                )
            )
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "DEPLOYMENT_NOT_FOUND"
        assert error.metadata == {"name": "deployments/fraud"}
        error = await failure(
            registry.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        )
        assert error.code is grpc.StatusCode.NOT_FOUND

    @pytest.mark.parametrize("path", ["traffik", "revision"])
    async def test_bad_mask_path_is_invalid(self, registry: RunningRegistry, path: str) -> None:
        """An update_mask path that is not a writable Deployment field is INVALID_ARGUMENT."""
        await self.two_versions(registry)
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment("deployments/fraud", ("models/fraud/versions/1", 100)),
                    update_mask=field_mask_pb2.FieldMask(paths=["traffic", path]),
                    allow_missing=True,
                )
            )
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["update_mask"]

    async def test_bad_deployment_name_is_invalid(self, registry: RunningRegistry) -> None:
        """A deployment name that is not deployments/{id} is INVALID_ARGUMENT on its field."""
        error = await failure(
            registry.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/Fraud"))
        )
        assert [v.field for v in error.violations] == ["name"]
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(deployment=deployment("fraud", ("x", 100)))
            )
        )
        assert [v.field for v in error.violations] == [
            "deployment.name",
            "deployment.traffic[0].model_version",
        ]


class TestRestart:
    async def test_data_survives_a_restart(self, registry_settings: RegistrySettings) -> None:
        """Models, versions, artifacts and deployments are all there after a restart."""
        data = tiny_onnx()
        async with running(build_server, registry_settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            await create_model(stub)
            first = await upload(stub, data)
            before = (
                await stub.UpdateDeployment(
                    pb.UpdateDeploymentRequest(
                        deployment=deployment("deployments/fraud", (first.name, 100)),
                        allow_missing=True,
                    )
                )
            ).deployment
        async with running(build_server, registry_settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            got = await stub.GetModelVersion(pb.GetModelVersionRequest(name=first.name))
            assert got.model_version == first
            chunks = [
                r.chunk
                async for r in stub.ReadModelVersionArtifact(
                    pb.ReadModelVersionArtifactRequest(name=first.name)
                )
            ]
            assert b"".join(chunks) == data
            after = await stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
            assert after.deployment == before
            second = await upload(stub, data)
            assert second.name == "models/fraud/versions/2"
            assert (await failure(create_model(stub))).code is grpc.StatusCode.ALREADY_EXISTS

    async def test_unfinished_uploads_are_swept_at_start(
        self, registry_settings: RegistrySettings
    ) -> None:
        """Temp files that a crashed upload left behind are removed when the service starts."""
        leftover = registry_settings.artifacts_dir / "tmp" / "0123abcd.partial"
        leftover.parent.mkdir(parents=True)
        leftover.write_bytes(b"half an upload")
        async with running(build_server, registry_settings):
            assert files_under(registry_settings.artifacts_dir) == []

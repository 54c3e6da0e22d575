"""What the reconcile loop wants from the deployments it has seen: which versions, and with
which Triton config per model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_inference.models import ModelVersions, ServingConfig
from modelserve_inference.reconcile import DeploymentNeeds, Reconciler
from modelserve_inference.registry_source import (
    RegistryArtifactSource,
    RegistryDeploymentFeed,
    deployment_needs,
    serving_config,
)
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryClient
from modelserve_triton.runner import TritonRunner

DEFAULTS = ServingConfig(max_batch_size=256, max_queue_delay_us=0, max_queue_size=32)


@pytest.fixture
async def reconciler() -> AsyncIterator[Reconciler]:
    """A reconcile loop that is never started: its clients point nowhere and are never called."""
    channel = create_channel("127.0.0.1:1")
    registry = RegistryClient(channel)
    triton = TritonRunner("127.0.0.1:1")
    versions = ModelVersions(
        RegistryArtifactSource(registry),
        triton,
        triton_endpoint="127.0.0.1:1",
        max_batch_size=256,
        max_queue_delay_us=0,
        infer_timeout_s=1,
        load_timeout_s=1,
    )
    yield Reconciler(
        versions,
        RegistryDeploymentFeed(registry, versions.default_config, timeout_s=1),
        unload_grace_s=1,
        max_concurrent_loads=1,
        retry_initial_s=1,
        retry_max_s=1,
        watch_backoff_max_s=1,
    )
    await triton.close()
    await channel.close()


def _needs(name: str, *versions: str, instances: int = 1, revision: int = 1) -> DeploymentNeeds:
    return DeploymentNeeds(
        name, revision, versions, ServingConfig(instance_count=instances, max_batch_size=256)
    )


class TestDeploymentNeeds:
    def test_traffic_targets_at_any_percent_shadows_and_the_fallback_are_needed(self) -> None:
        """Every version a deployment names is needed once, a 0 percent target included."""
        deployment = registry_pb.Deployment(
            name="deployments/fraud",
            revision=3,
            traffic=[
                registry_pb.TrafficTarget(model_version="models/fraud/versions/1", percent=100),
                registry_pb.TrafficTarget(model_version="models/fraud/versions/2", percent=0),
            ],
            shadow=["models/fraud/versions/3"],
            fallback_version="models/fraud/versions/1",
        )

        needs = deployment_needs(deployment, DEFAULTS)

        assert needs.name == "deployments/fraud"
        assert needs.revision == 3
        assert needs.versions == (
            "models/fraud/versions/1",
            "models/fraud/versions/2",
            "models/fraud/versions/3",
        )
        assert needs.config == DEFAULTS

    def test_a_malformed_version_name_is_left_out(self) -> None:
        """A name that is no version name cannot be loaded and is skipped with a warning."""
        deployment = registry_pb.Deployment(
            name="deployments/fraud",
            traffic=[registry_pb.TrafficTarget(model_version="fraud:1", percent=100)],
        )

        with capture_logs() as logs:
            needs = deployment_needs(deployment, DEFAULTS)

        assert needs.versions == ()
        assert [e["event"] for e in logs] == ["deployment_version_malformed"]


class TestServingConfig:
    def test_zero_fields_keep_the_service_defaults(self) -> None:
        """An empty InferenceConfig is the service's defaults (one instance, python backend)."""
        assert serving_config(registry_pb.InferenceConfig(), DEFAULTS) == DEFAULTS

    def test_set_fields_win(self) -> None:
        """Each set field replaces its default; the queue bound stays the service's."""
        config = registry_pb.InferenceConfig(
            backend=registry_pb.BACKEND_ONNXRUNTIME,
            max_batch_size=8,
            preferred_batch_sizes=[2, 4],
            max_queue_delay_us=100,
            instance_count=3,
        )

        assert serving_config(config, DEFAULTS) == ServingConfig(
            backend="onnxruntime",
            max_batch_size=8,
            preferred_batch_sizes=(2, 4),
            max_queue_delay_us=100,
            max_queue_size=32,
            instance_count=3,
        )

    def test_an_explicit_zero_queue_delay_is_not_the_default(self) -> None:
        """max_queue_delay_us is optional: set to 0 it overrides a non-zero default."""
        defaults = ServingConfig(max_queue_delay_us=500)

        explicit = serving_config(registry_pb.InferenceConfig(max_queue_delay_us=0), defaults)
        unset = serving_config(registry_pb.InferenceConfig(), defaults)

        assert (explicit.max_queue_delay_us, unset.max_queue_delay_us) == (0, 500)

    def test_device_and_gpus_come_together(self) -> None:
        """A deployment that names a device brings its own GPUs (none: every GPU); one that
        names none keeps the service's device and GPUs."""
        defaults = ServingConfig(device="gpu", gpus=(2,))
        gpu = registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU, gpus=[0, 1])
        every_gpu = registry_pb.InferenceConfig(device=registry_pb.DEVICE_GPU)
        cpu = registry_pb.InferenceConfig(device=registry_pb.DEVICE_CPU)

        assert (serving_config(gpu, DEFAULTS).device, serving_config(gpu, DEFAULTS).gpus) == (
            "gpu",
            (0, 1),
        )
        assert serving_config(every_gpu, defaults).gpus == ()
        assert (serving_config(cpu, defaults).device, serving_config(cpu, defaults).gpus) == (
            "cpu",
            (),
        )
        unset = serving_config(registry_pb.InferenceConfig(), defaults)
        assert (unset.device, unset.gpus) == ("gpu", (2,))

    def test_the_python_backend_by_name(self) -> None:
        """BACKEND_PYTHON_ONNXRUNTIME is the python backend whatever the default."""
        defaults = ServingConfig(backend="onnxruntime")
        config = registry_pb.InferenceConfig(backend=registry_pb.BACKEND_PYTHON_ONNXRUNTIME)

        assert serving_config(config, defaults).backend == "python"


class TestWanted:
    async def test_deployments_and_pins_make_the_wanted_set(self, reconciler: Reconciler) -> None:
        """Versions of every deployment are wanted, each for the first deployment by name that
        names it; the latest revision of a deployment replaces the one before."""
        reconciler.apply(1, _needs("deployments/b", "models/m/versions/1"))
        reconciler.apply(2, _needs("deployments/a", "models/m/versions/1", "models/m/versions/2"))
        reconciler.apply(3, _needs("deployments/b", "models/m/versions/3", revision=2))

        assert reconciler.wanted() == {
            "models/m/versions/1": "deployments/a",
            "models/m/versions/2": "deployments/a",
            "models/m/versions/3": "deployments/b",
        }
        assert reconciler.sequence == 3

    async def test_an_older_revision_changes_nothing_but_the_sequence(
        self, reconciler: Reconciler
    ) -> None:
        """A revision older than the one held (delivered again after a reconnect) is ignored."""
        reconciler.apply(5, _needs("deployments/a", "models/m/versions/2", revision=2))
        reconciler.apply(6, _needs("deployments/a", "models/m/versions/1", revision=1))

        assert list(reconciler.wanted()) == ["models/m/versions/2"]
        assert reconciler.sequence == 6

    async def test_the_first_deployment_by_name_sets_a_models_config_with_one_warning(
        self, reconciler: Reconciler
    ) -> None:
        """Two deployments asking different configs for one model's versions: the first by
        name wins, and the conflict is logged once, not on every pass."""
        reconciler.apply(1, _needs("deployments/zz", "models/m/versions/1", instances=3))
        reconciler.apply(2, _needs("deployments/aa", "models/m/versions/2", instances=2))

        with capture_logs() as logs:
            first = reconciler.model_configs()
            again = reconciler.model_configs()

        assert first == again
        assert first["m"].instance_count == 2
        assert [(e["event"], e["used"], e["ignored"]) for e in logs] == [
            ("inference_config_conflict", "deployments/aa", "deployments/zz")
        ]

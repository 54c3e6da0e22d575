"""A worker's view of the first process's versions: versions through the API and back, and
the mirror that takes them (workers.py)."""

from __future__ import annotations

import json

import pytest
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_cli.stack import free_port
from modelserve_inference.models import HeldVersion, ModelVersions, ServingConfig, VersionState
from modelserve_inference.servicer import held_from_proto, held_to_proto
from modelserve_inference.workers import OWNER_ENV, Owner, OwnerLoads, OwnerMirror
from modelserve_runtime.channels import create_channel
from modelserve_runtime.errors import FailedPreconditionError, UnavailableError
from modelserve_triton.model_config import TensorSpec
from modelserve_triton.runner import TritonRunner

V1, V2, V3 = (f"models/fraud/versions/{n}" for n in (1, 2, 3))
INPUTS = (TensorSpec("features", "FP32", (-1, 9), allow_non_finite=True),)
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2)))


def _held(name: str, state: VersionState = VersionState.READY, **kwargs: object) -> HeldVersion:
    version = int(name.rsplit("/", 1)[1])
    return HeldVersion(name, "fraud", version, state, INPUTS, OUTPUTS, **kwargs)  # type: ignore[arg-type]


class TestHeldFromProto:
    @pytest.mark.parametrize("state", list(VersionState))
    def test_every_state_comes_back_as_it_was_shown(self, state: VersionState) -> None:
        held = _held(V1, state, reason="why")

        back = held_from_proto(held_to_proto(held, "127.0.0.1:8001"))

        assert back == held

    def test_the_config_it_was_loaded_with_comes_back(self) -> None:
        """The limits a worker checks requests against: batch size, instances, queue, and
        where the instances run."""
        config = ServingConfig(
            max_batch_size=32, instance_count=3, max_queue_size=100, device="gpu", gpus=(0, 2)
        )
        shown = held_to_proto(_held(V1, config=config), "127.0.0.1:8001")

        assert (shown.max_batch_size, shown.instance_count, shown.max_queue_size) == (32, 3, 100)
        assert (shown.device, list(shown.gpus)) == (pb.INSTANCE_DEVICE_GPU, [0, 2])
        back = held_from_proto(shown).config
        assert back is not None
        assert (back.max_batch_size, back.instance_count, back.max_queue_size) == (32, 3, 100)
        assert (back.device, back.gpus) == ("gpu", (0, 2))

    def test_a_version_never_loaded_has_no_config(self) -> None:
        shown = held_to_proto(_held(V1, VersionState.LOADING), "")

        assert shown.max_batch_size == 0
        assert held_from_proto(shown).config is None


@pytest.fixture
async def versions() -> ModelVersions:
    # A Triton client that is never called: the mirror only takes states.
    return ModelVersions(
        OwnerLoads(),
        TritonRunner("127.0.0.1:1"),
        triton_endpoint="127.0.0.1:1",
        max_batch_size=8,
        max_queue_delay_us=0,
        infer_timeout_s=1,
        load_timeout_s=1,
    )


class TestMirror:
    async def test_changes_and_removals_are_taken_and_published(
        self, versions: ModelVersions
    ) -> None:
        watch = versions.watch()
        versions.mirror([_held(V1, VersionState.LOADING), _held(V2)], initial=True)
        versions.mirror([_held(V1)])
        versions.mirror([], [V2])

        assert [(h.name, h.state) for h in versions.list()] == [(V1, VersionState.READY)]
        versions.feed.end_watches()
        published = [
            ([(h.name, h.state) for h in change.changed], list(change.removed))
            async for change in watch
        ]
        assert published == [
            ([(V1, VersionState.LOADING), (V2, VersionState.READY)], []),
            ([(V1, VersionState.READY)], []),
            ([], [V2]),
        ]

    async def test_a_whole_state_drops_versions_it_does_not_name(
        self, versions: ModelVersions
    ) -> None:
        """After a reconnect the first process sends its whole state again; a version it
        dropped meanwhile goes, and watchers hear that it went."""
        versions.mirror([_held(V1), _held(V2)], initial=True)
        watch = versions.watch()

        versions.mirror([_held(V2), _held(V3)], initial=True)

        assert [h.name for h in versions.list()] == [V2, V3]
        versions.feed.end_watches()
        changes = [change async for change in watch]
        assert [list(c.removed) for c in changes] == [[V1]]

    def test_triton_up_follows_the_first_process(self, versions: ModelVersions) -> None:
        versions.mirror_triton_up(False)
        assert not versions.triton_up
        versions.mirror_triton_up(True)
        assert versions.triton_up


class TestOwner:
    def test_the_environment_carries_it_to_a_worker(self) -> None:
        owner = Owner("unix:/tmp/x/owner.sock", "127.0.0.1:8001", "127.0.0.1:8000")

        env = owner.to_env()

        assert json.loads(env[OWNER_ENV])["address"] == "unix:/tmp/x/owner.sock"
        assert Owner.from_env(env) == owner
        assert Owner.from_env({}) is None

    async def test_a_worker_loads_nothing_itself(self) -> None:
        with pytest.raises(FailedPreconditionError, match="only the first inference process"):
            await OwnerLoads().fetch(V1)


class TestOwnerUnreachable:
    async def test_the_worker_is_not_serving_and_never_synced(
        self, versions: ModelVersions
    ) -> None:
        """With nothing listening where the first process should be, the worker reports
        NOT_SERVING (health and ServerReady) and its readiness check fails after its wait."""
        serving: list[bool] = []

        async def set_serving(value: bool) -> None:
            serving.append(value)

        channel = create_channel(f"127.0.0.1:{free_port()}")
        mirror = OwnerMirror(channel, versions, set_serving, stream_timeout_s=5, backoff_max_s=0.05)
        mirror.start()
        try:
            await eventually(lambda: len(serving) >= 2, "two reports after broken streams")
            with pytest.raises(UnavailableError, match=r"sent no model states within 0\.1 s"):
                await mirror.wait_synced(0.1)
        finally:
            await mirror.close()
            await channel.close()

        assert set(serving) == {False}
        assert not versions.triton_up

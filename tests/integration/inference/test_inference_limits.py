"""Settings that change Infer's limits: a bounded Triton queue, NaN checks turned off."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from inference_testing import ROWS, V1, RunningInference, infer, infer_request, load

from modelserve_inference.config import InferenceSettings
from modelserve_runtime.convert import numpy_to_tensor
from modelserve_runtime.errors import decode_rpc_error

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> InferenceSettings:
    """A service whose Triton queues at most one request per version and lets NaN through,
    holding only what LoadModelVersion loads (reconcile off). The batcher waits up to 100 ms
    to fill a batch, so requests stay queued however fast the model runs: the bound is met
    by the queue, not by timing."""
    return InferenceSettings(
        triton_work_dir=tmp_path_factory.mktemp("triton"),
        registry_target=registry_target,
        reconcile=False,
        max_queue_size=1,
        max_queue_delay_us=100_000,
        reject_non_finite=False,
        warmup_batch_sizes=(1,),
    )


class TestLimits:
    async def test_full_queue_is_resource_exhausted(
        self, inference_service: RunningInference
    ) -> None:
        """Requests beyond Triton's bounded queue get RESOURCE_EXHAUSTED at once, the rest answer."""
        stub = inference_service.stub
        await load(stub, V1)
        # Batches of 64 rows: the batcher (up to 256) waits for more before it runs one.
        big = numpy_to_tensor("features", np.repeat(ROWS, 16, axis=0))

        results = await asyncio.gather(
            *(stub.Infer(infer_request(V1, big)) for _ in range(64)), return_exceptions=True
        )

        errors = [decode_rpc_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
        answered = [r for r in results if not isinstance(r, BaseException)]
        assert errors, "64 concurrent batches held by the batcher should overflow a queue of 1"
        assert {(e.code, e.reason) for e in errors} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "TRITON_QUEUE_FULL")
        }
        assert answered

    async def test_nan_passes_when_the_check_is_off(
        self, inference_service: RunningInference
    ) -> None:
        """With reject_non_finite off a NaN input reaches the model, which answers it."""
        await load(inference_service.stub, V1)
        rows = ROWS.copy()
        rows[0, 0] = np.nan

        outputs = await infer(
            inference_service.stub, infer_request(V1, numpy_to_tensor("features", rows))
        )

        assert outputs["probabilities"].shape == (len(ROWS), 2)

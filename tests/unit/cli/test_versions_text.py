"""How `modelserve versions` writes a held version's device and limits."""

from __future__ import annotations

import pytest

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_cli.inference_commands import device_text, limits_text


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (pb.LoadedModelVersion(), ""),
        (pb.LoadedModelVersion(max_batch_size=256, instance_count=1), "batch 256 x1"),
        (
            pb.LoadedModelVersion(max_batch_size=8, instance_count=2, max_queue_size=100),
            "batch 8 x2 queue 100",
        ),
    ],
)
def test_limits(version: pb.LoadedModelVersion, expected: str) -> None:
    assert limits_text(version) == expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (pb.LoadedModelVersion(), ""),
        (pb.LoadedModelVersion(device=pb.INSTANCE_DEVICE_CPU), "cpu"),
        (pb.LoadedModelVersion(device=pb.INSTANCE_DEVICE_GPU, gpus=[0, 2]), "gpu 0,2"),
    ],
)
def test_device(version: pb.LoadedModelVersion, expected: str) -> None:
    assert device_text(version) == expected

"""Unit tests for the Triton model configs and load-request files."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from modelserve_triton.model_config import (
    CPU,
    GPU,
    ONNXRUNTIME_BACKEND,
    TensorSpec,
    backend_source,
    build_model_config,
    model_files,
)
from modelserve_triton.process import TritonInstall

FEATURES = TensorSpec("features", "FP32", (-1, 8))
LABEL = TensorSpec("label", "INT64", (-1,))
PROBABILITIES = TensorSpec("probabilities", "FP32", (-1, 2))


class TestBuildModelConfig:
    def test_batched_config_strips_the_batch_dimension(self) -> None:
        """Dims leave out the leading -1 when Triton batches; per-item scalars become [1]."""
        config = build_model_config("fraud", [FEATURES], [LABEL, PROBABILITIES])

        assert config["max_batch_size"] == 256
        assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [8]}]
        assert config["output"] == [
            {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]},
        ]

    def test_dynamic_batching_is_on_with_the_given_delay(self) -> None:
        """A batched model gets the dynamic batcher with the queue delay asked for."""
        config = build_model_config("fraud", [FEATURES], [LABEL], max_queue_delay_us=250)

        assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 250}

    def test_preferred_batch_sizes_go_to_the_batcher(self) -> None:
        """Preferred batch sizes are the batcher's `preferred_batch_size`; none: Triton's own."""
        preferred = build_model_config("fraud", [FEATURES], [LABEL], preferred_batch_sizes=(4, 8))
        plain = build_model_config("fraud", [FEATURES], [LABEL])

        assert preferred["dynamic_batching"]["preferred_batch_size"] == [4, 8]
        assert "preferred_batch_size" not in plain["dynamic_batching"]

    def test_the_native_onnxruntime_backend_by_name(self) -> None:
        """The onnxruntime backend is named in the config like any other."""
        config = build_model_config("fraud", [FEATURES], [LABEL], backend=ONNXRUNTIME_BACKEND)

        assert config["backend"] == "onnxruntime"

    def test_max_queue_size_bounds_the_batcher_queue(self) -> None:
        """A positive max_queue_size becomes the batcher's default queue policy; 0 leaves none."""
        bounded = build_model_config("fraud", [FEATURES], [LABEL], max_queue_size=64)
        unbounded = build_model_config("fraud", [FEATURES], [LABEL])

        assert bounded["dynamic_batching"]["default_queue_policy"] == {"max_queue_size": 64}
        assert "default_queue_policy" not in unbounded["dynamic_batching"]

    def test_all_versions_stay_loaded_on_cpu_with_the_python_backend(self) -> None:
        """Every version sent is served, by `instance_count` CPU instances of the python backend."""
        config = build_model_config("fraud", [FEATURES], [LABEL], instance_count=3)

        assert config["name"] == "fraud"
        assert config["backend"] == "python"
        assert config["version_policy"] == {"all": {}}
        assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 3}]

    def test_gpu_instances_on_the_named_gpus(self) -> None:
        """Device `gpu` runs `instance_count` instances on each named GPU; naming none leaves
        the choice of GPUs to Triton (all it sees)."""
        named = build_model_config("fraud", [FEATURES], [LABEL], device=GPU, gpus=[1, 0])
        every = build_model_config("fraud", [FEATURES], [LABEL], device=GPU, instance_count=2)

        assert named["instance_group"] == [{"kind": "KIND_GPU", "count": 1, "gpus": [1, 0]}]
        assert every["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]

    @pytest.mark.parametrize(
        ("device", "gpus", "message"),
        [("tpu", (), "device must be"), (CPU, (0,), "only for device 'gpu'")],
    )
    def test_bad_device_settings_are_refused(
        self, device: str, gpus: tuple[int, ...], message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            build_model_config("fraud", [FEATURES], [LABEL], device=device, gpus=gpus)

    def test_config_is_json(self) -> None:
        """The config survives json.dumps, which is how load_model takes it."""
        config = build_model_config("fraud", [FEATURES], [LABEL, PROBABILITIES])

        assert json.loads(json.dumps(config)) == config

    def test_unbatched_config_keeps_dims_and_has_no_batcher(self) -> None:
        """With max_batch_size 0 the shape is given whole and there is nothing to batch."""
        config = build_model_config("fraud", [FEATURES], [PROBABILITIES], max_batch_size=0)

        assert config["input"][0]["dims"] == [-1, 8]
        assert "dynamic_batching" not in config

    def test_batched_config_needs_a_batch_dimension(self) -> None:
        """A tensor without a leading -1 cannot be batched and is refused."""
        with pytest.raises(ValueError, match="batch dimension"):
            build_model_config("fraud", [TensorSpec("features", "FP32", (8,))], [LABEL])


class TestTensorSpec:
    def test_unknown_datatype_is_refused(self) -> None:
        """Only Triton's datatype names are accepted."""
        with pytest.raises(ValueError, match="datatype"):
            TensorSpec("x", "float32", (-1,))


class TestModelFiles:
    def test_every_version_gets_its_model_and_the_backend(self) -> None:
        """Each version directory holds its own ONNX bytes and the python-backend model."""
        files = model_files({1: b"onnx-one", 2: b"onnx-two"})

        assert files == {
            "file:1/model.onnx": b"onnx-one",
            "file:1/model.py": backend_source(),
            "file:2/model.onnx": b"onnx-two",
            "file:2/model.py": backend_source(),
        }

    def test_backend_is_the_packaged_model_file(self) -> None:
        """The backend shipped to Triton is modelserve_triton/backend/model.py."""
        packaged = resources.files("modelserve_triton").joinpath("backend", "model.py")

        assert backend_source() == packaged.read_bytes()
        assert b"class TritonPythonModel" in backend_source()

    def test_the_native_onnxruntime_backend_needs_only_the_onnx_files(self) -> None:
        """Triton's own onnxruntime backend reads model.onnx: no python model is sent."""
        files = model_files({1: b"onnx-one", 2: b"onnx-two"}, backend=ONNXRUNTIME_BACKEND)

        assert files == {"file:1/model.onnx": b"onnx-one", "file:2/model.onnx": b"onnx-two"}

    def test_no_versions_is_refused(self) -> None:
        """A load request without a version is a mistake, not an empty model."""
        with pytest.raises(ValueError, match="version"):
            model_files({})


class TestTritonInstall:
    def test_the_wheel_ships_only_the_python_backend(self) -> None:
        """nvidia-pytriton's Triton has no native onnxruntime backend, which is why
        BACKEND_ONNXRUNTIME versions fail with that reason here."""
        assert set(TritonInstall.locate().backends()) == {"python"}

"""InferenceSettings for this increment: warmup, NaN checks, queue bound, supervisor polling."""

from __future__ import annotations

import os

import pytest

from modelserve_inference.config import InferenceSettings
from modelserve_runtime.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MODELSERVE_"):
            monkeypatch.delenv(name)


class TestInferenceSettings:
    def test_defaults(self) -> None:
        """Warmup at 1, 8 and 64 rows, NaN refused, an unbounded Triton queue, 1 s probes."""
        settings = load_settings(InferenceSettings)

        assert settings.warmup_batch_sizes == (1, 8, 64)
        assert settings.reject_non_finite is True
        assert settings.max_queue_size == 0
        assert settings.triton_poll_interval_s == 1.0

    def test_reconcile_is_on_by_default_with_a_grace_and_bounded_retries(self) -> None:
        """The reconcile loop follows the registry unless turned off; unwanted versions stay
        10 s, failed loads are retried from 1 s up to 60 s apart, two models load at once, and
        deployments without a backend get the python one."""
        settings = load_settings(InferenceSettings)

        assert settings.reconcile is True
        assert settings.unload_grace_s == 10.0
        assert (settings.load_retry_initial_s, settings.load_retry_max_s) == (1.0, 60.0)
        assert settings.max_concurrent_loads == 2
        assert settings.backend == "python"

    def test_reconcile_can_be_turned_off(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_INFERENCE_RECONCILE=false leaves Triton to LoadModelVersion alone."""
        monkeypatch.setenv("MODELSERVE_INFERENCE_RECONCILE", "false")

        assert load_settings(InferenceSettings).reconcile is False

    def test_reads_its_environment_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_INFERENCE_* variables set warmup sizes, the NaN check and the queue."""
        monkeypatch.setenv("MODELSERVE_INFERENCE_WARMUP_BATCH_SIZES", "[1, 4]")
        monkeypatch.setenv("MODELSERVE_INFERENCE_REJECT_NON_FINITE", "false")
        monkeypatch.setenv("MODELSERVE_INFERENCE_MAX_QUEUE_SIZE", "128")

        settings = load_settings(InferenceSettings)

        assert settings.warmup_batch_sizes == (1, 4)
        assert settings.reject_non_finite is False
        assert settings.max_queue_size == 128

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("WARMUP_BATCH_SIZES", "[0, 8]"),
            ("MAX_QUEUE_SIZE", "-1"),
            ("TRITON_POLL_INTERVAL_S", "0"),
            ("MAX_CONCURRENT_LOADS", "0"),
            ("LOAD_RETRY_INITIAL_S", "0"),
            ("BACKEND", "tensorrt"),
            ("DEVICE", "tpu"),
            ("GPUS", "[-1]"),
            ("TRITON_EXTRA_ARGS", '["--grpc-port=9000"]'),
            ("TRITON_EXTRA_ARGS", '["--model-control-mode=poll"]'),
            ("TRITON_EXTRA_ARGS", '["log-verbose=1"]'),
        ],
    )
    def test_bad_values_stop_the_start(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        """A warmup batch of 0, a negative queue or a zero poll interval is refused by name."""
        monkeypatch.setenv(f"MODELSERVE_INFERENCE_{variable}", value)

        with pytest.raises(ConfigError, match=variable.lower()):
            load_settings(InferenceSettings)

    def test_gpu_device_and_extra_triton_flags(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """DEVICE, GPUS and TRITON_EXTRA_ARGS (flags modelserve does not set itself) load."""
        monkeypatch.setenv("MODELSERVE_INFERENCE_DEVICE", "gpu")
        monkeypatch.setenv("MODELSERVE_INFERENCE_GPUS", "[0, 2]")
        monkeypatch.setenv(
            "MODELSERVE_INFERENCE_TRITON_EXTRA_ARGS",
            '["--cuda-memory-pool-byte-size=0:268435456", "--exit-timeout-secs=5"]',
        )

        settings = load_settings(InferenceSettings)

        assert (settings.device, settings.gpus) == ("gpu", (0, 2))
        assert settings.triton_extra_args == (
            "--cuda-memory-pool-byte-size=0:268435456",
            "--exit-timeout-secs=5",
        )

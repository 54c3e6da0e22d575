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
        ],
    )
    def test_bad_values_stop_the_start(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        """A warmup batch of 0, a negative queue or a zero poll interval is refused by name."""
        monkeypatch.setenv(f"MODELSERVE_INFERENCE_{variable}", value)

        with pytest.raises(ConfigError, match=variable.lower()):
            load_settings(InferenceSettings)

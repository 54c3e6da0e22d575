"""MonitorSettings: defaults, environment variable names, and refusal of bad values at load."""

from __future__ import annotations

import os
import socket

import pytest

from modelserve_monitor.config import MonitorSettings
from modelserve_runtime.config import ConfigError, load_settings
from modelserve_runtime.prediction_log import DEFAULT_STREAM


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MODELSERVE_"):
            monkeypatch.delenv(name)


class TestMonitorSettings:
    def test_defaults(self) -> None:
        """By default the monitor reads the router's stream as group `monitor`, named host-pid."""
        settings = load_settings(MonitorSettings)
        assert settings.stream == DEFAULT_STREAM
        assert settings.consumer_group == "monitor"
        assert settings.consumer_name == f"{socket.gethostname()}-{os.getpid()}"

    def test_reads_its_environment_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_MONITOR_* variables set the stream, group, consumer and limits."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS_URL", "redis://redis:6379/2")
        monkeypatch.setenv("MODELSERVE_MONITOR_STREAM", "other:stream")
        monkeypatch.setenv("MODELSERVE_MONITOR_CONSUMER_GROUP", "g")
        monkeypatch.setenv("MODELSERVE_MONITOR_CONSUMER_NAME", "c")
        monkeypatch.setenv("MODELSERVE_MONITOR_BLOCK_MS", "250")
        monkeypatch.setenv("MODELSERVE_MONITOR_BATCH_SIZE", "64")
        monkeypatch.setenv("MODELSERVE_MONITOR_MAX_LATENCY_SAMPLES", "100")
        monkeypatch.setenv("MODELSERVE_MONITOR_MAX_REMEMBERED_RECORDS", "1000")
        settings = load_settings(MonitorSettings)
        assert settings.redis_url == "redis://redis:6379/2"
        assert (settings.stream, settings.consumer_group, settings.consumer_name) == (
            "other:stream",
            "g",
            "c",
        )
        assert (settings.block_ms, settings.batch_size) == (250, 64)
        assert (settings.max_latency_samples, settings.max_remembered_records) == (100, 1000)

    def test_bad_value_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A batch size below 1 stops the service at start, naming its environment variable."""
        monkeypatch.setenv("MODELSERVE_MONITOR_BATCH_SIZE", "0")
        with pytest.raises(ConfigError, match="MODELSERVE_MONITOR_BATCH_SIZE"):
            load_settings(MonitorSettings)

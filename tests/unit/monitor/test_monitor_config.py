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
        monkeypatch.setenv("MODELSERVE_MONITOR_CLAIM_MIN_IDLE_MS", "500")
        monkeypatch.setenv("MODELSERVE_MONITOR_BASELINE_RECORDS", "200")
        settings = load_settings(MonitorSettings)
        assert settings.redis_url == "redis://redis:6379/2"
        assert (settings.stream, settings.consumer_group, settings.consumer_name) == (
            "other:stream",
            "g",
            "c",
        )
        assert (settings.block_ms, settings.batch_size) == (250, 64)
        assert (settings.claim_min_idle_ms, settings.baseline_records) == (500, 200)

    def test_bad_value_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A batch size below 1 stops the service at start, naming its environment variable."""
        monkeypatch.setenv("MODELSERVE_MONITOR_BATCH_SIZE", "0")
        with pytest.raises(ConfigError, match="MODELSERVE_MONITOR_BATCH_SIZE"):
            load_settings(MonitorSettings)

    def test_alert_rules_have_the_seed_defaults(self) -> None:
        """Latency p99 > 200 ms warns, error rate > 1 % and mean shift > 0.1 are critical."""
        alerts = load_settings(MonitorSettings).alerts
        assert (alerts.model_latency_high.threshold, alerts.model_latency_high.severity) == (
            200.0,
            "warning",
        )
        assert (alerts.error_rate_high.threshold, alerts.error_rate_high.severity) == (
            0.01,
            "critical",
        )
        assert (alerts.prediction_drift.threshold, alerts.prediction_drift.severity) == (
            0.1,
            "critical",
        )

    def test_alert_rule_is_configured_by_nested_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """MODELSERVE_MONITOR_ALERTS__<RULE>__<FIELD> changes one field of one rule."""
        monkeypatch.setenv("MODELSERVE_MONITOR_ALERTS__ERROR_RATE_HIGH__THRESHOLD", "0.05")
        monkeypatch.setenv("MODELSERVE_MONITOR_ALERTS__ERROR_RATE_HIGH__FOR_S", "30")
        rule = load_settings(MonitorSettings).alerts.error_rate_high
        assert (rule.threshold, rule.for_s, rule.severity) == (0.05, 30.0, "critical")

    def test_bad_alert_severity_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unknown severity stops the service at start, naming the nested variable."""
        monkeypatch.setenv("MODELSERVE_MONITOR_ALERTS__MODEL_LATENCY_HIGH__SEVERITY", "meh")
        with pytest.raises(ConfigError, match="ALERTS__MODEL_LATENCY_HIGH__SEVERITY"):
            load_settings(MonitorSettings)

    def test_webhooks_and_canary_defaults_come_from_nested_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Webhook URLs are a JSON list; canary thresholds are plain nested variables."""
        monkeypatch.setenv(
            "MODELSERVE_MONITOR_ALERTS__WEBHOOK__URLS", '["https://hooks.example/t/abc"]'
        )
        monkeypatch.setenv("MODELSERVE_MONITOR_ALERTS__WEBHOOK__MAX_ATTEMPTS", "2")
        monkeypatch.setenv("MODELSERVE_MONITOR_CANARY__MIN_REQUESTS", "1000")
        settings = load_settings(MonitorSettings)
        assert settings.alerts.webhook.urls == ["https://hooks.example/t/abc"]
        assert settings.alerts.webhook.max_attempts == 2
        assert (settings.canary.min_requests, settings.canary.alpha) == (1000, 0.01)

    def test_a_webhook_that_is_not_http_is_refused_without_echoing_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A non-HTTP webhook stops the service at start; the message names the variable but
        not the URL, which may hold a token."""
        monkeypatch.setenv("MODELSERVE_MONITOR_ALERTS__WEBHOOK__URLS", '["ftp://x/secret-token"]')
        with pytest.raises(ConfigError, match="ALERTS__WEBHOOK__URLS") as info:
            load_settings(MonitorSettings)
        assert "secret-token" not in str(info.value)

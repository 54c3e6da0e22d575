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


class TestRedisAndRegistrySettings:
    def test_redis_url_is_the_standalone_shorthand(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_MONITOR_REDIS_URL still works: it becomes the standalone url, and the
        socket timeout outlasts the blocking read."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS_URL", "redis://redis:6379/2")
        monkeypatch.setenv("MODELSERVE_MONITOR_BLOCK_MS", "500")
        connection = load_settings(MonitorSettings).redis_connection()
        assert (connection.mode, connection.url) == ("standalone", "redis://redis:6379/2")
        assert connection.timeout_s == pytest.approx(1.5)

    def test_sentinel_mode_with_acl_credentials_from_nested_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """REDIS__* variables pick Sentinel mode, its nodes, master and ACL user."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__MODE", "sentinel")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__NODES", "s1:26379,s2:26379")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__MASTER_NAME", "predictions")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__USERNAME", "monitor")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__PASSWORD", "s3cret")
        connection = load_settings(MonitorSettings).redis_connection()
        assert connection.addresses == [("s1", 26379), ("s2", 26379)]
        assert (connection.master_name, connection.username) == ("predictions", "monitor")
        assert connection.password_value() == "s3cret"

    def test_cluster_mode_is_refused_saying_why(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Cluster mode stops the service at start, naming the setting and the hash-slot reason,
        before anything else about the cluster settings is checked."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__MODE", "cluster")
        with pytest.raises(ConfigError, match="MODELSERVE_MONITOR_REDIS") as info:
            load_settings(MonitorSettings)
        assert "cluster is not supported by the monitor" in str(info.value)
        assert "hash slot" in str(info.value)

    def test_redis_url_contradicting_redis_mode_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The standalone shorthand together with Sentinel mode stops the service at start."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS_URL", "redis://r:6379/0")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__MODE", "sentinel")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__NODES", "s1:26379")
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__MASTER_NAME", "m")
        with pytest.raises(ConfigError, match="redis_url is the shorthand for standalone mode"):
            load_settings(MonitorSettings)

    def test_a_socket_timeout_shorter_than_the_blocking_read_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """redis.timeout_s at or below block_ms would cut every idle read: refused at start."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REDIS__TIMEOUT_S", "0.5")
        monkeypatch.setenv("MODELSERVE_MONITOR_BLOCK_MS", "1000")
        with pytest.raises(ConfigError, match="must be longer than block_ms"):
            load_settings(MonitorSettings)

    def test_registry_settings_and_the_feature_drift_rule(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The registry is reached at its target with an API key that is never shown; the
        feature drift rule warns above a PSI of 0.2 by default."""
        monkeypatch.setenv("MODELSERVE_MONITOR_REGISTRY_TARGET", "registry:50052")
        monkeypatch.setenv("MODELSERVE_MONITOR_REGISTRY_API_KEY", "key-123")
        monkeypatch.setenv("MODELSERVE_MONITOR_BASELINE_RETRY_S", "5")
        settings = load_settings(MonitorSettings)
        assert settings.registry_target == "registry:50052"
        assert settings.registry_api_key is not None
        assert settings.registry_api_key.get_secret_value() == "key-123"
        assert "key-123" not in repr(settings)
        assert (settings.baseline_retry_s, settings.baseline_retry_max_s) == (5.0, 600.0)
        rule = settings.alerts.feature_drift
        assert (rule.threshold, rule.severity, rule.min_requests) == (0.2, "warning", 200)

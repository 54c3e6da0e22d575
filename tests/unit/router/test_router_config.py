"""The router's settings for reaching its dependencies: the Redis block and its `redis_url`
shorthand, API keys for registry and inference, and the retired `ready_poll_ms`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from modelserve_router.config import RouterSettings
from modelserve_runtime.config import CONFIG_FILE_ENV, load_settings
from modelserve_runtime.redis_connect import RedisConnection


class TestRedisSettings:
    def test_redis_url_alone_keeps_working(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_ROUTER_REDIS_URL alone (as `make up` sets it) is a standalone connection
        to it, whose socket timeout is the feature read's deadline."""
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS_URL", "redis://cache:6390/2")
        monkeypatch.setenv("MODELSERVE_ROUTER_FEATURE_TIMEOUT_S", "0.3")
        connection = load_settings(RouterSettings).redis_connection()
        assert (connection.mode, connection.url, connection.timeout_s) == (
            "standalone",
            "redis://cache:6390/2",
            0.3,
        )

    def test_the_block_reaches_cluster_and_sentinel(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`REDIS__*` chooses the mode, nodes and credentials as the feature service's does."""
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__MODE", "cluster")
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__NODES", "n1:7000,n2:7000")
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__USERNAME", "router")
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__PASSWORD", "s3cret")
        connection = load_settings(RouterSettings).redis_connection()
        assert (connection.mode, connection.addresses, connection.username) == (
            "cluster",
            [("n1", 7000), ("n2", 7000)],
            "router",
        )
        assert connection.password_value() == "s3cret"
        assert "s3cret" not in connection.describe()

    def test_contradictions_are_refused(self) -> None:
        """`redis_url` beside a cluster, or beside a different `redis.url`, is refused."""
        cluster = RedisConnection(mode="cluster", nodes=["h:7000"])
        with pytest.raises(ValidationError, match="redis_url is the shorthand for standalone"):
            RouterSettings(redis_url="redis://h", redis=cluster)
        with pytest.raises(ValidationError, match=r"redis_url and redis\.url are both set"):
            RouterSettings(redis_url="redis://h", redis=RedisConnection(url="redis://g"))
        with pytest.raises(ValidationError, match=r"redis_url: .*not a redis://"):
            RouterSettings(redis_url="http://h")


class TestUpstreamSettings:
    def test_api_keys_are_secrets(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The registry and inference keys come from the environment and never show in the
        settings' text."""
        monkeypatch.setenv("MODELSERVE_ROUTER_REGISTRY_API_KEY", "msk_registry")
        monkeypatch.setenv("MODELSERVE_ROUTER_INFERENCE_API_KEY", "msk_inference")
        settings = load_settings(RouterSettings)
        assert settings.registry_api_key is not None
        assert settings.registry_api_key.get_secret_value() == "msk_registry"
        assert settings.inference_api_key is not None
        assert settings.inference_api_key.get_secret_value() == "msk_inference"
        assert "msk_" not in repr(settings)

    def test_retired_ready_poll_ms_still_loads(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A settings file written for a router that polled inference still loads."""
        path = tmp_path / "router.yaml"
        path.write_text("ready_poll_ms: 500\nwatch_timeout_s: 600\n")
        monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
        settings = load_settings(RouterSettings)
        assert (settings.ready_poll_ms, settings.watch_timeout_s) == (500, 600)

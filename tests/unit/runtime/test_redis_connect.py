"""Redis connection settings: modes, validation that names the field, the client each builds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis, RedisCluster, SSLConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection

from modelserve_feature.config import FeatureSettings
from modelserve_runtime.config import ConfigError, load_settings
from modelserve_runtime.redis_connect import (
    RedisConnection,
    RedisTls,
    SentinelMaster,
    connect,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MODELSERVE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A file standing in for a PEM file (nothing here opens a connection)."""
    path = tmp_path / "some.pem"
    path.write_text("not read by these tests\n")
    return path


def _problem(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        RedisConnection(**fields)
    return str(info.value)


class TestValidation:
    def test_defaults_are_a_local_standalone_server(self) -> None:
        """With nothing set: standalone, redis://127.0.0.1:6379/0, no TLS, fail fast."""
        settings = RedisConnection()
        assert settings.mode == "standalone"
        assert settings.url == "redis://127.0.0.1:6379/0"
        assert not settings.tls_on
        assert settings.retries == 0

    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"mode": "sentinel", "nodes": ["h:26379"]}, "sentinel mode needs master_name"),
            ({"mode": "sentinel", "master_name": "m"}, "sentinel mode needs nodes"),
            ({"mode": "cluster"}, "cluster mode needs nodes"),
            ({"mode": "cluster", "nodes": ["h:7000"], "db": 2}, "db must be 0 in cluster mode"),
            (
                {"mode": "cluster", "nodes": ["h:7000"], "master_name": "m"},
                "master_name is for sentinel mode",
            ),
            ({"mode": "cluster", "nodes": ["h:7000"], "url": "redis://h"}, "url is for standalone"),
            ({"nodes": ["h:7000"]}, "nodes is for sentinel or cluster mode"),
            ({"db": 3}, "db is for sentinel mode"),
            (
                {"mode": "cluster", "nodes": ["h:7000", "nohost"]},
                "nodes[1]: 'nohost' is not host:port",
            ),
            ({"mode": "cluster", "nodes": ["h:99999"]}, "'h:99999' is not host:port"),
            ({"url": "http://h:6379"}, "not a redis://, rediss:// or unix:// URL"),
            ({"url": "redis://:pw@h", "password": "x"}, "the url holds a password and password"),
            ({"url": "redis://u@h", "username": "v"}, "the url names a user and username is set"),
            ({"mode": "standalone", "master_name": "m"}, "master_name is for sentinel or cluster"),
            ({"mode": "single"}, "mode"),
        ],
    )
    def test_settings_that_do_not_fit_are_refused_naming_the_field(
        self, fields: dict[str, Any], expected: str
    ) -> None:
        """Each contradiction or malformed value is a ValidationError whose text names the
        field and what was expected."""
        assert expected in _problem(**fields)

    def test_password_in_two_places_is_refused(self, pem: Path) -> None:
        """password and password_file together are refused: which one would win is not
        obvious."""
        assert "password and password_file are both set" in _problem(
            password=SecretStr("x"), password_file=pem
        )

    def test_tls_files_need_tls_and_a_key_needs_a_certificate(self, pem: Path) -> None:
        """A CA file with TLS off is refused (it would be silently unused); a key without a
        certificate too; a missing file is named."""
        assert "tls files are set but TLS is off" in _problem(tls=RedisTls(ca_file=pem))
        with pytest.raises(ValidationError, match=r"tls\.key_file is set without tls\.cert_file"):
            RedisTls(enabled=True, key_file=pem)
        with pytest.raises(ValidationError, match="ca_file"):
            RedisTls(enabled=True, ca_file=pem.parent / "missing.pem")
        assert RedisConnection(url="rediss://h:6380", tls=RedisTls(ca_file=pem)).tls_on

    def test_nodes_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """REDIS__NODES takes a comma-separated list or a JSON array; the mode and the master
        come from their own variables."""
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__MODE", "sentinel")
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__MASTER_NAME", "mymaster")
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__NODES", "s1:26379, [::1]:26380")
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__PASSWORD", "pw")
        settings = load_settings(FeatureSettings)
        assert settings.redis.addresses == [("s1", 26379), ("::1", 26380)]
        assert settings.redis.password is not None
        assert settings.redis.password.get_secret_value() == "pw"
        assert "pw" not in repr(settings)
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__NODES", '["s1:26379", "s2:26379"]')
        assert load_settings(FeatureSettings).redis.nodes == ["s1:26379", "s2:26379"]

    def test_a_wrong_setting_names_its_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A service refuses to start with a contradiction, naming the variable and the
        problem."""
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__MODE", "cluster")
        with pytest.raises(ConfigError) as missing_nodes:
            load_settings(FeatureSettings)
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS__NODES", "h:7000,h")
        with pytest.raises(ConfigError) as bad_node:
            load_settings(FeatureSettings)
        assert "MODELSERVE_FEATURE_REDIS (redis)" in str(missing_nodes.value)
        assert "cluster mode needs nodes" in str(missing_nodes.value)
        assert "MODELSERVE_FEATURE_REDIS__NODES (redis.nodes)" in str(bad_node.value)
        assert "nodes[1]: 'h' is not host:port" in str(bad_node.value)


class TestFeatureShorthand:
    def test_redis_url_is_the_standalone_url(self) -> None:
        """REDIS_URL alone keeps working: a standalone connection to it."""
        settings = FeatureSettings(redis_url="redis://:pw@cache:6390/2")
        connection = settings.redis_connection()
        assert (connection.mode, connection.url) == ("standalone", "redis://:pw@cache:6390/2")

    def test_redis_url_contradicting_redis_is_refused(self) -> None:
        """REDIS_URL with a Sentinel or Cluster mode, or beside a different redis.url, or not a
        Redis URL, is refused naming redis_url."""
        cluster = RedisConnection(mode="cluster", nodes=["h:7000"])
        with pytest.raises(ValidationError, match="redis_url is the shorthand for standalone"):
            FeatureSettings(redis_url="redis://h", redis=cluster)
        with pytest.raises(ValidationError, match=r"redis_url and redis\.url are both set"):
            FeatureSettings(redis_url="redis://h", redis=RedisConnection(url="redis://g"))
        with pytest.raises(ValidationError, match=r"redis_url: .*not a redis://"):
            FeatureSettings(redis_url="http://h")

    def test_socket_timeout_follows_redis_timeout_unless_set(self) -> None:
        """The connection's socket timeout is REDIS_TIMEOUT_S unless REDIS__TIMEOUT_S says
        otherwise."""
        assert FeatureSettings(redis_timeout_s=0.3).redis_connection().timeout_s == 0.3
        explicit = FeatureSettings(redis_timeout_s=0.3, redis=RedisConnection(timeout_s=2.0))
        assert explicit.redis_connection().timeout_s == 2.0


class TestConnect:
    async def test_standalone_with_acl_user_and_tls(self, pem: Path) -> None:
        """A redis:// url with tls.enabled gets TLS connections carrying the CA, client
        certificate and the ACL credentials; the url's host, port and db stay."""
        client = connect(
            RedisConnection(
                url="redis://cache:6390/3",
                username="feature",
                password=SecretStr("pw"),
                timeout_s=0.25,
                tls=RedisTls(enabled=True, ca_file=pem, cert_file=pem, key_file=pem),
            )
        )
        try:
            assert isinstance(client, Redis)
            pool = client.connection_pool
            kwargs = pool.connection_kwargs
            assert pool.connection_class is SSLConnection
            assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache", 6390, 3)
            assert (kwargs["username"], kwargs["password"]) == ("feature", "pw")
            assert kwargs["ssl_ca_certs"] == str(pem)
            assert kwargs["ssl_certfile"] == kwargs["ssl_keyfile"] == str(pem)
            assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
        finally:
            await client.aclose()

    async def test_password_file_is_read_without_its_newline(self, tmp_path: Path) -> None:
        """The password comes from password_file, trailing newline dropped."""
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        client = connect(RedisConnection(password_file=secret))
        try:
            assert isinstance(client, Redis)
            assert client.connection_pool.connection_kwargs["password"] == "s3cret"
        finally:
            await client.aclose()

    async def test_sentinel_master_client(self, pem: Path) -> None:
        """Sentinel mode gives a client whose connections ask the Sentinels for the master
        (TLS to both), authenticating to the Sentinels with their own password."""
        client = connect(
            RedisConnection(
                mode="sentinel",
                nodes=["s1:26379", "s2:26380"],
                master_name="mymaster",
                db=1,
                password=SecretStr("pw"),
                sentinel_password=SecretStr("spw"),
                tls=RedisTls(enabled=True, ca_file=pem),
            )
        )
        try:
            assert isinstance(client, SentinelMaster)
            assert client.sentinels is not None
            pool: Any = client.connection_pool
            assert pool.service_name == "mymaster"
            assert pool.connection_class is SentinelManagedSSLConnection
            assert pool.connection_kwargs["db"] == 1
            assert pool.connection_kwargs["password"] == "pw"
            sentinels = [s.connection_pool.connection_kwargs for s in client.sentinels.sentinels]
            assert [(s["host"], s["port"]) for s in sentinels] == [("s1", 26379), ("s2", 26380)]
            assert {s["password"] for s in sentinels} == {"spw"}
            assert {s["ssl_ca_certs"] for s in sentinels} == {str(pem)}
        finally:
            await client.aclose()

    async def test_cluster_client_from_seed_nodes(self) -> None:
        """Cluster mode gives a RedisCluster seeded with every node given."""
        client = connect(
            RedisConnection(mode="cluster", nodes=["n1:7000", "n2:7001"], username="u")
        )
        try:
            assert isinstance(client, RedisCluster)
            seeds = client.nodes_manager.startup_nodes
            assert sorted(seeds) == ["n1:7000", "n2:7001"]
            assert client.connection_kwargs["username"] == "u"
        finally:
            await client.aclose()

    def test_describe_never_shows_a_password(self) -> None:
        """The description for logs drops the password from the url."""
        text = RedisConnection(url="rediss://user:hunter2@cache:6390/0").describe()
        assert "hunter2" not in text
        assert text == "standalone rediss://cache:6390/0 tls"
        cluster = RedisConnection(
            mode="cluster", nodes=["n1:7000", "n2:7001"], password=SecretStr("pw")
        )
        assert cluster.describe() == "cluster via n1:7000,n2:7001"

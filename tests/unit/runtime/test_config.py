"""Settings loading: env and YAML sources, their precedence, and errors that name the setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from modelserve_cli.stack import free_port
from modelserve_feature.config import FeatureSettings
from modelserve_runtime.config import CONFIG_FILE_ENV, ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MODELSERVE_") or name == "OTEL_EXPORTER_OTLP_ENDPOINT":
            monkeypatch.delenv(name)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "feature.yaml"
    path.write_text(text)
    return path


class TestLoadSettings:
    def test_bad_env_value_names_the_variable_and_the_field(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A wrong value raises ConfigError naming the env var and the field path it sets."""
        monkeypatch.setenv("MODELSERVE_FEATURE_SERVER__PORT", "not-a-port")
        with pytest.raises(ConfigError) as info:
            load_settings(FeatureSettings)
        assert "MODELSERVE_FEATURE_SERVER__PORT (server.port)" in str(info.value)

    def test_every_bad_value_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """All wrong values are reported at once, not just the first."""
        monkeypatch.setenv("MODELSERVE_FEATURE_SERVER__PORT", "70000")
        monkeypatch.setenv("MODELSERVE_FEATURE_MAX_ENTITIES", "0")
        with pytest.raises(ConfigError) as info:
            load_settings(FeatureSettings)
        assert "MODELSERVE_FEATURE_SERVER__PORT" in str(info.value)
        assert "MODELSERVE_FEATURE_MAX_ENTITIES (max_entities)" in str(info.value)

    def test_yaml_file_is_read_and_env_overrides_it(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Values come from the MODELSERVE_CONFIG file unless an env var sets them too."""
        path = _yaml(
            tmp_path,
            "redis_url: redis://from-yaml:6379/0\n"
            "max_entities: 25\n"
            "server:\n  host: 0.0.0.0\n  port: 7100\n",
        )
        monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
        monkeypatch.setenv("MODELSERVE_FEATURE_REDIS_URL", "redis://from-env:6379/0")
        monkeypatch.setenv("MODELSERVE_FEATURE_SERVER__PORT", "7200")
        settings = load_settings(FeatureSettings)
        assert settings.redis_url == "redis://from-env:6379/0"
        assert settings.max_entities == 25
        assert settings.server.port == 7200
        assert settings.server.host == "0.0.0.0"

    def test_config_file_argument_is_read_and_then_forgotten(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A file passed to load_settings (--config) is used for that load only."""
        path = _yaml(tmp_path, "max_features: 9\n")
        assert load_settings(FeatureSettings, path).max_features == 9
        assert CONFIG_FILE_ENV not in os.environ
        assert load_settings(FeatureSettings).max_features == 500

    def test_bad_value_in_the_file_is_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A wrong or unknown setting in the YAML file is refused, naming it."""
        monkeypatch.setenv(
            CONFIG_FILE_ENV, str(_yaml(tmp_path, "server:\n  port: -1\nredis_uri: x\n"))
        )
        with pytest.raises(ConfigError) as info:
            load_settings(FeatureSettings)
        assert "(server.port)" in str(info.value)
        assert "(redis_uri)" in str(info.value)

    def test_missing_config_file_from_env_is_a_clear_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """MODELSERVE_CONFIG naming no file raises ConfigError naming the variable and the path."""
        missing = tmp_path / "nope.yaml"
        monkeypatch.setenv(CONFIG_FILE_ENV, str(missing))
        with pytest.raises(ConfigError, match=f"{CONFIG_FILE_ENV}={missing}: no such file"):
            load_settings(FeatureSettings)

    def test_missing_config_file_argument_is_a_clear_error(self, tmp_path: Path) -> None:
        """A --config path that does not exist raises ConfigError naming the path."""
        missing = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
            load_settings(FeatureSettings, missing)


class TestConsoleScript:
    def test_bad_setting_stops_the_service_at_start(self, tmp_path: Path) -> None:
        """modelserve-feature with a wrong env value exits 2 at once, naming the setting on stderr."""
        script = Path(sys.executable).parent / "modelserve-feature"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
        env["MODELSERVE_FEATURE_SERVER__PORT"] = "not-a-port"
        done = subprocess.run(
            [str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert "MODELSERVE_FEATURE_SERVER__PORT (server.port)" in done.stderr
        assert "Traceback" not in done.stderr


class TestEventLoop:
    @pytest.mark.parametrize(
        ("setting", "module"), [(None, "uvloop"), ("asyncio", "asyncio.unix_events")]
    )
    def test_the_service_runs_on_the_loop_it_is_told(
        self, tmp_path: Path, redis_url: str, setting: str | None, module: str
    ) -> None:
        """modelserve-feature starts on uvloop by default and on asyncio's own loop with
        SERVER__EVENT_LOOP=asyncio; its start line names the loop it really runs on."""
        script = Path(sys.executable).parent / "modelserve-feature"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
        env |= {
            "MODELSERVE_FEATURE_REDIS_URL": redis_url,
            "MODELSERVE_FEATURE_TELEMETRY__LOG_FORMAT": "json",
        }
        if setting is not None:
            env["MODELSERVE_FEATURE_SERVER__EVENT_LOOP"] = setting
        process = subprocess.Popen(
            [str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                event = json.loads(line)
                if event.get("event") == "service_started":
                    assert event["event_loop"] == module
                    break
            else:
                pytest.fail(f"modelserve-feature exited ({process.wait()}) before it started")
        finally:
            process.terminate()
            process.wait(timeout=30)


def _feature_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env |= {
        "MODELSERVE_FEATURE_REDIS_URL": redis_url,
        "MODELSERVE_FEATURE_TELEMETRY__LOG_FORMAT": "json",
    }
    env |= {f"MODELSERVE_FEATURE_{k.upper()}": v for k, v in settings.items()}
    return env


def _two_workers(
    tmp_path: Path, redis_url: str, port: int, **settings: str
) -> tuple[subprocess.Popen[str], set[int]]:
    """modelserve-feature with SERVER__WORKERS=2 on `port` (and `settings`), once both
    processes serve; and their pids."""
    script = Path(sys.executable).parent / "modelserve-feature"
    env = _feature_env(redis_url, server__workers="2", server__port=str(port), **settings)
    process = subprocess.Popen(
        [str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    started: set[int] = set()
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "service_failed":
            process.kill()
            pytest.fail(f"a worker failed to start: {line}")
        if event.get("event") == "service_started":
            assert event["port"] == port
            started.add(event["pid"])
            if len(started) == 2:
                break
    assert len(started) == 2 and process.pid in started, started
    return process, started


def _health_checks(port: int, *, channels: int, calls: int) -> set[int]:
    """Makes `calls` health checks on each of `channels` connections to `port`; returns the
    pids of the processes that answered (their sockets' owners)."""
    import psutil

    answered: set[int] = set()
    for k in range(channels):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.channel_id", k)]) as c:
            stub = health_pb2_grpc.HealthStub(c)
            for _ in range(calls):
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            answered |= {
                conn.pid
                for conn in psutil.net_connections("tcp")
                if conn.pid is not None and conn.raddr and conn.laddr and conn.laddr.port == port
            }
    return answered


class TestWorkers:
    def test_two_workers_share_the_port_and_stop_together(
        self, tmp_path: Path, redis_url: str
    ) -> None:
        """SERVER__WORKERS=2 starts a second process on the same port; both answer health
        checks there, and SIGTERM to the first stops both."""
        import psutil

        port = free_port()
        process, started = _two_workers(tmp_path, redis_url, port)
        try:
            (worker,) = started - {process.pid}
            assert psutil.Process(worker).ppid() == process.pid
            # Connections on the port reach both processes (the kernel spreads them).
            listening = {
                c.pid
                for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
            }
            assert listening == started
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def test_a_worker_stops_when_the_first_process_is_killed(
        self, tmp_path: Path, redis_url: str
    ) -> None:
        """kill -9 of the first process (which cannot stop anything) still stops the worker:
        it asked Linux for SIGTERM when its parent dies."""
        import psutil

        process, started = _two_workers(tmp_path, redis_url, free_port())
        try:
            (worker,) = started - {process.pid}
            child = psutil.Process(worker)
            process.kill()
            process.wait(timeout=30)
            child.wait(timeout=30)
            assert not child.is_running()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def test_a_worker_that_dies_is_started_again(self, tmp_path: Path, redis_url: str) -> None:
        """kill -9 of a worker: the first process notices, starts a new one on the same port,
        and still stops it with itself."""
        import psutil

        port = free_port()
        process, started = _two_workers(tmp_path, redis_url, port)
        try:
            (worker,) = started - {process.pid}
            psutil.Process(worker).kill()
            assert process.stdout is not None
            seen: list[dict[str, object]] = []
            # Without a restart no line would come: the kill ends the wait for one.
            timer = threading.Timer(60, process.kill)
            timer.start()
            for line in process.stdout:
                seen.append(json.loads(line))
                if seen[-1].get("event") == "service_started":
                    break
            timer.cancel()
            events = [e["event"] for e in seen]
            assert events[:2] == ["worker_exited", "worker_restarted"], events
            assert seen[0]["pid"] == worker and seen[0]["code"] == -signal.SIGKILL
            replacement = psutil.Process(int(str(seen[-1]["pid"])))
            assert replacement.pid == seen[1]["pid"] != worker
            assert replacement.ppid() == process.pid
            assert seen[-1]["port"] == port
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            assert not replacement.is_running() or replacement.status() == "zombie"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def test_metrics_count_the_calls_of_every_worker(self, tmp_path: Path, redis_url: str) -> None:
        """The first process's /metrics counts the calls both processes answered: the RPC
        counter and the latency histogram hold every call, not the first process's share."""
        import psutil

        metrics_port = free_port()
        port = free_port()
        process, started = _two_workers(
            tmp_path, redis_url, port, telemetry__metrics_port=str(metrics_port)
        )
        try:
            (worker,) = started - {process.pid}
            served = _health_checks(port, channels=16, calls=5)
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            families = {f.name: f for f in text_string_to_metric_families(text.decode())}
            checks = [
                s
                for s in families["modelserve_rpc"].samples
                if s.name == "modelserve_rpc_total"
                and s.labels["method"] == "/grpc.health.v1.Health/Check"
            ]
            latencies = [
                s
                for s in families["modelserve_rpc_duration_seconds"].samples
                if s.name == "modelserve_rpc_duration_seconds_count"
                and s.labels["method"] == "/grpc.health.v1.Health/Check"
            ]
            assert served == {process.pid, worker}, "16 connections all reached one process"
            assert [(s.labels["code"], s.value) for s in checks] == [("OK", 80.0)]
            assert [s.value for s in latencies] == [80.0]
            assert psutil.Process(worker).is_running()
        finally:
            process.terminate()
            process.wait(timeout=60)

    @pytest.mark.parametrize(
        ("script", "settings", "message"),
        [
            (
                "modelserve-feature",
                {"server__workers": "2"},
                "server.port must be set",
            ),
            (
                "modelserve-registry",
                {"server__workers": "2", "server__port": "1"},
                "registry keeps state in its process",
            ),
            (
                "modelserve-router",
                {"server__workers": "2", "server__port": "1", "server__http_port": "0"},
                "server.http_port must be set (not 0) or unset",
            ),
        ],
    )
    def test_workers_are_refused_where_they_cannot_work(
        self, tmp_path: Path, script: str, settings: dict[str, str], message: str
    ) -> None:
        """More than one worker needs a fixed port, and only stateless services take it."""
        prefix = "MODELSERVE_" + script.removeprefix("modelserve-").upper() + "_"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
        env |= {prefix + k.upper(): v for k, v in settings.items()}
        done = subprocess.run(
            [str(Path(sys.executable).parent / script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr

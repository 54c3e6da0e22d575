"""RegistrySettings: environment variable names, derived paths, and checks at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelserve_registry.config import RegistrySettings
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.config import ConfigError, load_settings


class TestRegistrySettings:
    def test_reads_its_environment_variables(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """MODELSERVE_REGISTRY_* variables set the data directory and limits; paths derive from it."""
        monkeypatch.setenv("MODELSERVE_REGISTRY_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("MODELSERVE_REGISTRY_MAX_ARTIFACT_BYTES", "2048")
        monkeypatch.setenv("MODELSERVE_REGISTRY_READ_CHUNK_BYTES", "512")
        settings = load_settings(RegistrySettings)
        assert settings.data_dir == tmp_path
        assert settings.db_path == tmp_path / "registry.db"
        assert settings.artifacts_dir == tmp_path / "artifacts"
        assert (settings.max_artifact_bytes, settings.read_chunk_bytes) == (2048, 512)

    def test_defaults(self) -> None:
        """By default data lives in .run/registry, artifacts up to 512 MiB, read in 1 MiB chunks."""
        settings = RegistrySettings()
        assert settings.data_dir == Path(".run/registry")
        assert settings.max_artifact_bytes == 512 * 1024 * 1024
        assert settings.read_chunk_bytes == 1024 * 1024

    def test_chunk_larger_than_a_message_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A read chunk that would not fit in one gRPC message stops the service at start."""
        monkeypatch.setenv("MODELSERVE_REGISTRY_READ_CHUNK_BYTES", str(8 * 1024 * 1024))
        with pytest.raises(ConfigError, match="MODELSERVE_REGISTRY_READ_CHUNK_BYTES"):
            load_settings(RegistrySettings)

    def test_bad_number_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A limit below 1 is refused, naming its environment variable."""
        monkeypatch.setenv("MODELSERVE_REGISTRY_MAX_ARTIFACT_BYTES", "0")
        with pytest.raises(ConfigError, match="MODELSERVE_REGISTRY_MAX_ARTIFACT_BYTES"):
            load_settings(RegistrySettings)

    def test_auth_is_off_by_default(self) -> None:
        """Without configuration auth is off, so a local stack needs no keys."""
        assert RegistrySettings().auth.enabled is False

    def test_auth_on_without_keys_names_the_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELSERVE_REGISTRY_AUTH__ENABLED=true with no keys stops the service at start."""
        monkeypatch.setenv("MODELSERVE_REGISTRY_AUTH__ENABLED", "true")
        with pytest.raises(ConfigError, match="MODELSERVE_REGISTRY_AUTH"):
            load_settings(RegistrySettings)

    def test_auth_keys_file_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """MODELSERVE_REGISTRY_AUTH__KEYS_FILE names a JSON file of key records."""
        _, record = new_api_key("alice", {Role.ADMIN}, n=16)
        path = tmp_path / "keys.json"
        path.write_text(json.dumps([record.model_dump(mode="json")]))
        monkeypatch.setenv("MODELSERVE_REGISTRY_AUTH__ENABLED", "true")
        monkeypatch.setenv("MODELSERVE_REGISTRY_AUTH__KEYS_FILE", str(path))
        settings = load_settings(RegistrySettings)
        assert settings.auth.all_keys() == [record]

"""TLS settings of servers and of outbound channels: off by default, and refused at start, with
the setting named, when incomplete or when the files are not what they must be."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from pki import KeyPair, certificate_authority, client_certificate, server_certificate
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from modelserve_inference.config import InferenceSettings
from modelserve_registry.config import RegistrySettings
from modelserve_router.config import RouterSettings
from modelserve_runtime.auth import Role
from modelserve_runtime.config import (
    ClientTlsSettings,
    ConfigError,
    ServerSettings,
    ServerTlsSettings,
    ServiceSettings,
    load_settings,
)

PREFIX = "MODELSERVE_TLSTEST_"


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX)


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    server: KeyPair
    client: KeyPair
    not_pem: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server and a client certificate it signed, and a file that is no PEM."""
    directory = tmp_path_factory.mktemp("pki")
    ca = certificate_authority(directory, "ca")
    not_pem = directory / "not.pem"
    not_pem.write_text("not a certificate\n")
    return Pki(
        ca,
        server_certificate(directory, "server", ca),
        client_certificate(directory, "client", ca),
        not_pem,
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MODELSERVE_"):
            monkeypatch.delenv(name)


def _refused(monkeypatch: pytest.MonkeyPatch, **env: str | Path) -> str:
    """The ConfigError message of loading settings with these `server.tls` variables."""
    for name, value in env.items():
        monkeypatch.setenv(f"{PREFIX}SERVER__TLS__{name.upper()}", str(value))
    with pytest.raises(ConfigError) as info:
        load_settings(_Settings)
    return str(info.value)


class TestServerTlsSettings:
    def test_off_by_default(self) -> None:
        """Without settings the server stays plaintext and asks no client for a certificate."""
        tls = ServerSettings().tls
        assert (tls.enabled, tls.client_ca_file, tls.client_roles) == (False, None, {})

    def test_loaded_from_env(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """The `SERVER__TLS__*` variables set TLS, the client CA and the roles of CNs."""
        for name, value in {
            "CERT_FILE": pki.server.cert,
            "KEY_FILE": pki.server.key,
            "CLIENT_CA_FILE": pki.ca.cert,
            "CLIENT_ROLES": '{"router": ["viewer"], "scorer": ["predict", "viewer"]}',
        }.items():
            monkeypatch.setenv(f"{PREFIX}SERVER__TLS__{name}", str(value))
        tls = load_settings(_Settings).server.tls
        assert tls.enabled
        assert tls.client_roles == {
            "router": frozenset({Role.VIEWER}),
            "scorer": frozenset({Role.PREDICT, Role.VIEWER}),
        }

    def test_cert_without_key(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """A certificate without its key is refused, naming server.tls and key_file."""
        message = _refused(monkeypatch, cert_file=pki.server.cert)
        assert "(server.tls)" in message
        assert "cert_file is set without key_file" in message

    def test_key_without_cert(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """A key without its certificate is refused, naming cert_file."""
        message = _refused(monkeypatch, key_file=pki.server.key)
        assert "(server.tls)" in message
        assert "key_file is set without cert_file" in message

    def test_client_ca_needs_tls(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """Client certificates without a server certificate are refused: mTLS is TLS first."""
        message = _refused(monkeypatch, client_ca_file=pki.ca.cert)
        assert "client_ca_file is set without cert_file and key_file" in message

    def test_client_roles_need_a_client_ca(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """Roles by certificate CN without verified client certificates are refused."""
        message = _refused(
            monkeypatch,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            client_roles='{"router": ["viewer"]}',
        )
        assert "client_roles is set without client_ca_file" in message

    @pytest.mark.parametrize("roles", ['{"router": []}', '{"router": ["root"]}'])
    def test_client_roles_must_be_roles(self, pki: Pki, roles: str) -> None:
        """A CN with no role, or with a role that does not exist, is refused."""
        with pytest.raises(ValidationError, match=r"client_roles\.router"):
            ServerTlsSettings.model_validate_json(
                f'{{"cert_file": "{pki.server.cert}", "key_file": "{pki.server.key}", '
                f'"client_ca_file": "{pki.ca.cert}", "client_roles": {roles}}}'
            )

    def test_key_of_another_certificate(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """A key that does not belong to the certificate is refused at start, not at the first
        handshake."""
        message = _refused(monkeypatch, cert_file=pki.server.cert, key_file=pki.client.key)
        assert "are not a PEM certificate and its private key" in message

    def test_client_ca_that_is_no_pem(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """A client CA file holding no certificate is refused, naming client_ca_file."""
        message = _refused(
            monkeypatch,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            client_ca_file=pki.not_pem,
        )
        assert f"client_ca_file {pki.not_pem} holds no PEM CA certificate" in message

    def test_missing_file(self, monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path) -> None:
        """A file that does not exist is refused, naming its variable."""
        message = _refused(monkeypatch, cert_file=tmp_path / "missing.crt", key_file=pki.server.key)
        assert f"{PREFIX}SERVER__TLS__CERT_FILE (server.tls.cert_file)" in message


class TestClientTlsSettings:
    def test_off_by_default(self) -> None:
        """Every service's outbound channels stay plaintext unless told otherwise."""
        router, registry = RouterSettings(), RegistrySettings()
        outbound = [
            router.registry_tls,
            router.inference_tls,
            router.feature_tls,
            registry.inference_tls,
            registry.monitor_tls,
            InferenceSettings().registry_tls,
        ]
        assert [tls.enabled for tls in outbound] == [False] * 6

    def test_files_without_enabled(self, pki: Pki) -> None:
        """A CA given while TLS is off is refused rather than silently ignored."""
        with pytest.raises(ValidationError, match="enabled is false"):
            ClientTlsSettings(ca_file=pki.ca.cert)

    def test_cert_without_key(self, pki: Pki) -> None:
        """A client certificate without its key is refused, naming key_file."""
        with pytest.raises(ValidationError, match="cert_file is set without key_file"):
            ClientTlsSettings(enabled=True, cert_file=pki.client.cert)

    def test_key_without_cert(self, pki: Pki) -> None:
        """A client key without its certificate is refused, naming cert_file."""
        with pytest.raises(ValidationError, match="key_file is set without cert_file"):
            ClientTlsSettings(enabled=True, key_file=pki.client.key)

    def test_ca_that_is_no_pem(self, pki: Pki) -> None:
        """A CA file holding no certificate is refused, naming ca_file."""
        with pytest.raises(ValidationError, match=r"ca_file .* holds no PEM CA certificate"):
            ClientTlsSettings(enabled=True, ca_file=pki.not_pem)

    def test_router_names_the_peer(self, monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
        """A router's incomplete registry TLS is refused naming registry_tls."""
        monkeypatch.setenv("MODELSERVE_ROUTER_REGISTRY_TLS__ENABLED", "true")
        monkeypatch.setenv("MODELSERVE_ROUTER_REGISTRY_TLS__CERT_FILE", str(pki.client.cert))
        with pytest.raises(ConfigError) as info:
            load_settings(RouterSettings)
        assert "MODELSERVE_ROUTER_REGISTRY_TLS (registry_tls)" in str(info.value)
        assert "cert_file is set without key_file" in str(info.value)

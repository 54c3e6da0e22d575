"""TLS for the CLI's channels from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pki import certificate_authority, client_certificate

from modelserve_cli.tls import cli_tls


def test_nothing_set_is_plaintext() -> None:
    assert cli_tls({}) is None
    assert cli_tls({"MODELSERVE_TLS": "no"}) is None


def test_the_switch_alone_trusts_the_system_roots() -> None:
    tls = cli_tls({"MODELSERVE_TLS": "true"})
    assert tls is not None and tls.enabled
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (None, None, None)


def test_files_turn_it_on_and_are_checked(tmp_path: Path) -> None:
    ca = certificate_authority(tmp_path, "ca")
    client = client_certificate(tmp_path, "cli", ca)
    tls = cli_tls(
        {
            "MODELSERVE_TLS_CA_FILE": str(ca.cert),
            "MODELSERVE_TLS_CERT_FILE": str(client.cert),
            "MODELSERVE_TLS_KEY_FILE": str(client.key),
            "MODELSERVE_TLS_SERVER_NAME": "registry.internal",
        }
    )
    assert tls is not None and tls.enabled
    assert (tls.ca_file, tls.cert_file, tls.server_name) == (
        ca.cert,
        client.cert,
        "registry.internal",
    )


def test_a_certificate_without_its_key_is_refused_naming_the_variables(tmp_path: Path) -> None:
    ca = certificate_authority(tmp_path, "ca")
    client = client_certificate(tmp_path, "cli", ca)
    with pytest.raises(ValueError, match="MODELSERVE_TLS_KEY_FILE") as info:
        cli_tls({"MODELSERVE_TLS_CERT_FILE": str(client.cert)})
    assert "key" in str(info.value)

"""TLS for the CLI's channels, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import ValidationError

from modelserve_runtime.config import ClientTlsSettings

#: The environment that turns TLS on for the CLI's channels (all optional).
TLS_ENV = {
    "ca_file": "MODELSERVE_TLS_CA_FILE",
    "cert_file": "MODELSERVE_TLS_CERT_FILE",
    "key_file": "MODELSERVE_TLS_KEY_FILE",
    "server_name": "MODELSERVE_TLS_SERVER_NAME",
}


def cli_tls(environ: Mapping[str, str] | None = None) -> ClientTlsSettings | None:
    """TLS for the CLI's calls, from the environment: on when `MODELSERVE_TLS=true` or any of
    TLS_ENV is set (the CA the server's certificate chains to, else the system's; a client
    certificate and key for a server that requires one; the name the server's certificate
    carries when it is not the dialled host). None: plaintext. A wrong combination raises
    ValueError naming the setting."""
    env = os.environ if environ is None else environ
    values = {field: env[name] for field, name in TLS_ENV.items() if env.get(name)}
    if not values and env.get("MODELSERVE_TLS", "").lower() not in ("1", "true", "yes"):
        return None
    try:
        return ClientTlsSettings.model_validate({"enabled": True, **values})
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors())
        raise ValueError(f"TLS settings ({', '.join(TLS_ENV.values())}): {problems}") from None

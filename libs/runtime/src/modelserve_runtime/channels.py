"""Outbound gRPC channels: traced, with a deadline on every call and bounded message sizes."""

from __future__ import annotations

import grpc

from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.interceptors import client_interceptors

DEFAULT_TIMEOUT_S = 5.0
#: How often a channel pings its server while a call is open, so that a quiet stream through a
#: dead connection (a peer gone without a FIN) is noticed; the project's servers accept this.
KEEPALIVE_MS = 30_000


def channel_credentials(tls: ClientTlsSettings) -> grpc.ChannelCredentials:
    """The CAs that the server's certificate must chain to, and the client's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls.ca_file is None else tls.ca_file.read_bytes(),
        private_key=None if tls.key_file is None else tls.key_file.read_bytes(),
        certificate_chain=None if tls.cert_file is None else tls.cert_file.read_bytes(),
    )


#: Targets of these schemes are spread over every address they resolve to (round robin).
SPREAD_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def create_channel(
    target: str,
    *,
    default_timeout_s: float = DEFAULT_TIMEOUT_S,
    max_message_bytes: int = 4 * 1024 * 1024,
    api_key: str | None = None,
    tls: ClientTlsSettings | None = None,
    keepalive_ms: int = KEEPALIVE_MS,
) -> grpc.aio.Channel:
    """An aio channel to `target` whose calls always carry a deadline, and the API key
    `api_key` (as `x-api-key`) when one is given; TLS when `tls` is enabled, else plaintext.
    While a call is open it pings the server every `keepalive_ms`. A target with a resolver
    scheme (SPREAD_SCHEMES) spreads calls over all the servers it resolves to."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.enable_retries", 1),
        # A restarted peer is found again within seconds, not gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if target.startswith(SPREAD_SCHEMES):
        # A target that names its resolver (`dns:///feature-headless:50053`, a Kubernetes
        # headless Service; `ipv4:a:p,b:p`) may resolve to many servers: calls go round them
        # all rather than to the first, which a ClusterIP Service would do per connection.
        options.append(("grpc.lb_policy_name", "round_robin"))
    interceptors = client_interceptors(default_timeout_s, api_key)
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        target, channel_credentials(tls), options=options, interceptors=interceptors
    )

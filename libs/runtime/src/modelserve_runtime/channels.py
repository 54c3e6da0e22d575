"""Outbound gRPC channels: traced, with a deadline on every call and bounded message sizes."""

from __future__ import annotations

import grpc

from modelserve_runtime.interceptors import client_interceptors

DEFAULT_TIMEOUT_S = 5.0


def create_channel(
    target: str,
    *,
    default_timeout_s: float = DEFAULT_TIMEOUT_S,
    max_message_bytes: int = 4 * 1024 * 1024,
    api_key: str | None = None,
) -> grpc.aio.Channel:
    """An insecure aio channel to `target` whose calls always carry a deadline, and the API
    key `api_key` (as `x-api-key`) when one is given."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 1),
        # A restarted peer is found again within seconds, not gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    return grpc.aio.insecure_channel(
        target, options=options, interceptors=client_interceptors(default_timeout_s, api_key)
    )

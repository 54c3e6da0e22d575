"""An in-test Consul agent: a small HTTP server in a thread that speaks the few endpoints
ConsulDiscovery (py-consul) uses, with the request and response shapes of Consul's HTTP API,
and records what it was sent.

No Consul binary can be installed here. With `check_registered`, the agent does what a real
one does for a service registered with a gRPC check: it asks the instance's gRPC health
service, and reports it passing only while it answers SERVING.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class FakeConsul:
    """What the fake agent was sent, and the instances it reports as passing."""

    port: int = 0
    registered: list[dict[str, Any]] = field(default_factory=list)
    deregistered: list[str] = field(default_factory=list)
    health_queries: list[dict[str, list[str]]] = field(default_factory=list)
    tokens: list[str | None] = field(default_factory=list)
    passing: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    index: int = 42
    check_registered: bool = False
    """Whether registered services (not yet deregistered) are reported too, each while its
    gRPC health check answers SERVING."""


def instance(
    service: str, address: str, port: int, node_address: str = "10.9.9.9"
) -> dict[str, Any]:
    """One entry of GET /v1/health/service/<name>, shaped as Consul returns it."""
    return {
        "Node": {"ID": "node-1", "Node": "node-1", "Address": node_address, "Datacenter": "dc1"},
        "Service": {
            "ID": f"{service}-{address}-{port}",
            "Service": service,
            "Tags": ["modelserve", "grpc"],
            "Address": address,
            "Port": port,
        },
        "Checks": [{"CheckID": f"service:{service}", "Status": "passing"}],
    }


def key(mapping: dict[str, Any], name: str) -> Any:
    """A value by key, ignoring case, as Consul decodes its JSON bodies."""
    matches = [value for k, value in mapping.items() if k.lower() == name.lower()]
    assert len(matches) == 1, f"{name} not in {mapping}"
    return matches[0]


def _serving(target: str) -> bool:
    """One gRPC health check, as the agent runs it on the check's `GRPC` address."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _checked_instances(state: FakeConsul, service: str) -> list[dict[str, Any]]:
    """The registered, not deregistered instances of `service` whose gRPC check passes."""
    found = []
    for body in list(state.registered):
        if key(body, "Name") != service or key(body, "ID") in state.deregistered:
            continue
        if all(_serving(key(check, "GRPC")) for check in key(body, "Checks")):
            found.append(instance(service, key(body, "Address"), key(body, "Port")))
    return found


def _handler(state: FakeConsul) -> type[BaseHTTPRequestHandler]:
    class ConsulAgent(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _reply(
            self, status: int, body: Any = None, headers: dict[str, str] | None = None
        ) -> None:
            payload = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_PUT(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.tokens.append(self.headers.get("X-Consul-Token"))
            if url.path == "/v1/agent/service/register":
                state.registered.append(json.loads(body))
                self._reply(200)
            elif url.path.startswith("/v1/agent/service/deregister/"):
                state.deregistered.append(url.path.rsplit("/", 1)[1])
                self._reply(200)
            else:
                self._reply(404)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            prefix = "/v1/health/service/"
            if not url.path.startswith(prefix):
                self._reply(404)
                return
            query = parse_qs(url.query)
            state.health_queries.append(query)
            service = url.path[len(prefix) :]
            entries = list(state.passing.get(service, [])) if "passing" in query else []
            if "passing" in query and state.check_registered:
                entries.extend(_checked_instances(state, service))
            self._reply(200, entries, {"X-Consul-Index": str(state.index)})

    return ConsulAgent


@contextmanager
def fake_consul(*, check_registered: bool = False) -> Iterator[FakeConsul]:
    """A fake Consul agent on a free loopback port, stopped on exit."""
    state = FakeConsul(check_registered=check_registered)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

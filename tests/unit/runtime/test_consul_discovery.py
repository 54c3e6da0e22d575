"""Service discovery: StaticDiscovery, and ConsulDiscovery (py-consul) against an in-test Consul.

No Consul binary can be installed here, so a small HTTP server in a thread speaks the
few agent endpoints the client uses, with the request and response shapes of Consul's
HTTP API, and records what it was sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from modelserve_runtime.config import DiscoverySettings
from modelserve_runtime.discovery import ConsulDiscovery, StaticDiscovery, create_discovery
from modelserve_runtime.errors import UnavailableError


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


def _instance(
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
            entries = state.passing.get(url.path[len(prefix) :], []) if "passing" in query else []
            self._reply(200, entries, {"X-Consul-Index": str(state.index)})

    return ConsulAgent


@pytest.fixture
def consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsul]:
    """A fake Consul agent on a free loopback port, for one test."""
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_ADDR"):
        monkeypatch.delenv(name, raising=False)
    state = FakeConsul()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _key(mapping: dict[str, Any], name: str) -> Any:
    """A value by key, ignoring case, as Consul decodes its JSON bodies."""
    matches = [value for key, value in mapping.items() if key.lower() == name.lower()]
    assert len(matches) == 1, f"{name} not in {mapping}"
    return matches[0]


class TestConsulDiscovery:
    async def test_register_announces_the_service_with_a_grpc_check(
        self, consul: FakeConsul
    ) -> None:
        """register sends name, ID, address, port and a gRPC health check on host:port."""
        discovery = ConsulDiscovery(
            "127.0.0.1", consul.port, check_interval="7s", deregister_after="3m"
        )
        await discovery.register("router", "10.1.2.3", 7001)
        (body,) = consul.registered
        assert _key(body, "Name") == "router"
        assert _key(body, "ID") == "router-10.1.2.3-7001"
        assert _key(body, "Address") == "10.1.2.3"
        assert _key(body, "Port") == 7001
        (check,) = _key(body, "Checks")
        assert _key(check, "GRPC") == "10.1.2.3:7001"
        assert _key(check, "Interval") == "7s"
        assert _key(check, "DeregisterCriticalServiceAfter") == "3m"

    async def test_token_is_sent_to_the_agent(self, consul: FakeConsul) -> None:
        """The ACL token goes in the X-Consul-Token header of each call."""
        discovery = ConsulDiscovery("127.0.0.1", consul.port, token="acl-token")
        await discovery.register("router", "10.1.2.3", 7001)
        await discovery.deregister()
        assert consul.tokens == ["acl-token", "acl-token"]

    async def test_resolve_returns_a_passing_instance(self, consul: FakeConsul) -> None:
        """resolve asks Consul for passing instances only and answers host:port of one of them."""
        consul.passing["feature"] = [_instance("feature", "10.0.0.5", 7002)]
        discovery = ConsulDiscovery("127.0.0.1", consul.port)
        assert await discovery.resolve("feature") == "10.0.0.5:7002"
        (query,) = consul.health_queries
        assert query["passing"] == ["1"]

    async def test_resolve_falls_back_to_the_node_address(self, consul: FakeConsul) -> None:
        """An instance registered without an address is reached at its node's address."""
        consul.passing["feature"] = [_instance("feature", "", 7002, node_address="10.0.0.8")]
        discovery = ConsulDiscovery("127.0.0.1", consul.port)
        assert await discovery.resolve("feature") == "10.0.0.8:7002"

    async def test_resolve_without_passing_instances_is_unavailable(
        self, consul: FakeConsul
    ) -> None:
        """No passing instance raises UnavailableError naming the service."""
        discovery = ConsulDiscovery("127.0.0.1", consul.port)
        with pytest.raises(UnavailableError) as info:
            await discovery.resolve("inference")
        assert info.value.reason == "NO_HEALTHY_INSTANCE"
        assert info.value.metadata == {"service": "inference"}

    async def test_deregister_withdraws_the_registration_once(self, consul: FakeConsul) -> None:
        """deregister sends the registered service id; a second call sends nothing."""
        discovery = ConsulDiscovery("127.0.0.1", consul.port)
        await discovery.deregister()
        await discovery.register("router", "10.1.2.3", 7001)
        await discovery.deregister()
        await discovery.deregister()
        assert consul.deregistered == ["router-10.1.2.3-7001"]

    def test_settings_choose_consul(self, consul: FakeConsul) -> None:
        """mode=consul gives ConsulDiscovery; the default gives StaticDiscovery."""
        chosen = create_discovery(DiscoverySettings(mode="consul", consul_port=consul.port))
        assert isinstance(chosen, ConsulDiscovery)
        assert isinstance(create_discovery(DiscoverySettings()), StaticDiscovery)


class TestStaticDiscovery:
    async def test_resolve_returns_the_configured_address(self) -> None:
        """A configured service resolves to its address; registration changes nothing."""
        discovery = StaticDiscovery({"feature": "127.0.0.1:7002"})
        await discovery.register("router", "127.0.0.1", 7001)
        assert await discovery.resolve("feature") == "127.0.0.1:7002"
        await discovery.deregister()

    async def test_missing_service_is_unavailable(self) -> None:
        """A service without a configured address raises UnavailableError naming it."""
        with pytest.raises(UnavailableError) as info:
            await StaticDiscovery({}).resolve("registry")
        assert info.value.reason == "SERVICE_NOT_CONFIGURED"
        assert info.value.metadata == {"service": "registry"}

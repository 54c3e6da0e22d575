"""Service discovery: StaticDiscovery, and ConsulDiscovery (py-consul) against an in-test Consul.

No Consul binary can be installed here, so the fake agent in tests/consul_fake.py (a small
HTTP server in a thread) speaks the few agent endpoints the client uses, with the request and
response shapes of Consul's HTTP API, and records what it was sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from consul_fake import FakeConsul, fake_consul, instance, key

from modelserve_runtime.config import DiscoverySettings
from modelserve_runtime.discovery import ConsulDiscovery, StaticDiscovery, create_discovery
from modelserve_runtime.errors import UnavailableError


@pytest.fixture
def consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeConsul]:
    """A fake Consul agent on a free loopback port, for one test."""
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with fake_consul() as state:
        yield state


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
        assert key(body, "Name") == "router"
        assert key(body, "ID") == "router-10.1.2.3-7001"
        assert key(body, "Address") == "10.1.2.3"
        assert key(body, "Port") == 7001
        (check,) = key(body, "Checks")
        assert key(check, "GRPC") == "10.1.2.3:7001"
        assert key(check, "Interval") == "7s"
        assert key(check, "DeregisterCriticalServiceAfter") == "3m"

    async def test_token_is_sent_to_the_agent(self, consul: FakeConsul) -> None:
        """The ACL token goes in the X-Consul-Token header of each call."""
        discovery = ConsulDiscovery("127.0.0.1", consul.port, token="acl-token")
        await discovery.register("router", "10.1.2.3", 7001)
        await discovery.deregister()
        assert consul.tokens == ["acl-token", "acl-token"]

    async def test_resolve_returns_a_passing_instance(self, consul: FakeConsul) -> None:
        """resolve asks Consul for passing instances only and answers host:port of one of them."""
        consul.passing["feature"] = [instance("feature", "10.0.0.5", 7002)]
        discovery = ConsulDiscovery("127.0.0.1", consul.port)
        assert await discovery.resolve("feature") == "10.0.0.5:7002"
        (query,) = consul.health_queries
        assert query["passing"] == ["1"]

    async def test_resolve_falls_back_to_the_node_address(self, consul: FakeConsul) -> None:
        """An instance registered without an address is reached at its node's address."""
        consul.passing["feature"] = [instance("feature", "", 7002, node_address="10.0.0.8")]
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

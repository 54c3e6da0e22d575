"""Service discovery behind one interface: static addresses, or Consul."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Protocol

import structlog

from modelserve_runtime.config import DiscoverySettings
from modelserve_runtime.errors import UnavailableError

log = structlog.get_logger()


class Discovery(Protocol):
    """Finds the address of a service and announces this one."""

    async def resolve(self, service: str) -> str:
        """Returns one `host:port` of a healthy instance; UnavailableError when none."""
        ...

    async def register(self, service: str, host: str, port: int) -> None:
        """Announces this process as an instance of `service`."""
        ...

    async def deregister(self) -> None:
        """Withdraws what `register` announced."""
        ...


class StaticDiscovery:
    """Addresses from configuration; registration is a no-op."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self._addresses = dict(addresses)

    async def resolve(self, service: str) -> str:
        try:
            return self._addresses[service]
        except KeyError:
            raise UnavailableError(
                f"no address configured for service {service!r}",
                reason="SERVICE_NOT_CONFIGURED",
                metadata={"service": service},
            ) from None

    async def register(self, service: str, host: str, port: int) -> None:
        return None

    async def deregister(self) -> None:
        return None


class ConsulDiscovery:
    """Registers with a gRPC health check and resolves passing instances through Consul."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        check_interval: str = "5s",
        deregister_after: str = "1m",
    ) -> None:
        import consul

        self._consul: Any = consul.Consul(
            host=host, port=port, token=token, connections_timeout=timeout_s
        )
        self._check_interval = check_interval
        self._deregister_after = deregister_after
        self._service_id: str | None = None

    async def register(self, service: str, host: str, port: int) -> None:
        import consul

        service_id = f"{service}-{host}-{port}"
        check = consul.Check.grpc(
            f"{host}:{port}", self._check_interval, timeout="2s", deregister=self._deregister_after
        )
        await asyncio.to_thread(
            self._consul.agent.service.register,
            service,
            service_id=service_id,
            address=host,
            port=port,
            check=check,
            tags=["modelserve", "grpc"],
        )
        self._service_id = service_id
        log.info("consul_registered", service=service, service_id=service_id)

    async def deregister(self) -> None:
        if self._service_id is None:
            return
        service_id, self._service_id = self._service_id, None
        await asyncio.to_thread(self._consul.agent.service.deregister, service_id)
        log.info("consul_deregistered", service_id=service_id)

    async def resolve(self, service: str) -> str:
        _index, entries = await asyncio.to_thread(
            self._consul.health.service, service, passing=True
        )
        if not entries:
            raise UnavailableError(
                f"no passing instance of service {service!r} in Consul",
                reason="NO_HEALTHY_INSTANCE",
                metadata={"service": service},
            )
        entry = random.choice(entries)
        address = entry["Service"]["Address"] or entry["Node"]["Address"]
        return f"{address}:{entry['Service']['Port']}"


def create_discovery(settings: DiscoverySettings) -> Discovery:
    """The discovery implementation that the settings choose."""
    if settings.mode == "consul":
        return ConsulDiscovery(
            settings.consul_host,
            settings.consul_port,
            token=settings.consul_token,
            timeout_s=settings.consul_timeout_s,
        )
    return StaticDiscovery(settings.static)

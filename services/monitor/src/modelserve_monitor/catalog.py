"""The registry, as the monitor asks it about a version: GetModelVersion and GetModel."""

from __future__ import annotations

import grpc

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.discovery import Discovery
from modelserve_runtime.errors import NotFoundError, UnavailableError

#: A validation set may hold up to 100 000 rows: answers up to this size are read.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Registry answers that say the version is not one it knows, now or later.
_UNKNOWN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class RegistryCatalog:
    """Asks the registry at `target`, or at the address discovery gives for `registry`.

    With discovery the address is looked up when there is no channel, and the channel is
    dropped when the registry is unavailable, so the next attempt may find another instance.
    """

    def __init__(
        self,
        target: str | None,
        discovery: Discovery,
        *,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        tls: ClientTlsSettings | None = None,
    ) -> None:
        self._target = target
        self._discovery = discovery
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None

    async def version_and_model(
        self, model_version: str
    ) -> tuple[registry_pb.ModelVersion, registry_pb.Model]:
        """The version and its model; NotFoundError when the registry does not know them (or
        the name is not a version's), UnavailableError when the registry could not be asked."""
        stub = registry_grpc.RegistryServiceStub(await self._open())
        model_name = model_version.partition("/versions/")[0]
        try:
            version = await stub.GetModelVersion(
                registry_pb.GetModelVersionRequest(name=model_version), timeout=self._timeout_s
            )
            model = await stub.GetModel(
                registry_pb.GetModelRequest(name=model_name), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _UNKNOWN:
                raise NotFoundError(
                    f"{model_version}: the registry answered {code.name}: {exc.details()}",
                    metadata={"model_version": model_version},
                ) from exc
            if self._target is None and code is grpc.StatusCode.UNAVAILABLE:
                await self.close()
            raise UnavailableError(
                f"{model_version}: the registry answered {code.name}: {exc.details()}",
                reason="UPSTREAM_UNAVAILABLE",
                metadata={"upstream_code": code.name},
            ) from exc
        return version.model_version, model.model

    async def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            target = self._target or await self._discovery.resolve("registry")
            self._channel = create_channel(
                target,
                default_timeout_s=self._timeout_s,
                max_message_bytes=MAX_MESSAGE_BYTES,
                api_key=self._api_key,
                tls=self._tls,
            )
        return self._channel

    async def close(self) -> None:
        """Closes the channel, if one is open."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

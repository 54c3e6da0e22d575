"""TLS and mutual TLS of a real server built by build_grpc_server, reached through
create_channel, and the principal that a verified client certificate names."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import KeyPair, certificate_authority, client_certificate, server_certificate
from pydantic_settings import SettingsConfigDict

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_runtime.auth import (
    ApiKeyAuthenticator,
    AuthInterceptor,
    Role,
    current_principal,
    new_api_key,
)
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ClientTlsSettings, ServerSettings, ServiceSettings
from modelserve_runtime.errors import decode_rpc_error
from modelserve_runtime.server import build_grpc_server

METHOD = "/modelserve.feature.v1.FeatureService/GetOnlineFeatures"


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_TLSTEST_")


class _Recording(pb_grpc.FeatureServiceServicer):
    """Answers every call and remembers the principal of each."""

    def __init__(self) -> None:
        self.principals: list[str] = []

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetOnlineFeaturesResponse:
        self.principals.append(current_principal())
        return pb.GetOnlineFeaturesResponse()


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    server: KeyPair
    #: A server certificate naming only `modelserve.internal`, not the address dialled.
    named_server: KeyPair
    scorer: KeyPair
    auditor: KeyPair
    unlisted: KeyPair
    #: A client certificate whose CN is listed, signed by a CA the server does not trust.
    stranger: KeyPair
    other_ca: KeyPair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = certificate_authority(directory, "ca")
    other_ca = certificate_authority(directory, "other-ca")
    return Pki(
        ca=ca,
        server=server_certificate(directory, "server", ca),
        named_server=server_certificate(directory, "named", ca, "DNS:modelserve.internal"),
        scorer=client_certificate(directory, "scorer", ca),
        auditor=client_certificate(directory, "auditor", ca),
        unlisted=client_certificate(directory, "unlisted", ca),
        stranger=client_certificate(directory / "other", "scorer", other_ca),
        other_ca=other_ca,
    )


@asynccontextmanager
async def served(
    tls: dict[str, Any], auth: Sequence[grpc.aio.ServerInterceptor] = ()
) -> AsyncIterator[tuple[str, _Recording]]:
    """A real server with `server.tls` set to `tls`; yields its address and its servicer."""
    servicer = _Recording()

    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["FeatureService"].full_name]

    settings = _Settings(server=ServerSettings.model_validate({"tls": tls}))
    grpc_server = build_grpc_server("tlstest", settings, register, inner_interceptors=auth)
    await grpc_server.server.start()
    try:
        yield f"127.0.0.1:{grpc_server.port}", servicer
    finally:
        await grpc_server.server.stop(0)


def client_tls(ca: KeyPair, client: KeyPair | None = None, **extra: Any) -> ClientTlsSettings:
    return ClientTlsSettings(
        enabled=True,
        ca_file=ca.cert,
        cert_file=None if client is None else client.cert,
        key_file=None if client is None else client.key,
        **extra,
    )


async def call(
    target: str, tls: ClientTlsSettings | None, api_key: str | None = None
) -> grpc.StatusCode:
    """The code one GetOnlineFeatures call over a fresh channel ends with."""
    async with create_channel(target, tls=tls, api_key=api_key, default_timeout_s=10) as channel:
        try:
            await pb_grpc.FeatureServiceStub(channel).GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest()
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _server(pki: Pki, pair: KeyPair | None = None, **extra: Path | dict[str, list[str]]) -> Any:
    pair = pair or pki.server
    return {"cert_file": pair.cert, "key_file": pair.key, **extra}


class TestServerTls:
    async def test_tls_client_is_served_and_plaintext_is_not(self, pki: Pki) -> None:
        """With a server certificate, a client trusting its CA is served; a plaintext client
        and a client trusting another CA fail to connect (UNAVAILABLE)."""
        async with served(_server(pki)) as (target, servicer):
            assert await call(target, client_tls(pki.ca)) is grpc.StatusCode.OK
            assert await call(target, None) is grpc.StatusCode.UNAVAILABLE
            assert await call(target, client_tls(pki.other_ca)) is grpc.StatusCode.UNAVAILABLE
        assert servicer.principals == ["anonymous"]

    async def test_server_name_checks_another_name(self, pki: Pki) -> None:
        """A certificate that does not name the address dialled is refused unless the client
        checks the name it does carry (`server_name`)."""
        async with served(_server(pki, pki.named_server)) as (target, _):
            assert await call(target, client_tls(pki.ca)) is grpc.StatusCode.UNAVAILABLE
            named = client_tls(pki.ca, server_name="modelserve.internal")
            assert await call(target, named) is grpc.StatusCode.OK


class TestMutualTls:
    async def test_only_a_certificate_of_the_client_ca_gets_through(self, pki: Pki) -> None:
        """With a client CA, a client with a certificate it signed is served; one with no
        certificate, or with one another CA signed, cannot connect (UNAVAILABLE: the
        handshake fails before any call, so there is no status from the server to give)."""
        async with served(_server(pki, client_ca_file=pki.ca.cert)) as (target, _):
            assert await call(target, client_tls(pki.ca, pki.scorer)) is grpc.StatusCode.OK
            assert await call(target, client_tls(pki.ca)) is grpc.StatusCode.UNAVAILABLE
            stranger = client_tls(pki.ca, pki.stranger)
            assert await call(target, stranger) is grpc.StatusCode.UNAVAILABLE


class TestCertificatePrincipal:
    @asynccontextmanager
    async def secured(self, pki: Pki) -> AsyncIterator[tuple[str, _Recording, str]]:
        """Auth on; only `predict` may call; CN `scorer` holds it, CN `auditor` holds
        `viewer`; yields the address, the servicer and a viewer's API key."""
        key, record = new_api_key("vera", {Role.VIEWER}, n=16)
        auth = AuthInterceptor(
            ApiKeyAuthenticator([record]),
            {METHOD: frozenset({Role.PREDICT})},
            certificate_roles={
                "scorer": frozenset({Role.PREDICT}),
                "auditor": frozenset({Role.VIEWER}),
            },
        )
        tls = _server(
            pki,
            client_ca_file=pki.ca.cert,
            client_roles={"scorer": ["predict"], "auditor": ["viewer"]},
        )
        async with served(tls, [auth]) as (target, servicer):
            yield target, servicer, key

    async def test_listed_cn_is_the_principal(self, pki: Pki) -> None:
        """A call with no key over a verified certificate whose CN is listed runs as that CN."""
        async with self.secured(pki) as (target, servicer, _):
            assert await call(target, client_tls(pki.ca, pki.scorer)) is grpc.StatusCode.OK
        assert servicer.principals == ["scorer"]

    async def test_unlisted_cn_needs_a_key(self, pki: Pki) -> None:
        """A verified certificate whose CN is not listed is no principal: UNAUTHENTICATED."""
        async with (
            self.secured(pki) as (target, _, _),
            create_channel(target, tls=client_tls(pki.ca, pki.unlisted)) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.FeatureServiceStub(channel).GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest()
                )
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")

    async def test_cn_roles_are_checked(self, pki: Pki) -> None:
        """A listed CN without the method's role is PERMISSION_DENIED."""
        async with self.secured(pki) as (target, _, _):
            code = await call(target, client_tls(pki.ca, pki.auditor))
        assert code is grpc.StatusCode.PERMISSION_DENIED

    async def test_a_key_decides_over_the_certificate(self, pki: Pki) -> None:
        """A key sent over a certificate that would be allowed is what is checked: a viewer's
        key is PERMISSION_DENIED though CN `scorer` may predict."""
        async with self.secured(pki) as (target, servicer, viewer_key):
            code = await call(target, client_tls(pki.ca, pki.scorer), api_key=viewer_key)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert servicer.principals == []

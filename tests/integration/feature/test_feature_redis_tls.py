"""The feature service on a real Redis that speaks only TLS and checks client certificates,
with a CA and certificates made for the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from feature_testing import customer_view, double, entity, rpc_error, write
from redis_topologies import Certificates, TlsServer, feature_service, make_certificates, tls_server

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve_feature.config import FeatureSettings
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.redis_connect import RedisConnection, RedisTls

AVG = "customer:avg_amount_30d"


@dataclass(frozen=True)
class TlsSetup:
    """The server and the certificates it trusts."""

    server: TlsServer
    certs: Certificates


@pytest.fixture(scope="module")
async def tls(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsSetup]:
    """Certificates, and a TLS-only server using them, for the module."""
    work_dir = tmp_path_factory.mktemp("tls")
    certs = make_certificates(work_dir / "pki")
    async with tls_server(work_dir / "redis", certs) as server:
        yield TlsSetup(server, certs)


def _settings(
    tls: TlsSetup, *, ca: Path | None, client_cert: bool = True, scheme: str = "redis"
) -> FeatureSettings:
    return FeatureSettings(
        redis=RedisConnection(
            url=f"{scheme}://127.0.0.1:{tls.server.port}/0",
            tls=RedisTls(
                enabled=scheme == "redis",
                ca_file=ca,
                cert_file=tls.certs.client_cert if client_cert else None,
                key_file=tls.certs.client_key if client_cert else None,
            ),
        )
    )


class TestTls:
    @pytest.mark.parametrize("scheme", ["redis", "rediss"])
    async def test_verified_server_and_client_certificate(self, tls: TlsSetup, scheme: str) -> None:
        """With the CA that signed the server's certificate and a client certificate, the
        service defines a view, writes and reads over TLS (turned on by `tls.enabled` or by a
        `rediss://` url)."""
        settings = _settings(tls, ca=tls.certs.ca, scheme=scheme)
        async with feature_service(settings) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(3.5)})])
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
            )
        assert response.results[0].values[AVG].double_value == 3.5

    async def test_a_server_signed_by_another_ca_is_refused(self, tls: TlsSetup) -> None:
        """Trusting only another CA, the service does not accept the server's certificate:
        not ready, and calls are UNAVAILABLE saying the certificate did not verify."""
        async with feature_service(_settings(tls, ca=tls.certs.other_ca), ready=False) as service:
            with pytest.raises(UnavailableError) as ready:
                await service.app.check_ready()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await service.stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
                )
        assert "certificate verify failed" in ready.value.message
        assert rpc_error(info).code is grpc.StatusCode.UNAVAILABLE
        assert "certificate verify failed" in rpc_error(info).message

    async def test_without_a_client_certificate_the_server_refuses(self, tls: TlsSetup) -> None:
        """A server that checks clients turns away a service without a client certificate
        (the readiness check fails with UNAVAILABLE), so the test above passing means the
        service presented its certificate."""
        settings = _settings(tls, ca=tls.certs.ca, client_cert=False)
        async with feature_service(settings, ready=False) as service:
            with pytest.raises(UnavailableError) as ready:
                await service.app.check_ready()
        assert ready.value.reason == "REDIS_UNAVAILABLE"
        assert f"127.0.0.1:{tls.server.port}" in ready.value.message

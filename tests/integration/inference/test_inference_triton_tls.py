"""Remote mode over TLS: the inference service loads into and infers through a Triton that
serves gRPC over mutual TLS, and publishes only that endpoint; its settings refuse TLS for
the local Triton, which listens on 127.0.0.1 in plaintext."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from inference_testing import (
    V1,
    RunningInference,
    assert_answers_as,
    held,
    infer,
    infer_request,
    load,
)
from pki import KeyPair, certificate_authority, client_certificate, server_certificate
from pydantic import ValidationError

from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.config import ClientTlsSettings
from modelserve_triton.process import GrpcServerTls, TritonOptions, TritonServer

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("pki")
    ca = certificate_authority(directory, "ca")
    return {
        "ca": ca,
        "server": server_certificate(directory, "triton", ca),
        "client": client_certificate(directory, "inference", ca),
    }


@pytest.fixture(scope="module")
async def tls_triton(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, KeyPair]
) -> AsyncIterator[TritonServer]:
    """A tritonserver, not the service's own, requiring TLS and a client certificate."""
    server = TritonServer(
        TritonOptions(
            work_dir=tmp_path_factory.mktemp("tls-triton"),
            grpc_tls=GrpcServerTls(pki["server"].cert, pki["server"].key, pki["ca"].cert),
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def inference_settings(
    registry_target: str, tls_triton: TritonServer, pki: dict[str, KeyPair]
) -> InferenceSettings:
    """Remote mode on the TLS Triton, with its HTTP endpoint named too (to be left unused)."""
    return InferenceSettings(
        triton_mode="remote",
        triton_url=tls_triton.grpc_endpoint,
        triton_http_url=tls_triton.http_endpoint,
        triton_tls=ClientTlsSettings(
            enabled=True,
            ca_file=pki["ca"].cert,
            cert_file=pki["client"].cert,
            key_file=pki["client"].key,
        ),
        registry_target=registry_target,
    )


class TestRemoteTritonOverTls:
    async def test_loads_infers_and_publishes_only_the_tls_endpoint(
        self,
        inference_service: RunningInference,
        tls_triton: TritonServer,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """The version loads READY through TLS and answers as the model does; what is
        published for routers is the gRPC endpoint, no HTTP one."""
        await load(inference_service.stub, V1)
        assert_answers_as(await infer(inference_service.stub, infer_request(V1)), fraud_models[V1])
        (version,) = [v for v in await held(inference_service.stub) if v.name == V1]
        assert version.triton_endpoint == tls_triton.grpc_endpoint
        assert version.triton_http_endpoint == ""


def test_tls_to_the_local_triton_is_refused() -> None:
    """`triton_tls` with `triton_mode: local` is a settings error naming both."""
    with pytest.raises(ValidationError, match="triton_tls is for a remote Triton"):
        InferenceSettings(triton_mode="local", triton_tls=ClientTlsSettings(enabled=True))

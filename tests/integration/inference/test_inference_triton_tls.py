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
from pki import KeyPair, triton_pki
from pydantic import ValidationError
from support import tls_tritonserver

from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.config import ClientTlsSettings
from modelserve_triton.process import TritonServer

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    return triton_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def tls_triton(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, KeyPair]
) -> AsyncIterator[TritonServer]:
    """A tritonserver, not the service's own, requiring TLS and a client certificate."""
    async with tls_tritonserver(
        tmp_path_factory.mktemp("tls-triton"), pki["server"], pki["ca"]
    ) as server:
        yield server


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

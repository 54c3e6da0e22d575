"""Triton's gRPC endpoint over mutual TLS: a real tritonserver started with `--grpc-use-ssl`,
the runner that loads and infers through it with the CA and a client certificate, the
router's direct runner choosing gRPC over TLS, and the clients it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import onnxruntime as ort
import pytest
from pki import KeyPair, triton_pki
from support import tls_tritonserver

from modelserve_cli.stack import free_port
from modelserve_demo.fraud import TrainedModel, make_dataset, train
from modelserve_router.sources import ServedVersion, TritonModelRunner
from modelserve_runtime.channels import channel_credentials
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.errors import UnavailableError
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.process import TritonServer
from modelserve_triton.runner import TritonError, TritonRunner

pytestmark = pytest.mark.triton

MODEL = "fraud-tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    return triton_pki(tmp_path_factory.mktemp("pki"))


def tls(
    pki: dict[str, KeyPair], client: str | None = "client", **extra: object
) -> ClientTlsSettings:
    pair = pki[client] if client else None
    return ClientTlsSettings(
        enabled=True,
        ca_file=pki["ca"].cert,
        cert_file=None if pair is None else pair.cert,
        key_file=None if pair is None else pair.key,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
async def tls_triton(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, KeyPair]
) -> AsyncIterator[TritonServer]:
    """A tritonserver whose gRPC endpoint requires TLS and a client certificate of our CA."""
    async with tls_tritonserver(
        tmp_path_factory.mktemp("triton-tls"), pki["server"], pki["ca"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
async def model(tls_triton: TritonServer, pki: dict[str, KeyPair]) -> TrainedModel:
    trained = train(seed=3)
    runner = TritonRunner(tls_triton.grpc_endpoint, credentials=channel_credentials(tls(pki)))
    try:
        config = build_model_config(MODEL, trained.inputs, trained.outputs)
        await runner.load(MODEL, config, model_files({1: trained.onnx_bytes}))
    finally:
        await runner.close()
    return trained


def _rows() -> np.ndarray:
    features, _ = make_dataset(4, seed=11)
    return np.asarray(features, dtype=np.float32)


def _onnxruntime(model: TrainedModel) -> np.ndarray:
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"features": _rows()})[0])


class TestTritonOverTls:
    async def test_a_client_of_the_ca_with_a_certificate_loads_and_infers(
        self, tls_triton: TritonServer, pki: dict[str, KeyPair], model: TrainedModel
    ) -> None:
        """Through TLS, with the CA and a client certificate, the model loaded above answers
        as onnxruntime does; the name override reaches a server dialled by another name."""
        runner = TritonRunner(
            tls_triton.grpc_endpoint.replace("127.0.0.1", "localhost"),
            credentials=channel_credentials(tls(pki)),
            server_name="127.0.0.1",
        )
        try:
            answer = await runner.infer(
                MODEL, 1, {"features": _rows()}, ["probabilities"], timeout_s=10
            )
        finally:
            await runner.close()
        np.testing.assert_allclose(answer["probabilities"], _onnxruntime(model), atol=1e-5)

    @pytest.mark.parametrize("who", ["plaintext", "no certificate", "another CA's certificate"])
    async def test_other_clients_are_refused(
        self, tls_triton: TritonServer, pki: dict[str, KeyPair], model: TrainedModel, who: str
    ) -> None:
        """Plaintext, TLS without a client certificate, and one from another CA all fail."""
        credentials = {
            "plaintext": None,
            "no certificate": channel_credentials(tls(pki, client=None)),
            "another CA's certificate": channel_credentials(tls(pki, client="stranger")),
        }[who]
        runner = TritonRunner(tls_triton.grpc_endpoint, credentials=credentials)
        try:
            with pytest.raises(TritonError):
                await runner.infer(MODEL, 1, {"features": _rows()}, ["probabilities"], timeout_s=5)
        finally:
            await runner.close()

    async def test_the_routers_direct_runner_goes_over_tls_by_grpc(
        self, tls_triton: TritonServer, pki: dict[str, KeyPair], model: TrainedModel
    ) -> None:
        """With TLS on, the router's direct runner calls the published gRPC endpoint over
        TLS even where an HTTP endpoint is published (Triton's HTTP has no TLS)."""
        version = ServedVersion(
            model_version="models/fraud-tls/versions/1",
            triton_model_name=MODEL,
            triton_model_version=1,
            triton_endpoint=tls_triton.grpc_endpoint,
            # Published, but where nothing listens: the runner must not take it.
            triton_http_endpoint=f"127.0.0.1:{free_port()}",
        )
        runner = TritonModelRunner(timeout_s=10, protocol="http", tls=tls(pki))
        try:
            answer = await runner.run(version, {"features": _rows()}, ["probabilities"])
        finally:
            await runner.close()
        np.testing.assert_allclose(answer["probabilities"], _onnxruntime(model), atol=1e-5)
        plain = TritonModelRunner(timeout_s=5, protocol="grpc")
        try:
            with pytest.raises(UnavailableError):
                await plain.run(version, {"features": _rows()}, ["probabilities"])
        finally:
            await plain.close()

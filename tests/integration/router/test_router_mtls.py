"""The router behind mutual TLS with API keys, following a registry that is itself behind mutual
TLS: the `predict` role predicts and administers nothing, a caller without a key is
UNAUTHENTICATED, a client without a certificate of the trusted CA cannot connect, and the router
reaches the registry with its own certificate, whose CN the registry maps to `viewer`."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from node_client import predict as node_predict
from pki import KeyPair, certificate_authority, client_certificate, mutual_tls, server_certificate
from router_testing import V1, WAIT_S, Dependencies, register_demo_model, request, router_settings
from support import eventually, running
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_demo import fraud
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_router.server import build_server
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.errors import DecodedError, decode_rpc_error

pytestmark = pytest.mark.triton

#: Served only by the registry behind mTLS, so only a router that follows it knows it.
ENDPOINT = "mtls-only"
TEST_SCRYPT_N = 16


@dataclass
class SecuredStack:
    """A router and a registry, both behind mTLS with API keys, the router answering for
    ENDPOINT; their keys and certificates."""

    router_target: str
    registry_target: str
    ca: KeyPair
    #: A caller's certificate: signed by the CA, its CN (`app`) mapped to no role.
    app: KeyPair
    #: A certificate with the same CN signed by another CA.
    stranger: KeyPair
    #: A service's certificate: CN `svc`, which the router maps to `predict` (no key needed).
    svc: KeyPair
    keys: dict[str, str]
    #: `https://127.0.0.1:<port>` of the router's Open Inference Protocol over HTTP/REST.
    http_url: str = ""

    def tls(self, client: KeyPair | None = None) -> ClientTlsSettings:
        """TLS that trusts the stack's CA, with `client` as the client certificate."""
        return ClientTlsSettings(
            enabled=True,
            ca_file=self.ca.cert,
            cert_file=None if client is None else client.cert,
            key_file=None if client is None else client.key,
        )

    def channel(self, target: str, key: str | None = None) -> grpc.aio.Channel:
        """A channel with the `app` certificate and, if named, a principal's key."""
        return create_channel(
            target, tls=self.tls(self.app), api_key=None if key is None else self.keys[key]
        )


def _keys() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Keys of `pia` (predict) and `ada` (admin), and their records."""
    keys, records = {}, []
    for principal, role in (("pia", Role.PREDICT), ("ada", Role.ADMIN)):
        keys[principal], record = new_api_key(principal, {role}, n=TEST_SCRYPT_N)
        records.append(record.model_dump())
    return keys, records


@pytest.fixture(scope="module")
async def stack(
    dependencies: Dependencies, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SecuredStack]:
    """A second registry behind mTLS (CN `router` is a viewer) holding `models/fraud` v1 and
    a deployment of ENDPOINT, and a router behind mTLS that follows it with its certificate and
    no key, while it asks the package's inference (plaintext) which versions are READY; yields
    once an admin's Predict of ENDPOINT answers."""
    pki = tmp_path_factory.mktemp("pki")
    ca = certificate_authority(pki, "ca")
    server = server_certificate(pki, "server", ca)
    router_client = client_certificate(pki, "router", ca)
    keys, records = _keys()
    secured = SecuredStack(
        router_target="",
        registry_target="",
        ca=ca,
        app=client_certificate(pki, "app", ca),
        stranger=client_certificate(pki / "other", "app", certificate_authority(pki, "other-ca")),
        svc=client_certificate(pki, "svc", ca),
        keys=keys,
    )
    mutual = mutual_tls(server, ca)
    registry_settings = RegistrySettings.model_validate(
        {
            "data_dir": tmp_path_factory.mktemp("mtls-registry"),
            "production_traffic_only": False,
            "server": {"tls": {**mutual, "client_roles": {"router": ["viewer"]}}},
            "auth": {"enabled": True, "keys": records},
        }
    )
    async with running(registry_server.build_server, registry_settings) as (registry, _, _):
        secured.registry_target = f"127.0.0.1:{registry.port}"
        async with secured.channel(secured.registry_target, "ada") as admin:
            await register_demo_model(RegistryAdminClient(admin), versions=1)
            await registry_grpc.RegistryServiceStub(admin).UpdateDeployment(
                registry_pb.UpdateDeploymentRequest(
                    deployment=registry_pb.Deployment(
                        name=f"deployments/{ENDPOINT}",
                        traffic=[registry_pb.TrafficTarget(model_version=V1, percent=100)],
                    ),
                    allow_missing=True,
                )
            )
        settings = router_settings(
            dependencies,
            registry_target=secured.registry_target,
            registry_tls=secured.tls(router_client),
            server={"tls": {**mutual, "client_roles": {"svc": ["predict"]}}, "http_port": 0},
            auth={"enabled": True, "keys": records},
        )
        async with running(build_server, settings) as (router, _, _):
            secured.router_target = f"127.0.0.1:{router.port}"
            assert router.http is not None
            secured.http_url = f"https://127.0.0.1:{router.http.port}"
            async with secured.channel(secured.router_target, "ada") as channel:
                await eventually(
                    lambda: predicts(router_grpc.RouterServiceStub(channel)),
                    f"the router answering for {ENDPOINT}",
                    within_s=WAIT_S,
                )
            yield secured


async def predicts(router: router_grpc.RouterServiceAsyncStub) -> bool:
    """Whether a Predict of ENDPOINT answers."""
    try:
        await router.Predict(request(ENDPOINT))
    except grpc.aio.AioRpcError:
        return False
    return True


async def failure(call: Any) -> DecodedError:
    """The decoded error of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return decode_rpc_error(info.value)


def infer_request() -> Any:
    """A ModelInferRequest of ENDPOINT with four rows of the demo model's features."""
    rows = fraud.make_dataset(4, seed=7)[0]
    infer = service_pb2.ModelInferRequest(model_name=ENDPOINT)
    tensor = infer.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    return infer


class TestPredictRole:
    async def test_predict_key_predicts(self, stack: SecuredStack) -> None:
        """A `predict` key, over mTLS, gets Predict and ModelInfer answers from the version that
        the mTLS registry deploys: the router followed it with its certificate alone."""
        async with stack.channel(stack.router_target, "pia") as channel:
            answer = await router_grpc.RouterServiceStub(channel).Predict(request(ENDPOINT))
            inferred = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request()
            )
        assert answer.model_version == V1
        assert inferred.model_version == "1"

    async def test_predict_key_administers_nothing(self, stack: SecuredStack) -> None:
        """A `predict` key may not change or even read the registry (ROLE_REQUIRED), nor call
        the router's model control (METHOD_NOT_ALLOWED): PERMISSION_DENIED throughout."""
        async with stack.channel(stack.registry_target, "pia") as channel:
            registry = registry_grpc.RegistryServiceStub(channel)
            change = await failure(
                registry.RollbackDeployment(
                    registry_pb.RollbackDeploymentRequest(name=f"deployments/{ENDPOINT}")
                )
            )
            read = await failure(
                registry.GetModel(registry_pb.GetModelRequest(name="models/fraud"))
            )
        async with stack.channel(stack.router_target, "pia") as channel:
            load = await failure(
                service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                    service_pb2.RepositoryModelLoadRequest(model_name=ENDPOINT)
                )
            )
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert (change.code, change.reason) == (denied, "ROLE_REQUIRED")
        assert (read.code, read.reason) == (denied, "ROLE_REQUIRED")
        assert (load.code, load.reason) == (denied, "METHOD_NOT_ALLOWED")

    async def test_admin_key_predicts_too(self, stack: SecuredStack) -> None:
        """`admin` may do everything, predicting included."""
        async with stack.channel(stack.router_target, "ada") as channel:
            answer = await router_grpc.RouterServiceStub(channel).Predict(request(ENDPOINT))
        assert answer.model_version == V1

    async def test_no_key_is_unauthenticated(self, stack: SecuredStack) -> None:
        """A caller whose certificate is trusted but whose CN has no roles and who sends no key
        is UNAUTHENTICATED."""
        async with stack.channel(stack.router_target) as channel:
            error = await failure(router_grpc.RouterServiceStub(channel).Predict(request(ENDPOINT)))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")


class TestMutualTls:
    @pytest.mark.parametrize("client", ["none", "stranger", "plaintext"])
    async def test_untrusted_client_cannot_connect(self, stack: SecuredStack, client: str) -> None:
        """Without a client certificate, with one another CA signed, or in plaintext, a caller
        with a good key gets no call through: the handshake fails, so gRPC reports UNAVAILABLE
        (not UNAUTHENTICATED: the server never sees a call)."""
        tls = {
            "none": stack.tls(),
            "stranger": stack.tls(stack.stranger),
            "plaintext": None,
        }[client]
        async with create_channel(stack.router_target, tls=tls, api_key=stack.keys["pia"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router_grpc.RouterServiceStub(ch).Predict(request(ENDPOINT))
        error = decode_rpc_error(info.value)
        # No ErrorInfo: the status comes from the client's transport, not from the router.
        assert (error.code, error.domain) == (grpc.StatusCode.UNAVAILABLE, "")


class TestHttpBinding:
    """The router's Open Inference Protocol over HTTP/REST speaks TLS with the gRPC port's
    files, demands the same client certificates, and takes a certificate's CN as the gRPC
    port does."""

    def _ssl(self, stack: SecuredStack, client: KeyPair | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(stack.ca.cert))
        if client is not None:
            context.load_cert_chain(str(client.cert), str(client.key))
        return context

    async def _infer(
        self, stack: SecuredStack, client: KeyPair | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        rows = fraud.make_dataset(2, seed=7)[0]
        body = {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [2, 8], "data": rows.tolist()}
            ]
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{stack.http_url}/v2/models/{ENDPOINT}/infer",
                json=body,
                headers=headers,
                ssl=self._ssl(stack, client),
            ) as response,
        ):
            return response.status, await response.json()

    async def test_a_key_or_a_mapped_certificate_predicts(self, stack: SecuredStack) -> None:
        """With a trusted certificate: a `predict` key predicts; CN `svc`, mapped to
        `predict`, predicts without a key; CN `app`, mapped to nothing, without a key is 401."""
        keyed = await self._infer(stack, stack.app, {"x-api-key": stack.keys["pia"]})
        by_certificate = await self._infer(stack, stack.svc, {})
        no_key = await self._infer(stack, stack.app, {})
        assert (keyed[0], keyed[1]["model_version"]) == (200, "1")
        assert (by_certificate[0], by_certificate[1]["model_version"]) == (200, "1")
        assert no_key[0] == 401
        assert "an API key is required" in no_key[1]["error"]

    @pytest.mark.parametrize("client", ["none", "stranger"])
    async def test_untrusted_client_cannot_connect(self, stack: SecuredStack, client: str) -> None:
        """Without a client certificate, or with one another CA signed, a caller with a good
        key fails in the TLS handshake: the router never sees a request."""
        certificate = {"none": None, "stranger": stack.stranger}[client]
        with pytest.raises(aiohttp.ClientError):
            await self._infer(stack, certificate, {"x-api-key": stack.keys["pia"]})


class TestNodeClient:
    """The Node.js client generated from the protos (tests/node_client.py) over mutual TLS."""

    def _tls(self, stack: SecuredStack, client: KeyPair | None) -> list[str]:
        flags = ["--ca-file", str(stack.ca.cert)]
        if client is not None:
            flags += ["--cert-file", str(client.cert), "--key-file", str(client.key)]
        return flags

    async def test_a_node_caller_with_a_certificate_and_a_key_predicts(
        self, stack: SecuredStack
    ) -> None:
        """With the CA, a client certificate and a `predict` key the Node client predicts;
        without the key it hears UNAUTHENTICATED with the router's reason."""
        body = json_format.MessageToDict(request(ENDPOINT))
        tls = self._tls(stack, stack.app)
        code, [answer] = await node_predict(
            stack.router_target, body, *tls, "--api-key", stack.keys["pia"]
        )
        assert (code, answer["modelVersion"]) == (0, V1)
        code, [refused] = await node_predict(stack.router_target, body, *tls)
        assert code == 1
        assert (refused["error"]["code"], refused["error"]["reason"]) == (
            "Unauthenticated",
            "API_KEY_MISSING",
        )

    async def test_a_node_caller_without_a_certificate_gets_nothing_through(
        self, stack: SecuredStack
    ) -> None:
        """Trusting the CA but holding no client certificate, a Node caller with a good key is
        refused at the handshake, so no reason of ours comes back. Under TLS 1.3 the client
        finishes its side of the handshake first and sees the server close the stream:
        Connect reports CANCEL (0x8) as Canceled, or Unavailable when it notices sooner."""
        body = json_format.MessageToDict(request(ENDPOINT))
        code, [refused] = await node_predict(
            stack.router_target, body, *self._tls(stack, None), "--api-key", stack.keys["pia"]
        )
        assert code == 1
        assert refused["error"]["code"] in ("Canceled", "Unavailable"), refused
        assert (refused["error"]["reason"], refused["error"]["domain"]) == ("", ""), refused

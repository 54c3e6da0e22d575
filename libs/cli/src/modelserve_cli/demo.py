"""Deploys the demo fraud model onto a running stack: train, register, load, route, define the
feature view and seed its features."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.metrics import roc_auc_score

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.feature.v1 import feature_service_pb2_grpc as feature_grpc
from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import feature_value_pb2, tensor_pb2
from modelserve_demo import fraud
from modelserve_features.convert import view_to_proto
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.convert import numpy_to_tensor
from modelserve_triton.model_config import TensorSpec

ENDPOINT = "fraud"
MODEL_ID = "fraud"
_DATATYPES = {"FP32": tensor_pb2.DATA_TYPE_FP32, "INT64": tensor_pb2.DATA_TYPE_INT64}


def _spec(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name, datatype=_DATATYPES[spec.datatype], shape=list(spec.shape)
    )


@dataclass(frozen=True)
class DemoDeployment:
    """What `deploy_demo` created."""

    model_version: str
    trained: fraud.TrainedModel
    customers: dict[str, dict[str, float]]


VALIDATION_ROWS = 500
VALIDATION_SEED = 99
SAMPLE_ROWS = 4


async def deploy_demo(
    targets: dict[str, str],
    *,
    seed: int = 0,
    api_key: str | None = None,
    tls: ClientTlsSettings | None = None,
) -> DemoDeployment:
    """Trains the fraud model and makes endpoint `fraud` answer with it (each call registers a
    new version of model `fraud`). Calls carry `api_key` and go over TLS with `tls`."""
    trained = fraud.train(seed=seed)
    customers = fraud.demo_customers()
    channel = functools.partial(create_channel, api_key=api_key, tls=tls)
    async with (
        channel(targets["registry"], default_timeout_s=60, max_message_bytes=64 << 20) as registry,
        channel(targets["inference"], default_timeout_s=120) as inference,
        channel(targets["feature"]) as feature,
    ):
        admin = RegistryAdminClient(registry)
        # Payments the model never saw: the set its versions are validated on and the
        # monitor's feature baseline.
        holdout, labels = fraud.make_dataset(VALIDATION_ROWS, seed=VALIDATION_SEED)
        try:
            await admin.create_model(
                MODEL_ID,
                "Card-payment fraud score (demo, synthetic data)",
                validation_set=registry_pb.ValidationSet(
                    inputs=[numpy_to_tensor(fraud.INPUT_SPEC.name, holdout)],
                    labels=numpy_to_tensor("labels", labels),
                    output="probabilities",
                    metric=registry_pb.VALIDATION_METRIC_ROC_AUC,
                ),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
        version = await admin.upload_model_version(
            f"models/{MODEL_ID}",
            registry_pb.ModelVersion(
                description=f"GradientBoosting on synthetic payments, seed {seed}",
                format=registry_pb.ARTIFACT_FORMAT_ONNX,
                signature=registry_pb.Signature(
                    inputs=[_spec(s) for s in trained.inputs],
                    outputs=[_spec(s) for s in trained.outputs],
                    feature_refs=list(trained.feature_refs),
                ),
                sample_inputs=[numpy_to_tensor(fraud.INPUT_SPEC.name, holdout[:SAMPLE_ROWS])],
                metrics={
                    "holdout_roc_auc": float(
                        roc_auc_score(labels, trained.predict_proba(holdout)[:, 1])
                    )
                },
                lineage=registry_pb.Lineage(
                    training_run_id=f"demo-seed-{seed}",
                    dataset_uri=f"synthetic://modelserve_demo.fraud/make_dataset?seed={seed}",
                    parameters={"n_estimators": "50", "max_depth": "3", "learning_rate": "0.1"},
                    feature_views=[fraud.VIEW],
                ),
            ),
            trained.onnx_bytes,
        )
        loaded = await inference_grpc.InferenceServiceStub(inference).LoadModelVersion(
            inference_pb.LoadModelVersionRequest(name=version.name)
        )
        if loaded.model_version.state != inference_pb.MODEL_VERSION_STATE_READY:
            raise RuntimeError(f"{version.name} failed to load: {loaded.model_version.reason}")
        await admin.set_traffic(ENDPOINT, {version.name: 100})
        features = feature_grpc.FeatureServiceStub(feature)
        # The view first: writes are validated against it, and the router reads through it.
        await features.ApplyFeatureView(
            feature_pb.ApplyFeatureViewRequest(feature_view=view_to_proto(fraud.feature_view()))
        )
        await features.WriteFeatures(
            feature_pb.WriteFeaturesRequest(
                writes=[
                    feature_pb.EntityFeatureWrite(
                        feature_view=f"featureViews/{fraud.VIEW}",
                        entity=feature_pb.EntityKey(entity_type=fraud.ENTITY_TYPE, entity_id=cid),
                        values={
                            name: feature_value_pb2.FeatureValue(double_value=value)
                            for name, value in values.items()
                        },
                    )
                    for cid, values in customers.items()
                ]
            )
        )
    return DemoDeployment(model_version=version.name, trained=trained, customers=customers)


def demo_request(customer: str = "c-1001", amount: float = 420.0) -> router_pb.PredictRequest:
    """A Predict request for the demo endpoint."""
    request = router_pb.PredictRequest(
        endpoint=ENDPOINT,
        entities={fraud.ENTITY_TYPE: customer},
        features={"amount": feature_value_pb2.FeatureValue(double_value=amount)},
    )
    request.context.user_agent = (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148"
    )
    request.context.event_time.FromSeconds(1_717_208_000)
    return request


async def predict(
    router_target: str,
    request: router_pb.PredictRequest,
    *,
    tls: ClientTlsSettings | None = None,
    api_key: str | None = None,
) -> router_pb.PredictResponse:
    """One Predict call through the router (over TLS with `tls`, with `api_key`)."""
    async with create_channel(router_target, tls=tls, api_key=api_key) as channel:
        return await router_grpc.RouterServiceStub(channel).Predict(request)


class NotServingError(Exception):
    """A service did not report SERVING in time."""


async def wait_serving(
    targets: dict[str, str],
    timeout_s: float,
    *,
    tls: ClientTlsSettings | None = None,
    poll_s: float = 0.2,
) -> None:
    """Returns once every service in `targets` answers SERVING on the standard health check
    (which needs no API key); raises NotServingError naming those that did not within
    `timeout_s`, with what each last answered."""
    last: dict[str, str] = dict.fromkeys(targets, "no answer")

    async def one(service: str, target: str) -> None:
        async with create_channel(target, tls=tls, default_timeout_s=1.0) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                except grpc.aio.AioRpcError as exc:
                    last[service] = f"{exc.code().name}: {exc.details()}"
                else:
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        del last[service]
                        return
                    last[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                await asyncio.sleep(poll_s)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(s, t) for s, t in targets.items()))
    except TimeoutError:
        waiting = "; ".join(f"{s} at {targets[s]} ({why})" for s, why in sorted(last.items()))
        raise NotServingError(f"not serving after {timeout_s:g}s: {waiting}") from None


async def predict_when_routed(
    router_target: str,
    request: router_pb.PredictRequest,
    model_version: str,
    timeout_s: float,
    *,
    tls: ClientTlsSettings | None = None,
    api_key: str | None = None,
    poll_s: float = 0.2,
) -> router_pb.PredictResponse:
    """Predicts through the router until `model_version` answers: a router learns of a new
    deployment and of the version's READY state through its watches, a moment after the
    registry and inference know. Raises the last RPC error, or NotServingError when an older
    version still answers, once `timeout_s` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with create_channel(router_target, tls=tls, api_key=api_key) as channel:
        stub = router_grpc.RouterServiceStub(channel)
        while True:
            try:
                response = await stub.Predict(request)
            except grpc.aio.AioRpcError as exc:
                if loop.time() > deadline or exc.code() not in _NOT_ROUTED_YET:
                    raise
            else:
                if response.model_version == model_version:
                    return response
                if loop.time() > deadline:
                    raise NotServingError(
                        f"the router at {router_target} still answers from "
                        f"{response.model_version} after {timeout_s:g}s, not {model_version}"
                    )
            await asyncio.sleep(poll_s)


#: What a router answers for an endpoint it does not yet know or whose version it does not
#: yet see READY.
_NOT_ROUTED_YET = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
)


async def add_ready_version(targets: dict[str, str], demo: DemoDeployment) -> str:
    """Uploads the demo's artifact again as a new version of the demo model (same signature,
    so the same answers) and has inference load it; returns the version once READY. For
    rollouts to flip to: blue-green, A/B and replica tests and benchmarks."""
    async with (
        create_channel(targets["registry"], default_timeout_s=60) as channel,
        create_channel(targets["inference"], default_timeout_s=120) as inference,
    ):
        signature = (
            await registry_grpc.RegistryServiceStub(channel).GetModelVersion(
                registry_pb.GetModelVersionRequest(name=demo.model_version)
            )
        ).model_version.signature
        version = (
            await RegistryAdminClient(channel).upload_model_version(
                f"models/{MODEL_ID}",
                registry_pb.ModelVersion(
                    format=registry_pb.ARTIFACT_FORMAT_ONNX, signature=signature
                ),
                demo.trained.onnx_bytes,
            )
        ).name
        loaded = await inference_grpc.InferenceServiceStub(inference).LoadModelVersion(
            inference_pb.LoadModelVersionRequest(name=version)
        )
        if loaded.model_version.state != inference_pb.MODEL_VERSION_STATE_READY:
            raise RuntimeError(f"{version} is not READY after LoadModelVersion: {loaded}")
        return version

"""The router on a customer the feature store knows nothing about: defaults, then zeros."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.feature.v1 import feature_service_pb2_grpc as feature_grpc
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, demo_request
from modelserve_cli.stack import Stack
from modelserve_demo import fraud
from modelserve_features.request_time import RequestFacts
from modelserve_runtime.channels import create_channel


class TestUnknownCustomer:
    async def test_defaults_then_zero_fill(self, stack: Stack, demo: DemoDeployment) -> None:
        """For a customer with nothing stored, the feature service reports the counts
        DEFAULTED (the demo view's 0.0) and the rest MISSING, and the router answers like
        onnxruntime on that vector, missing values taken as 0.0."""
        request = demo_request("c-unknown", 250.0)
        stored = [r for r in fraud.FEATURE_REFS if not r.startswith("request:")]
        async with create_channel(stack.targets["feature"]) as channel:
            read = await feature_grpc.FeatureServiceStub(channel).GetOnlineFeatures(
                feature_pb.GetOnlineFeaturesRequest(
                    entities=[feature_pb.EntityKey(entity_type="customer", entity_id="c-unknown")],
                    features=stored,
                )
            )
        async with create_channel(stack.targets["router"]) as channel:
            response = await router_grpc.RouterServiceStub(channel).Predict(request)

        statuses = read.results[0].statuses
        assert statuses["customer:avg_amount_30d"] == feature_pb.FEATURE_STATUS_MISSING
        assert statuses["customer:account_age_days"] == feature_pb.FEATURE_STATUS_MISSING
        assert statuses["customer:chargebacks_90d"] == feature_pb.FEATURE_STATUS_DEFAULTED
        assert statuses["customer:txn_count_24h"] == feature_pb.FEATURE_STATUS_DEFAULTED
        facts = RequestFacts(
            event_time=datetime.fromtimestamp(request.context.event_time.seconds, UTC),
            user_agent=request.context.user_agent,
        )
        values = {ref: 0.0 for ref in stored}
        values.update(fraud.request_feature_values(250.0, facts))
        session = ort.InferenceSession(demo.trained.onnx_bytes, providers=["CPUExecutionProvider"])
        expected = session.run(["probabilities"], {"features": fraud.feature_vector(values)[None]})
        probabilities = next(o for o in response.outputs if o.name == "probabilities")
        np.testing.assert_allclose(
            np.asarray(probabilities.contents.fp32_contents), expected[0][0], atol=1e-5
        )

"""Locust load test of the router's Predict over gRPC.

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 30s --host 127.0.0.1:50051

Start the stack first (`make up`); the demo endpoint `fraud` and customers c-1001..c-1020 exist then.
"""

from __future__ import annotations

import random
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, task

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2

# Locust runs its users as greenlets. gRPC's calls wait in C, where gevent cannot switch, so
# without this every call would stop the whole process until it returned: `-u 32` would make
# one call at a time. After locust's monkey-patching, before any channel exists.
grpc_gevent.init_gevent()


class PredictUser(User):
    """One caller of RouterService.Predict on the demo endpoint."""

    wait_time = between(0, 0.01)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._channel = grpc.insecure_channel(self.host or "127.0.0.1:50051")
        self._stub = pb_grpc.RouterServiceStub(self._channel)

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def predict(self) -> None:
        request = pb.PredictRequest(
            endpoint="fraud",
            entities={"customer": f"c-{random.randint(1001, 1020)}"},
            features={
                "amount": feature_value_pb2.FeatureValue(double_value=random.uniform(1, 2000))
            },
        )
        request.context.user_agent = (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148"
        )
        start = time.perf_counter()
        error: Exception | None = None
        try:
            self._stub.Predict(request, timeout=5)
        except grpc.RpcError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name="RouterService/Predict",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

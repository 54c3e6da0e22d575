"""Locust load test of the router's HTTP port: one-row JSON requests of the demo model over
the Open Inference Protocol's HTTP/REST binding, as curl or any HTTP client sends them, and
`Predict` over the Connect protocol (a PredictRequest as JSON, features read by the router).

    .venv/bin/locust -f loadtests/locustfile_rest.py --headless -u 32 -r 8 -t 30s \
        --host http://127.0.0.1:8080

Start the stack first (`make up`, whose router serves HTTP on 8080); the demo endpoint
`fraud` exists then. Locust's HTTP client is gevent-friendly: its users call at once.
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, task

#: The demo model's features in its signature's order (README, "The Open Inference Protocol
#: over HTTP/REST"): 30-day average amount, account age in days, chargebacks in 90 days,
#: transactions in 24 h, amount, hour of day, day of week, from a phone.
_RANGES = ((5, 500), (1, 3650), (0, 3), (0, 40), (1, 2000), (0, 23), (0, 6), (0, 1))


def _customer() -> str:
    return f"c-{random.randint(1001, 1020)}"


class RestInferUser(FastHttpUser):
    """One caller of `POST /v2/models/fraud/infer` on the router."""

    wait_time = between(0, 0.01)

    @task
    def infer(self) -> None:
        row = [float(random.randint(low, high)) for low, high in _RANGES]
        body = {
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [row]}],
            "parameters": {"routing_key": _customer()},
        }
        with self.client.post(
            "/v2/models/fraud/infer", json=body, name="OIP REST infer", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text}")
            elif not response.json().get("outputs"):
                response.failure(f"no outputs: {response.text}")


class ConnectPredictUser(FastHttpUser):
    """One caller of `Predict` over Connect on the router: `POST
    /modelserve.router.v1.RouterService/Predict` with the request as JSON."""

    wait_time = between(0, 0.01)

    @task
    def predict(self) -> None:
        body = {
            "endpoint": "fraud",
            "entities": {"customer": _customer()},
            "features": {"amount": {"doubleValue": float(random.randint(1, 2000))}},
        }
        with self.client.post(
            "/modelserve.router.v1.RouterService/Predict",
            json=body,
            headers={"Connect-Protocol-Version": "1", "Connect-Timeout-Ms": "5000"},
            name="Connect Predict",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text}")
            elif not response.json().get("outputs"):
                response.failure(f"no outputs: {response.text}")

"""The Open Inference Protocol's HTTP/REST binding on the inference service: tritonclient's
HTTP client unchanged, plain JSON as curl sends it, and every refusal with its HTTP status
and the same words as over gRPC, changing nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http.aio as triton_http
from inference_testing import (
    MODEL_ID,
    ROWS,
    V1,
    V2,
    RunningInference,
    load,
    local_settings,
    reference,
)
from prometheus_client import REGISTRY
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.config import ServerSettings

pytestmark = pytest.mark.triton

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> InferenceSettings:
    """A local-mode service with its HTTP binding on a free port and a small message limit."""
    return local_settings(
        tmp_path_factory,
        registry_target,
        server=ServerSettings(http_port=0, max_message_bytes=64 * 1024),
    )


@pytest.fixture(scope="module")
async def loaded(inference_service: RunningInference) -> RunningInference:
    """The module's service with both versions loaded."""
    await load(inference_service.stub, V1)
    await load(inference_service.stub, V2)
    return inference_service


@pytest.fixture
def base_url(loaded: RunningInference) -> str:
    http = loaded.server.http
    assert http is not None
    return f"http://127.0.0.1:{http.port}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _count(code: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "modelserve_rpc_total", {"service": "inference", "method": INFER_METHOD, "code": code}
        )
        or 0.0
    )


def _json_request(rows: Any = ROWS) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.tolist(),
            }
        ]
    }


class TestTritonHttpClient:
    async def test_tritonclient_http_works_unchanged(
        self, base_url: str, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """tritonclient.http pointed at the service: health, metadata, model readiness, and
        inference with binary inputs, a binary output and a JSON output, answered as
        onnxruntime answers for the version asked for (the newest ready one by default)."""
        client = triton_http.InferenceServerClient(base_url.removeprefix("http://"))
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready(MODEL_ID, "1")
            assert not await client.is_model_ready(MODEL_ID, "7")
            metadata = await client.get_model_metadata(MODEL_ID, "1")
            server = await client.get_server_metadata()
            answers = {}
            for version in ("1", "2"):
                features = InferInput("features", list(ROWS.shape), "FP32")
                features.set_data_from_numpy(ROWS)  # binary by default
                answers[version] = await client.infer(
                    MODEL_ID,
                    [features],
                    model_version=version,
                    outputs=[
                        InferRequestedOutput("label", binary_data=True),
                        InferRequestedOutput("probabilities", binary_data=False),
                    ],
                    request_id=f"http-{version}",
                )
        finally:
            await client.close()
        assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
        assert server["name"] == "modelserve-inference"
        for version, trained in (("1", fraud_models[V1]), ("2", fraud_models[V2])):
            answer = answers[version]
            labels, probabilities = reference(trained)
            np.testing.assert_array_equal(answer.as_numpy("label"), labels)
            np.testing.assert_allclose(
                answer.as_numpy("probabilities"), probabilities, rtol=0, atol=1e-5
            )
            response = answer.get_response()
            assert (response["model_version"], response["id"]) == (version, f"http-{version}")
        # The two versions differ, so the answers above came from the version asked for.
        assert not np.allclose(
            answers["1"].as_numpy("probabilities"), answers["2"].as_numpy("probabilities")
        )

    async def test_triton_extensions_as_triton_answers_them(self, base_url: str) -> None:
        """tritonclient.http's model config, statistics and repository index (what
        perf_analyzer and Triton dashboards ask for) come back as Triton gives them, for the
        versions the service holds; a model it does not hold is 404."""
        client = triton_http.InferenceServerClient(base_url.removeprefix("http://"))
        features = InferInput("features", list(ROWS.shape), "FP32")
        features.set_data_from_numpy(ROWS)
        try:
            await client.infer(MODEL_ID, [features], model_version="1")
            config = await client.get_model_config(MODEL_ID, "1")
            statistics = await client.get_inference_statistics(MODEL_ID, "1")
            every = await client.get_inference_statistics()
            index = await client.get_model_repository_index()
            with pytest.raises(InferenceServerException) as unknown:
                await client.get_model_config("nope")
        finally:
            await client.close()
        assert config["name"] == MODEL_ID
        assert config["max_batch_size"] > 1
        assert [i["name"] for i in config["input"]] == ["features"]
        ((version_stats),) = statistics["model_stats"]
        assert (version_stats["name"], version_stats["version"]) == (MODEL_ID, "1")
        assert int(version_stats["inference_count"]) >= len(ROWS)
        assert {(m["name"], m["version"]) for m in every["model_stats"]} >= {
            (MODEL_ID, "1"),
            (MODEL_ID, "2"),
        }
        assert {(m["name"], m["version"], m["state"]) for m in index} == {
            (MODEL_ID, "1", "READY"),
            (MODEL_ID, "2", "READY"),
        }
        assert unknown.value.status() == "404"

    async def test_tritonclient_http_sees_refusals(self, base_url: str) -> None:
        """A tensor of the wrong width reaches tritonclient as its exception, with the status
        and the field named."""
        client = triton_http.InferenceServerClient(base_url.removeprefix("http://"))
        narrow = np.ascontiguousarray(ROWS[:, :5])
        features = InferInput("features", list(narrow.shape), "FP32")
        features.set_data_from_numpy(narrow)
        try:
            with pytest.raises(InferenceServerException) as info:
                await client.infer(MODEL_ID, [features], model_version="1")
        finally:
            await client.close()
        assert info.value.status() == "400"
        assert "inputs[features].shape: expected [-1, 8], got [4, 5]" in info.value.message()


class TestPlainJson:
    async def test_curl_style_json(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A JSON-only request with nested rows, as curl sends it, gets JSON values back."""
        async with session.post(
            f"{base_url}/v2/models/{MODEL_ID}/versions/1/infer",
            json={**_json_request(), "id": "curl-1"},
        ) as response:
            status, content_type = response.status, response.content_type
            answer = await response.json()
        assert (status, content_type) == (200, "application/json")
        outputs = {o["name"]: o for o in answer["outputs"]}
        labels, probabilities = reference(fraud_models[V1])
        assert outputs["label"]["shape"] == [len(ROWS)]
        assert outputs["label"]["data"] == labels.tolist()
        got = np.asarray(outputs["probabilities"]["data"]).reshape(
            outputs["probabilities"]["shape"]
        )
        np.testing.assert_allclose(got, probabilities, rtol=0, atol=1e-5)
        assert (answer["model_name"], answer["model_version"], answer["id"]) == (
            MODEL_ID,
            "1",
            "curl-1",
        )

    async def test_health_and_metadata(self, base_url: str, session: aiohttp.ClientSession) -> None:
        """Liveness and readiness as status codes (and JSON); server and model metadata."""
        answers = {}
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL_ID}"):
            async with session.get(base_url + path) as response:
                answers[path] = (response.status, await response.json())
        assert answers["/v2/health/live"] == (200, {"live": True})
        assert answers["/v2/health/ready"] == (200, {"ready": True})
        assert answers["/v2"][1]["name"] == "modelserve-inference"
        status, model = answers[f"/v2/models/{MODEL_ID}"]
        assert status == 200
        assert sorted(model["versions"]) == ["1", "2"]
        assert model["outputs"] == [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ]


def _bad_bodies() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    """(what, body, headers, HTTP status, words of the error) for requests to version 1."""
    good = _json_request()
    narrow = _json_request(ROWS[:, :5])
    nan = _json_request(np.where(np.arange(ROWS.size).reshape(ROWS.shape) == 3, np.nan, ROWS))
    short = json.loads(json.dumps(good))
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    binary = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [4, 8],
                    "parameters": {"binary_data_size": 128},
                }
            ]
        }
    ).encode()
    return [
        ("not JSON", b"{inputs", {}, 400, "body: expected a JSON inference request"),
        ("wrong width", json.dumps(narrow).encode(), {}, 400, "inputs[features].shape: expected"),
        ("a NaN", json.dumps(nan).encode(), {}, 400, "inputs[features]: contains NaN"),
        ("too few values", json.dumps(short).encode(), {}, 400, "inputs[0].data: shape [4, 8]"),
        (
            "binary bytes missing",
            binary + b"\0" * 64,
            {"Inference-Header-Content-Length": str(len(binary))},
            400,
            "inputs[0].parameters.binary_data_size: 128 bytes declared, 64 left",
        ),
        (
            "an unknown output",
            json.dumps({**good, "outputs": [{"name": "score"}]}).encode(),
            {},
            400,
            "output_names: unknown outputs ['score']",
        ),
        (
            "over the size limit",
            json.dumps({**good, "pad": "x" * 70_000}).encode(),
            {},
            413,
            "larger than this server's limit of 65536 bytes",
        ),
    ]


class TestRefusals:
    @pytest.mark.parametrize(
        ("what", "body", "headers", "status", "words"),
        _bad_bodies(),
        ids=[case[0] for case in _bad_bodies()],
    )
    async def test_bad_request_refused_with_its_field(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        what: str,
        body: bytes,
        headers: dict[str, str],
        status: int,
        words: str,
    ) -> None:
        """Each bad request gets its HTTP status and an error naming what was wrong, is
        counted and logged as the gRPC call it stands for, and the next good request is
        answered as before."""
        refused_before = _count("INVALID_ARGUMENT")
        async with session.post(
            f"{base_url}/v2/models/{MODEL_ID}/versions/1/infer", data=body, headers=headers
        ) as response:
            got = (response.status, await response.json())
        assert got[0] == status, got
        assert words in got[1]["error"], got
        if status == 400:
            assert _count("INVALID_ARGUMENT") == refused_before + 1
        async with session.post(
            f"{base_url}/v2/models/{MODEL_ID}/versions/1/infer", json=_json_request()
        ) as response:
            assert response.status == 200

    async def test_unknown_models_routes_and_methods(
        self, base_url: str, session: aiohttp.ClientSession
    ) -> None:
        """An unknown model or version is 404 naming it; an unknown path is 404 listing the
        protocol's routes; the wrong method is 405; a model not held is simply not ready."""
        answers = {}
        for method, path in (
            ("POST", "/v2/models/nope/infer"),
            ("POST", f"/v2/models/{MODEL_ID}/versions/9/infer"),
            ("GET", "/v2/models/nope/ready"),
            ("GET", "/v1/models/fraud:predict"),
            ("GET", f"/v2/models/{MODEL_ID}/infer"),
        ):
            async with session.request(method, base_url + path, json=_json_request()) as response:
                answers[(method, path)] = (response.status, await response.json())
        assert answers[("POST", "/v2/models/nope/infer")] == (
            404,
            {"error": "model nope has no loaded version"},
        )
        status, error = answers[("POST", f"/v2/models/{MODEL_ID}/versions/9/infer")]
        assert status == 404
        assert "9" in error["error"]
        assert answers[("GET", "/v2/models/nope/ready")] == (400, {"name": "nope", "ready": False})
        status, error = answers[("GET", "/v1/models/fraud:predict")]
        assert status == 404
        assert "/v2/models/<name>" in error["error"]
        status, error = answers[("GET", f"/v2/models/{MODEL_ID}/infer")]
        assert status == 405
        assert "Method Not Allowed" in error["error"]

"""Competitor baselines for the router benchmark, each serving the demo model from scikit-learn.

- KServe: KServe's Python ``ModelServer`` with a small custom ``kserve.Model`` that loads the
  joblib'd pipeline, answering the Open Inference Protocol's ``ModelInfer`` on KServe's gRPC
  v2 endpoint; driven with ``tritonclient.grpc.aio``, the client the router uses for Triton.
- FastAPI: what a tutorial writes: FastAPI + uvicorn, the pipeline loaded with joblib,
  ``POST /predict`` with the features as JSON; driven with aiohttp over keep-alive connections.

Each runs in its own virtualenv under ``.bench/`` (never in the project's), created on first
use with pinned versions, and as a child process on free ports, stopped on exit. The model
itself comes from ``fraud.train``; the rows sent are the ones the router builds for the same
Predict requests, so every path scores the same inputs with the same model.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import time
import venv
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve_cli.stack import free_port
from modelserve_demo import fraud
from modelserve_features.request_time import RequestFacts
from modelserve_runtime.convert import tensor_to_numpy

#: The competitors' own packages, pinned; scikit-learn, numpy and joblib are pinned to what
#: this interpreter has (the project's pins), so the pickled pipeline loads as it was saved.
KSERVE_PACKAGES: tuple[str, ...] = ("kserve==0.21.0",)
FASTAPI_PACKAGES: tuple[str, ...] = ("fastapi==0.165.0", "uvicorn[standard]==0.54.0")
MODEL_PACKAGES: tuple[str, ...] = ("scikit-learn", "numpy", "joblib")

#: Distributions whose installed versions are reported for each venv.
REPORTED: tuple[str, ...] = (
    "kserve",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvloop",
    "httptools",
    "grpcio",
    "protobuf",
    "scikit-learn",
    "numpy",
    "joblib",
)

#: The name the model is served under (KServe's model name; the router's endpoint is `fraud`).
MODEL_NAME = "fraud"

#: The names of the model's inputs in the tutorial app's JSON body, in FEATURE_REFS order.
JSON_FIELDS: tuple[str, ...] = tuple(ref.split(":", 1)[1] for ref in fraud.FEATURE_REFS)

KSERVE_SERVER = '''\
"""KServe custom model: the demo's scikit-learn pipeline, loaded with joblib, served by
KServe's ModelServer (the Open Inference Protocol's ModelInfer on its gRPC port)."""

import argparse

import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class SklearnFraudModel(Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.pipeline = None
        self.load()

    def load(self):
        self.pipeline = joblib.load(self.path)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        rows = payload.inputs[0].as_numpy().astype(np.float64)
        probabilities = self.pipeline.predict_proba(rows)
        labels = self.pipeline.classes_[probabilities.argmax(axis=1)].astype(np.int64)
        return InferResponse(
            response_id=payload.id,
            model_name=self.name,
            infer_outputs=[
                InferOutput("label", list(labels.shape), "INT64", labels),
                InferOutput(
                    "probabilities",
                    list(probabilities.shape),
                    "FP32",
                    probabilities.astype(np.float32),
                ),
            ],
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="the joblib file of the pipeline")
    args, _ = parser.parse_known_args()
    ModelServer().start([SklearnFraudModel(args.model_name, args.model_path)])
'''

FASTAPI_APP = '''\
"""Serving a scikit-learn model the way the tutorials do: FastAPI, uvicorn and joblib."""

import os

import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
from fastapi import FastAPI
from pydantic import BaseModel

model = joblib.load(os.environ["MODEL_PATH"])
app = FastAPI()


class Payment(BaseModel):
    avg_amount_30d: float
    account_age_days: float
    chargebacks_90d: float
    txn_count_24h: float
    amount: float
    hour_of_day: float
    day_of_week: float
    is_mobile: float


@app.post("/predict")
def predict(payment: Payment):
    row = [
        [
            payment.avg_amount_30d,
            payment.account_age_days,
            payment.chargebacks_90d,
            payment.txn_count_24h,
            payment.amount,
            payment.hour_of_day,
            payment.day_of_week,
            payment.is_mobile,
        ]
    ]
    probabilities = model.predict_proba(row)[0]
    return {"label": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
'''


class BaselineError(RuntimeError):
    """A competitor could not be installed or started; the message says why."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def model_pins() -> tuple[str, ...]:
    """`name==version` of scikit-learn, numpy and joblib as installed here."""
    return tuple(f"{name}=={metadata.version(name)}" for name in MODEL_PACKAGES)


#: An interpreter that already has every competitor's packages, used instead of the venvs
#: (on a machine that cannot reach PyPI, with the packages carried there).
PYTHON_OVERRIDE = "MODELSERVE_BENCH_BASELINE_PYTHON"


class Venv:
    """A virtualenv of its own for one competitor, (re)installed when its requirements change;
    with MODELSERVE_BENCH_BASELINE_PYTHON set, that interpreter instead, as it is."""

    def __init__(self, path: Path, requirements: Sequence[str]) -> None:
        self.path = path
        self.requirements = tuple(requirements)
        self._override = os.environ.get(PYTHON_OVERRIDE)

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return Path(self._override) if self._override else self.path / "bin" / "python"

    @property
    def _stamp(self) -> Path:
        return self.path / ".modelserve-requirements"

    def ensure(self) -> None:
        """Creates the venv and installs the requirements unless they are already there."""
        if self._override:
            return
        wanted = "\n".join(self.requirements) + "\n"
        if self.python.exists() and self._stamp.exists() and self._stamp.read_text() == wanted:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.path.parent / f"{self.path.name}-pip.log"
        print(f"installing {' '.join(self.requirements)} into {self.path} (log: {log_path})")
        if not self.python.exists():
            venv.EnvBuilder(with_pip=True).create(self.path)
        with log_path.open("w") as log_file:
            done = subprocess.run(
                [str(self.python), "-m", "pip", "install", *self.requirements],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        if done.returncode != 0:
            lines = [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if not line.startswith("WARNING: Location")
            ]
            raise BaselineError(
                f"pip could not install {' '.join(self.requirements)} into {self.path}"
                f" (exit {done.returncode}):\n" + "\n".join(lines[-20:])
            )
        self._stamp.write_text(wanted)

    def versions(self, names: Iterable[str] = REPORTED) -> dict[str, str]:
        """Installed versions of the named distributions (those present)."""
        script = (
            "import json, sys\n"
            "from importlib import metadata\n"
            "found = {}\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        found[name] = metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n"
            "        pass\n"
            "print(json.dumps(found))\n"
        )
        out = subprocess.run(
            [str(self.python), "-c", script, *names],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found: dict[str, str] = json.loads(out)
        return found


def kserve_venv(bench_dir: Path) -> Venv:
    """`.bench/kserve-venv`: kserve and the model's packages."""
    return Venv(bench_dir / "kserve-venv", (*KSERVE_PACKAGES, *model_pins()))


def fastapi_venv(bench_dir: Path) -> Venv:
    """`.bench/fastapi-venv`: FastAPI, uvicorn and the model's packages."""
    return Venv(bench_dir / "fastapi-venv", (*FASTAPI_PACKAGES, *model_pins()))


_LIVE: set[ChildProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when the interpreter exits without stopping a child (it should not)."""
    for child in list(_LIVE):
        child.kill()


class ChildProcess:
    """A server child in its own session (a terminal's Ctrl-C reaches only us), logged to a file,
    stopped with its whole process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Starts the process; returns at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _LIVE.add(self)

    def check_running(self) -> None:
        """Raises BaselineError, with the tail of the log, when the process has exited."""
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise BaselineError(
                f"{self.name} exited with code {code}; log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the process group, now."""
        self._signal_group(signal.SIGKILL)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
        _LIVE.discard(self)

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `grace_s`."""
        process = self._process
        if process is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, grace_s)
        # The leader may be gone while a worker of its group lingers: kill whatever is left.
        self.kill()


async def _wait_until(
    child: ChildProcess, probe: Callable[[], Awaitable[bool]], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        child.check_running()
        with contextlib.suppress(Exception):
            if await probe():
                return
        if time.monotonic() > deadline:
            raise BaselineError(
                f"{child.name} was not ready after {timeout_s:.0f}s; log {child.log_path}:\n"
                f"{_tail(child.log_path)}"
            )
        await asyncio.sleep(0.1)


class KServeServer:
    """KServe's ModelServer with the custom model above, gRPC and HTTP on free ports."""

    def __init__(self, python: Path, model_path: Path, work_dir: Path) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        script = work_dir / "kserve_server.py"
        script.write_text(KSERVE_SERVER)
        env = dict(os.environ)
        # The router's services log at warning in the benchmark; so does KServe here.
        env.update({"KSERVE_LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
        self.process = ChildProcess(
            "KServe ModelServer",
            [
                str(python),
                str(script),
                "--model_name",
                MODEL_NAME,
                "--model_path",
                str(model_path),
                "--http_port",
                str(self.http_port),
                "--grpc_port",
                str(self.grpc_port),
                # One log line per request otherwise (the router writes none at warning).
                "--enable_latency_logging",
                "false",
            ],
            work_dir / "kserve.log",
            env=env,
            cwd=work_dir,
        )

    @property
    def target(self) -> str:
        """`host:port` of the gRPC v2 endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        """`http://host:port` of the REST v2 endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Starts the server process; `wait_ready` awaits it."""
        self.process.start()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Returns once the model reports ready over gRPC (ModelReady)."""
        client = InferenceServerClient(self.target)
        try:

            async def ready() -> bool:
                return bool(await client.is_model_ready(MODEL_NAME))

            await _wait_until(self.process, ready, timeout_s)
        finally:
            await client.close()

    async def stop(self) -> None:
        """Stops the server process."""
        await self.process.stop()


class FastAPIServer:
    """The tutorial app under uvicorn on a free port: one worker, uvloop and httptools as
    uvicorn[standard] picks them; logs at warning and no access log, as the router runs here."""

    def __init__(self, python: Path, model_path: Path, work_dir: Path) -> None:
        self.port = free_port()
        (work_dir / "fastapi_app.py").write_text(FASTAPI_APP)
        env = dict(os.environ)
        env.update({"MODEL_PATH": str(model_path), "PYTHONUNBUFFERED": "1"})
        self.process = ChildProcess(
            "FastAPI app (uvicorn)",
            [
                str(python),
                "-m",
                "uvicorn",
                "fastapi_app:app",
                "--app-dir",
                str(work_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # The router's services log at warning in the benchmark; so does uvicorn here,
                # and it writes no access line per request.
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            work_dir / "fastapi.log",
            env=env,
            cwd=work_dir,
        )

    @property
    def url(self) -> str:
        """The app's POST /predict URL."""
        return f"http://127.0.0.1:{self.port}/predict"

    def start(self) -> None:
        """Starts the server process; `wait_ready` awaits it."""
        self.process.start()

    async def wait_ready(self, body: bytes, timeout_s: float = 60.0) -> None:
        """Returns once POST /predict answers 200 to `body`."""
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                async with session.post(
                    self.url, data=body, headers={"content-type": "application/json"}
                ) as response:
                    return response.status == 200

            await _wait_until(self.process, ready, timeout_s)

    async def stop(self) -> None:
        """Stops the server process."""
        await self.process.stop()


class KServeClient:
    """ModelInfer on KServe's gRPC v2 endpoint with tritonclient's aio client, one row a call."""

    def __init__(self, target: str, rows: npt.NDArray[np.float32]) -> None:
        self._client = InferenceServerClient(target)
        self._inputs: list[list[Any]] = []
        for row in rows:
            request_input = InferInput(fraud.INPUT_SPEC.name, [1, rows.shape[1]], "FP32")
            request_input.set_data_from_numpy(np.ascontiguousarray(row[np.newaxis, :]))
            self._inputs.append([request_input])
        self._outputs = [InferRequestedOutput(spec.name) for spec in fraud.OUTPUT_SPECS]

    async def infer(self, i: int) -> npt.NDArray[np.float32]:
        """The class probabilities of row `i` (modulo the number of rows)."""
        try:
            result = await self._client.infer(
                MODEL_NAME, self._inputs[i % len(self._inputs)], outputs=self._outputs
            )
        except InferenceServerException as exc:
            raise BaselineError(f"KServe ModelInfer failed: {exc}") from exc
        return np.asarray(result.as_numpy("probabilities"), dtype=np.float32)

    async def close(self) -> None:
        """Closes the channel."""
        await self._client.close()


class FastAPIClient:
    """POST /predict with aiohttp over keep-alive connections, one JSON row a call."""

    def __init__(self, url: str, bodies: Sequence[bytes]) -> None:
        self._url = url
        self._bodies = list(bodies)
        self._headers = {"content-type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Opens the session (inside the event loop that uses it)."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def infer(self, i: int) -> npt.NDArray[Any]:
        """The class probabilities of request `i` (modulo the number of requests)."""
        if self._session is None:
            raise RuntimeError("open() first")
        body = self._bodies[i % len(self._bodies)]
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise BaselineError(f"{self._url} answered {response.status}: {payload[:200]!r}")
        return self._probabilities(payload)

    def _probabilities(self, payload: bytes) -> npt.NDArray[Any]:
        answer = json.loads(payload)
        return np.asarray(answer["probabilities"], dtype=np.float64)

    async def close(self) -> None:
        """Closes the session and its connections."""
        if self._session is not None:
            await self._session.close()


class OipRestClient(FastAPIClient):
    """The Open Inference Protocol over HTTP/REST (KServe v2 JSON), one row a call, with
    aiohttp over keep-alive connections: `POST <base>/v2/models/<model>/infer`, the row as JSON
    values, as curl sends it."""

    def __init__(self, base_url: str, model: str, rows: npt.NDArray[np.float32]) -> None:
        bodies = [
            json.dumps(
                {
                    # KServe's REST endpoint wants an id to answer with (it has none to make).
                    "id": f"row-{index}",
                    "inputs": [
                        {
                            "name": fraud.INPUT_SPEC.name,
                            "datatype": "FP32",
                            "shape": [1, rows.shape[1]],
                            "data": [float(v) for v in row],
                        }
                    ],
                }
            ).encode()
            for index, row in enumerate(rows)
        ]
        super().__init__(f"{base_url}/v2/models/{model}/infer", bodies)

    def _probabilities(self, payload: bytes) -> npt.NDArray[np.float32]:
        answer = json.loads(payload)
        probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")
        return np.asarray(probabilities["data"], dtype=np.float32)


class PredictJsonClient(FastAPIClient):
    """The router's Predict over HTTP: `POST <base>/v1/endpoints/<endpoint>:predict` with
    each PredictRequest as JSON (protobuf's mapping)."""

    def __init__(
        self, base_url: str, endpoint: str, requests: Sequence[router_pb.PredictRequest]
    ) -> None:
        bodies = [json_format.MessageToJson(r, indent=None).encode() for r in requests]
        super().__init__(f"{base_url}/v1/endpoints/{endpoint}:predict", bodies)

    def _probabilities(self, payload: bytes) -> npt.NDArray[np.float32]:
        answer = json_format.Parse(payload, router_pb.PredictResponse())
        tensor = next(o for o in answer.outputs if o.name == "probabilities")
        return np.asarray(tensor_to_numpy(tensor), dtype=np.float32)


class PredictConnectClient(FastAPIClient):
    """The router's Predict over the Connect protocol on its HTTP port:
    `POST <base>/modelserve.router.v1.RouterService/Predict` with each PredictRequest as
    binary protobuf (`application/proto`), the answer the same way."""

    def __init__(self, base_url: str, requests: Sequence[router_pb.PredictRequest]) -> None:
        bodies = [r.SerializeToString() for r in requests]
        super().__init__(f"{base_url}/modelserve.router.v1.RouterService/Predict", bodies)
        self._headers = {"content-type": "application/proto", "connect-protocol-version": "1"}

    def _probabilities(self, payload: bytes) -> npt.NDArray[np.float32]:
        answer = router_pb.PredictResponse.FromString(payload)
        tensor = next(o for o in answer.outputs if o.name == "probabilities")
        return np.asarray(tensor_to_numpy(tensor), dtype=np.float32)


def save_model(trained: fraud.TrainedModel, directory: Path) -> Path:
    """Saves the scikit-learn pipeline with joblib, as the tutorials do; returns the file."""
    path = directory / "fraud.joblib"
    joblib.dump(trained.pipeline, path)
    return path


def feature_rows(
    requests: Sequence[router_pb.PredictRequest], customers: Mapping[str, Mapping[str, float]]
) -> npt.NDArray[np.float32]:
    """The model input rows the router builds for these Predict requests: the customer's stored
    features plus the request-time ones from the shared library, in FEATURE_REFS order."""
    rows = []
    for request in requests:
        stored = customers[request.entities[fraud.ENTITY_TYPE]]
        facts = RequestFacts(
            event_time=request.context.event_time.ToDatetime(),
            user_agent=request.context.user_agent,
        )
        values = {f"{fraud.ENTITY_TYPE}:{name}": value for name, value in stored.items()}
        values.update(fraud.request_feature_values(request.features["amount"].double_value, facts))
        rows.append(fraud.feature_vector(values))
    return np.stack(rows)


def json_bodies(rows: npt.NDArray[np.float32]) -> list[bytes]:
    """The tutorial app's request bodies for these rows (the float32 values, as JSON numbers)."""
    return [
        json.dumps(
            {name: float(value) for name, value in zip(JSON_FIELDS, row, strict=True)}
        ).encode()
        for row in rows
    ]

"""Benchmark: the router's Predict against KServe and a tutorial FastAPI app, in one run.

Trains the demo fraud model (`fraud.train(seed=0)`), saves the scikit-learn pipeline with
joblib, and serves it two more ways, each from its own virtualenv under `.bench/` (created on
first use, versions pinned and printed):

- KServe ModelInfer (gRPC v2): KServe's Python ModelServer with a custom `kserve.Model`,
  driven with `tritonclient.grpc.aio` (the Open Inference Protocol, as the router calls Triton);
- FastAPI POST /predict: FastAPI + uvicorn + joblib as a tutorial writes it, driven with aiohttp;
- KServe REST v2 infer (JSON rows): the same ModelServer's HTTP endpoint, one row as JSON
  values per `POST /v2/models/fraud/infer`, driven with aiohttp.

Unless `--no-router`, it also starts the modelserve stack as `bench.py` does and measures the
router's Predict for the same customers and amounts (the competitors get the very feature rows
the router builds for them), unary and as a streaming caller would send them (`PredictStream`,
one stream that every concurrent caller shares), and the same rows the competitors get,
sent to the router's Open Inference Protocol over HTTP/REST as KServe's REST endpoint gets
them (`router REST v2 infer (JSON rows)`: no feature read, the model call and the prediction
log), and the Predict requests themselves as JSON on the same HTTP port (`router Predict over
HTTP (JSON)`: features read as over gRPC). For each concurrency every path runs for a fixed
time after a
warm-up; it prints p50/p95/p99, req/s, the router's ratios to each competitor and the issue's
targets at concurrency 64. Every process it starts is stopped at the end, also on Ctrl-C.

    .venv/bin/python loadtests/bench_baselines.py --duration 5 --concurrency 1 16 64 --uvloop
    .venv/bin/python loadtests/bench_baselines.py --duration 5 --concurrency 1 16 64 --no-uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import baselines
import numpy as np
import numpy.typing as npt
import uvloop
from bench import (
    Result,
    add_run_arguments,
    add_stack_arguments,
    drive,
    predict_requests,
    start_demo_stack,
)

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_demo import fraud
from modelserve_runtime.channels import create_channel
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.predict_stream import PredictStreamClient

ROUTER = "router Predict"
ROUTER_STREAM = "router PredictStream (one stream)"
KSERVE = "KServe ModelInfer (gRPC v2)"
FASTAPI = "FastAPI POST /predict"
ROUTER_REST = "router REST v2 infer (JSON rows)"
ROUTER_JSON = "router Predict over HTTP (JSON)"
ROUTER_CONNECT = "router Predict over Connect (protobuf)"
KSERVE_REST = "KServe REST v2 infer (JSON rows)"

#: Largest difference in a class probability allowed between a path's answer and the
#: in-process pipeline's (the router's ONNX model and KServe answer in float32).
_TOLERANCE = 1e-5

Call = Callable[[int], Awaitable[object]]
Answer = Callable[[int], Awaitable[npt.NDArray[Any]]]


async def run(
    args: argparse.Namespace, venvs: Mapping[str, baselines.Venv], skipped: Mapping[str, str]
) -> None:
    task = asyncio.current_task()
    if task is not None:
        # SIGTERM unwinds like Ctrl-C does, so the servers are stopped either way.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    work_dir = Path(tempfile.mkdtemp(prefix="modelserve-baselines-"))
    try:
        await _run(args, venvs, skipped, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


async def _run(
    args: argparse.Namespace,
    venvs: Mapping[str, baselines.Venv],
    skipped: Mapping[str, str],
    work_dir: Path,
) -> None:
    calls: dict[str, Call] = {}
    answers: dict[str, Answer] = {}
    async with contextlib.AsyncExitStack() as exits:
        customers = fraud.demo_customers()
        requests = predict_requests(customers)
        n = len(requests)
        if args.router:
            print("starting the modelserve stack and deploying the demo model ...", flush=True)
            stack, demo = await start_demo_stack(
                args.model_runner, args.feature_reader, with_monitor=args.with_monitor
            )
            exits.push_async_callback(stack.stop)
            trained = demo.trained
            channel = create_channel(stack.targets["router"])
            exits.push_async_callback(channel.close)
            router = router_grpc.RouterServiceStub(channel)

            async def router_answer(i: int) -> npt.NDArray[Any]:
                response = await router.Predict(requests[i % n])
                output = next(o for o in response.outputs if o.name == "probabilities")
                return tensor_to_numpy(output)

            calls[ROUTER] = lambda i: router.Predict(requests[i % n])
            answers[ROUTER] = router_answer
            # A caller that streams: every concurrent caller shares one PredictStream.
            stream = await exits.enter_async_context(PredictStreamClient(channel))

            def streamed(i: int) -> Awaitable[router_pb.PredictResponse]:
                request = router_pb.PredictRequest()
                request.CopyFrom(requests[i % n])
                return stream.predict(request)

            async def stream_answer(i: int) -> npt.NDArray[Any]:
                response = await streamed(i)
                output = next(o for o in response.outputs if o.name == "probabilities")
                return tensor_to_numpy(output)

            calls[ROUTER_STREAM] = streamed
            answers[ROUTER_STREAM] = stream_answer
            rest_base = f"http://127.0.0.1:{stack.router_http_port}"
        else:
            trained = fraud.train(seed=0)
        rows = baselines.feature_rows(requests, customers)
        expected = trained.predict_proba(rows)
        if args.router:
            # The endpoint over the Open Inference Protocol's HTTP binding, on the caller's
            # rows (no feature read), as KServe's REST endpoint gets them below.
            router_rest = baselines.OipRestClient(rest_base, "fraud", rows)
            await router_rest.open()
            exits.push_async_callback(router_rest.close)
            calls[ROUTER_REST] = answers[ROUTER_REST] = router_rest.infer
            # Predict itself (features read from Redis) over the same HTTP port, as JSON.
            predict_json = baselines.PredictJsonClient(rest_base, "fraud", requests)
            await predict_json.open()
            exits.push_async_callback(predict_json.close)
            calls[ROUTER_JSON] = answers[ROUTER_JSON] = predict_json.infer
            # And over the Connect protocol on the same port, as binary protobuf.
            predict_connect = baselines.PredictConnectClient(rest_base, requests)
            await predict_connect.open()
            exits.push_async_callback(predict_connect.close)
            calls[ROUTER_CONNECT] = answers[ROUTER_CONNECT] = predict_connect.infer
        model_path = baselines.save_model(trained, work_dir)

        servers: list[Coroutine[Any, Any, None]] = []
        kserve_server = fastapi_server = None
        if "kserve" in venvs:
            kserve_server = baselines.KServeServer(venvs["kserve"].python, model_path, work_dir)
            kserve_server.start()
            exits.push_async_callback(kserve_server.stop)
            servers.append(kserve_server.wait_ready())
        bodies = baselines.json_bodies(rows)
        if "fastapi" in venvs:
            fastapi_server = baselines.FastAPIServer(venvs["fastapi"].python, model_path, work_dir)
            fastapi_server.start()
            exits.push_async_callback(fastapi_server.stop)
            servers.append(fastapi_server.wait_ready(bodies[0]))
        print("starting the competitors ...", flush=True)
        await asyncio.gather(*servers)
        if kserve_server is not None:
            kserve = baselines.KServeClient(kserve_server.target, rows)
            exits.push_async_callback(kserve.close)
            calls[KSERVE] = answers[KSERVE] = kserve.infer
            kserve_rest = baselines.OipRestClient(kserve_server.url, baselines.MODEL_NAME, rows)
            await kserve_rest.open()
            exits.push_async_callback(kserve_rest.close)
            calls[KSERVE_REST] = answers[KSERVE_REST] = kserve_rest.infer
        if fastapi_server is not None:
            http = baselines.FastAPIClient(fastapi_server.url, bodies)
            await http.open()
            exits.push_async_callback(http.close)
            calls[FASTAPI] = answers[FASTAPI] = http.infer

        for name, answer in answers.items():
            got = np.stack([np.asarray(await answer(i)).reshape(-1) for i in range(n)])
            worst = float(np.max(np.abs(got - expected)))
            if worst > _TOLERANCE:
                raise baselines.BaselineError(
                    f"{name} does not answer what the pipeline does (max |dp| = {worst:.2e})"
                )
            print(f"{name}: answers agree with the pipeline in-process (max |dp| = {worst:.1e})")

        results: list[Result] = []
        for concurrency in args.concurrency:
            for name, call in calls.items():
                await drive(name, call, concurrency, min(1.0, args.duration))  # warm-up
            # With --rounds N the paths take turns N times, duration/N each, so that a slow
            # spell of a shared machine falls on every path rather than on one.
            parts: dict[str, list[Result]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    parts[name].append(
                        await drive(name, call, concurrency, args.duration / args.rounds)
                    )
            for name in calls:
                result = _merged(parts[name])
                results.append(result)
                print(
                    f"  {name} c={concurrency}: p50 {result.percentile(50):.2f} ms,"
                    f" p99 {result.percentile(99):.2f} ms, {result.rps:.0f} req/s",
                    flush=True,
                )
        _print(results, args, venvs, skipped)


def _merged(parts: Sequence[Result]) -> Result:
    """One path's rounds at one concurrency as one result."""
    first = parts[0]
    return Result(
        first.path,
        first.concurrency,
        [latency for part in parts for latency in part.latencies_ms],
        sum(part.seconds for part in parts),
        sum(part.errors for part in parts),
    )


def _print(
    results: list[Result],
    args: argparse.Namespace,
    venvs: Mapping[str, baselines.Venv],
    skipped: Mapping[str, str],
) -> None:
    loop = "uvloop" if args.uvloop else "asyncio (default loop)"
    router = (
        f"model_runner={args.model_runner} feature_reader={args.feature_reader}"
        if args.router
        else "not measured"
    )
    print(
        f"\nclient loop={loop} duration={args.duration}s in {args.rounds} round(s) router: {router}"
    )
    for name, environment in venvs.items():
        versions = " ".join(f"{k}=={v}" for k, v in environment.versions().items())
        print(f"{name} venv ({environment.path}): {versions}")
    for name, reason in skipped.items():
        print(f"{name}: NOT MEASURED, its venv could not be installed: {reason.splitlines()[0]}")
    print("\n| path | conc | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.path} | {r.concurrency} | {r.percentile(50):.2f} | {r.percentile(95):.2f} | "
            f"{r.percentile(99):.2f} | {r.rps:.0f} | {r.errors} |"
        )
    by = {(r.path, r.concurrency): r for r in results}
    competitors = [c for c in (KSERVE, FASTAPI) if (c, args.concurrency[0]) in by]
    if (ROUTER, args.concurrency[0]) not in by or not competitors:
        return
    print("\n| ratio | conc | p50 x | p99 x | req/s x |")
    print("|---|---:|---:|---:|---:|")
    for ours in (ROUTER, ROUTER_STREAM):
        for competitor in competitors:
            for c in args.concurrency:
                a, b = by[(ours, c)], by[(competitor, c)]
                print(
                    f"| {ours} / {competitor} | {c} | {a.percentile(50) / b.percentile(50):.2f} |"
                    f" {a.percentile(99) / b.percentile(99):.2f} | {a.rps / b.rps:.2f} |"
                )
    for ours in (ROUTER_REST, ROUTER_JSON, ROUTER_CONNECT):
        # Over HTTP: the router's binding against the others'.
        if (ours, args.concurrency[0]) not in by:
            continue
        for competitor in (KSERVE, KSERVE_REST, FASTAPI):
            if (competitor, args.concurrency[0]) not in by:
                continue
            for c in args.concurrency:
                a, b = by[(ours, c)], by[(competitor, c)]
                print(
                    f"| {ours} / {competitor} | {c} |"
                    f" {a.percentile(50) / b.percentile(50):.2f} |"
                    f" {a.percentile(99) / b.percentile(99):.2f} | {a.rps / b.rps:.2f} |"
                )
    if 64 not in args.concurrency:
        return
    router_64 = by[(ROUTER, 64)]
    print("\n| issue 6 target (c=64) | router | competitor | met |")
    print("|---|---:|---:|---|")
    if KSERVE in competitors:
        kserve_64 = by[(KSERVE, 64)]
        print(
            f"| req/s ≥ KServe's | {router_64.rps:.0f} | {kserve_64.rps:.0f} | "
            f"{_yes(router_64.rps >= kserve_64.rps)} |"
        )
        print(
            f"| p99 ≤ KServe's | {router_64.percentile(99):.2f} ms | "
            f"{kserve_64.percentile(99):.2f} ms | "
            f"{_yes(router_64.percentile(99) <= kserve_64.percentile(99))} |"
        )
    if FASTAPI in competitors:
        fastapi_64 = by[(FASTAPI, 64)]
        print(
            f"| p99 ≤ 1/5 of FastAPI's | {router_64.percentile(99):.2f} ms | "
            f"{fastapi_64.percentile(99) / 5:.2f} ms (1/5 of {fastapi_64.percentile(99):.2f}) | "
            f"{_yes(router_64.percentile(99) <= fastapi_64.percentile(99) / 5)} |"
        )


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def _venvs(args: argparse.Namespace) -> tuple[dict[str, baselines.Venv], dict[str, str]]:
    """Creates or reuses the competitors' virtualenvs. One that cannot be installed (KServe's
    dependencies may not resolve on every Python) is reported and skipped, so the others run."""
    wanted: dict[str, baselines.Venv] = {}
    if args.kserve:
        wanted["kserve"] = baselines.kserve_venv(args.bench_dir)
    if args.fastapi:
        wanted["fastapi"] = baselines.fastapi_venv(args.bench_dir)
    ready: dict[str, baselines.Venv] = {}
    skipped: dict[str, str] = {}
    for name, environment in wanted.items():
        try:
            environment.ensure()
        except baselines.BaselineError as exc:
            print(f"\n*** {name} baseline skipped: {exc}\n", flush=True)
            skipped[name] = str(exc)
            continue
        ready[name] = environment
    return ready, skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the client (this process) on uvloop or on asyncio's default loop",
    )
    parser.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the modelserve stack and measure the router's Predict in the same run",
    )
    parser.add_argument(
        "--kserve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure KServe's ModelServer (venv .bench/kserve-venv)",
    )
    parser.add_argument(
        "--fastapi",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the tutorial FastAPI app (venv .bench/fastapi-venv)",
    )
    add_stack_arguments(parser)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the paths in turn this many times per concurrency (duration/rounds each)",
    )
    parser.add_argument(
        "--bench-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".bench",
        help="where the competitors' virtualenvs live",
    )
    args = parser.parse_args()
    venvs, skipped = _venvs(args)
    try:
        if args.uvloop:
            uvloop.run(run(args, venvs, skipped))
        else:
            asyncio.run(run(args, venvs, skipped))
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started is stopped", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except baselines.BaselineError as exc:
        raise SystemExit(f"benchmark failed: {exc}") from None
    except asyncio.CancelledError:
        print("terminated; every process this benchmark started is stopped", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()

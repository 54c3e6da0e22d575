"""Benchmark: one ONNX artifact served by Triton on a GPU instance against CPU instances.

Starts Triton (local mode, the nvidia-pytriton wheel), loads two models twice each from the
same bytes, once with `device=cpu` and once with `device=gpu` (the python backend running
onnxruntime's CUDA provider):

- fraud: the demo model (a scaler and gradient-boosted trees, 13 features): tiny;
- mlp: a multilayer perceptron, 256 features through three hidden layers of --hidden units
  to 16 classes, trained for one pass on random rows: enough arithmetic per row to feed a GPU.

Before timing, each GPU model must answer a batch as its CPU twin does. Then for each model,
rows per request and concurrency, the CPU and GPU copies take turns, each driven through the
project's TritonRunner (straight to Triton) for --duration seconds, and the table gives
p50/p95/p99 latency of a request, requests/s and rows/s, and the GPU/CPU rows/s ratio.

    python loadtests/bench_gpu.py --duration 3 --concurrency 1 16

Needs an NVIDIA GPU and onnxruntime-gpu in place of onnxruntime (`make test-gpu` installs
it); without a GPU the GPU models fail to load with Triton's reason, and this says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from bench import Result, drive, run_benchmark
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.neural_network import MLPClassifier

from modelserve_demo import fraud
from modelserve_triton.model_config import (
    CPU,
    GPU,
    TensorSpec,
    build_model_config,
    model_files,
)
from modelserve_triton.process import TritonOptions, TritonServer
from modelserve_triton.runner import TritonError, TritonRunner

MLP_FEATURES = 256
MLP_CLASSES = 16
MAX_BATCH = 1024


@dataclass(frozen=True)
class Artifact:
    """An ONNX model and its signature."""

    name: str
    onnx: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def rows(self, n: int, seed: int) -> dict[str, npt.NDArray[Any]]:
        """`n` random input rows."""
        generator = np.random.default_rng(seed)
        (spec,) = self.inputs
        return {spec.name: generator.normal(size=(n, spec.shape[1])).astype(np.float32)}


def mlp(hidden: int) -> Artifact:
    """A multilayer perceptron trained for one pass on random rows (its answers are not the
    point: the work per row is), as ONNX."""
    generator = np.random.default_rng(0)
    features = generator.normal(size=(4096, MLP_FEATURES)).astype(np.float32)
    labels = generator.integers(0, MLP_CLASSES, size=4096)
    model = MLPClassifier(hidden_layer_sizes=(hidden, hidden, hidden), max_iter=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one pass does not converge, by design
        model.fit(features, labels)
    onnx_model = convert_sklearn(
        model,
        initial_types=[("features", FloatTensorType([None, MLP_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    return Artifact(
        "mlp",
        onnx_model.SerializeToString(),
        (TensorSpec("features", "FP32", (-1, MLP_FEATURES)),),
        (
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, MLP_CLASSES)),
        ),
    )


def demo() -> Artifact:
    """The demo fraud model."""
    trained = fraud.train(seed=0)
    return Artifact("fraud", trained.onnx_bytes, trained.inputs, trained.outputs)


async def load(runner: TritonRunner, artifact: Artifact, device: str, instances: int) -> str:
    """Loads the artifact as `<name>_<device>`; returns that name."""
    name = f"{artifact.name}_{device}"
    config = build_model_config(
        name,
        artifact.inputs,
        artifact.outputs,
        max_batch_size=MAX_BATCH,
        device=device,
        instance_count=instances,
    )
    await runner.load(name, config, model_files({1: artifact.onnx}), timeout_s=300)
    return name


@dataclass
class Row:
    model: str
    rows: int
    cpu: Result
    gpu: Result


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    server = TritonServer(TritonOptions(work_dir=work))
    await server.start()
    runner = TritonRunner(server.grpc_endpoint)
    try:
        artifacts = [demo(), mlp(args.hidden)]
        names: dict[tuple[str, str], str] = {}
        for artifact in artifacts:
            names[artifact.name, CPU] = await load(runner, artifact, CPU, args.cpu_instances)
            try:
                names[artifact.name, GPU] = await load(runner, artifact, GPU, args.gpu_instances)
            except TritonError as exc:
                sys.exit(f"the GPU copy of {artifact.name} did not load: {exc}")
            await _same_answers(runner, artifact, names)
        measured: list[Row] = []
        for artifact in artifacts:
            outputs = [spec.name for spec in artifact.outputs]
            for rows in args.rows:
                payloads = [artifact.rows(rows, seed) for seed in range(32)]
                for concurrency in args.concurrency:
                    results = {}
                    for device in (CPU, GPU, CPU, GPU)[: 2 * args.rounds]:
                        name = names[artifact.name, device]

                        async def call(
                            i: int,
                            name: str = name,
                            payloads: list[dict[str, npt.NDArray[Any]]] = payloads,
                            outputs: list[str] = outputs,
                        ) -> object:
                            payload = payloads[i % len(payloads)]
                            return await runner.infer(name, 1, payload, outputs, timeout_s=30)

                        await drive(name, call, concurrency, 0.5)  # warm
                        result = await drive(name, call, concurrency, args.duration)
                        if device in results:
                            results[device].latencies_ms += result.latencies_ms
                            results[device].seconds += result.seconds
                            results[device].errors += result.errors
                        else:
                            results[device] = result
                    measured.append(Row(artifact.name, rows, results[CPU], results[GPU]))
        _print(measured, args)
    finally:
        await runner.close()
        await server.stop()


async def _same_answers(
    runner: TritonRunner, artifact: Artifact, names: dict[tuple[str, str], str]
) -> None:
    """The GPU copy answers 256 rows as the CPU copy does (float32 arithmetic on another
    device: close, not bit-equal)."""
    payload = artifact.rows(256, seed=99)
    outputs = [spec.name for spec in artifact.outputs]
    cpu = await runner.infer(names[artifact.name, CPU], 1, payload, outputs, timeout_s=60)
    gpu = await runner.infer(names[artifact.name, GPU], 1, payload, outputs, timeout_s=60)
    for output in outputs:
        if cpu[output].dtype.kind == "f":
            np.testing.assert_allclose(gpu[output], cpu[output], rtol=1e-3, atol=1e-4)
        else:
            agree = float(np.mean(gpu[output] == cpu[output]))
            if agree < 0.99:
                sys.exit(f"{artifact.name}: GPU and CPU labels agree on {agree:.1%} of rows")
    print(f"{artifact.name}: GPU answers match CPU answers on 256 rows")


def _print(measured: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\nCPU: {args.cpu_instances} instance(s), one onnxruntime thread each; GPU:"
        f" {args.gpu_instances} instance(s) on GPU 0. {args.duration} s per path and round,"
        f" {args.rounds} round(s), CPU and GPU alternating."
    )
    print("| model | rows/req | conc | device | p50 ms | p95 ms | p99 ms | req/s | rows/s | err |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in measured:
        for device, result in ((CPU, row.cpu), (GPU, row.gpu)):
            print(
                f"| {row.model} | {row.rows} | {result.concurrency} | {device} |"
                f" {result.percentile(50):.2f} | {result.percentile(95):.2f} |"
                f" {result.percentile(99):.2f} | {result.rps:,.0f} |"
                f" {result.rps * row.rows:,.0f} | {result.errors} |"
            )
    print("\n| model | rows/req | conc | GPU/CPU rows/s | GPU/CPU p50 |")
    print("|---|---:|---:|---:|---:|")
    for row in measured:
        print(
            f"| {row.model} | {row.rows} | {row.cpu.concurrency} |"
            f" {row.gpu.rps / row.cpu.rps:.2f}x |"
            f" {row.gpu.percentile(50) / row.cpu.percentile(50):.2f}x |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per path and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--rounds", type=int, choices=[1, 2], default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="units per MLP hidden layer")
    parser.add_argument(
        "--cpu-instances",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU instances of each model (default: half the cores)",
    )
    parser.add_argument("--gpu-instances", type=int, default=1, help="instances on GPU 0")
    run_benchmark(main(parser.parse_args()))

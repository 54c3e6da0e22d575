"""`modelserve up`, what `make up` runs: the whole suite from one command, the demo model
answering, and Ctrl-C (or the terminal closing) stopping every process it started."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from support import eventually

from modelserve_demo import fraud

CLI = str(Path(sys.executable).parent / "modelserve")


def _started_under(run_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names `run_dir`: Redis, Triton and its stubs, the
    services (their logs and state go there)."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in cmdline or str(run_dir) == (process.info["cwd"] or ""):
            found.append(process)
    return found


async def _infer_over_http(url: str) -> dict[str, Any]:
    """One row of the demo model's features, posted as curl would to the endpoint `fraud`."""
    row = fraud.make_dataset(1, seed=5)[0]
    body = {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": list(row.shape), "data": row.tolist()}
        ]
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v2/models/fraud/infer", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def _demo_customer_over_connect(url: str) -> str:
    """The status of one demo customer's feature, read over Connect as JSON, as curl would."""
    body = {
        "entities": [{"entityType": "customer", "entityId": "c-1001"}],
        "features": ["customer:avg_amount_30d"],
        "layout": "FEATURE_LAYOUT_LISTS",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/modelserve.feature.v1.FeatureService/GetOnlineFeatures", json=body
        ) as response,
    ):
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
    (status,) = answer["results"][0]["orderedStatuses"]
    return str(status).removeprefix("FEATURE_STATUS_")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
async def test_up_serves_the_demo_and_ctrl_c_stops_everything(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """The command prints every service's address (each one's HTTP port too), deploys the
    demo model and prints its prediction, then waits; SIGINT (Ctrl-C), or SIGHUP (its terminal closed), stops it in
    order with exit 0 and leaves no process."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSERVE_", "OTEL_"))}
    process = await asyncio.create_subprocess_exec(
        CLI,
        "up",
        "--run-dir",
        str(run_dir),
        "--router-port",
        "0",
        "--router-http-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "COLUMNS": "250"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(240):
            while not any(line.startswith("ready") for line in lines):
                line = (await process.stdout.readline()).decode()
                assert line, "modelserve up ended early:\n" + "".join(lines)
                lines.append(line)
        output = "".join(lines)
        for service in ("router", "feature", "inference", "registry", "monitor"):
            assert re.search(rf"\b{service}\b.*127\.0\.0\.1:\d+", output), output
        assert re.search(r"\bredis\b.*redis://127\.0\.0\.1:\d+", output), output
        assert "deployed models/fraud/versions/1 to endpoint fraud" in output, output
        assert "prediction: fraud probability" in output, output
        assert "from models/fraud/versions/1" in output, output
        assert _started_under(run_dir), "no process runs under the run directory"
        http = re.search(r"router \(HTTP\).*?(http://127\.0\.0\.1:\d+)", output)
        assert http, output
        answer = await _infer_over_http(http.group(1))
        assert answer["model_version"] == "1", answer
        (probabilities,) = [o for o in answer["outputs"] if o["name"] == "probabilities"]
        assert probabilities["shape"] == [1, 2]
        assert abs(sum(probabilities["data"]) - 1) < 1e-4
        # Every other service has an HTTP port too: the feature store answers over Connect.
        feature_http = re.search(r"feature \(HTTP\).*?(http://127\.0\.0\.1:\d+)", output)
        assert feature_http, output
        assert await _demo_customer_over_connect(feature_http.group(1)) == "PRESENT"
    finally:
        process.send_signal(stop_signal)
        rest, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, "".join(lines) + rest.decode()
    assert rest.decode().rstrip().endswith("stopped"), rest.decode()
    await eventually(lambda: not _started_under(run_dir), "every process gone", within_s=10)

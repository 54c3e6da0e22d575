"""The Node.js client generated from the protos (`make client-node`, clients/node/), for the
tests that call the services as a caller in another language would."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "clients" / "node" / "predict.mjs"


@functools.cache
def generated() -> Path:
    """`predict.mjs`, once `make client-node` has generated its code (once per run); fails
    (never skips) when it cannot be."""
    made = subprocess.run(
        ["make", "-s", "client-node"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if made.returncode != 0:
        pytest.fail(f"make client-node failed:\n{made.stdout}\n{made.stderr}")
    return SCRIPT


async def predict(target: str, request: dict[str, Any], *extra: str) -> tuple[int, list[Any]]:
    """Runs `predict.mjs` against `target`; its exit code and the JSON lines it printed."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(generated()),
        "--target",
        target,
        "--request",
        json.dumps(request),
        "--timeout-ms",
        "10000",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert not err.strip(), err.decode()
    return process.returncode or 0, [json.loads(line) for line in out.decode().splitlines()]

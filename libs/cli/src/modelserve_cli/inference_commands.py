"""`modelserve versions`: what the inference service holds, as an operator asks it."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console
from rich.table import Table

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_cli.output import fail
from modelserve_cli.tls import cli_tls
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient
from modelserve_runtime.errors import ModelServeError

console = Console()

_STATES = {
    value: name.removeprefix("MODEL_VERSION_STATE_") for name, value in pb.ModelVersionState.items()
}
_DEVICES = {pb.INSTANCE_DEVICE_CPU: "cpu", pb.INSTANCE_DEVICE_GPU: "gpu"}


def device_text(version: pb.LoadedModelVersion) -> str:
    """`cpu`, `gpu`, `gpu 0,1`, or "" before the version's first load."""
    device = _DEVICES.get(version.device, "")
    if device == "gpu" and version.gpus:
        return f"gpu {','.join(str(g) for g in version.gpus)}"
    return device


def limits_text(version: pb.LoadedModelVersion) -> str:
    """`batch 256 x1`, with `queue 100` when Triton's queue is bounded; "" before the
    version's first load."""
    if not version.max_batch_size:
        return ""
    text = f"batch {version.max_batch_size} x{version.instance_count}"
    return f"{text} queue {version.max_queue_size}" if version.max_queue_size else text


async def _held(target: str, api_key: str | None, timeout_s: float) -> list[pb.LoadedModelVersion]:
    channel = create_channel(target, default_timeout_s=timeout_s, api_key=api_key, tls=cli_tls())
    try:
        return await InferenceClient(channel, timeout_s=timeout_s).list_model_versions()
    finally:
        await channel.close()


def versions_command(
    inference: str = typer.Option(
        ..., envvar="MODELSERVE_INFERENCE", help="The inference service's host:port."
    ),
    api_key: str | None = typer.Option(
        None, envvar="MODELSERVE_API_KEY", help="API key, when inference has auth on."
    ),
    timeout_s: float = typer.Option(10.0, help="Deadline of the call."),
) -> None:
    """List the model versions inference holds: their state, the device their instances run
    on, the largest batch Triton takes and how many instances run it (and its queue bound),
    why (a FAILED load, a Triton restart, a refused config), and the Triton endpoint that
    serves each READY one."""
    try:
        held = asyncio.run(_held(inference, api_key, timeout_s))
    except ModelServeError as exc:
        fail(f"{exc.code.name}: {exc}")
    except ValueError as exc:  # the MODELSERVE_TLS_* settings
        fail(str(exc))
    table = Table(title=f"model versions held by {inference}")
    for column in ("version", "state", "device", "limits", "triton endpoint", "reason"):
        table.add_column(column, overflow="fold")
    for version in held:
        table.add_row(
            version.name,
            _STATES.get(version.state, str(version.state)),
            device_text(version),
            limits_text(version),
            version.triton_endpoint,
            version.reason,
        )
    console.print(table)

"""`modelserve` CLI: `up` runs the local stack with the demo model; `predict` calls the router."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve_cli.batch import batch_predict_command
from modelserve_cli.demo import (
    NotServingError,
    demo_request,
    deploy_demo,
    predict,
    predict_when_routed,
    wait_serving,
)
from modelserve_cli.feature_commands import features_app
from modelserve_cli.inference_commands import versions_command
from modelserve_cli.output import fail
from modelserve_cli.registry_commands import audit, deployments_app, keys_app, models_app
from modelserve_cli.rollout_commands import canary_app
from modelserve_cli.stack import SERVICES, Stack, StackError, StackOptions
from modelserve_cli.stream import stream_predict_command
from modelserve_cli.tls import cli_tls
from modelserve_runtime.errors import decode_rpc_error

app = typer.Typer(
    help="modelserve: deploy models to Triton behind a routed gRPC API.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
deployments_app.add_typer(canary_app, name="canary")
app.add_typer(deployments_app, name="deployments")
app.add_typer(keys_app, name="keys")
app.add_typer(features_app, name="features")
app.command(name="audit")(audit)
app.command(name="batch-predict")(batch_predict_command)
app.command(name="stream-predict")(stream_predict_command)
app.command(name="versions")(versions_command)
console = Console()


@app.command()
def up(
    run_dir: Path = typer.Option(
        Path(".run"), help="Where logs, the registry and Triton's files go."
    ),
    router_port: int = typer.Option(50051, help="The router's port (0: any free port)."),
    router_http_port: int = typer.Option(
        8080,
        help="The router's HTTP port (Connect, and the Open Inference Protocol's KServe v2"
        " JSON): 0 for any free port, -1 for none.",
    ),
    http: bool = typer.Option(
        True, help="Give every other service an HTTP port too (Connect), a free one."
    ),
    otlp_endpoint: str | None = typer.Option(
        None,
        envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
        help="OTLP/gRPC collector for the services' spans.",
    ),
    triton_trace_endpoint: str | None = typer.Option(
        None, help="OTLP/HTTP receiver (host:port) for Triton's spans."
    ),
    exit_after_demo: bool = typer.Option(False, help="Stop once the demo prediction is printed."),
) -> None:
    """Start Redis, Triton and every service, deploy the demo model, predict once, run until Ctrl-C."""
    options = StackOptions(
        run_dir=run_dir.resolve(),
        ports={"router": router_port} if router_port else {},
        router_http_port=None if router_http_port < 0 else router_http_port,
        http=http,
        otlp_endpoint=otlp_endpoint,
        triton_trace_endpoint=triton_trace_endpoint,
    )
    try:
        asyncio.run(_up(options, exit_after_demo))
    except StackError as exc:
        console.print(f"[red]modelserve up failed:[/red] {exc}")
        raise typer.Exit(1) from None


async def _up(options: StackOptions, exit_after_demo: bool) -> None:
    stack = Stack(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal closed. Its services are in sessions of their own and would not
    # hear of it; without this they would still be stopped, by Linux as this process ends
    # (Stack.spawn), but all at once instead of in order.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        with console.status("starting redis, triton and the services"):
            await stack.start()
        table = Table(title="modelserve is up")
        table.add_column("service")
        table.add_column("address")
        table.add_column("log")
        for service in SERVICES:
            table.add_row(service, stack.targets[service], str(stack.log_path(service)))
            http_port = (
                stack.router_http_port if service == "router" else stack.http_ports.get(service)
            )
            if http_port is not None:
                table.add_row(
                    f"{service} (HTTP)",
                    f"http://127.0.0.1:{http_port}",
                    str(stack.log_path(service)),
                )
        table.add_row("redis", stack.redis.url, str(options.run_dir / "redis" / "redis.log"))
        console.print(table)
        with console.status("training and deploying the demo fraud model"):
            deployment = await deploy_demo(stack.targets)
        console.print(
            f"deployed [bold]{deployment.model_version}[/bold] to endpoint [bold]fraud[/bold]"
        )
        response = await predict(stack.targets["router"], demo_request())
        console.print(
            f"prediction: fraud probability [bold]{_fraud_probability(response):.4f}[/bold]"
            f" from {response.model_version} (request {response.request_id}, trace {response.trace_id})"
        )
        console.print("[green]ready[/green]; Ctrl-C stops everything", highlight=False)
        if not exit_after_demo:
            await stop.wait()
    finally:
        try:
            with console.status("stopping"):
                await stack.stop()
            console.print("stopped")
        except OSError:  # the terminal is gone: stop without a word
            await stack.stop()


@app.command(name="demo")
def demo_command(
    registry: str = typer.Option(
        ..., envvar="MODELSERVE_REGISTRY", help="The registry's host:port."
    ),
    inference: str = typer.Option(
        ..., envvar="MODELSERVE_INFERENCE", help="The inference service's host:port."
    ),
    feature: str = typer.Option(
        ..., envvar="MODELSERVE_FEATURE", help="The feature service's host:port."
    ),
    router: str | None = typer.Option(
        None,
        envvar="MODELSERVE_ROUTER",
        help="The router's host:port, to predict through once deployed (none: no prediction).",
    ),
    api_key: str | None = typer.Option(
        None, envvar="MODELSERVE_API_KEY", help="API key (deploy role), when auth is on."
    ),
    wait_s: float = typer.Option(
        120.0,
        min=0,
        help="Seconds to wait for the services to serve, then for the router to answer.",
    ),
    seed: int = typer.Option(0, help="Seed of the demo model's synthetic training data."),
) -> None:
    """Deploy the demo fraud model onto a suite that is already running (Docker Compose,
    Kubernetes): wait until the services serve, train, register, load and route a new version
    of model `fraud` at endpoint `fraud`, seed its features, then predict once through the
    router (over TLS when MODELSERVE_TLS_* say so)."""
    import grpc

    try:
        tls = cli_tls()
    except ValueError as exc:
        fail(str(exc))
    targets = {"registry": registry, "inference": inference, "feature": feature}
    if router:
        targets["router"] = router

    async def run() -> None:
        await wait_serving(targets, wait_s, tls=tls)
        deployment = await deploy_demo(targets, seed=seed, api_key=api_key, tls=tls)
        console.print(
            f"deployed [bold]{deployment.model_version}[/bold] to endpoint [bold]fraud[/bold]"
        )
        if router:
            response = await predict_when_routed(
                router, demo_request(), deployment.model_version, wait_s, tls=tls, api_key=api_key
            )
            console.print(
                f"prediction: fraud probability [bold]{_fraud_probability(response):.4f}[/bold]"
                f" from {response.model_version} (request {response.request_id})"
            )

    try:
        asyncio.run(run())
    except NotServingError as exc:
        fail(str(exc))
    except grpc.aio.AioRpcError as exc:
        error = decode_rpc_error(exc)
        fail(f"{error.code.name} {error.message} {error.violations or ''}")


def _fraud_probability(response: router_pb.PredictResponse) -> float:
    probabilities = next(o for o in response.outputs if o.name == "probabilities")
    return float(probabilities.contents.fp32_contents[1])


@app.command(name="predict")
def predict_command(
    customer: str = typer.Option("c-1001", help="Customer id (entity `customer`)."),
    amount: float = typer.Option(420.0, help="Payment amount."),
    router: str = typer.Option(
        "127.0.0.1:50051", envvar="MODELSERVE_ROUTER", help="The router's host:port."
    ),
    api_key: str | None = typer.Option(
        None, envvar="MODELSERVE_API_KEY", help="API key, when the router has auth on."
    ),
) -> None:
    """Send one Predict for the demo `fraud` endpoint and print the answer (over TLS when
    MODELSERVE_TLS_* say so, as the registry commands)."""
    import grpc

    try:
        tls = cli_tls()
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        response = asyncio.run(
            predict(router, demo_request(customer, amount), tls=tls, api_key=api_key)
        )
    except grpc.aio.AioRpcError as exc:
        error = decode_rpc_error(exc)
        console.print(f"[red]{error.code.name}[/red] {error.message} {error.violations or ''}")
        raise typer.Exit(1) from None
    table = Table(title=f"endpoint fraud, customer {customer}, amount {amount}")
    table.add_column("field")
    table.add_column("value")
    for output in response.outputs:
        contents = output.contents
        values = list(contents.fp32_contents) or list(contents.int_contents)
        table.add_row(
            f"output {output.name} {list(output.shape)}", ", ".join(f"{v:.6g}" for v in values)
        )
    table.add_row("model version", response.model_version)
    table.add_row("route reason", response.route_reason)
    table.add_row("request id", response.request_id)
    table.add_row("trace id", response.trace_id)
    console.print(table)


if __name__ == "__main__":
    app()

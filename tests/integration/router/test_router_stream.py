"""Streaming predictions (`modelserve stream-predict`) on the real registry, inference (Triton)
and Redis: events scored as the router scores them, results appended and events acknowledged
together, bad events answered with their error, retries that append nothing twice, a failed
batch left pending, and a worker that follows its deployment."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from router_testing import V1, V2, Dependencies, deploy, probabilities, request, router
from support import eventually

from modelserve_cli.demo import demo_request
from modelserve_cli.stack import free_port
from modelserve_cli.stream import StreamJob, StreamWorker
from modelserve_features.online import OnlineStore
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryClient
from modelserve_runtime.errors import UnavailableError

_DEMO = demo_request()
CONTEXT = {
    "event_time": str(_DEMO.context.event_time.seconds),
    "user_agent": _DEMO.context.user_agent,
}


def worker(
    deps: Dependencies,
    store: aioredis.Redis,
    inference: InferenceClient,
    endpoint: str,
    name: str,
    **job: object,
) -> StreamWorker:
    return StreamWorker(
        StreamJob(
            endpoint=endpoint,
            input_stream=f"{name}:in",
            output_stream=f"{name}:out",
            start_id="0",
            block_ms=50,
            **job,  # type: ignore[arg-type]
        ),
        registry=RegistryClient(deps.registry_channel),
        inference=inference,
        features=OnlineStore(store),
        client=store,
    )


async def add(store: aioredis.Redis, stream: str, customer: str, amount: object) -> str:
    event_id = await store.xadd(stream, {"customer": customer, "amount": str(amount), **CONTEXT})
    return event_id.decode()


async def results(store: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in await store.xrange(stream)
    ]


async def pending(store: aioredis.Redis, name: str) -> int:
    summary = await store.xpending(f"{name}:in", "modelserve")
    return int(summary["pending"])


class TestStreamPredict:
    async def test_events_are_scored_as_online_and_acknowledged_with_their_result(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
    ) -> None:
        """Each event's result carries its id, customer, version, time and outputs equal to
        the router's online answer for the same customer, amount and context; a bad event is
        answered with its error; every event is acknowledged."""
        deps = dependencies
        await deploy(deps, "stream-online", V1)
        await deploy(deps, "stream-fraud", V1)
        reader = worker(deps, store, inference, "stream-fraud", "s1", consumer="w1")
        await reader.setup()
        amounts = {"c-1001": 12.5, "c-1002": 980.0}
        ids = {c: await add(store, "s1:in", c, a) for c, a in amounts.items()}
        bad = await add(store, "s1:in", "c-1003", "lots")
        nobody = await add(store, "s1:in", "", 5.0)
        assert await reader.process_once() == 4
        assert await pending(store, "s1") == 0
        answered = await results(store, "s1:out")
        assert [r["event_id"] for r in answered] == [*ids.values(), bad, nobody]
        assert "not a number" in answered[2]["error"] and "probabilities" not in answered[2]
        assert (answered[3]["customer"], answered[3]["error"]) == ("", "no customer id")
        async with router(deps) as (stub, _app):
            for result in answered[:2]:
                customer = result["customer"]
                online = await stub.Predict(request("stream-online", customer, amounts[customer]))
                np.testing.assert_allclose(
                    json.loads(result["probabilities"]), probabilities(online)[0], atol=1e-6
                )
                assert json.loads(result["label"]) == int(np.argmax(probabilities(online)[0]))
                assert result["model_version"] == V1 and result["computed_at"]
        assert (reader.stats.events, reader.stats.scored, reader.stats.failed) == (4, 2, 2)

    async def test_a_retry_never_appends_a_result_twice(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
    ) -> None:
        """An event this consumer read before it stopped, whose result another worker had
        since appended, is acknowledged on restart without a second result; one it read and
        never answered is answered; another consumer's idle event is taken over."""
        deps = dependencies
        await deploy(deps, "stream-retry", V1)
        first = worker(deps, store, inference, "stream-retry", "s2", consumer="w1")
        await first.setup()
        answered = await add(store, "s2:in", "c-1004", 10.0)
        unanswered = await add(store, "s2:in", "c-1005", 20.0)
        # w1 reads both and stops before answering; another worker had answered the first.
        await store.xreadgroup("modelserve", "w1", {"s2:in": ">"})
        await store.set(f"s2:out:done:{answered}", "1")
        restarted = worker(deps, store, inference, "stream-retry", "s2", consumer="w1")
        await restarted.setup()
        assert await restarted.process_once() == 2
        assert [r["event_id"] for r in await results(store, "s2:out")] == [unanswered]
        assert restarted.stats.duplicates == 1
        assert await pending(store, "s2") == 0
        # A dead consumer's event, idle past claim_idle_ms, goes to a live one.
        orphan = await add(store, "s2:in", "c-1006", 30.0)
        await store.xreadgroup("modelserve", "dead", {"s2:in": ">"})
        live = worker(deps, store, inference, "stream-retry", "s2", consumer="w2", claim_idle_ms=1)
        await live.setup()

        async def claimed() -> bool:
            await live.process_once()
            return await pending(store, "s2") == 0

        await eventually(claimed, "w2 taking over the dead consumer's event")
        assert [r["event_id"] for r in await results(store, "s2:out")] == [unanswered, orphan]

    async def test_a_failed_batch_stays_pending_until_inference_answers(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
    ) -> None:
        """With inference unreachable the batch fails, nothing is appended and the event
        stays pending; the worker restarted with inference back answers it."""
        deps = dependencies
        await deploy(deps, "stream-down", V1)
        event = await add(store, "s3:in", "c-1007", 40.0)
        async with create_channel(f"127.0.0.1:{free_port()}") as nowhere:
            down = worker(
                deps,
                store,
                InferenceClient(nowhere, timeout_s=5),
                "stream-down",
                "s3",
                consumer="w1",
            )
            await down.setup()
            with pytest.raises(UnavailableError):
                await down.process_once()
        assert await results(store, "s3:out") == []
        assert await pending(store, "s3") == 1
        back = worker(deps, store, inference, "stream-down", "s3", consumer="w1")
        await back.setup()
        assert await back.process_once() == 1
        assert [r["event_id"] for r in await results(store, "s3:out")] == [event]
        assert await pending(store, "s3") == 0

    async def test_a_running_worker_follows_its_deployment(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
    ) -> None:
        """`run` answers events as they come; once the deployment moves to V2 the worker
        scores new events with V2; it returns when stopped."""
        deps = dependencies
        await deploy(deps, "stream-follow", V1)
        running = worker(deps, store, inference, "stream-follow", "s4", refresh_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(running.run(stop))
        try:
            await add(store, "s4:in", "c-1008", 5.0)

            async def answered(n: int) -> bool:
                return len(await results(store, "s4:out")) >= n

            await eventually(lambda: answered(1), "the first event answered")
            await deploy(deps, "stream-follow", V2)

            async def by_v2() -> bool:
                await add(store, "s4:in", "c-1009", 6.0)
                return (await results(store, "s4:out"))[-1].get("model_version") == V2

            await eventually(by_v2, "an event scored by V2", every_s=0.2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert (await results(store, "s4:out"))[0]["model_version"] == V1

    async def test_the_command_line_runs_until_sigterm(
        self, dependencies: Dependencies, store: aioredis.Redis, tmp_path: Path
    ) -> None:
        """`modelserve stream-predict` answers events until SIGTERM, then exits 0 with what it
        did."""
        deps = dependencies
        await deploy(deps, "stream-cli", V1)
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "modelserve"),
            "stream-predict",
            "stream-cli",
            "--input",
            "s5:in",
            "--output",
            "s5:out",
            "--start-id",
            "0",
            "--registry",
            deps.registry_target,
            "--inference",
            deps.inference_target,
            "--redis-url",
            deps.redis.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            event = await add(store, "s5:in", "c-1010", 7.0)

            async def answered() -> bool:
                return [r["event_id"] for r in await results(store, "s5:out")] == [event]

            await eventually(answered, "the command answering the event", within_s=60)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        assert "1 events, 1 scored" in err.decode()

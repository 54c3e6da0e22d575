"""Batch prediction (`modelserve batch-predict`) on the real registry, inference (Triton) and
Redis: rows scored as the router scores them online, written to a file and to the hybrid
lookup, bad rows reported and skipped, shards, and jobs that cannot run changing nothing."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from router_testing import V1, V2, Dependencies, deploy, probabilities, request, router
from support import eventually

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve_cli.batch import BatchJob, BatchSummary, JobError, run_batch
from modelserve_cli.demo import demo_request
from modelserve_cli.stack import free_port
from modelserve_features.online import OnlineStore
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryAdminClient, RegistryClient
from modelserve_runtime.errors import NotFoundError, UnavailableError
from modelserve_runtime.precomputed import KEY_PREFIX, read_precomputed

#: The facts the demo request carries, as table columns.
_DEMO = demo_request()
EVENT_TIME = _DEMO.context.event_time.seconds
USER_AGENT = _DEMO.context.user_agent
HYBRID = registry_pb.HybridLookup(
    enabled=True, max_age=Duration(seconds=600), entity_type="customer"
)


def table(path: Path, rows: list[dict[str, object]]) -> Path:
    """A CSV of `rows` (every row has the same columns)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(customer: str, amount: object) -> dict[str, object]:
    return {
        "customer": customer,
        "amount": amount,
        "event_time": EVENT_TIME,
        "user_agent": USER_AGENT,
        "note": "ignored",
    }


async def batch(
    deps: Dependencies,
    store: aioredis.Redis,
    inference: InferenceClient,
    job: BatchJob,
) -> BatchSummary:
    return await run_batch(
        job,
        registry=RegistryClient(deps.registry_channel),
        inference=inference,
        features=OnlineStore(store),
        precomputed=store,
    )


async def precomputed_keys(store: aioredis.Redis, endpoint: str) -> list[str]:
    return sorted([k.decode() async for k in store.scan_iter(f"{KEY_PREFIX}:{endpoint}:*")])


class TestBatchPredict:
    async def test_rows_score_as_online_and_answer_the_hybrid_lookup(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
        tmp_path: Path,
    ) -> None:
        """The job scores with the deployment's largest share; each row's prediction equals
        the router's online answer for the same customer, amount and context; the file holds
        it with the version and time; the hybrid lookup then answers those customers from
        what the job wrote, without the model."""
        deps = dependencies
        await deploy(deps, "batch-online", V1)
        # The job scores with the version that has the largest share.
        await deploy(deps, "batch-hybrid", {V2: 30, V1: 70}, hybrid=HYBRID)
        customers = {"c-1001": 12.5, "c-1002": 980.0, "c-1003": 55.0, "c-1004": 3.0}
        source = table(tmp_path / "in.csv", [row(c, a) for c, a in customers.items()])
        summary = await batch(
            deps,
            store,
            inference,
            BatchJob("batch-hybrid", source, output_path=tmp_path / "out.parquet", batch_rows=3),
        )
        assert (summary.model_version, summary.rows, summary.scored, summary.failed) == (
            V1,
            4,
            4,
            0,
        )
        assert summary.precomputed == 4
        written = pq.read_table(tmp_path / "out.parquet").to_pylist()
        assert [r["customer"] for r in written] == list(customers)
        assert {r["model_version"] for r in written} == {V1}
        assert all(r["error"] is None and r["computed_at"] is not None for r in written)
        # All of the endpoint's traffic to V1, so that every request may take what V1 wrote.
        await deploy(deps, "batch-hybrid", V1, hybrid=HYBRID)
        async with router(deps) as (stub, _app):
            for customer, amount in customers.items():
                online = await stub.Predict(request("batch-online", customer, amount))
                stored = next(r for r in written if r["customer"] == customer)
                np.testing.assert_allclose(
                    stored["probabilities"], probabilities(online)[0], atol=1e-6
                )
                assert stored["label"] == int(np.argmax(probabilities(online)[0]))
                # The hybrid endpoint answers from the job's prediction whatever the amount.
                answer = await stub.Predict(request("batch-hybrid", customer, amount + 1000))
                assert answer.route_reason == "precomputed"
                assert answer.model_version == V1
                np.testing.assert_allclose(
                    probabilities(answer)[0], stored["probabilities"], atol=1e-6
                )

    async def test_bad_rows_are_reported_and_shards_split_the_table(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
        tmp_path: Path,
    ) -> None:
        """Two shards take alternate rows into their own files; a row without a customer id
        and one whose amount is not a number are written with their error and not to Redis,
        while the rows around them are scored."""
        deps = dependencies
        await deploy(deps, "batch-shards", V1, hybrid=HYBRID)
        source = table(
            tmp_path / "in.csv",
            [row("c-1005", 20.0), row("", 30.0), row("c-1006", "lots"), row("c-1007", 40.0)],
        )
        summaries = [
            await batch(
                deps,
                store,
                inference,
                BatchJob(
                    "batch-shards",
                    source,
                    output_path=tmp_path / "out-{shard}.csv",
                    shard=shard,
                    shards=2,
                ),
            )
            for shard in (0, 1)
        ]
        assert [(s.rows, s.scored, s.failed, s.precomputed) for s in summaries] == [
            (2, 1, 1, 1),
            (2, 1, 1, 1),
        ]
        assert summaries[0].errors == ["row 2: features.amount: 'lots' is not a number"]
        assert summaries[1].errors == ["row 1: no customer id"]
        with (tmp_path / "out-0.csv").open() as handle:
            first = list(csv.DictReader(handle))
        with (tmp_path / "out-1.csv").open() as handle:
            second = list(csv.DictReader(handle))
        assert [r["customer"] for r in first] == ["c-1005", "c-1006"]
        assert [r["customer"] for r in second] == ["", "c-1007"]
        assert len(json.loads(first[0]["probabilities"])) == 2
        assert first[1]["probabilities"] == "" and "not a number" in first[1]["error"]
        assert await precomputed_keys(store, "batch-shards") == [
            f"{KEY_PREFIX}:batch-shards:customer:c-1005",
            f"{KEY_PREFIX}:batch-shards:customer:c-1007",
        ]
        stored = await read_precomputed(store, "batch-shards", "customer", "c-1007")
        assert stored is not None and stored.model_version == V1

    async def test_a_named_version_fills_the_lookup_before_traffic_moves_to_it(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
        tmp_path: Path,
    ) -> None:
        """Scored with `model_version` V2 while all traffic goes to V1: the router does not
        serve V2's predictions to V1's requests, and serves them once traffic moves to V2."""
        deps = dependencies
        await deploy(deps, "batch-warm", V1, hybrid=HYBRID)
        source = table(tmp_path / "in.csv", [row("c-1012", 15.0)])
        summary = await batch(
            deps, store, inference, BatchJob("batch-warm", source, model_version=V2)
        )
        assert (summary.model_version, summary.scored, summary.precomputed) == (V2, 1, 1)
        async with router(deps) as (stub, _app):
            before = await stub.Predict(request("batch-warm", "c-1012", 15.0))
            await deploy(deps, "batch-warm", V2, hybrid=HYBRID)
            answers: list[router_pb.PredictResponse] = []

            async def moved() -> bool:
                answers.append(await stub.Predict(request("batch-warm", "c-1012", 15.0)))
                return answers[-1].model_version == V2

            await eventually(moved, "the router routing batch-warm to V2")
        assert (before.model_version, before.route_reason) == (V1, "single_target")
        assert (answers[-1].model_version, answers[-1].route_reason) == (V2, "precomputed")

    async def test_a_job_that_cannot_run_writes_nothing(
        self,
        dependencies: Dependencies,
        store: aioredis.Redis,
        inference: InferenceClient,
        tmp_path: Path,
    ) -> None:
        """A table without the customer column, a Redis write asked of a deployment without
        a hybrid lookup, an unknown deployment and a version without feature_refs each fail
        before anything is scored: no output file, nothing in Redis. Inference unreachable
        stops the job, writing nothing."""
        deps = dependencies
        await deploy(deps, "batch-refused", V1, hybrid=HYBRID)
        await deploy(deps, "batch-plain", V1)
        no_customer = table(tmp_path / "in.csv", [{"client": "c-1001", "amount": 1.0}])
        output = tmp_path / "out.parquet"
        with pytest.raises(JobError, match="no column 'customer'"):
            await batch(deps, store, inference, BatchJob("batch-refused", no_customer, output))
        good = table(tmp_path / "good.csv", [row("c-1001", 5.0)])
        with pytest.raises(JobError, match="no hybrid lookup"):
            await batch(
                deps, store, inference, BatchJob("batch-plain", good, output, precompute=True)
            )
        with pytest.raises(NotFoundError):
            await batch(deps, store, inference, BatchJob("batch-nowhere", good, output))
        # A version that declares no feature_refs gives the job nothing to build rows from.
        template = await deps.registry.GetModelVersion(registry_pb.GetModelVersionRequest(name=V1))
        signature = registry_pb.Signature()
        signature.CopyFrom(template.model_version.signature)
        del signature.feature_refs[:]
        admin = RegistryAdminClient(deps.registry_channel)
        await admin.create_model("batch-norefs", "no feature_refs")
        bare = await admin.upload_model_version(
            "models/batch-norefs",
            registry_pb.ModelVersion(format=registry_pb.ARTIFACT_FORMAT_ONNX, signature=signature),
            await RegistryClient(deps.registry_channel).read_artifact(V1),
        )
        with pytest.raises(JobError, match="declares no feature_refs"):
            await batch(
                deps,
                store,
                inference,
                BatchJob("batch-plain", good, output, model_version=bare.name),
            )
        assert not output.exists()
        # Inference down: the job stops at its first batch rather than failing every row.
        async with create_channel(f"127.0.0.1:{free_port()}") as nowhere:
            with pytest.raises(UnavailableError):
                await batch(
                    deps,
                    store,
                    InferenceClient(nowhere, timeout_s=5),
                    BatchJob("batch-refused", good),
                )
        assert await precomputed_keys(store, "batch-refused") == []
        assert await precomputed_keys(store, "batch-plain") == []

    async def test_the_command_line_exits_by_outcome(
        self, dependencies: Dependencies, store: aioredis.Redis, tmp_path: Path
    ) -> None:
        """`modelserve batch-predict` scores a table (exit 0) and prints its summary; exits 2
        when a row failed, the others scored; exits 1 with a one-line error when the job
        cannot run."""
        deps = dependencies
        await deploy(deps, "batch-cli", V1, hybrid=HYBRID)

        async def cli(source: Path, *extra: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "modelserve"),
                "batch-predict",
                "batch-cli",
                str(source),
                "--registry",
                deps.registry_target,
                "--inference",
                deps.inference_target,
                "--redis-url",
                deps.redis.url,
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        good = table(tmp_path / "good.csv", [row("c-1008", 5.0), row("c-1009", 7.0)])
        code, out, _ = await cli(good, "--output", str(tmp_path / "good.parquet"))
        assert code == 0, out
        assert "scored" in out and V1 in out
        assert pq.read_table(tmp_path / "good.parquet").num_rows == 2
        bad = table(tmp_path / "bad.csv", [row("c-1010", "x"), row("c-1011", 7.0)])
        code, _, err = await cli(bad)
        assert code == 2
        assert "row 0: features.amount: 'x' is not a number" in err
        assert await read_precomputed(store, "batch-cli", "customer", "c-1011") is not None
        code, _, err = await cli(tmp_path / "missing.csv")
        assert code == 1
        assert err.startswith("error: ") and "missing.csv" in err

"""The `modelserve` registry commands, run as a real process against a real registry."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
import numpy as np
import pytest
from pki import certificate_authority, client_certificate, mutual_tls, server_certificate
from registry_testing import tiny_onnx
from sklearn.linear_model import LogisticRegression
from support import running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.tls import TLS_ENV
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server
from modelserve_runtime.auth import ApiKeyRecord, AuthSettings

MODELSERVE = str(Path(sys.executable).parent / "modelserve")


@dataclass
class Result:
    """How a CLI run ended."""

    code: int
    stdout: str
    stderr: str


async def cli(
    *args: str, api_key: str | None = None, env_extra: dict[str, str] | None = None
) -> Result:
    """Runs `modelserve ARGS` (with `env_extra` in its environment) and waits for it."""
    env = {**os.environ, "COLUMNS": "250"}
    for name in ("MODELSERVE_API_KEY", "MODELSERVE_TLS", *TLS_ENV.values()):
        env.pop(name, None)
    if api_key is not None:
        env["MODELSERVE_API_KEY"] = api_key
    env.update(env_extra or {})
    process = await asyncio.create_subprocess_exec(
        MODELSERVE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


@dataclass
class CliRegistry:
    """A running registry, its address and a stub to check what the CLI did."""

    address: str
    stub: pb_grpc.RegistryServiceAsyncStub


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[CliRegistry]:
    """A registry with auth off."""
    settings = RegistrySettings(production_traffic_only=False, data_dir=tmp_path / "registry")
    async with running(build_server, settings) as (server, channel, _app):
        yield CliRegistry(f"127.0.0.1:{server.port}", pb_grpc.RegistryServiceStub(channel))


class TestRegister:
    async def test_sklearn_model_is_converted_and_registered(
        self, served: CliRegistry, tmp_path: Path
    ) -> None:
        """`models register --sklearn` converts a joblib model to ONNX on the client and records
        a version whose signature is read from the converted graph."""
        rng = np.random.default_rng(0)
        rows = rng.normal(size=(200, 4))
        model = LogisticRegression().fit(rows, (rows[:, 0] > 0).astype(int))
        path = tmp_path / "model.joblib"
        joblib.dump(model, path)
        result = await cli(
            "models", "register", "fraud", "--sklearn", str(path), "--registry", served.address,
            "--reason", "first fit",
        )  # fmt: skip
        assert result.code == 0, result.stderr
        assert "models/fraud/versions/1" in result.stdout
        got = await served.stub.GetModelVersion(
            pb.GetModelVersionRequest(name="models/fraud/versions/1")
        )
        [features] = got.model_version.signature.inputs
        assert (features.name, features.datatype, list(features.shape)) == (
            "features",
            tensor_pb2.DATA_TYPE_FP32,
            [-1, 4],
        )
        assert {o.name for o in got.model_version.signature.outputs} == {"label", "probabilities"}
        events = await served.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1))
        assert events.audit_events[0].reason == "first fit"

    async def test_an_input_is_registered_as_taking_nan(
        self, served: CliRegistry, tmp_path: Path
    ) -> None:
        """`--allow-non-finite INPUT` marks that input of the signature; an input the model
        does not have is one error line, and nothing is registered."""
        path = tmp_path / "tiny.onnx"
        path.write_bytes(tiny_onnx())
        target = ("--registry", served.address)
        wrong = await cli(
            "models", "register", "fraud", "--onnx", str(path), "--allow-non-finite", "x", *target
        )
        right = await cli(
            "models", "register", "fraud", "--onnx", str(path),
            "--allow-non-finite", "features", *target,
        )  # fmt: skip

        assert wrong.code == 1
        assert (
            wrong.stderr.strip() == "error: --allow-non-finite x: the model's inputs are features"
        )
        assert right.code == 0, right.stderr
        assert "models/fraud/versions/1" in right.stdout
        got = await served.stub.GetModelVersion(
            pb.GetModelVersionRequest(name="models/fraud/versions/1")
        )
        assert [s.allow_non_finite for s in got.model_version.signature.inputs] == [True]

    async def test_onnx_then_the_whole_flow(self, served: CliRegistry, tmp_path: Path) -> None:
        """Register, promote, deploy, re-deploy, roll back, and read history and audit, all
        through the CLI."""
        path = tmp_path / "tiny.onnx"
        path.write_bytes(tiny_onnx())
        target = ("--registry", served.address)
        for weight in (1.0, 2.0):
            path.write_bytes(tiny_onnx(weight=weight))
            assert (
                await cli("models", "register", "fraud", "--onnx", str(path), *target)
            ).code == 0
        promoted = await cli("models", "promote", "fraud/2", "staging", *target)
        assert (promoted.code, promoted.stdout.strip()) == (
            0,
            "models/fraud/versions/2 is now in staging",
        )
        aliased = await cli("models", "alias", "fraud/2", "champion", *target)
        assert aliased.code == 0
        shown = await cli("models", "show", "fraud", *target)
        assert "staging" in shown.stdout and "champion" in shown.stdout
        listed = await cli("models", "list", *target)
        assert "models/fraud" in listed.stdout
        assert (await cli("deployments", "set", "fraud", "fraud/1=100", *target)).code == 0
        split = await cli(
            "deployments", "set", "fraud", "fraud/1=90", "fraud/2=10", "--reason", "canary",
            *target,
        )  # fmt: skip
        assert split.code == 0
        rolled = await cli("deployments", "rollback", "fraud", "--reason", "errors", *target)
        assert rolled.code == 0 and "revision 3" in rolled.stdout
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert [(t.model_version, t.percent) for t in current.deployment.traffic] == [
            ("models/fraud/versions/1", 100)
        ]
        history = await cli("deployments", "history", "fraud", *target)
        assert "canary" in history.stdout and "errors" in history.stdout
        audit = await cli("audit", "--resource", "deployments/fraud", *target)
        assert audit.stdout.count("UpdateDeployment") == 2
        assert "RollbackDeployment" in audit.stdout


class TestRolloutCommands:
    async def test_canary_tag_and_delete(self, served: CliRegistry, tmp_path: Path) -> None:
        """A canary started, shown, paused and aborted from the command line; a version tagged;
        validation without an inference service fails with one line; delete refused while the
        model is deployed."""
        target = ("--registry", served.address)
        await _register_two_versions(tmp_path, target)
        assert (await cli("deployments", "set", "fraud", "fraud/1=100", *target)).code == 0
        started = await cli(
            "deployments", "canary", "start", "fraud", "fraud/2", "--steps", "20,100",
            "--interval", "10m", "--reason", "retrain", *target,
        )  # fmt: skip
        assert started.code == 0, started.stderr
        assert "running" in started.stdout and "20% to the candidate" in started.stdout
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert {t.model_version: t.percent for t in current.deployment.traffic} == {
            "models/fraud/versions/1": 80,
            "models/fraud/versions/2": 20,
        }
        paused = await cli("deployments", "canary", "pause", "fraud", *target)
        assert paused.code == 0 and "paused" in paused.stdout
        status = await cli("deployments", "canary", "status", "fraud", *target)
        assert "paused" in status.stdout and "models/fraud/versions/2" in status.stdout
        aborted = await cli("deployments", "canary", "abort", "fraud", "--reason", "oops", *target)
        assert aborted.code == 0 and "aborted" in aborted.stdout
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert {t.model_version: t.percent for t in current.deployment.traffic} == {
            "models/fraud/versions/1": 100
        }
        bad = await cli(
            "deployments", "canary", "start", "fraud", "fraud/2", "--interval", "soon", *target
        )
        assert (bad.code, bad.stderr.strip()) == (
            1,
            "error: 'soon': give a duration like 30s, 5m or 1h",
        )

        unsticky = await cli("deployments", "canary", "ab-test", "fraud", "fraud/2", *target)
        assert (unsticky.code, unsticky.stderr.strip().splitlines()[0][:45]) == (
            1,
            "error: FAILED_PRECONDITION NO_ROUTING_KEY: de",
        )
        tagged = await cli("models", "tag", "fraud/2", "owner=risk", "ticket=ML-7", *target)
        assert tagged.stdout.strip() == "models/fraud/versions/2 tags: owner=risk, ticket=ML-7"
        unvalidated = await cli("models", "validate", "fraud/2", *target)
        assert unvalidated.code == 1
        assert unvalidated.stderr.startswith("error: UNAVAILABLE")
        assert len(unvalidated.stderr.strip().splitlines()) == 1
        deleted = await cli("models", "delete", "fraud", *target)
        assert deleted.code == 1 and "MODEL_IN_USE" in deleted.stderr


async def _register_two_versions(tmp_path: Path, target: tuple[str, ...]) -> None:
    """Registers `fraud` versions 1 and 2 from the command line."""
    path = tmp_path / "tiny.onnx"
    for weight in (1.0, 2.0):
        path.write_bytes(tiny_onnx(weight=weight))
        registered = await cli("models", "register", "fraud", "--onnx", str(path), *target)
        assert registered.code == 0, registered.stderr


class TestExpectedRevision:
    async def test_set_and_rollback_against_a_stale_revision_change_nothing(
        self, served: CliRegistry, tmp_path: Path
    ) -> None:
        """`--expected-revision` holds `set` and `rollback` to the revision the operator saw:
        once someone else moved the deployment on, they fail with one ABORTED line and leave
        it as it is; at the current revision they apply."""
        target = ("--registry", served.address)
        await _register_two_versions(tmp_path, target)
        created = await cli("deployments", "set", "fraud", "fraud/1=100", "--expected-revision", "0", *target)  # fmt: skip
        moved = await cli("deployments", "set", "fraud", "fraud/2=100", *target)
        stale_set = await cli("deployments", "set", "fraud", "fraud/1=50", "fraud/2=50", "--expected-revision", "1", *target)  # fmt: skip
        stale_rollback = await cli("deployments", "rollback", "fraud", "--expected-revision", "1", *target)  # fmt: skip
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        rolled = await cli("deployments", "rollback", "fraud", "--expected-revision", "2", *target)  # fmt: skip

        assert (created.code, moved.code) == (0, 0), created.stderr + moved.stderr
        for refused in (stale_set, stale_rollback):
            assert refused.code == 1
            assert refused.stderr.startswith("error: ABORTED CONCURRENT_CHANGE:"), refused.stderr
            assert refused.stderr.count("\n") == 1
        assert current.deployment.revision == 2
        assert {t.model_version for t in current.deployment.traffic} == {"models/fraud/versions/2"}
        assert rolled.code == 0, rolled.stderr
        assert "deployments/fraud at revision 3" in rolled.stdout


class TestInferenceSettings:
    async def test_configure_changes_only_what_it_is_given(
        self, served: CliRegistry, tmp_path: Path
    ) -> None:
        """`deployments configure` sets the deployment's inference settings as a new revision,
        keeping those it is not given; `deployments set` changes the split and keeps them; the
        table shows them."""
        path = tmp_path / "tiny.onnx"
        path.write_bytes(tiny_onnx())
        target = ("--registry", served.address)
        assert (await cli("models", "register", "fraud", "--onnx", str(path), *target)).code == 0
        path.write_bytes(tiny_onnx(weight=2.0))
        assert (await cli("models", "register", "fraud", "--onnx", str(path), *target)).code == 0
        assert (await cli("deployments", "set", "fraud", "fraud/1=100", *target)).code == 0

        on_gpu = await cli(
            "deployments", "configure", "fraud", "--device", "gpu", "--gpus", "0,1",
            "--instances", "2", "--reason", "to the GPUs", *target,
        )  # fmt: skip
        assert on_gpu.code == 0, on_gpu.stderr
        assert "inference: device=gpu gpus=0,1 instances=2" in on_gpu.stdout
        batched = await cli("deployments", "configure", "fraud", "--max-batch-size", "64", *target)
        assert batched.code == 0, batched.stderr
        split = await cli("deployments", "set", "fraud", "fraud/1=90", "fraud/2=10", *target)
        assert split.code == 0, split.stderr

        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert current.deployment.inference == pb.InferenceConfig(
            device=pb.DEVICE_GPU, gpus=[0, 1], instance_count=2, max_batch_size=64
        )
        assert len(current.deployment.traffic) == 2
        shown = await cli("deployments", "show", "fraud", *target)
        assert "inference: device=gpu gpus=0,1 instances=2 max-batch-size=64" in shown.stdout
        back = await cli("deployments", "configure", "fraud", "--device", "cpu", *target)
        assert back.code == 0, back.stderr
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert current.deployment.inference == pb.InferenceConfig(
            device=pb.DEVICE_CPU, instance_count=2, max_batch_size=64
        )
        reset = await cli("deployments", "configure", "fraud", "--reset", *target)
        assert reset.code == 0, reset.stderr
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert current.deployment.inference == pb.InferenceConfig()
        history = await cli("deployments", "history", "fraud", *target)
        assert "to the GPUs" in history.stdout

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ((), "error: give at least one setting to change"),
            (("--gpus", "a,b"), "error: --gpus: give comma-separated integers"),
            (
                ("--device", "cpu", "--gpus", "0"),
                "error: INVALID_ARGUMENT INVALID_ARGUMENT: deployment.inference.gpus: is only"
                " for device DEVICE_GPU",
            ),
            (
                ("--instances", "99"),
                "error: INVALID_ARGUMENT INVALID_ARGUMENT: deployment.inference.instance_count:",
            ),
        ],
    )
    async def test_bad_settings_are_one_line_and_change_nothing(
        self, served: CliRegistry, tmp_path: Path, args: tuple[str, ...], message: str
    ) -> None:
        path = tmp_path / "tiny.onnx"
        path.write_bytes(tiny_onnx())
        target = ("--registry", served.address)
        assert (await cli("models", "register", "fraud", "--onnx", str(path), *target)).code == 0
        assert (await cli("deployments", "set", "fraud", "fraud/1=100", *target)).code == 0

        result = await cli("deployments", "configure", "fraud", *args, *target)

        assert result.code == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr
        current = await served.stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/fraud"))
        assert (current.deployment.revision, current.deployment.inference) == (
            1,
            pb.InferenceConfig(),
        )


class TestErrors:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (
                ("deployments", "set", "fraud", "fraud/1=90"),
                "error: INVALID_ARGUMENT INVALID_ARGUMENT: deployment.traffic:",
            ),
            (("deployments", "set", "fraud", "fraud/1"), "error: 'fraud/1': give each target"),
            (("deployments", "rollback", "nope"), "error: NOT_FOUND DEPLOYMENT_NOT_FOUND:"),
            (("models", "register", "fraud"), "error: give exactly one of --onnx and --sklearn"),
        ],
    )
    async def test_failure_is_one_line_and_exit_1(
        self, served: CliRegistry, args: tuple[str, ...], message: str
    ) -> None:
        """Any refused command exits 1 with a single `error:` line on stderr."""
        result = await cli(*args, "--registry", served.address)
        assert result.code == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr

    async def test_bad_onnx_file_is_refused_before_upload(
        self, served: CliRegistry, tmp_path: Path
    ) -> None:
        """A file that is not ONNX is refused by the CLI with one line and nothing recorded."""
        path = tmp_path / "model.onnx"
        path.write_bytes(b"not onnx")
        result = await cli(
            "models", "register", "fraud", "--onnx", str(path), "--registry", served.address
        )
        assert (result.code, result.stderr.startswith("error: not an ONNX model")) == (1, True)
        listed = await served.stub.ListModels(pb.ListModelsRequest())
        assert list(listed.models) == []


class TestKeys:
    async def test_created_key_works_and_roles_are_enforced(self, tmp_path: Path) -> None:
        """`keys create` prints a key and its record; a registry holding the record accepts the
        key from MODELSERVE_API_KEY, refuses a missing one, and applies the key's role."""
        made = await cli("keys", "create", "--principal", "vera", "--role", "viewer")
        assert made.code == 0, made.stderr
        key, record_json = made.stdout.strip().splitlines()
        record = ApiKeyRecord.model_validate(json.loads(record_json))
        assert key.split("_", 2)[2] not in record_json  # the secret may itself hold "_"
        settings = RegistrySettings(
            data_dir=tmp_path / "registry", auth=AuthSettings(enabled=True, keys=[record])
        )
        async with running(build_server, settings) as (server, _channel, _app):
            target = ("--registry", f"127.0.0.1:{server.port}")
            assert (await cli("models", "list", *target, api_key=key)).code == 0
            missing = await cli("models", "list", *target)
            assert missing.code == 1
            assert missing.stderr.startswith("error: UNAUTHENTICATED API_KEY_MISSING")
            denied = await cli("deployments", "set", "fraud", "fraud/1=100", *target, api_key=key)
            assert denied.code == 1
            assert denied.stderr.startswith("error: PERMISSION_DENIED ROLE_REQUIRED")


class TestTls:
    async def test_the_cli_reaches_a_registry_that_requires_client_certificates(
        self, tmp_path: Path
    ) -> None:
        """With MODELSERVE_TLS_* naming the CA and a client certificate the CLI lists the
        models of a registry behind mutual TLS; without them it fails in one line, exit 1."""
        ca = certificate_authority(tmp_path / "pki", "ca")
        server = server_certificate(tmp_path / "pki", "registry", ca)
        client = client_certificate(tmp_path / "pki", "cli", ca)
        settings = RegistrySettings.model_validate(
            {
                "production_traffic_only": False,
                "data_dir": tmp_path / "registry",
                "server": {"tls": mutual_tls(server, ca)},
            }
        )
        async with running(build_server, settings) as (registry, _, _app):
            target = ("--registry", f"127.0.0.1:{registry.port}")
            tls = {
                "MODELSERVE_TLS_CA_FILE": str(ca.cert),
                "MODELSERVE_TLS_CERT_FILE": str(client.cert),
                "MODELSERVE_TLS_KEY_FILE": str(client.key),
            }
            listed = await cli("models", "list", *target, env_extra=tls)
            assert listed.code == 0, listed.stderr
            refused = await cli("models", "list", *target)
            assert refused.code == 1
            assert refused.stderr.strip().startswith("error: UNAVAILABLE"), refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1

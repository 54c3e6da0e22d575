"""The inference domain: which model versions Triton holds, their states, and running them."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from modelserve_inference.coalesce import Coalescer, TritonInfer
from modelserve_inference.oip_requests import (
    arrays_from_response,
    check_request,
    conform_response,
    request_from_arrays,
)
from modelserve_inference.state_feed import StateChange, StateFeed, StateWatch
from modelserve_runtime.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from modelserve_triton.model_config import (
    CPU,
    PYTHON_BACKEND,
    TensorSpec,
    build_model_config,
    conform_outputs,
    model_files,
)
from modelserve_triton.oip import read_inputs
from modelserve_triton.runner import TritonError

log = structlog.get_logger()

_VERSION_NAME = re.compile(r"^models/([a-z][a-z0-9-]{0,62})/versions/([1-9][0-9]{0,9})$")
#: How Triton names a version that failed inside a load of several ("version 2 is at
#: UNAVAILABLE state: ..."), so that only that one is given up.
_FAILED_VERSION = re.compile(r"\bversion (\d+) is at UNAVAILABLE state")
_NUMPY_TYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}
_TRITON_TYPES = {np.dtype(t): name for name, t in _NUMPY_TYPES.items()}


class VersionState(Enum):
    """Life cycle of a version inside Triton."""

    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """How Triton serves a model: one config covers every version loaded under the model's
    name, so all versions of a model share it."""

    backend: str = PYTHON_BACKEND
    """`python` (onnxruntime inside the python backend) or `onnxruntime` (Triton's own)."""
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes the dynamic batcher prefers to form; none: any."""
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    """Requests the dynamic batcher may queue; 0: unbounded."""
    instance_count: int = 1
    """Instances of each version; on a GPU device, that many on each GPU."""
    device: str = CPU
    """`cpu`, or `gpu` (onnxruntime's CUDA provider)."""
    gpus: tuple[int, ...] = ()
    """The GPUs a GPU device uses; none: every GPU Triton sees."""


@dataclass(frozen=True, slots=True)
class VersionArtifact:
    """What is needed to load a version: its signature, its ONNX bytes and, when the version
    has them, example inputs (rows along the first dimension) to warm it up with."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx: bytes
    sample_inputs: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)


@dataclass(slots=True)
class HeldVersion:
    """A version this service holds, and its state."""

    name: str
    model: str
    version: int
    state: VersionState
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    reason: str = ""
    onnx: bytes = field(default=b"", repr=False)
    sample_inputs: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict, repr=False)
    """Warmup inputs from the registry, cast to the signature's dtypes; empty: synthesized."""
    config: ServingConfig | None = None
    """The config Triton serves it with, as of its last successful load; None before."""

    @property
    def device(self) -> str:
        """Where Triton runs its instances (`cpu`, `gpu`) as of its last load; "" before."""
        return self.config.device if self.config is not None else ""

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPUs of a `gpu` device; none: every GPU Triton sees."""
        return self.config.gpus if self.config is not None else ()


class ArtifactSource(Protocol):
    """Where versions come from (the registry)."""

    async def fetch(self, name: str) -> VersionArtifact:
        """The signature and artifact of `models/{m}/versions/{v}`."""
        ...


class TritonModels(Protocol):
    """The Triton operations this domain needs."""

    async def load(
        self,
        model_name: str,
        config: Mapping[str, Any],
        files: Mapping[str, bytes],
        *,
        timeout_s: float | None = None,
    ) -> None: ...

    async def unload(self, model_name: str, *, timeout_s: float | None = None) -> None: ...

    async def infer(
        self,
        model_name: str,
        version: int,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
        *,
        timeout_s: float,
    ) -> dict[str, npt.NDArray[Any]]: ...

    async def infer_request(
        self,
        request: Any,
        *,
        timeout_s: float,
        context: otel_context.Context | None = None,
        links: Sequence[trace.Link] = (),
    ) -> Any: ...


def parse_version_name(name: str, field_path: str = "name") -> tuple[str, int]:
    """`models/{m}/versions/{v}` as (m, v); InvalidArgumentError naming the field otherwise."""
    match = _VERSION_NAME.match(name)
    if match is None:
        raise InvalidArgumentError.for_field(
            field_path, f"{name!r} is not of the form models/{{model}}/versions/{{version}}"
        )
    return match.group(1), int(match.group(2))


class ConfigRefused(Exception):
    """Triton refused a model's new config and serves its versions with the previous one
    (they stay READY, their `reason` saying so)."""


class ModelVersions:
    """Loads versions into Triton (all versions of a model in one load), warms, tracks and runs them.

    A version turns READY only after warmup requests at the batch sizes in
    `warmup_batch_sizes` have run on it, so the first caller does not pay for cold caches.
    Every state change is published on `feed` (WatchModelStates, the reconcile loop).
    Requests for a version that arrive while `coalesce_in_flight` calls of it (per instance)
    are in Triton wait and go together, as one batched call (`Coalescer`).
    """

    def __init__(
        self,
        source: ArtifactSource,
        triton: TritonModels,
        *,
        triton_endpoint: str,
        triton_http_endpoint: str = "",
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int = 0,
        backend: str = PYTHON_BACKEND,
        device: str = CPU,
        gpus: Sequence[int] = (),
        available_backends: frozenset[str] | None = None,
        infer_timeout_s: float,
        load_timeout_s: float,
        warmup_batch_sizes: Sequence[int] = (1,),
        reject_non_finite: bool = True,
        coalesce_in_flight: int = 1,
        inference: TritonInfer | None = None,
    ) -> None:
        """`inference` sends `Infer` and facade requests to Triton (its HTTP client, say);
        by default `triton`, which also loads, unloads and warms versions."""
        self._source = source
        self._triton = triton
        self.triton_endpoint = triton_endpoint
        self.triton_http_endpoint = triton_http_endpoint
        self.default_config = ServingConfig(
            backend=backend,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            max_queue_size=max_queue_size,
            device=device,
            gpus=tuple(gpus),
        )
        self._available_backends = available_backends
        self._infer_timeout_s = infer_timeout_s
        self._load_timeout_s = load_timeout_s
        self._warmup_batch_sizes = tuple(warmup_batch_sizes)
        self._reject_non_finite = reject_non_finite
        self._coalesce_in_flight = coalesce_in_flight
        self._coalescer = Coalescer(inference or triton)
        self._held: dict[str, HeldVersion] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._configs: dict[str, ServingConfig] = {}
        """Per model, the config its next load uses (set by the reconcile loop)."""
        self._loaded_configs: dict[str, ServingConfig] = {}
        """Per model, the config Triton runs it with now."""
        self._triton_up = True
        self.feed = StateFeed()

    @property
    def triton_up(self) -> bool:
        """False from the moment Triton is found down until every version is reloaded."""
        return self._triton_up

    def list(self) -> list[HeldVersion]:
        """Every held version, ordered by name."""
        return sorted(self._held.values(), key=lambda v: (v.model, v.version))

    def watch(self) -> StateWatch:
        """Copies of every held version now, then every change after (see StateFeed.open)."""
        return self.feed.open([dataclasses.replace(h) for h in self.list()])

    def loaded_config(self, model: str) -> ServingConfig | None:
        """The config Triton runs the model with; None when Triton holds none of its versions."""
        return self._loaded_configs.get(model) if self._of_model(model) else None

    def find(self, name: str) -> HeldVersion | None:
        """One held version, or None."""
        return self._held.get(name)

    def get(self, name: str) -> HeldVersion:
        """One held version; NotFoundError when it is not held."""
        held = self._held.get(name)
        if held is None:
            raise NotFoundError(
                f"model version {name} is not loaded",
                reason="VERSION_NOT_LOADED",
                metadata={"name": name},
            )
        return held

    def resolve(self, model: str, version: str = "") -> HeldVersion:
        """A held version by Triton model name and version string; the newest READY one of the
        model when `version` is empty. NotFoundError when nothing matches."""
        if version:
            if not version.isdigit() or int(version) < 1:
                raise InvalidArgumentError.for_field(
                    "model_version", f"{version!r} is not a positive version number"
                )
            return self.get(f"models/{model}/versions/{int(version)}")
        of_model = [v for v in self.list() if v.model == model]
        ready = [v for v in of_model if v.state is VersionState.READY]
        if ready or of_model:
            return (ready or of_model)[-1]
        raise NotFoundError(
            f"model {model} has no loaded version",
            reason="MODEL_NOT_LOADED",
            metadata={"model": model},
        )

    async def load(self, name: str, *, config: ServingConfig | None = None) -> HeldVersion:
        """Fetches, loads and warms a version; returns it READY or FAILED (with the reason).

        `config`, when given, becomes the model's config (a change reloads its other versions
        with it). A version the registry cannot give is not kept: the error is raised.
        """
        model, version = parse_version_name(name)
        async with self._lock(model):
            if config is not None:
                self._configs[model] = config
            current = self._held.get(name)
            if current is not None and current.state is VersionState.READY:
                return current
            held = self._begin(name, model, version)
            try:
                artifact = await self._source.fetch(name)
            except Exception:
                del self._held[name]
                self._publish(removed=(name,))
                raise
            self._take(held, artifact)
            await self._sync_model(model, [held])
            return held

    async def ensure(self, model: str, names: Sequence[str], config: ServingConfig) -> None:
        """Loads those of the model's versions `names` that are not held or have FAILED, all in
        one Triton load, and reloads the model when `config` is not the one Triton runs it with
        (ConfigRefused: Triton refused that config and serves the model as before).

        A version whose artifact cannot be fetched turns FAILED with the reason, like one that
        Triton refuses; the others load regardless.
        """
        async with self._lock(model):
            self._configs[model] = config
            fresh = []
            for name in names:
                current = self._held.get(name)
                if current is None or current.state is VersionState.FAILED:
                    fresh.append(self._begin(name, model, parse_version_name(name)[1]))
            fetched = await asyncio.gather(
                *(self._source.fetch(h.name) for h in fresh), return_exceptions=True
            )
            for held, result in zip(fresh, fetched, strict=True):
                if isinstance(result, VersionArtifact):
                    self._take(held, result)
                elif isinstance(result, Exception):
                    reason = result.message if isinstance(result, ModelServeError) else str(result)
                    self._fail(held, f"fetching the artifact from the registry failed: {reason}")
                else:
                    raise result
            loaded = [h for h in fresh if h.onnx]
            reconfigure = bool(self._of_model(model)) and self._loaded_configs.get(model) != config
            if loaded or reconfigure:
                await self._sync_model(model, loaded)

    async def unload(self, name: str) -> None:
        """Removes a version; the model's other versions stay loaded."""
        model, _ = parse_version_name(name)
        async with self._lock(model):
            self.get(name)
            await self._remove(model, [name])

    async def remove(self, model: str, names: Sequence[str]) -> None:
        """Removes those of the model's versions `names` that are held, in one Triton load."""
        async with self._lock(model):
            present = [n for n in names if n in self._held]
            if present:
                await self._remove(model, present)

    def mark_triton_down(self, reason: str) -> None:
        """Triton is gone: every version it held is LOADING again until `reload_all` ends."""
        self._triton_up = False
        self._loaded_configs.clear()
        changed = []
        for held in self._held.values():
            if held.onnx:
                held.state, held.reason = VersionState.LOADING, f"triton restarting: {reason}"
                changed.append(held)
        self._publish(*changed)

    async def reload_all(self) -> None:
        """Loads and warms every held version into a fresh Triton, model by model."""
        for model in sorted({v.model for v in self._held.values() if v.onnx}):
            async with self._lock(model):
                await self._sync_model(model, [], failure="reload after triton restart failed: ")
        self._triton_up = True
        self._publish()

    def mirror(
        self,
        changed: Sequence[HeldVersion],
        removed: Sequence[str] = (),
        *,
        initial: bool = False,
    ) -> None:
        """Takes the states that the process owning Triton published (in a worker that serves
        from a mirror of them): versions `changed` as they are now, versions `removed` gone;
        with `initial`, `changed` is the whole state, and versions not in it go too."""
        if initial:
            kept = {h.name for h in changed}
            removed = [*removed, *(name for name in self._held if name not in kept)]
        for name in removed:
            self._held.pop(name, None)
        for held in changed:
            self._held[held.name] = held
        self._publish(*changed, removed=removed)

    def mirror_triton_up(self, up: bool) -> None:
        """Takes whether Triton is up from the process owning it (see `mirror`)."""
        self._triton_up = up

    def _lock(self, model: str) -> asyncio.Lock:
        return self._model_locks.setdefault(model, asyncio.Lock())

    def _publish(self, *changed: HeldVersion, removed: Sequence[str] = ()) -> None:
        self.feed.publish(
            StateChange(tuple(dataclasses.replace(h) for h in changed), tuple(removed))
        )

    def _set_state(self, held: HeldVersion, state: VersionState, reason: str = "") -> None:
        held.state, held.reason = state, reason
        self._publish(held)

    def _begin(self, name: str, model: str, version: int) -> HeldVersion:
        held = HeldVersion(name=name, model=model, version=version, state=VersionState.LOADING)
        self._held[name] = held
        self._publish(held)
        return held

    def _take(self, held: HeldVersion, artifact: VersionArtifact) -> None:
        held.inputs, held.outputs, held.onnx = artifact.inputs, artifact.outputs, artifact.onnx
        held.sample_inputs = usable_samples(held.name, held.inputs, artifact.sample_inputs)

    def _of_model(self, model: str) -> tuple[HeldVersion, ...]:
        """The model's versions that Triton should hold (those with an artifact, not leaving)."""
        return tuple(
            v
            for v in self._held.values()
            if v.model == model and v.onnx and v.state is not VersionState.UNLOADING
        )

    def _fail(self, held: HeldVersion, reason: str) -> None:
        held.onnx, held.sample_inputs = b"", {}
        self._set_state(held, VersionState.FAILED, reason)
        log.error("model_version_failed", version=held.name, reason=reason)

    async def _remove(self, model: str, names: Sequence[str]) -> None:
        """Turns the versions UNLOADING, reloads the model without them, and forgets them."""
        leaving = [self._held[n] for n in names]
        in_triton = any(h.onnx for h in leaving)
        for held in leaving:
            held.state, held.reason = VersionState.UNLOADING, ""
        self._publish(*leaving)
        try:
            if in_triton:
                await self._load_model(model)
        except TritonError as exc:
            raise UnavailableError(f"triton could not unload {', '.join(names)}: {exc}") from exc
        finally:
            for name in names:
                del self._held[name]
            self._publish(removed=names)
            log.info("model_version_unloaded", versions=list(names))

    async def _sync_model(
        self, model: str, fresh: Sequence[HeldVersion], *, failure: str = ""
    ) -> None:
        """Loads the model into Triton with every version it should hold, then warms them.

        When Triton refuses the load, the versions its message names turn FAILED (prefixed by
        `failure`) and the load is tried again without them, so one broken artifact does not
        keep the others out. A refusal that names none fails the `fresh` versions (Triton
        keeps serving what it held before a load it refuses), or, with none fresh (a reload
        or a new config), every version. A new config refused for a model Triton already
        serves is not a failure of its versions: Triton keeps serving them as they were, so
        they stay READY, their `reason` says why the new config is not applied, and this
        raises ConfigRefused once they are warmed (the reconcile loop tries again later).
        """
        previous = self._loaded_configs.get(model)
        wanted = self._configs.get(model, self.default_config)
        refused = ""
        for _ in range(len(self._of_model(model)) + 1):
            try:
                await self._load_model(model)
                self.config_applied(model)
                break
            except TritonError as exc:
                if not fresh and previous is not None and wanted != previous:
                    refused = (
                        "the deployment's new inference config was refused, so the previous"
                        f" one serves: {_first_paragraph(str(exc))}"
                    )
                    log.error("model_reconfigure_refused", model=model, reason=str(exc))
                    self._set_config_note(model, refused)
                    break
                held = self._of_model(model)
                numbers = {int(n) for n in _FAILED_VERSION.findall(exc.message)}
                named = [h for h in held if h.version in numbers]
                unproven = [h for h in fresh if h.onnx]
                suspects = named or unproven or list(held)
                if not suspects:
                    log.error("model_unload_failed", model=model, reason=str(exc))
                    break
                for version in suspects:
                    self._fail(version, failure + _first_paragraph(str(exc)))
                if not named and unproven:
                    break
        await self._warm_model(model)
        if refused:
            raise ConfigRefused(refused)

    def config_applied(self, model: str) -> None:
        """The model runs with its deployment's latest config: no READY version of it says
        otherwise any more."""
        self._set_config_note(model, "")

    def _set_config_note(self, model: str, reason: str) -> None:
        """Sets (or, with "", clears) the reason on the model's READY versions that the
        config they are served with is not the deployment's latest."""
        changed = [h for h in self._of_model(model) if h.state is VersionState.READY]
        changed = [h for h in changed if h.reason != reason]
        for held in changed:
            held.reason = reason
        if changed:
            self._publish(*changed)

    async def _load_model(self, model: str) -> None:
        """Makes Triton hold exactly the model's versions that have an artifact, with the
        model's config."""
        versions = {v.version: v for v in self._of_model(model)}
        if not versions:
            self._loaded_configs.pop(model, None)
            await self._triton.unload(model, timeout_s=self._load_timeout_s)
            return
        config = self._configs.get(model, self.default_config)
        if self._available_backends is not None and config.backend not in self._available_backends:
            raise TritonError(
                f"the {config.backend!r} backend is not installed in this Triton (it has"
                f" {', '.join(sorted(self._available_backends))}); the nvidia-pytriton wheel"
                " ships only the python backend, which runs ONNX with onnxruntime"
            )
        newest = versions[max(versions)]
        try:
            triton_config = build_model_config(
                model,
                newest.inputs,
                newest.outputs,
                backend=config.backend,
                max_batch_size=config.max_batch_size,
                preferred_batch_sizes=config.preferred_batch_sizes,
                max_queue_delay_us=config.max_queue_delay_us,
                max_queue_size=config.max_queue_size,
                instance_count=config.instance_count,
                device=config.device,
                gpus=config.gpus,
            )
        except ValueError as exc:
            raise TritonError(f"no Triton config fits the signature: {exc}") from exc
        files = model_files({n: v.onnx for n, v in versions.items()}, backend=config.backend)
        await self._triton.load(model, triton_config, files, timeout_s=self._load_timeout_s)
        self._loaded_configs[model] = config
        moved = []
        for held in versions.values():
            if held.config != config:
                held.config = config
                if held.state is VersionState.READY:
                    moved.append(held)
        if moved:
            self._publish(*moved)

    async def _warm_model(self, model: str) -> None:
        """Warms each version of the model that is not READY yet, then declares it READY.

        A (re)load may have replaced every version inside Triton; the ones already READY keep
        serving while the new ones warm, so they are warmed too but stay READY meanwhile.
        """
        for held in sorted(self._of_model(model), key=lambda v: v.version):
            ready = held.state is VersionState.READY
            if not ready:
                self._set_state(held, VersionState.WARMING)
            try:
                await self._warm(held)
            except TritonError as exc:
                self._fail(held, f"warmup failed: {exc}")
                try:
                    await self._load_model(model)
                except TritonError as reload_error:
                    log.error("model_reload_failed", model=model, reason=str(reload_error))
                continue
            if not ready:
                self._set_state(held, VersionState.READY)
                log.info("model_version_ready", version=held.name)

    async def _warm(self, held: HeldVersion) -> None:
        """Runs the version once per warmup batch size (capped at the model's max_batch_size)
        on its sample inputs, rows repeated to the batch size, or on inputs synthesized from
        its signature when it has none."""
        started = time.perf_counter()
        names = [o.name for o in held.outputs]
        config = self._loaded_configs.get(held.model, self.default_config)
        sizes = sorted({min(b, config.max_batch_size) for b in self._warmup_batch_sizes})
        for batch in sizes:
            inputs = warmup_inputs(held.inputs, held.sample_inputs, batch)
            await self._triton.infer(
                held.model, held.version, inputs, names, timeout_s=self._load_timeout_s
            )
        log.info(
            "model_version_warmed",
            version=held.name,
            batch_sizes=sizes,
            inputs="sample_inputs" if held.sample_inputs else "synthesized",
            seconds=round(time.perf_counter() - started, 3),
        )

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
        *,
        deadline_s: float | None = None,
        exact_dtypes: bool = False,
    ) -> dict[str, npt.NDArray[Any]]:
        """Runs a READY version; inputs are checked against its signature first.

        `deadline_s` is the time the caller has left; Triton gets no more than that.
        With `exact_dtypes` each input must have its signature's dtype, else inputs are cast.
        The arrays go to Triton as raw bytes through the coalescer, as `infer_request`'s do.
        """
        parse_version_name(name)
        held = self.get(name)
        self._check_ready(held)
        arrays = self._check_inputs(held, inputs, exact_dtypes=exact_dtypes)
        sizes = sorted({array.shape[0] for array in arrays.values()})
        limit = (held.config or self.default_config).max_batch_size
        if len(sizes) != 1 or not 1 <= sizes[0] <= limit:
            raise InvalidArgumentError.for_field(
                "inputs", f"every input needs the same batch size, from 1 to {limit}; got {sizes}"
            )
        known = {o.name: o.shape for o in held.outputs}
        wanted = list(output_names) or list(known)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidArgumentError.for_field(
                "output_names", f"unknown outputs {unknown}; the version has {sorted(known)}"
            )
        timeout_s = self._timeout(name, deadline_s)
        request, checked = request_from_arrays(held, arrays, wanted)
        try:
            limit, max_rows = self._coalescing(held)
            response = await self._coalescer.infer(
                request, checked, timeout_s=timeout_s, limit=limit, max_rows=max_rows
            )
            answered = arrays_from_response(response)
            missing = [n for n in wanted if n not in answered]
            if missing:
                raise TritonError(f"model {held.model!r} returned no output {missing[0]!r}")
        except TritonError as exc:
            raise _infer_error(name, exc) from exc
        return conform_outputs({n: answered[n] for n in wanted}, known)

    async def infer_request(
        self, held: HeldVersion, request: Any, *, deadline_s: float | None = None
    ) -> Any:
        """Runs a version on an Open Inference Protocol `ModelInferRequest` and answers Triton's
        `ModelInferResponse`, outputs shaped as the signature says.

        The request's raw tensors are checked where they lie (`read_inputs`, `check_request`) as
        `infer` checks arrays with `exact_dtypes`, and go to Triton as they came, without being
        decoded.
        """
        tensors = read_inputs(request)
        self._check_ready(held)
        limit, max_rows = self._coalescing(held)
        checked = check_request(
            held,
            request,
            tensors,
            max_batch_size=max_rows,
            reject_non_finite=self._reject_non_finite,
        )
        timeout_s = self._timeout(held.name, deadline_s)
        try:
            response = await self._coalescer.infer(
                request, checked, timeout_s=timeout_s, limit=limit, max_rows=max_rows
            )
        except TritonError as exc:
            raise _infer_error(held.name, exc) from exc
        return conform_response(held, response)

    async def close(self) -> None:
        """Cancels the coalesced Triton calls in flight."""
        await self._coalescer.close()

    def _timeout(self, name: str, deadline_s: float | None) -> float:
        """How long Triton may take: the caller's time left, at most `infer_timeout_s`."""
        timeout_s = (
            self._infer_timeout_s if deadline_s is None else min(deadline_s, self._infer_timeout_s)
        )
        if timeout_s <= 0:
            raise DeadlineExceededError(
                f"the deadline of the call to {name} had passed before triton was called"
            )
        return timeout_s

    def _coalescing(self, held: HeldVersion) -> tuple[int, int]:
        """How many calls of the version may be in Triton at once before requests wait to be
        coalesced (`coalesce_in_flight` per instance; no limit with a bounded Triton queue,
        which must see every request to refuse what does not fit), and the largest batch
        Triton takes (the model's max_batch_size)."""
        config = held.config or self.default_config
        limit = 0 if config.max_queue_size else self._coalesce_in_flight * config.instance_count
        return limit, config.max_batch_size

    @staticmethod
    def _check_ready(held: HeldVersion) -> None:
        if held.state is VersionState.READY:
            return
        details = {"name": held.name, "state": held.state.value}
        message = f"model version {held.name} is {held.state.value}, not READY"
        if held.reason:
            message += f": {held.reason}"
        if held.state is VersionState.FAILED:
            raise FailedPreconditionError(message, reason="VERSION_FAILED", metadata=details)
        # LOADING or WARMING: it will be READY shortly, so a retry is the right answer.
        raise UnavailableError(message, reason="VERSION_NOT_READY", metadata=details)

    def _check_inputs(
        self, held: HeldVersion, inputs: Mapping[str, npt.NDArray[Any]], *, exact_dtypes: bool
    ) -> dict[str, npt.NDArray[Any]]:
        violations: list[FieldViolation] = []
        arrays: dict[str, npt.NDArray[Any]] = {}
        expected = {spec.name: spec for spec in held.inputs}
        for name in inputs:
            if name not in expected:
                violations.append(FieldViolation(f"inputs[{name}]", f"not an input of {held.name}"))
        for spec in held.inputs:
            array = inputs.get(spec.name)
            if array is None:
                violations.append(
                    FieldViolation(f"inputs[{spec.name}]", "required input is missing")
                )
                continue
            if array.ndim != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
            ):
                violations.append(
                    FieldViolation(
                        f"inputs[{spec.name}].shape",
                        f"expected {list(spec.shape)}, got {list(array.shape)}",
                    )
                )
                continue
            target = np.dtype(_NUMPY_TYPES.get(spec.datatype, array.dtype))
            mismatch = (
                array.dtype != target
                if exact_dtypes
                else ((array.dtype == np.object_) != (target == np.object_))
            )
            if mismatch:
                got = _TRITON_TYPES.get(array.dtype, str(array.dtype))
                violations.append(
                    FieldViolation(
                        f"inputs[{spec.name}].datatype", f"expected {spec.datatype}, got {got}"
                    )
                )
                continue
            cast = array.astype(target, copy=False)
            if (
                self._reject_non_finite
                and not spec.allow_non_finite
                and cast.dtype.kind == "f"
                and not np.isfinite(cast).all()
            ):
                violations.append(
                    FieldViolation(f"inputs[{spec.name}]", "contains NaN or infinity")
                )
                continue
            arrays[spec.name] = cast
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        return arrays


def warmup_inputs(
    specs: Sequence[TensorSpec], samples: Mapping[str, npt.NDArray[Any]], batch: int
) -> dict[str, npt.NDArray[Any]]:
    """A warmup batch of `batch` rows: the sample rows repeated in turn when there are samples
    (checked by `usable_samples`), else zeros synthesized from the signature."""
    if samples:
        return {spec.name: tile_rows(samples[spec.name], batch) for spec in specs}
    return {spec.name: synthesize(spec, batch) for spec in specs}


def tile_rows(rows: npt.NDArray[Any], batch: int) -> npt.NDArray[Any]:
    """`batch` rows taken from `rows` in turn: rows 0, 1, ..., n-1, 0, 1, ..."""
    return np.take(rows, np.arange(batch) % len(rows), axis=0)


def usable_samples(
    name: str, specs: Sequence[TensorSpec], samples: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """The sample inputs cast to the signature's dtypes, or none (with a warning, so that
    warmup synthesizes its inputs) when they do not fit the signature: one array per input,
    the same number of rows (at least one) in each, the declared inner dimensions."""
    if not samples:
        return {}
    problems: list[str] = []
    usable: dict[str, npt.NDArray[Any]] = {}
    extra = sorted(set(samples) - {spec.name for spec in specs})
    if extra:
        problems.append(f"not inputs of the signature: {extra}")
    for spec in specs:
        array = samples.get(spec.name)
        if array is None:
            problems.append(f"no sample for input {spec.name}")
        elif array.ndim != len(spec.shape) or any(
            want not in (-1, got)
            for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
        ):
            problems.append(f"{spec.name} has shape {list(array.shape)}, not {list(spec.shape)}")
        else:
            try:
                usable[spec.name] = array.astype(_NUMPY_TYPES.get(spec.datatype, array.dtype))
            except (TypeError, ValueError) as exc:
                problems.append(f"{spec.name} cannot be cast to {spec.datatype}: {exc}")
    rows = {len(array) for array in usable.values()}
    if len(rows) > 1 or 0 in rows:
        problems.append(
            f"the inputs need the same number of rows, at least one; got {sorted(rows)}"
        )
    if problems:
        log.warning("sample_inputs_unusable", version=name, problems=problems)
        return {}
    return usable


def _first_paragraph(message: str) -> str:
    """Triton's message without what follows its first blank line (a Python traceback)."""
    return message.split("\n\n", 1)[0].strip()


def synthesize(spec: TensorSpec, batch: int) -> npt.NDArray[Any]:
    """Zeros of the tensor's dtype for a batch of `batch` rows."""
    shape = (batch, *(1 if d < 0 else d for d in spec.shape[1:]))
    if spec.datatype == "BYTES":
        return np.full(shape, b"0", dtype=np.object_)
    return np.zeros(shape, dtype=_NUMPY_TYPES.get(spec.datatype, np.float32))


def _infer_error(name: str, exc: TritonError) -> ModelServeError:
    """Triton's refusal as the error that tells the caller what to do."""
    status = exc.status or ""
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidArgumentError(
            f"triton refused the inputs of {name}: {exc}", reason="TRITON_REFUSED_INPUT"
        )
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceededError(
            f"triton did not answer {name} within the deadline", reason="TRITON_DEADLINE"
        )
    # Triton answers a request its dynamic batcher's bounded queue cannot take with
    # UNAVAILABLE "Exceeds maximum queue size"; that is overload, not an outage.
    if status == "StatusCode.RESOURCE_EXHAUSTED" or "maximum queue size" in exc.message:
        return ResourceExhaustedError(
            f"triton's queue for {name} is full: {exc}", reason="TRITON_QUEUE_FULL"
        )
    return UnavailableError(f"triton failed to run {name}: {exc}", reason="TRITON_UNAVAILABLE")

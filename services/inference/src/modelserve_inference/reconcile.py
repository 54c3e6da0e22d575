"""The reconcile loop: Triton holds exactly the versions that the registry's deployments
reference, plus those pinned by LoadModelVersion, each model with its deployment's config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from modelserve_inference.models import (
    ConfigRefused,
    HeldVersion,
    ModelVersions,
    ServingConfig,
    VersionState,
    parse_version_name,
)
from modelserve_runtime.errors import FailedPreconditionError, ModelServeError
from modelserve_runtime.waiting import wait_until_set

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class DeploymentNeeds:
    """What one deployment revision asks of inference."""

    name: str
    """`deployments/{deployment}`."""
    revision: int
    versions: tuple[str, ...]
    """Every version it references, once: traffic targets (any percent, 0 included), shadow
    versions, the fallback version."""
    config: ServingConfig
    """How Triton serves them: the deployment's InferenceConfig over the service's defaults."""


class DeploymentFeed(Protocol):
    """The registry's deployments, as inference follows them."""

    def watch(self, after_sequence: int) -> AsyncIterator[tuple[int, DeploymentNeeds]]:
        """Every deployment revision after `after_sequence` (the current one of each deployment
        when 0), then each new one as it is made, with its registry-wide sequence. Raises
        ModelServeError when the registry cannot be reached or ends the stream."""
        ...


@dataclass(slots=True)
class _Retry:
    """When a FAILED version is loaded again (or a refused config tried again), and how many
    tries failed in a row."""

    failures: int
    at: float


class PinFile:
    """The pinned versions on disk (a JSON list of names), written whole on each change
    (a temporary file renamed over the old one), so a restart finds the last set whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> set[str]:
        """The pins kept, none when there is no file; a file that is not a list of version
        names is logged and ignored (the service starts without its pins)."""
        try:
            names = json.loads(self.path.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.error("pins_unreadable", path=str(self.path), error=str(exc))
            return set()
        pins = set()
        for name in names if isinstance(names, list) else [names]:
            try:
                parse_version_name(name)
            except (ModelServeError, TypeError, AttributeError):
                log.error("pin_ignored", path=str(self.path), pin=repr(name))
                continue
            pins.add(name)
        return pins

    def write(self, pins: Iterable[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(sorted(pins)))
        scratch.replace(self.path)


class Reconciler:
    """Follows the registry's WatchDeployments and converges Triton to what it asks for.

    Wanted are the versions that any deployment references and those pinned by `load`
    (LoadModelVersion) until `unload`. Each pass of the loop, per model: wanted versions not
    held are loaded (all of a model's in one Triton load; models `max_concurrent_loads` at a
    time); FAILED ones again once their backoff has passed (doubling from `retry_initial_s`
    up to `retry_max_s`); held versions nobody wants any more are unloaded once unwanted for
    `unload_grace_s`, so a rollback that comes right back finds them still READY; a model
    whose deployment changed its InferenceConfig is reloaded with it.

    A model's versions share one Triton config, taken from the first deployment by name that
    references any of them; another deployment asking differently gets a warning. While the
    registry cannot be reached everything held stays; the watch reconnects with capped
    backoff and resumes after the last sequence seen, so no revision is missed. While Triton
    is down the loop waits: the supervisor reloads what was held.
    """

    def __init__(
        self,
        versions: ModelVersions,
        feed: DeploymentFeed,
        *,
        unload_grace_s: float,
        max_concurrent_loads: int,
        retry_initial_s: float,
        retry_max_s: float,
        watch_backoff_max_s: float,
        watch_backoff_initial_s: float = 0.05,
        pin_file: PinFile | None = None,
    ) -> None:
        self._versions = versions
        self._pin_file = pin_file
        self._feed = feed
        self._unload_grace_s = unload_grace_s
        self._slots = asyncio.Semaphore(max_concurrent_loads)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._watch_backoff_initial_s = watch_backoff_initial_s
        self._watch_backoff_max_s = watch_backoff_max_s
        self.sequence = 0
        """The registry sequence of the last revision applied; a reconnect resumes after it."""
        self._deployments: dict[str, DeploymentNeeds] = {}
        self._pinned: set[str] = set()
        self._pinning: set[str] = set()
        """Pinned versions whose LoadModelVersion is still running: the loop leaves them be."""
        self._unwanted_since: dict[str, float] = {}
        self._retries: dict[str, _Retry] = {}
        self._planned_configs: dict[str, ServingConfig] = {}
        self._conflicts: set[tuple[str, str, str]] = set()
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._held_off: dict[str, float] = {}
        """Models left alone until then, after their work failed unexpectedly."""
        self._refusals: dict[str, _Retry] = {}
        """Per model whose new config Triton refused: the refusals in a row, and when to try
        the config again (other work on the model goes on meanwhile)."""
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        versions.feed.add_listener(self._wake.set)

    def start(self) -> None:
        """Starts following the registry and converging, with the pins kept by an earlier
        run: the loop loads them as it loads what deployments reference."""
        if not self._tasks:
            if self._pin_file is not None:
                kept = self._pin_file.read()
                if kept:
                    log.info("pins_restored", pins=sorted(kept))
                self._pinned |= kept
            self._tasks = [
                asyncio.create_task(self._follow(), name="inference-watch-deployments"),
                asyncio.create_task(self._converge(), name="inference-reconcile"),
            ]

    async def close(self) -> None:
        """Stops following and converging; loads in progress are abandoned."""
        tasks = [*self._tasks, *self._busy.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def wanted(self) -> dict[str, str]:
        """Every wanted version and why: the first deployment (by name) that references it,
        or "" for a version only pinned."""
        wanted: dict[str, str] = {}
        for deployment in sorted(self._deployments.values(), key=lambda d: d.name):
            for version in deployment.versions:
                wanted.setdefault(version, deployment.name)
        for version in sorted(self._pinned):
            wanted.setdefault(version, "")
        return wanted

    async def load(self, name: str) -> HeldVersion:
        """LoadModelVersion: pins the version (kept until `unload` whatever the deployments
        say), then loads it with its model's config; answers READY or FAILED. A version that
        cannot be fetched is not pinned: the error is raised."""
        model, _ = parse_version_name(name)
        already = name in self._pinned
        self._pinned.add(name)
        self._pinning.add(name)
        try:
            held = await self._versions.load(name, config=self.model_configs().get(model))
        except BaseException:
            if not already:
                self._pinned.discard(name)
            raise
        else:
            if not already:
                self._save_pins()
            return held
        finally:
            self._pinning.discard(name)
            self._wake.set()

    async def unload(self, name: str) -> None:
        """UnloadModelVersion: releases the pin and unloads the version at once, unless a
        deployment references it (FailedPreconditionError naming the deployments)."""
        parse_version_name(name)
        if name in self._pinned:
            self._pinned.discard(name)
            self._save_pins()
        self._versions.get(name)
        users = sorted(d.name for d in self._deployments.values() if name in d.versions)
        if users:
            raise FailedPreconditionError(
                f"{name} stays loaded while {', '.join(users)} reference it (its pin is released)",
                reason="VERSION_IN_USE",
                metadata={"name": name, "deployments": ",".join(users)},
            )
        await self._versions.unload(name)
        self._wake.set()

    def _save_pins(self) -> None:
        if self._pin_file is None:
            return
        try:
            self._pin_file.write(self._pinned)
        except OSError as exc:
            # The pin holds in this run; only a restart would forget it.
            log.error("pins_not_saved", path=str(self._pin_file.path), error=str(exc))

    def apply(self, sequence: int, needs: DeploymentNeeds) -> None:
        """Takes one deployment revision in (an older revision than the one held changes
        nothing but the sequence)."""
        current = self._deployments.get(needs.name)
        if current is None or current.revision <= needs.revision:
            self._deployments[needs.name] = needs
        self.sequence = max(self.sequence, sequence)
        log.info(
            "deployment_revision_applied",
            deployment=needs.name,
            revision=needs.revision,
            sequence=sequence,
            versions=list(needs.versions),
        )
        self._wake.set()

    async def _follow(self) -> None:
        backoff = self._watch_backoff_initial_s
        while True:
            after = self.sequence
            log.info("deployment_watch_opening", after_sequence=after)
            try:
                async for sequence, needs in self._feed.watch(after):
                    self.apply(sequence, needs)
                    backoff = self._watch_backoff_initial_s
            except ModelServeError as exc:
                log.warning(
                    "deployment_watch_lost",
                    error=exc.message,
                    sequence=self.sequence,
                    retry_in_s=backoff,
                )
            except Exception:  # whatever went wrong, the watch must come back
                log.exception("deployment_watch_failed", sequence=self.sequence)
            # Pacing the reconnects to a registry that is down, not waiting for a result.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._watch_backoff_max_s)

    async def _converge(self) -> None:
        while True:
            self._wake.clear()
            delay = self._plan()
            # Woken by a revision, a pin, a state change or a finished load; or at the
            # next retry or unload that falls due.
            await wait_until_set(self._wake, delay)

    def _plan(self) -> float | None:
        """Starts the work each idle model needs; returns the seconds until the next retry or
        unload falls due (None: nothing is waiting on time)."""
        if not self._versions.triton_up:
            return None
        loop = asyncio.get_running_loop()
        now = loop.time()
        wanted = self.wanted()
        configs = self.model_configs()
        held = {h.name: h for h in self._versions.list()}
        for name in list(self._unwanted_since):
            if name in wanted or name not in held:
                del self._unwanted_since[name]
        for name in list(self._retries):
            current = held.get(name)
            if name not in wanted or (current is not None and current.state is VersionState.READY):
                del self._retries[name]
        by_model: dict[str, list[str]] = {}
        for name in wanted:
            by_model.setdefault(parse_version_name(name)[0], []).append(name)
        for version in held.values():
            by_model.setdefault(version.model, [])
        due: list[float] = []
        for model, names in sorted(by_model.items()):
            config = configs.get(model, self._versions.default_config)
            if self._planned_configs.get(model) != config:
                # A new config may be what a FAILED version needed, or the fix of one Triton
                # refused: try it at once.
                self._planned_configs[model] = config
                self._refusals.pop(model, None)
                for name in names:
                    current = held.get(name)
                    if current is not None and current.state is VersionState.FAILED:
                        self._retries[name] = _Retry(failures=0, at=now)
            if model in self._busy:
                continue
            if self._held_off.get(model, now) > now:
                due.append(self._held_off[model])
                continue
            to_load = []
            for name in names:
                current = held.get(name)
                if name in self._pinning:
                    continue
                if current is None:
                    to_load.append(name)
                elif current.state is VersionState.FAILED:
                    retry = self._retries.get(name)
                    if retry is None:
                        retry = self._schedule_retry(name, 1, current.reason, now)
                    if retry.at <= now:
                        to_load.append(name)
                    else:
                        due.append(retry.at)
            to_remove = []
            for name, version in held.items():
                if version.model != model or name in wanted:
                    continue
                since = self._unwanted_since.setdefault(name, now)
                if version.state is VersionState.UNLOADING:
                    continue
                if since + self._unload_grace_s <= now:
                    to_remove.append(name)
                else:
                    due.append(since + self._unload_grace_s)
            loaded = self._versions.loaded_config(model)
            reconfigure = loaded is not None and loaded != config
            if loaded == config:
                self._refusals.pop(model, None)
                self._versions.config_applied(model)
            refused = self._refusals.get(model)
            if reconfigure and refused is not None and refused.at > now:
                reconfigure = False
                due.append(refused.at)
            if to_load or to_remove or reconfigure:
                self._busy[model] = asyncio.create_task(
                    self._work(model, config, to_load, to_remove), name=f"reconcile-{model}"
                )
        return max(0.0, min(due) - now) if due else None

    async def _work(
        self, model: str, config: ServingConfig, to_load: list[str], to_remove: list[str]
    ) -> None:
        try:
            async with self._slots:
                if to_remove:
                    log.info("model_versions_unwanted", model=model, versions=to_remove)
                    await self._versions.remove(model, to_remove)
                await self._versions.ensure(model, to_load, config)
            now = asyncio.get_running_loop().time()
            for name in to_load:
                version = self._versions.find(name)
                if version is not None and version.state is VersionState.FAILED:
                    failures = self._retries[name].failures + 1 if name in self._retries else 1
                    self._schedule_retry(name, failures, version.reason, now)
                else:
                    self._retries.pop(name, None)
        except ConfigRefused as exc:
            previous = self._refusals.get(model)
            failures = previous.failures + 1 if previous is not None else 1
            delay = min(self._retry_initial_s * 2 ** (failures - 1), self._retry_max_s)
            now = asyncio.get_running_loop().time()
            self._refusals[model] = _Retry(failures, now + delay)
            log.warning(
                "model_reconfigure_retry_scheduled",
                model=model,
                failures=failures,
                retry_in_s=round(delay, 3),
                reason=str(exc),
            )
        except Exception:  # one model's trouble must not stop the loop, nor spin it
            log.exception("reconcile_failed", model=model, retry_in_s=self._retry_initial_s)
            self._held_off[model] = asyncio.get_running_loop().time() + self._retry_initial_s
        finally:
            del self._busy[model]
            self._wake.set()

    def _schedule_retry(self, name: str, failures: int, reason: str, now: float) -> _Retry:
        delay = min(self._retry_initial_s * 2 ** (failures - 1), self._retry_max_s)
        retry = self._retries[name] = _Retry(failures, now + delay)
        log.warning(
            "model_version_load_retry_scheduled",
            version=name,
            failures=failures,
            retry_in_s=round(delay, 3),
            reason=reason,
        )
        return retry

    def model_configs(self) -> dict[str, ServingConfig]:
        """Per model, the config of the first deployment by name that references any of its
        versions; a later deployment asking otherwise is warned about once."""
        chosen: dict[str, tuple[str, ServingConfig]] = {}
        conflicts: set[tuple[str, str, str]] = set()
        for deployment in sorted(self._deployments.values(), key=lambda d: d.name):
            for model in sorted({parse_version_name(v)[0] for v in deployment.versions}):
                first = chosen.setdefault(model, (deployment.name, deployment.config))
                if first[1] != deployment.config:
                    conflicts.add((model, first[0], deployment.name))
        for model, used, ignored in sorted(conflicts - self._conflicts):
            log.warning(
                "inference_config_conflict",
                model=model,
                used=used,
                ignored=ignored,
                detail="deployments that share a model's versions must agree on its inference"
                " config; the first deployment by name wins",
            )
        self._conflicts = conflicts
        return {model: config for model, (_, config) in chosen.items()}

"""Keeps Triton alive: notices when it dies, has it restarted, and reloads what it held."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from modelserve_inference.models import ModelVersions

log = structlog.get_logger()


class TritonHost(Protocol):
    """The Triton whose life the supervisor watches: started here, or run elsewhere."""

    async def is_live(self) -> bool:
        """Whether Triton answers; raises when it cannot be reached."""
        ...

    async def wait_exited(self) -> None:
        """Returns when the Triton process exits; never, when it is not our child."""
        ...

    async def recover(self) -> None:
        """Returns once a Triton answers again: one started anew, or the remote one back."""
        ...


class TritonSupervisor:
    """Watches Triton; when it is gone, reports every version LOADING and the service not
    serving, gets Triton back, reloads and warms every version, and serves again.

    A child that exits is noticed at once; a Triton that stops answering is declared gone
    after `failures_before_down` probes in a row, `poll_interval_s` apart, so one slow
    answer under load does not restart a healthy server.
    """

    def __init__(
        self,
        host: TritonHost,
        versions: ModelVersions,
        on_serving: Callable[[bool], Awaitable[None]],
        *,
        poll_interval_s: float,
        failures_before_down: int = 3,
    ) -> None:
        self._host = host
        self._versions = versions
        self._on_serving = on_serving
        self._poll_interval_s = poll_interval_s
        self._failures_before_down = failures_before_down
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    def start(self) -> None:
        """Starts watching in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="triton-supervisor")

    async def close(self) -> None:
        """Stops watching (before Triton is stopped on purpose)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            reason = await self._wait_for_failure()
            started = time.monotonic()
            log.error("triton_down", reason=reason)
            self._versions.mark_triton_down(reason)
            await self._on_serving(False)
            await self._recover()
            await self._versions.reload_all()
            await self._on_serving(True)
            self.restarts += 1
            log.info(
                "triton_recovered",
                seconds=round(time.monotonic() - started, 3),
                versions=[v.name for v in self._versions.list()],
            )

    async def _wait_for_failure(self) -> str:
        """Returns why Triton is considered gone."""
        exited = asyncio.ensure_future(self._host.wait_exited())
        failures = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self._poll_interval_s)
                if done:
                    return "tritonserver exited"
                try:
                    live = await self._host.is_live()
                    problem = "" if live else "triton reports it is not live"
                except Exception as exc:  # any failure to answer counts as one strike
                    problem = f"triton does not answer: {exc}"
                failures = failures + 1 if problem else 0
                if failures >= self._failures_before_down:
                    return problem
        finally:
            exited.cancel()

    async def _recover(self) -> None:
        """Tries until Triton is back, waiting longer after each failed try (up to 10 s)."""
        delay = self._poll_interval_s
        while True:
            try:
                await self._host.recover()
                return
            except Exception:
                log.exception("triton_recover_failed", retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

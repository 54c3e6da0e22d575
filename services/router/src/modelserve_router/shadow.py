"""Shadow copies of requests: run in the background, at most so many at once, never awaited by
the caller; a copy that finds no room is dropped and counted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger()


class ShadowMirror:
    """Runs shadow work as background tasks, at most `max_in_flight` at a time."""

    def __init__(self, *, max_in_flight: int) -> None:
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0
        """Copies dropped because `max_in_flight` were already running."""

    @property
    def in_flight(self) -> int:
        """Copies running now."""
        return len(self._tasks)

    def submit(self, work: Coroutine[Any, Any, None], *, model_version: str) -> bool:
        """Starts `work` in the background; when full, closes it unrun, counts and logs the
        drop, and returns False."""
        if len(self._tasks) >= self._max_in_flight:
            work.close()
            self.dropped += 1
            log.warning("shadow_dropped", shadow_version=model_version, dropped=self.dropped)
            return False
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def idle(self) -> None:
        """Returns once every copy started so far has finished."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        """Cancels the copies still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

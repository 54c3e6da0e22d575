"""Waiting on an event with a time limit, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns normally when the awaited future finishes in the
same loop pass as a ``cancel()`` of the waiting task, so the cancellation is lost and a loop
that waits this way runs on while its owner awaits it at shutdown (fixed in 3.12). The
``asyncio.timeout`` context manager has no such race; every "sleep until woken or due" loop
in the project waits through :func:`wait_until_set`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger()


async def wait_until_set(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Waits until `event` is set or `timeout_s` passes (None: no limit); True when it was set.

    A cancellation of the caller always propagates.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def wait_for_notify(condition: asyncio.Condition, timeout_s: float | None) -> bool:
    """Waits (holding `condition`'s lock) until notified or `timeout_s` passes; True when
    notified. A cancellation of the caller always propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await condition.wait()
    except TimeoutError:
        return False
    return True


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], timeout_s: float = 5.0) -> list[str]:
    """Cancels `tasks` and waits up to `timeout_s` for them to end; returns the names of those
    still running then (logged), so a stuck task delays a shutdown but never hangs it."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _, stuck = await asyncio.wait(pending, timeout=timeout_s)
    names = sorted(task.get_name() for task in stuck)
    if names:
        log.error("tasks_did_not_stop", tasks=names, waited_s=timeout_s)
    return names

"""The first process's care of its workers (`Workers`): a worker that keeps failing at start
is started again after doubling waits, and every one is stopped with the service."""

from __future__ import annotations

import sys

import psutil
from structlog.testing import capture_logs
from support import eventually

from modelserve_runtime.config import ServerSettings, ServiceSettings
from modelserve_runtime.server import Workers

FAILS_AT_ONCE = [sys.executable, "-c", "raise SystemExit(3)"]
#: A worker that runs until it is signalled (SIGTERM ends it).
RUNS_ON = [sys.executable, "-c", "import signal; signal.pause()"]


class _App:
    """A service app with nothing to hand its workers."""


async def test_a_worker_failing_at_start_waits_longer_each_time() -> None:
    settings = ServiceSettings(server=ServerSettings(workers=2, port=1))
    workers = Workers(
        settings,
        None,
        command=FAILS_AT_ONCE,
        poll_s=0.01,
        restart_initial_s=0.05,
        restart_max_s=0.2,
    )
    with capture_logs() as logs:
        workers.start(_App())  # type: ignore[arg-type]
        exits = lambda: [e for e in logs if e["event"] == "worker_exited"]  # noqa: E731
        await eventually(lambda: len(exits()) >= 5, "five exits of the failing worker")
        await workers.stop()

    assert [e["code"] for e in exits()][:5] == [3] * 5
    assert [e["restart_in_s"] for e in exits()][:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    restarts = [e for e in logs if e["event"] == "worker_restarted"]
    assert len(restarts) >= 4
    assert all(e["worker"] == 1 for e in exits() + restarts)


async def test_stop_ends_every_worker_and_restarts_none() -> None:
    settings = ServiceSettings(server=ServerSettings(workers=3, port=1, grace_period_s=0))
    workers = Workers(settings, None, command=RUNS_ON, poll_s=0.01)
    with capture_logs() as logs:
        workers.start(_App())  # type: ignore[arg-type]
        (started,) = [e for e in logs if e["event"] == "workers_started"]
        children = [psutil.Process(pid) for pid in started["pids"]]
        assert len(children) == 2 and all(c.is_running() for c in children)
        await workers.stop()

    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not [e for e in logs if e["event"] in ("worker_exited", "worker_restarted")]

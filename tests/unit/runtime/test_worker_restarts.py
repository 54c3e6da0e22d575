"""The first process's care of its workers (`Workers`): a worker that keeps failing at start
is started again after doubling waits, every one is stopped with the service, and the first
process waits for each to report that it serves (or for its timeout) before serving itself."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import psutil
from structlog.testing import capture_logs
from support import eventually

from modelserve_runtime.config import ServerSettings, ServiceSettings
from modelserve_runtime.server import Workers

FAILS_AT_ONCE = [sys.executable, "-c", "raise SystemExit(3)"]
#: A worker that runs until it is signalled (SIGTERM ends it).
RUNS_ON = [sys.executable, "-c", "import signal; signal.pause()"]
#: A worker that reports that it serves, as a real one does once it is SERVING, and runs on.
REPORTS_READY = [
    sys.executable,
    "-c",
    "import os, signal; fd = int(os.environ['MODELSERVE_WORKER_READY_FD']);"
    " os.write(fd, b'1'); os.close(fd); signal.pause()",
]


def _workers(count: int, command: list[str], *, ready_timeout_s: float, **tuning: float) -> Workers:
    """`Workers` of `count` processes (the first included) running `command`."""
    settings = ServiceSettings(
        server=ServerSettings(
            workers=count, port=1, grace_period_s=0, workers_ready_timeout_s=ready_timeout_s
        )
    )
    return Workers(settings, None, command=command, **tuning)  # type: ignore[arg-type]


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


async def test_the_wait_ends_when_every_worker_reports_it_serves() -> None:
    workers = _workers(3, REPORTS_READY, ready_timeout_s=30, poll_s=0.01)
    with capture_logs() as logs:
        await workers.start_and_wait(_App())  # type: ignore[arg-type]
        await workers.stop()
    (ready,) = [e for e in logs if e["event"] == "workers_ready"]
    assert ready["count"] == 2
    assert ready["waited_s"] < 30
    assert not [e for e in logs if e["event"] == "workers_not_ready"]


async def test_workers_that_never_report_are_named_and_the_wait_ends() -> None:
    """A worker stuck before serving (or one failing at start, restarted meanwhile) does not
    hold the service back past `workers_ready_timeout_s`; it is named in a warning."""
    workers = _workers(3, RUNS_ON, ready_timeout_s=0.5, poll_s=0.01)
    with capture_logs() as logs:
        await workers.start_and_wait(_App())  # type: ignore[arg-type]
        await workers.stop()
    (missing,) = [e for e in logs if e["event"] == "workers_not_ready"]
    assert missing["workers"] == [1, 2]
    assert missing["timeout_s"] == 0.5
    assert not [e for e in logs if e["event"] == "workers_ready"]


async def test_a_worker_that_exits_before_serving_is_waited_for_once_restarted(
    tmp_path: Path,
) -> None:
    """Its pipe closes without a report; the first process starts it again and waits for
    the new process's report."""
    # Exits with 4 the first time (no marker yet), reports and runs on the second.
    command = [
        sys.executable,
        "-c",
        "import os, pathlib, signal, sys; p = pathlib.Path(sys.argv[1]); first = not p.exists();"
        " p.touch(); first and sys.exit(4);"
        " os.write(int(os.environ['MODELSERVE_WORKER_READY_FD']), b'1'); signal.pause()",
        str(tmp_path / "ran-once"),
    ]
    workers = _workers(2, command, ready_timeout_s=30, poll_s=0.01, restart_initial_s=0.05)
    with capture_logs() as logs:
        await workers.start_and_wait(_App())  # type: ignore[arg-type]
        await workers.stop()
    assert [e["code"] for e in logs if e["event"] == "worker_exited"] == [4]
    assert len([e for e in logs if e["event"] == "worker_restarted"]) == 1
    assert len([e for e in logs if e["event"] == "workers_ready"]) == 1
    assert not [e for e in logs if e["event"] == "workers_not_ready"]


async def test_no_worker_serves_before_every_worker_is_ready(tmp_path: Path) -> None:
    """A ready worker waits for the first process's word, which comes once all are ready:
    until then a client could reach only the processes already listening."""
    # Worker 2 is ready only once something is written to the `release` FIFO (its read
    # blocks until then); each worker, let serve, touches `served-<index>`.
    os.mkfifo(tmp_path / "release")
    command = [
        sys.executable,
        "-c",
        "import os, pathlib, signal, sys; d = pathlib.Path(sys.argv[1]);"
        " i = os.environ['MODELSERVE_WORKER_INDEX'];"
        " i == '2' and (d / 'release').read_text();"
        " os.write(int(os.environ['MODELSERVE_WORKER_READY_FD']), b'1');"
        " os.read(int(os.environ['MODELSERVE_WORKER_GO_FD']), 1) and (d / f'served-{i}').touch();"
        " signal.pause()",
        str(tmp_path),
    ]
    workers = _workers(3, command, ready_timeout_s=30, poll_s=0.01)
    waiting = asyncio.create_task(workers.start_and_wait(_App()))  # type: ignore[arg-type]
    try:
        await eventually(lambda: 1 in workers._ready, "worker 1 ready")
        assert not waiting.done()
        assert _served(tmp_path) == set(), "a worker served before worker 2 was ready"
        _release(tmp_path)
        await asyncio.wait_for(waiting, 30)
        await eventually(
            lambda: _served(tmp_path) == {"served-1", "served-2"}, "both workers let serve"
        )
    finally:
        await workers.stop()


def _served(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("served-*")}


def _release(directory: Path) -> None:
    (directory / "release").write_text("go")


async def test_a_worker_restarted_while_the_service_serves_serves_once_ready(
    tmp_path: Path,
) -> None:
    """Killed (the OOM killer, say) and started again: the new process is let serve as soon
    as it is ready, with nobody waiting for it."""
    # Each worker, let serve, touches `served-<pid>`.
    command = [
        sys.executable,
        "-c",
        "import os, pathlib, signal, sys; d = pathlib.Path(sys.argv[1]);"
        " os.write(int(os.environ['MODELSERVE_WORKER_READY_FD']), b'1');"
        " os.read(int(os.environ['MODELSERVE_WORKER_GO_FD']), 1) and (d / f'served-{os.getpid()}').touch();"
        " signal.pause()",
        str(tmp_path),
    ]
    workers = _workers(2, command, ready_timeout_s=30, poll_s=0.01, restart_initial_s=0.05)
    with capture_logs() as logs:
        try:
            await workers.start_and_wait(_App())  # type: ignore[arg-type]
            (first,) = next(e["pids"] for e in logs if e["event"] == "workers_started")
            await eventually(lambda: _served(tmp_path) == {f"served-{first}"}, "worker 1 serving")
            psutil.Process(first).kill()
            restarted = lambda: [e for e in logs if e["event"] == "worker_restarted"]  # noqa: E731
            await eventually(lambda: len(restarted()) == 1, "worker 1 started again")
            second = restarted()[0]["pid"]
            await eventually(
                lambda: _served(tmp_path) == {f"served-{first}", f"served-{second}"},
                "the new worker 1 serving",
            )
        finally:
            await workers.stop()

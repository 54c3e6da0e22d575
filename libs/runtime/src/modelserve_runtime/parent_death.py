"""Child processes that end with the process that started them, on Linux even when it is
killed with SIGKILL (the OOM killer, a supervisor that kills only the main process), so that
none is left holding ports, memory or a model after it (`prctl(PR_SET_PDEATHSIG)`).

Linux sends the signal when the *thread* that started the child ends, so start children
from a thread that lives as long as the process: the event loop's. No `preexec_fn` either:
a process running gRPC's threads can deadlock between fork and exec on a lock one of them
held, so the request is made after the fork by the child itself, in Python, before it
becomes the real program."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1

_EXEC = """
import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]))  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: the child outlives a parent that is killed
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the parent died before the request took hold
os.execv(sys.argv[3], sys.argv[3:])
"""


def ask_to_die_with_parent(parent: int, signum: signal.Signals = signal.SIGTERM) -> bool:
    """In a child: asks Linux for `signum` when its parent dies; False when `parent` is
    already gone (the caller should end at once)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum))
    return os.getppid() == parent


def dying_with_this_process(
    argv: Sequence[str], signum: signal.Signals = signal.SIGTERM
) -> list[str]:
    """`argv` (its program a path) to run through a few lines of Python that ask for
    `signum` when this process ends, then become the program (exec: same pid, same process
    group and session)."""
    return [sys.executable, "-I", "-S", "-c", _EXEC, str(os.getpid()), str(int(signum)), *argv]

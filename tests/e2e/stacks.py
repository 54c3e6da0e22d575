"""The whole stack as `make up` runs it, for the session's fixture and for modules that need
one of their own (their calls would change what the session's stack must keep)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from modelserve_cli.stack import Stack, StackOptions


@contextlib.asynccontextmanager
async def running_stack(run_dir: Path, **options: Any) -> AsyncIterator[Stack]:
    """Every service as its own process, the router calling the feature and inference
    services (test_direct_path covers the default path); fails (never skips) when one cannot
    start. `options` go to StackOptions."""
    stack = Stack(
        StackOptions(
            run_dir=run_dir,
            env={
                "MODELSERVE_ROUTER_FEATURE_READER": "service",
                "MODELSERVE_ROUTER_MODEL_RUNNER": "service",
            },
            **options,
        )
    )
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()

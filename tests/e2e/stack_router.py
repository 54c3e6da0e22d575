"""A router run in the test process against the e2e stack: the settings every e2e router test
starts from (the default direct path to Redis and Triton)."""

from __future__ import annotations

from typing import Any

from modelserve_cli.stack import Stack
from modelserve_router.config import RouterSettings


def stack_router_settings(stack: Stack, stream: str, **overrides: Any) -> RouterSettings:
    """A router on `stack`'s services and Redis, logging to `stream`, with `overrides`."""
    values: dict[str, Any] = {
        "registry_target": stack.targets["registry"],
        "inference_target": stack.targets["inference"],
        "feature_target": stack.targets["feature"],
        "redis_url": stack.redis.url,
        "prediction_stream": stream,
        "watch_backoff_max_s": 0.2,
    }
    values.update(overrides)
    return RouterSettings.model_validate(values)

"""Hybrid lookup: a prediction that a batch job precomputed for the request's entity answers
instead of the model while it is fresh and was made by the version the request is routed to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy.typing as npt
import redis.asyncio as redis
import structlog
from prometheus_client import Counter
from redis.exceptions import RedisClusterException

from modelserve_router.routing import HybridLookup
from modelserve_runtime.precomputed import read_precomputed
from modelserve_runtime.redis_connect import RedisClient
from modelserve_triton.model_config import conform_outputs

log = structlog.get_logger()

PRECOMPUTED_LOOKUPS = Counter(
    "modelserve_router_precomputed_total",
    "Hybrid lookups by endpoint and result: hit (answered without the model); no_entity, "
    "missing, stale, other_version (made by a version the request is not routed to), "
    "unusable (does not decode, or lacks an output) and unavailable (Redis failed) go online.",
    ["endpoint", "result"],
)


class PrecomputedLookup:
    """Reads the precomputed prediction of a request's entity (one GET on the router's Redis
    client) and judges whether it may answer."""

    def __init__(
        self, client: RedisClient, *, timeout_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._clock = clock

    async def answer(
        self,
        endpoint: str,
        lookup: HybridLookup,
        entities: Mapping[str, str],
        model_version: str,
        output_shapes: Mapping[str, Sequence[int]],
    ) -> dict[str, npt.NDArray[Any]] | None:
        """The outputs stored for the request's entity of `lookup.entity_type`, shaped as the
        version's signature says, when they are at most `lookup.max_age_s` old and were made
        by `model_version`; None (and the model answers) otherwise, also when Redis fails or
        what is stored is unusable: the lookup only ever saves a model call."""
        entity_id = entities.get(lookup.entity_type)
        if not entity_id:
            PRECOMPUTED_LOOKUPS.labels(endpoint, "no_entity").inc()
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await read_precomputed(
                    self._client, endpoint, lookup.entity_type, entity_id
                )
        except (redis.RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            PRECOMPUTED_LOOKUPS.labels(endpoint, "unavailable").inc()
            log.warning("precomputed_unavailable", error=str(exc) or type(exc).__name__)
            return None
        except ValueError as exc:
            PRECOMPUTED_LOOKUPS.labels(endpoint, "unusable").inc()
            log.warning("precomputed_unusable", entity_id=entity_id, error=str(exc))
            return None
        if found is None:
            result = "missing"
        elif found.age_s(self._clock()) > lookup.max_age_s:
            result = "stale"
        elif found.model_version != model_version:
            result = "other_version"
        elif not output_shapes.keys() <= found.outputs.keys():
            result = "unusable"
            log.warning(
                "precomputed_unusable",
                entity_id=entity_id,
                error=f"outputs {sorted(found.outputs)} lack {sorted(output_shapes)}",
            )
        else:
            PRECOMPUTED_LOOKUPS.labels(endpoint, "hit").inc()
            return conform_outputs(
                {name: found.outputs[name] for name in output_shapes}, output_shapes
            )
        PRECOMPUTED_LOOKUPS.labels(endpoint, result).inc()
        return None

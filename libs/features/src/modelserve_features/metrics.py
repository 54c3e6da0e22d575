"""Prometheus metrics of online feature reads and writes (feature service and router alike)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

READS = Counter(
    "modelserve_feature_reads_total",
    "Online reads, counted once per view a read touches.",
    ["view"],
)
ENTITIES = Counter("modelserve_feature_entities_read_total", "Entities read, per view.", ["view"])
VALUES = Counter(
    "modelserve_feature_values_read_total",
    "Values read, by view and status (present, missing, expired, defaulted).",
    ["view", "status"],
)
WRITES = Counter(
    "modelserve_feature_values_written_total",
    "Values offered for writing, by view and outcome (written, stale: a newer value was kept).",
    ["view", "outcome"],
)
CACHE = Counter(
    "modelserve_feature_cache_total", "In-process cache lookups by result (hit, miss).", ["result"]
)
REDIS_LATENCY = Histogram(
    "modelserve_feature_redis_seconds",
    "Latency of the feature store's Redis round trips, by operation.",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

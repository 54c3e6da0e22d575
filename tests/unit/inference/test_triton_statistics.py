"""Reading Triton's statistics response (its JSON spelling) into per-version records."""

from __future__ import annotations

from modelserve_inference.triton_stats import VersionStatistics, parse_statistics


class TestParseStatistics:
    def test_counts_times_and_batch_sizes(self) -> None:
        """64-bit counts written as strings become numbers, nanoseconds become seconds."""
        stats = {
            "model_stats": [
                {
                    "name": "fraud",
                    "version": "2",
                    "inference_count": "12",
                    "execution_count": "3",
                    "inference_stats": {
                        "success": {"count": "5", "ns": "900"},
                        "queue": {"count": "5", "ns": "2000000000"},
                        "compute_infer": {"count": "3", "ns": "1500000000"},
                    },
                    "batch_stats": [
                        {"batch_size": "4", "compute_infer": {"count": "3", "ns": "10"}},
                        {"batch_size": "1", "compute_infer": {"count": "2", "ns": "10"}},
                    ],
                }
            ]
        }

        (parsed,) = parse_statistics(stats)

        assert parsed == VersionStatistics(
            model="fraud",
            version="2",
            requests=5,
            failures=0,
            inferences=12,
            executions=3,
            queue_seconds=2.0,
            compute_seconds={"input": 0.0, "infer": 1.5, "output": 0.0},
            batch_executions={4: 3, 1: 2},
        )

    def test_a_version_never_run_has_zeros(self) -> None:
        """Triton leaves zero counts out of its JSON; they read as zero."""
        (parsed,) = parse_statistics({"model_stats": [{"name": "fraud", "version": "1"}]})

        assert (parsed.requests, parsed.executions, parsed.queue_seconds) == (0, 0, 0.0)
        assert parsed.batch_executions == {}

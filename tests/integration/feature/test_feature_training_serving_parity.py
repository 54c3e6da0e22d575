"""Training and serving build the same feature vector for the same payment."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from modelserve_demo import fraud
from modelserve_features.online import FeatureWrite, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureRef
from modelserve_router.predict import assemble_row
from modelserve_router.sources import RedisFeatureReader


class TestTrainingServingParity:
    async def test_router_rows_equal_make_dataset_rows(self, redis_client: aioredis.Redis) -> None:
        """For 300 synthetic payments, the row the router assembles (stored features written
        to and read back from real Redis through its direct reader, request-time features
        from the request's facts) equals `fraud.make_dataset`'s training row bit for bit."""
        n, seed = 300, 11
        payments = fraud.make_payments(n, seed)
        training, _ = fraud.make_dataset(n, seed)
        store = OnlineStore(redis_client)
        await store.apply_view(fraud.feature_view())
        await store.write(
            [
                FeatureWrite(EntityKey(fraud.ENTITY_TYPE, f"p-{i}"), fraud.VIEW, p.customer)
                for i, p in enumerate(payments)
            ]
        )
        reader = RedisFeatureReader(OnlineStore(redis_client))
        refs = [FeatureRef.parse(r) for r in fraud.FEATURE_REFS if not r.startswith("request:")]
        types = await reader.entity_types(sorted({r.view for r in refs}))
        assert types == {fraud.VIEW: fraud.ENTITY_TYPE}

        rows = []
        for i, payment in enumerate(payments):
            stored = await reader.read({fraud.ENTITY_TYPE: f"p-{i}"}, refs)
            row, _, statuses = assemble_row(
                fraud.FEATURE_REFS, stored, {"amount": payment.amount}, payment.facts
            )
            assert set(statuses.values()) == {"present"}
            rows.append(row)
        serving = np.asarray(rows, dtype=np.float32)

        np.testing.assert_array_equal(serving, training)

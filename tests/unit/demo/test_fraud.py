"""Unit tests for the demo fraud model: its data, its training and its ONNX form."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelserve_demo.fraud import (
    ENTITY_TYPE,
    FEATURE_REFS,
    INPUT_SPEC,
    OUTPUT_SPECS,
    STORED_FEATURES,
    TrainedModel,
    demo_customers,
    feature_vector,
    make_dataset,
    request_feature_values,
    train,
)
from modelserve_features.request_time import RequestFacts, compute_request_features


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    """The demo model trained with seed 0."""
    return train(seed=0)


def _session(model: TrainedModel) -> ort.InferenceSession:
    return ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])


class TestMakeDataset:
    def test_same_seed_same_data(self) -> None:
        """The dataset is a function of its seed."""
        first_x, first_y = make_dataset(2_000, seed=3)
        second_x, second_y = make_dataset(2_000, seed=3)

        np.testing.assert_array_equal(first_x, second_x)
        np.testing.assert_array_equal(first_y, second_y)

    def test_other_seed_other_data(self) -> None:
        """Different seeds give different payments."""
        first_x, _ = make_dataset(500, seed=3)
        second_x, _ = make_dataset(500, seed=4)

        assert not np.array_equal(first_x, second_x)

    def test_rows_follow_feature_refs(self) -> None:
        """Rows are float32 vectors in FEATURE_REFS order with int64 labels."""
        features, labels = make_dataset(1_000, seed=5)

        assert features.shape == (1_000, len(FEATURE_REFS))
        assert features.dtype == np.float32
        assert labels.shape == (1_000,)
        assert labels.dtype == np.int64
        hours = features[:, FEATURE_REFS.index("request:hour_of_day")]
        assert set(np.unique(hours)) <= set(range(24))
        assert set(np.unique(features[:, FEATURE_REFS.index("request:is_mobile")])) == {0.0, 1.0}

    def test_fraud_rate_is_plausible(self) -> None:
        """Fraud is rare but present: between 1% and 30% of payments."""
        _, labels = make_dataset(20_000, seed=0)

        assert 0.01 < labels.mean() < 0.30

    def test_fraud_follows_the_rule(self) -> None:
        """Night payments far above the customer's average are much likelier to be fraud."""
        features, labels = make_dataset(20_000, seed=0)
        amount = features[:, FEATURE_REFS.index("request:amount")]
        average = features[:, FEATURE_REFS.index("customer:avg_amount_30d")]
        night = features[:, FEATURE_REFS.index("request:hour_of_day")] < 6
        risky = night & (amount > 3 * average)

        assert labels[risky].mean() > 5 * labels[~risky].mean()


class TestFeatures:
    def test_feature_refs_name_the_stored_features_first(self) -> None:
        """The model reads every stored customer feature, then the request features."""
        stored = tuple(f"{ENTITY_TYPE}:{name}" for name in STORED_FEATURES)

        assert FEATURE_REFS[: len(stored)] == stored
        assert all(ref.startswith("request:") for ref in FEATURE_REFS[len(stored) :])

    def test_request_features_come_from_the_shared_function(self) -> None:
        """Serving computes request features with the same function as training."""
        facts = RequestFacts(
            event_time=datetime(2024, 3, 9, 2, 30, tzinfo=UTC),
            user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile",
        )
        shared = compute_request_features(facts)

        values = request_feature_values(42.5, facts)

        assert values == {
            "request:amount": 42.5,
            "request:hour_of_day": shared["hour_of_day"],
            "request:day_of_week": shared["day_of_week"],
            "request:is_mobile": shared["is_mobile"],
        }

    def test_feature_vector_orders_by_feature_refs(self) -> None:
        """A row is built in FEATURE_REFS order whatever order the values come in."""
        values = {ref: float(index) for index, ref in enumerate(reversed(FEATURE_REFS))}

        row = feature_vector(values)

        assert row.dtype == np.float32
        assert row.tolist() == [values[ref] for ref in FEATURE_REFS]

    def test_feature_vector_names_missing_features(self) -> None:
        """A missing feature is an error that names it."""
        values = {ref: 1.0 for ref in FEATURE_REFS if ref != "request:amount"}

        with pytest.raises(KeyError, match="request:amount"):
            feature_vector(values)


class TestTrain:
    def test_onnx_matches_scikit_learn(self, model: TrainedModel) -> None:
        """On unseen payments ONNX Runtime gives the pipeline's probabilities to 1e-5."""
        features, _ = make_dataset(20_000, seed=101)

        labels, probabilities = _session(model).run(None, {"features": features})

        expected = model.predict_proba(features)
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(labels, expected.argmax(axis=1))

    def test_onnx_matches_scikit_learn_on_split_thresholds(self, model: TrainedModel) -> None:
        """Rows on and a few float32 steps around every split agree with the pipeline too."""
        scaler = model.pipeline.named_steps["scale"]
        classifier = model.pipeline.named_steps["classify"]
        base, _ = make_dataset(1, seed=103)
        rows = []
        for estimator in classifier.estimators_.ravel():
            tree = estimator.tree_
            for feature, threshold in zip(tree.feature, tree.threshold, strict=True):
                if feature < 0:  # a leaf
                    continue
                # The float32 values around the raw threshold; their scaled values land
                # on, below and above the threshold's float32 neighbours.
                value = np.float32(threshold * scaler.scale_[feature] + scaler.mean_[feature])
                for _ in range(8):
                    value = np.nextafter(value, np.float32(-np.inf))
                for _ in range(17):
                    row = base[0].copy()
                    row[feature] = value
                    rows.append(row)
                    value = np.nextafter(value, np.float32(np.inf))
        features = np.stack(rows)

        _, probabilities = _session(model).run(None, {"features": features})

        np.testing.assert_allclose(probabilities, model.predict_proba(features), rtol=0, atol=1e-5)

    def test_onnx_signature_is_exact(self, model: TrainedModel) -> None:
        """One FP32 [N, 8] input "features"; outputs "label" INT64 [N], "probabilities" FP32 [N, 2]."""
        graph = onnx.load_from_string(model.onnx_bytes).graph

        def signature(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[int]]]:
            return [
                (
                    value.name,
                    value.type.tensor_type.elem_type,
                    [dim.dim_value or -1 for dim in value.type.tensor_type.shape.dim],
                )
                for value in values
            ]

        assert signature(list(graph.input)) == [("features", onnx.TensorProto.FLOAT, [-1, 8])]
        assert signature(list(graph.output)) == [
            ("label", onnx.TensorProto.INT64, [-1]),
            ("probabilities", onnx.TensorProto.FLOAT, [-1, 2]),
        ]

    def test_specs_describe_the_onnx_model(self, model: TrainedModel) -> None:
        """The Triton tensor specs name the same tensors with the batch dimension first."""
        assert model.inputs == (INPUT_SPEC,)
        assert model.outputs == OUTPUT_SPECS
        assert [(s.name, s.datatype, s.shape) for s in (*model.inputs, *model.outputs)] == [
            ("features", "FP32", (-1, 8)),
            ("label", "INT64", (-1,)),
            ("probabilities", "FP32", (-1, 2)),
        ]
        assert model.feature_refs == FEATURE_REFS

    def test_model_separates_fraud(self, model: TrainedModel) -> None:
        """The model ranks fraud above legitimate payments far better than chance."""
        features, labels = make_dataset(20_000, seed=102)
        scores = model.predict_proba(features)[:, 1]

        fraud, legitimate = scores[labels == 1], scores[labels == 0]
        # Probability that a random fraud outscores a random legitimate payment (AUC).
        auc = (fraud[:, None] > legitimate[None, :]).mean()
        assert auc > 0.8

    def test_training_is_deterministic(self, model: TrainedModel) -> None:
        """The same seed trains the same model, byte for byte."""
        assert train(seed=0).onnx_bytes == model.onnx_bytes


class TestDemoCustomers:
    def test_customers_have_every_stored_feature(self) -> None:
        """Ids run c-1001, c-1002, ...; each customer has all stored features."""
        customers = demo_customers(5)

        assert list(customers) == ["c-1001", "c-1002", "c-1003", "c-1004", "c-1005"]
        for values in customers.values():
            assert tuple(values) == STORED_FEATURES
            assert values["account_age_days"] >= 1

    def test_customers_are_deterministic(self) -> None:
        """The same seed gives the same customers."""
        assert demo_customers(20, seed=1) == demo_customers(20, seed=1)
        assert demo_customers(20, seed=1) != demo_customers(20, seed=2)

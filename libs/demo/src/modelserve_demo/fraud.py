"""The demo card-fraud model: synthetic customers and payments, trained on the spot, as ONNX."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from modelserve_features.request_time import RequestFacts, compute_request_features
from modelserve_features.views import FeatureDtype, FeatureSpec, FeatureView
from modelserve_triton.model_config import TensorSpec

#: The entity whose stored features the model reads.
ENTITY_TYPE = "customer"

#: Features kept per customer in the online store.
STORED_FEATURES: tuple[str, ...] = (
    "avg_amount_30d",
    "account_age_days",
    "chargebacks_90d",
    "txn_count_24h",
)

#: The online view the model reads its stored features from (named like its entity type,
#: so the refs below read `customer:<feature>`).
VIEW = "customer"


def feature_view() -> FeatureView:
    """The demo's feature view: the customer's stored features, all doubles; the counts
    default to 0 for a customer with no history."""
    return FeatureView(
        name=VIEW,
        entity_type=ENTITY_TYPE,
        features=(
            FeatureSpec("avg_amount_30d", FeatureDtype.DOUBLE, description="Mean payment, 30 days"),
            FeatureSpec("account_age_days", FeatureDtype.DOUBLE, description="Days since sign-up"),
            FeatureSpec(
                "chargebacks_90d", FeatureDtype.DOUBLE, 0.0, "Chargebacks in the last 90 days"
            ),
            FeatureSpec("txn_count_24h", FeatureDtype.DOUBLE, 0.0, "Payments in the last 24 hours"),
        ),
        owner="demo",
        description="Card-fraud demo: what is known about each customer",
    )


#: The model's input vector, in order: ``<entity type or "request">:<feature>``.
FEATURE_REFS: tuple[str, ...] = (
    "customer:avg_amount_30d",
    "customer:account_age_days",
    "customer:chargebacks_90d",
    "customer:txn_count_24h",
    "request:amount",
    "request:hour_of_day",
    "request:day_of_week",
    "request:is_mobile",
)

#: The one input: a batch of feature vectors in FEATURE_REFS order.
INPUT_SPEC = TensorSpec("features", "FP32", (-1, len(FEATURE_REFS)))

#: The outputs: the predicted class (1 = fraud) and both class probabilities.
OUTPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec("label", "INT64", (-1,)),
    TensorSpec("probabilities", "FP32", (-1, 2)),
)

_USER_AGENTS: tuple[tuple[str, float], ...] = (
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0", 0.35),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari", 0.15),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148", 0.25),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/126.0 Mobile Safari/537.36", 0.2),
    ("okhttp/4.12.0", 0.05),
)
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TrainedModel:
    """A trained fraud model, as ONNX for serving and as the scikit-learn pipeline it came from."""

    onnx_bytes: bytes
    pipeline: Any
    """The fitted scikit-learn Pipeline (StandardScaler, GradientBoostingClassifier)."""
    feature_refs: tuple[str, ...] = FEATURE_REFS
    inputs: tuple[TensorSpec, ...] = (INPUT_SPEC,)
    outputs: tuple[TensorSpec, ...] = OUTPUT_SPECS

    def predict_proba(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Class probabilities from the scikit-learn pipeline, the reference for the ONNX model.

        Rows go in as float64: scikit-learn then scales in double as the ONNX model does.
        """
        return np.asarray(self.pipeline.predict_proba(features.astype(np.float64)))


def request_feature_values(amount: float, facts: RequestFacts) -> dict[str, float]:
    """The ``request:*`` features of one payment: its amount plus the shared request-time ones."""
    computed = compute_request_features(facts)
    return {
        "request:amount": float(amount),
        "request:hour_of_day": computed["hour_of_day"],
        "request:day_of_week": computed["day_of_week"],
        "request:is_mobile": computed["is_mobile"],
    }


def feature_vector(values: Mapping[str, float]) -> npt.NDArray[np.float32]:
    """Orders feature values, keyed by FEATURE_REFS entries, into one model input row."""
    missing = [ref for ref in FEATURE_REFS if ref not in values]
    if missing:
        raise KeyError(f"missing features: {', '.join(missing)}")
    return np.array([values[ref] for ref in FEATURE_REFS], dtype=np.float32)


def _customers(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """Stored features of n synthetic customers, columns in STORED_FEATURES order."""
    avg_amount = rng.lognormal(mean=3.6, sigma=0.8, size=n)
    account_age = np.minimum(rng.exponential(scale=700.0, size=n), 3650.0).round() + 1
    chargebacks = rng.poisson(lam=0.15, size=n)
    txn_count = rng.poisson(lam=3.0, size=n)
    return np.column_stack([avg_amount, account_age, chargebacks, txn_count]).astype(np.float64)


@dataclass(frozen=True)
class Payment:
    """One synthetic payment as the router sees it: the customer's stored features, the
    amount the caller sends, and the facts the request-time features come from."""

    customer: dict[str, float]
    amount: float
    facts: RequestFacts


def make_payments(n: int, seed: int) -> list[Payment]:
    """The payments behind `make_dataset(n, seed)`, row for row."""
    return _synthesize(n, seed)[0]


def training_row(payment: Payment) -> npt.NDArray[np.float32]:
    """The training-side feature vector of one payment, in FEATURE_REFS order."""
    values = {f"{ENTITY_TYPE}:{name}": value for name, value in payment.customer.items()}
    values.update(request_feature_values(payment.amount, payment.facts))
    return feature_vector(values)


def _synthesize(
    n: int, seed: int
) -> tuple[list[Payment], np.random.Generator, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Payments, the generator (to draw labels from next), stored features and amounts."""
    rng = np.random.default_rng(seed)
    stored = _customers(rng, n)
    avg_amount = stored[:, 0]
    amount = (avg_amount * rng.lognormal(mean=0.0, sigma=0.7, size=n)).round(2)
    # Payments cluster in the day; the seconds offset spreads them over one year.
    hours = rng.choice(24, size=n, p=_hour_weights())
    days = rng.integers(0, 365, size=n)
    seconds = rng.integers(0, 3600, size=n)
    agents = rng.choice(len(_USER_AGENTS), size=n, p=[weight for _, weight in _USER_AGENTS])
    payments = [
        Payment(
            customer={
                name: float(stored[row, column]) for column, name in enumerate(STORED_FEATURES)
            },
            amount=float(amount[row]),
            facts=RequestFacts(
                event_time=_EPOCH
                + timedelta(days=int(days[row]), hours=int(hours[row]), seconds=int(seconds[row])),
                user_agent=_USER_AGENTS[agents[row]][0],
            ),
        )
        for row in range(n)
    ]
    return payments, rng, stored, amount


def make_dataset(n: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Synthesizes n payments, one customer each: features in FEATURE_REFS order and is-fraud.

    Fraud is likelier when the amount is far above the customer's average, the account
    is young, it had chargebacks, the payment is at night or from a phone; the label is
    drawn from that probability, so the rule is learnable but noisy.
    """
    payments, rng, stored, amount = _synthesize(n, seed)
    avg_amount, account_age, chargebacks, txn_count = stored.T
    features = np.empty((n, len(FEATURE_REFS)), dtype=np.float32)
    for row, payment in enumerate(payments):
        features[row] = training_row(payment)

    hour_of_day = features[:, FEATURE_REFS.index("request:hour_of_day")]
    is_mobile = features[:, FEATURE_REFS.index("request:is_mobile")]
    logit = (
        -6.5
        + 3.0 * np.clip(np.log(amount / avg_amount), 0.0, None)
        + 2.0 * (account_age < 60)
        + 1.5 * chargebacks
        + 1.8 * (hour_of_day < 6)
        + 0.8 * is_mobile
        + 0.15 * np.maximum(txn_count - 5, 0)
        + rng.normal(0.0, 0.3, size=n)
    )
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return features, labels


def _hour_weights() -> npt.NDArray[np.float64]:
    weights: npt.NDArray[np.float64] = np.array([0.4] * 6 + [1.0] * 3 + [2.0] * 12 + [1.2] * 3)
    return weights / float(weights.sum())


def train(seed: int = 0, n: int = 10_000, *, shuffle_labels: bool = False) -> TrainedModel:
    """Trains the fraud model on synthetic data and converts it to ONNX.

    `shuffle_labels` trains on labels shuffled across rows: a deliberately useless model
    with the same signature, for regression tests and failed-rollout demos.

    The ONNX model computes what the pipeline computes on float64 rows, split for split:
    it scales in double as scikit-learn does, with the scaler's mean kept float32-exact
    because skl2onnx stores it as float32; skl2onnx itself moves each float64 split
    threshold to the float32 that sends every float32 value the same way.
    """
    features, labels = make_dataset(n, seed)
    if shuffle_labels:
        labels = np.random.default_rng(seed).permutation(labels)
    rows = features.astype(np.float64)
    scaler = StandardScaler().fit(rows)
    scaler.mean_ = scaler.mean_.astype(np.float32).astype(np.float64)
    classifier = GradientBoostingClassifier(
        n_estimators=50, max_depth=3, learning_rate=0.1, random_state=seed
    )
    classifier.fit(scaler.transform(rows), labels)
    pipeline = Pipeline([("scale", scaler), ("classify", classifier)])
    onnx_model = convert_sklearn(
        pipeline,
        initial_types=[(INPUT_SPEC.name, FloatTensorType([None, len(FEATURE_REFS)]))],
        # A fixed graph name (the default is a random uuid) keeps the bytes reproducible.
        name="modelserve_demo_fraud",
        options={
            # Scale in double, as scikit-learn does on float64 rows, then cast.
            id(scaler): {"div": "div_cast"},
            # Plain tensors, not a list of {class: probability} maps.
            id(classifier): {"zipmap": False},
        },
    )
    names = tuple(output.name for output in onnx_model.graph.output)
    expected = tuple(spec.name for spec in OUTPUT_SPECS)
    if names != expected:
        raise RuntimeError(f"skl2onnx named the outputs {names}, expected {expected}")
    return TrainedModel(onnx_bytes=onnx_model.SerializeToString(), pipeline=pipeline)


def demo_customers(n: int = 20, seed: int = 1) -> dict[str, dict[str, float]]:
    """Customer id ("c-1001", ...) to stored feature values, for seeding the online store."""
    stored = _customers(np.random.default_rng(seed), n)
    return {
        f"c-{1001 + index}": {
            name: round(float(stored[index, column]), 2)
            for column, name in enumerate(STORED_FEATURES)
        }
        for index in range(n)
    }

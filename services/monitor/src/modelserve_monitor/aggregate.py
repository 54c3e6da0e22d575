"""What one prediction record adds to a version's aggregate, and aggregates read back and merged.

An aggregate is a flat map of counters (a Redis hash): adding a record is a list of
increments, and merging windows is adding counters, because every histogram uses the
same fixed buckets (`histogram.bucket_of`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelserve.type.v1 import prediction_record_pb2, tensor_pb2
from modelserve_monitor.histogram import Histogram, bucket_of, subtract_counts

#: Separates the parts of a counter name (feature references may hold `:` or `/`).
SEP = "\x1f"

Increment = tuple[str, int | float]

#: The largest magnitude a counter adds: a prediction or feature value beyond it is added as
#: ±VALUE_LIMIT. Redis adds floats in long double, whose sums outgrow a Python float, and
#: predictions are also squared; bounded, no sum of any number of records reads back as
#: infinity. The histograms already put such values in their last bucket.
VALUE_LIMIT = 1e100


def _bounded(value: float) -> float:
    return max(-VALUE_LIMIT, min(VALUE_LIMIT, value))


@dataclass(frozen=True, slots=True)
class RecordContribution:
    """The increments one record adds: `core` to every aggregate, `detail` to windows and baseline.

    `request_id` is set for the answer a caller got (it joins outcomes and shadow copies);
    `shadow_request_id` is set instead for a shadow copy, which pairs with that answer.
    `label` is the predicted label that shadow agreement compares.
    """

    identity: str
    endpoint: str
    model_version: str
    request_id: str
    prediction: float | None
    core: list[Increment]
    detail: list[Increment]
    label: int | None = None
    shadow_request_id: str = ""


def _first_output(record: prediction_record_pb2.PredictionRecord) -> tuple[list[float], int]:
    """The first output's values and its values per row (the last dimension, at least 1)."""
    if not record.outputs:
        return [], 1
    tensor = record.outputs[0]
    contents = tensor.contents
    values: list[float]
    if tensor.datatype == tensor_pb2.DATA_TYPE_FP32:
        values = list(contents.fp32_contents)
    elif tensor.datatype == tensor_pb2.DATA_TYPE_FP64:
        values = list(contents.fp64_contents)
    elif tensor.datatype in (tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_INT64):
        values = [float(v) for v in contents.int_contents]
    elif tensor.datatype == tensor_pb2.DATA_TYPE_BOOL:
        values = [float(v) for v in contents.bool_contents]
    else:
        return [], 1
    per_row = tensor.shape[-1] if tensor.shape and tensor.shape[-1] > 0 else 1
    return values, per_row


def prediction_of(record: prediction_record_pb2.PredictionRecord) -> float | None:
    """The positive-class probability (two values per row), else the first output's first value.

    None without one, and for NaN or infinity, which the counters cannot add.
    """
    values, per_row = _first_output(record)
    if not values:
        return None
    value = values[1] if per_row == 2 and len(values) >= 2 else values[0]
    return _bounded(value) if math.isfinite(value) else None


def label_of(record: prediction_record_pb2.PredictionRecord) -> int | None:
    """The predicted label: the argmax of the first output's first row when it has three or
    more values per row, else the prediction thresholded at 0.5 (1 when at least 0.5), as
    RecordOutcome reads it; for two values per row that is the positive-class probability."""
    values, per_row = _first_output(record)
    if per_row >= 3 and len(values) >= per_row:
        row = values[:per_row]
        if all(math.isfinite(v) for v in row):
            return max(range(per_row), key=row.__getitem__)
        return None
    prediction = prediction_of(record)
    return None if prediction is None else int(prediction >= 0.5)


def contribution(
    record: prediction_record_pb2.PredictionRecord, entry_id: str
) -> RecordContribution:
    """The increments of a record; ValueError when it has no endpoint.

    A record is identified by endpoint, version and request id (a shadow copy of a request
    has its id but another version), or by its stream entry id when it has no request id.

    A request counts for the version it was routed to (`routed_version`; `model_version` in
    records from before it), so that a version whose requests the fallback chain answered
    shows them as degraded, as its canary gate needs. The outputs of such an answer are not
    its own (a fallback version's, a cached one, the declared defaults): a degraded record
    adds no prediction and no label for outcomes.
    """
    if not record.endpoint:
        raise ValueError("prediction record has no endpoint")
    version = record.routed_version or record.model_version
    core: list[Increment] = [("n", 1), (f"lat{SEP}{bucket_of(record.latency_us / 1000.0)}", 1)]
    core.append(("lat_sum", record.latency_us / 1000.0))
    if record.status == prediction_record_pb2.PREDICTION_STATUS_ERROR:
        core.append(("err", 1))
    if record.degraded:
        core.append(("deg", 1))
    detail: list[Increment] = []
    prediction = None if record.degraded else prediction_of(record)
    if prediction is not None:
        # Count, sum and sum of squares go into the totals too (A/B tests over them).
        core += [("p_n", 1), ("p_sum", prediction), ("p_sq", prediction * prediction)]
        detail.append((f"p{SEP}{bucket_of(prediction)}", 1))
    for name, value in record.features.items():
        prefix = f"f{SEP}{name}{SEP}"
        detail.append((prefix + "n", 1))
        kind = value.WhichOneof("kind")
        number = float(getattr(value, kind)) if kind in ("int64_value", "double_value") else 0.0
        if kind is None or not math.isfinite(number):
            # NaN and infinity mean "no value" here: the counters cannot add them.
            detail.append((prefix + "miss", 1))
        elif kind in ("int64_value", "double_value"):
            number = _bounded(number)
            detail += [(prefix + "vn", 1), (prefix + "sum", number)]
            detail.append((f"{prefix}h{SEP}{bucket_of(number)}", 1))
        elif kind == "string_value":
            detail.append((f"{prefix}c{SEP}{value.string_value}", 1))
        elif kind == "bool_value":
            detail.append((f"{prefix}c{SEP}{'true' if value.bool_value else 'false'}", 1))
        # Embeddings (float vectors) are counted as present; their distribution is not kept.
    request_id = record.request_id or f"entry:{entry_id}"
    return RecordContribution(
        identity=SEP.join((record.endpoint, version, request_id)),
        endpoint=record.endpoint,
        model_version=version,
        # A shadow copy shares its caller's request id; outcomes join the answer the caller
        # got, and the shadow copy pairs with that answer instead.
        request_id="" if record.shadow else record.request_id,
        prediction=prediction,
        core=core,
        detail=detail,
        label=None if record.degraded else label_of(record),
        shadow_request_id=record.request_id if record.shadow else "",
    )


@dataclass(slots=True)
class FeatureAggregate:
    """One feature's appearances, missing values, numeric histogram and category counts."""

    count: int = 0
    missing: int = 0
    values: Histogram = field(default_factory=Histogram.empty)
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def missing_rate(self) -> float:
        return self.missing / self.count if self.count else 0.0

    @property
    def categorical(self) -> bool:
        return bool(self.categories) and not self.values.total


@dataclass(slots=True)
class VersionAggregate:
    """A version's counters over some buckets, merged."""

    requests: int = 0
    errors: int = 0
    degraded: int = 0
    latency_ms: Histogram = field(default_factory=Histogram.empty)
    predictions: Histogram = field(default_factory=Histogram.empty)
    features: dict[str, FeatureAggregate] = field(default_factory=dict)
    prediction_square_sum: float = 0.0
    outcomes: int = 0
    labels: int = 0
    correct: int = 0
    values: int = 0
    value_sum: float = 0.0
    value_square_sum: float = 0.0
    absolute_error_sum: float = 0.0
    absolute_error_square_sum: float = 0.0
    pairs: int = 0
    compared_pairs: int = 0
    agreeing_pairs: int = 0
    pair_difference_sum: float = 0.0

    @property
    def failures(self) -> int:
        """Requests the version did not answer itself: failed, or answered by the fallback
        chain (degraded). A record is one or the other, never both."""
        return self.errors + self.degraded

    def add_hash(self, raw: Mapping[bytes, bytes]) -> None:
        """Adds the counters of one Redis hash (one bucket, the total, or the baseline)."""
        for raw_name, raw_value in raw.items():
            self._add(raw_name.decode(), float(raw_value))

    def subtract(self, earlier: VersionAggregate) -> None:
        """Takes away counters read earlier from the same (growing) hashes: what is left is
        what was counted in between. The inverse of adding `earlier`'s hashes: every count,
        sum and histogram bucket goes down by its amount."""
        for name in (*_COUNTS.values(), *_SUMS.values()):
            setattr(self, name, getattr(self, name) - getattr(earlier, name))
        self.latency_ms.subtract(earlier.latency_ms)
        self.predictions.subtract(earlier.predictions)
        for reference, before in earlier.features.items():
            feature = self.features.setdefault(reference, FeatureAggregate())
            feature.count -= before.count
            feature.missing -= before.missing
            feature.values.subtract(before.values)
            subtract_counts(feature.categories, before.categories)
            if feature == FeatureAggregate():
                del self.features[reference]

    def _add(self, name: str, value: float) -> None:
        # Counts are integers; a sum written before sums were bounded may read back as
        # infinity, which is kept as it is rather than failing every read of the window.
        count = int(value) if math.isfinite(value) else 0
        if name in _COUNTS:
            setattr(self, _COUNTS[name], getattr(self, _COUNTS[name]) + count)
        elif name in _SUMS:
            setattr(self, _SUMS[name], getattr(self, _SUMS[name]) + value)
        elif name == "lat_sum":
            self.latency_ms.sum += value
        elif name == "p_n":
            self.predictions.total += count
        elif name == "p_sum":
            self.predictions.sum += value
        else:
            self._add_part(name.split(SEP), value, count)

    def _add_part(self, parts: list[str], value: float, count: int) -> None:
        kind = parts[0]
        if kind == "lat":
            self.latency_ms.merge({int(parts[1]): count}, count, 0.0)
        elif kind == "p":
            self.predictions.merge({int(parts[1]): count}, 0, 0.0)
        elif kind == "f":
            # f SEP name SEP what [SEP bucket or category]; feature names never hold SEP.
            feature = self.features.setdefault(parts[1], FeatureAggregate())
            what = parts[2]
            if what == "n":
                feature.count += count
            elif what == "miss":
                feature.missing += count
            elif what == "vn":
                feature.values.total += count
            elif what == "sum":
                feature.values.sum += value
            elif what == "h":
                feature.values.merge({int(parts[3]): count}, 0, 0.0)
            elif what == "c":
                category = SEP.join(parts[3:])
                feature.categories[category] = feature.categories.get(category, 0) + count


#: Integer counters of a version's hash and the VersionAggregate field each adds to.
_COUNTS = {
    "n": "requests",
    "err": "errors",
    "deg": "degraded",
    "o_n": "outcomes",
    "o_ln": "labels",
    "o_lc": "correct",
    "o_vn": "values",
    "sh_n": "pairs",
    "sh_cmp": "compared_pairs",
    "sh_eq": "agreeing_pairs",
}
#: Float sums of a version's hash and the VersionAggregate field each adds to.
_SUMS = {
    "p_sq": "prediction_square_sum",
    "o_vsum": "value_sum",
    "o_vsq": "value_square_sum",
    "o_abs": "absolute_error_sum",
    "o_abs2": "absolute_error_square_sum",
    "sh_abs": "pair_difference_sum",
}

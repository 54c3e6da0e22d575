"""The monitor's figures in Redis: per-version counters in time buckets, updated atomically.

Layout (prefix `modelserve:monitor`):
- `:agg:{endpoint}\\x1f{version}:fine:{t}`: a hash of counters for 10 s starting at `t`
  (the 1 and 5 minute windows); `:coarse:{t}`: for 60 s (the 1 hour window); `:total`:
  requests, errors, degraded, latency, prediction sums, outcomes and shadow pairs since the
  version was first counted; `:baseline`: everything of the version's first
  `baseline_records` records; `:reference`: the feature counters of the model's validation
  set; `:baseline_source`: which of the two the version's feature baseline is, once decided.
- `:seen:{endpoint}\\x1f{version}\\x1f{request id}`: a record was counted (expires).
- `:pred:{request id}`: endpoint, version, prediction and label of the answer a caller got,
  for outcomes and shadow pairs (expires).
- `:shadow:{request id}`: shadow copies counted before the answer they pair with (expires).
- `:outcome:{request id}`: an outcome was recorded for the request (expires).
- `:endpoints`, `:versions:{endpoint}`: sets of what was seen.
- `:experiment:{endpoint}\\x1f{experiment id}`: an A/B experiment's arms and start time;
  `:agg:{endpoint}\\x1f{version}:experiment:{experiment id}`: the arm's `:total` counters
  when the experiment started, its zero point. Like the totals they do not expire.

A Lua script counts a batch of stream entries and acknowledges them in the same atomic
step, and skips a record whose `seen` key exists: a crash can neither count a batch
without acknowledging it nor acknowledge it without counting, and a record delivered or
appended twice is counted once, whichever process sees it, across restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis.asyncio as redis

from modelserve_monitor.aggregate import SEP, Increment, RecordContribution, VersionAggregate

PREFIX = "modelserve:monitor"
FINE_STEP_S = 10
COARSE_STEP_S = 60


class Window(Enum):
    """A sliding window ending now; TOTAL is everything counted so far."""

    TOTAL = 0
    ONE_MINUTE = 60
    FIVE_MINUTES = 300
    ONE_HOUR = 3600


# Shared by both counting scripts: the header arguments, and the shadow pairing. A
# request's answer keeps `:pred:{request id}` = endpoint, version, prediction, label; a
# shadow copy that arrives first waits in the hash `:shadow:{request id}` (field endpoint
# and version, value prediction and label) until the answer arrives. Whichever of the two
# is counted second makes the pair, so a pair is counted once, in either order.
_PRELUDE = """
local function incr(key, field, amount)
  if string.find(amount, '^%-?%d+$') then
    redis.call('HINCRBY', key, field, amount)
  else
    redis.call('HINCRBYFLOAT', key, field, amount)
  end
end
local group, prefix, sep = ARGV[1], ARGV[2], ARGV[3]
local fine_suffix, coarse_suffix = ARGV[4], ARGV[5]
local seen_ttl, fine_ttl, coarse_ttl, pred_ttl = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local baseline_n = tonumber(ARGV[10])
local function split(text)
  local parts, from = {}, 1
  while true do
    local at = string.find(text, sep, from, true)
    if not at then
      parts[#parts + 1] = string.sub(text, from)
      return parts
    end
    parts[#parts + 1] = string.sub(text, from, at - 1)
    from = at + 1
  end
end
local function count_pair(endpoint, shadow_version, answer, answer_label, copy, copy_label)
  local base = prefix .. ':agg:' .. endpoint .. sep .. shadow_version
  local fine, coarse = base .. fine_suffix, base .. coarse_suffix
  local a, c = tonumber(answer), tonumber(copy)
  for _, key in ipairs({fine, coarse, base .. ':total'}) do
    redis.call('HINCRBY', key, 'sh_n', 1)
    if a and c then
      redis.call('HINCRBY', key, 'sh_cmp', 1)
      if answer_label ~= '' and answer_label == copy_label then
        redis.call('HINCRBY', key, 'sh_eq', 1)
      end
      redis.call('HINCRBYFLOAT', key, 'sh_abs', string.format('%.17g', math.abs(a - c)))
    end
  end
  redis.call('EXPIRE', fine, fine_ttl)
  redis.call('EXPIRE', coarse, coarse_ttl)
end
local function remember_answer(endpoint, version, request_id, prediction, label)
  local key = prefix .. ':pred:' .. request_id
  redis.call('SET', key, endpoint .. sep .. version .. sep .. prediction .. sep .. label,
    'NX', 'EX', pred_ttl)
  local waiting = prefix .. ':shadow:' .. request_id
  local copies = redis.call('HGETALL', waiting)
  if #copies == 0 then return end
  local answer = split(redis.call('GET', key))
  for j = 1, #copies, 2 do
    local who, what = split(copies[j]), split(copies[j + 1])
    if who[1] == answer[1] then
      count_pair(who[1], who[2], answer[3], answer[4] or '', what[1], what[2])
    end
  end
  redis.call('DEL', waiting)
end
local function pair_copy(endpoint, version, request_id, prediction, label)
  local stored = redis.call('GET', prefix .. ':pred:' .. request_id)
  if stored then
    local answer = split(stored)
    if answer[1] == endpoint then
      count_pair(endpoint, version, answer[3], answer[4] or '', prediction, label)
    end
    return
  end
  local waiting = prefix .. ':shadow:' .. request_id
  redis.call('HSET', waiting, endpoint .. sep .. version, prediction .. sep .. label)
  redis.call('EXPIRE', waiting, pred_ttl)
end
"""

_APPLY_BATCH = (
    _PRELUDE
    + """
local entries = tonumber(ARGV[11])
local i = 12
local counted = 0
local ids = {}
for _ = 1, entries do
  local entry_id, has_record = ARGV[i], ARGV[i + 1]
  i = i + 2
  ids[#ids + 1] = entry_id
  if has_record == '1' then
    local identity, endpoint, version = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local request_id, shadow_of = ARGV[i + 3], ARGV[i + 4]
    local prediction, label = ARGV[i + 5], ARGV[i + 6]
    local n_core, n_detail = tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8])
    i = i + 9
    if redis.call('SET', prefix .. ':seen:' .. identity, '1', 'NX', 'EX', seen_ttl) then
      counted = counted + 1
      local base = prefix .. ':agg:' .. endpoint .. sep .. version
      local total, baseline = base .. ':total', base .. ':baseline'
      local fine, coarse = base .. fine_suffix, base .. coarse_suffix
      local in_baseline = tonumber(redis.call('HGET', total, 'n') or '0') < baseline_n
      redis.call('SADD', prefix .. ':endpoints', endpoint)
      redis.call('SADD', prefix .. ':versions:' .. endpoint, version)
      for c = 0, n_core - 1 do
        local field, amount = ARGV[i + 2 * c], ARGV[i + 2 * c + 1]
        incr(fine, field, amount)
        incr(coarse, field, amount)
        incr(total, field, amount)
        if in_baseline then incr(baseline, field, amount) end
      end
      for d = n_core, n_core + n_detail - 1 do
        local field, amount = ARGV[i + 2 * d], ARGV[i + 2 * d + 1]
        incr(fine, field, amount)
        incr(coarse, field, amount)
        if in_baseline then incr(baseline, field, amount) end
      end
      redis.call('EXPIRE', fine, fine_ttl)
      redis.call('EXPIRE', coarse, coarse_ttl)
      if request_id ~= '' then
        remember_answer(endpoint, version, request_id, prediction, label)
      elseif shadow_of ~= '' then
        pair_copy(endpoint, version, shadow_of, prediction, label)
      end
    end
    i = i + 2 * (n_core + n_detail)
  end
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
end
return counted
"""
)

# The fast path: the batch's increments summed per version in Python, applied once. It
# writes nothing and answers -1 when a record was seen before or a version's baseline
# would fill up within the batch; the caller then uses _APPLY_BATCH, record by record.
# Every answer of the batch is remembered before any shadow copy of it is paired.
_APPLY_MERGED = (
    _PRELUDE
    + """
local n_ids = tonumber(ARGV[11])
local i = 12
local ids = {}
for k = 1, n_ids do ids[k] = ARGV[i + k - 1] end
i = i + n_ids
local versions = {}
local n_versions = tonumber(ARGV[i])
i = i + 1
for v = 1, n_versions do
  local g = {endpoint = ARGV[i], version = ARGV[i + 1], records = tonumber(ARGV[i + 2])}
  i = i + 3
  g.base = prefix .. ':agg:' .. g.endpoint .. sep .. g.version
  g.identities = {}
  for k = 1, g.records do
    local identity = ARGV[i + k - 1]
    if redis.call('EXISTS', prefix .. ':seen:' .. identity) == 1 then return -1 end
    g.identities[k] = identity
  end
  i = i + g.records
  local before = tonumber(redis.call('HGET', g.base .. ':total', 'n') or '0')
  if before < baseline_n and before + g.records > baseline_n then return -1 end
  g.in_baseline = before < baseline_n
  g.preds_at, g.n_preds = i, tonumber(ARGV[i])
  i = i + 1 + 3 * g.n_preds
  g.copies_at, g.n_copies = i, tonumber(ARGV[i])
  i = i + 1 + 3 * g.n_copies
  g.ops_at, g.n_core, g.n_detail = i + 2, tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2 + 2 * (g.n_core + g.n_detail)
  versions[v] = g
end
local counted = 0
for _, g in ipairs(versions) do
  for _, identity in ipairs(g.identities) do
    redis.call('SET', prefix .. ':seen:' .. identity, '1', 'EX', seen_ttl)
  end
  counted = counted + g.records
  redis.call('SADD', prefix .. ':endpoints', g.endpoint)
  redis.call('SADD', prefix .. ':versions:' .. g.endpoint, g.version)
  local total, baseline = g.base .. ':total', g.base .. ':baseline'
  local fine, coarse = g.base .. fine_suffix, g.base .. coarse_suffix
  for c = 0, g.n_core + g.n_detail - 1 do
    local field, amount = ARGV[g.ops_at + 2 * c], ARGV[g.ops_at + 2 * c + 1]
    incr(fine, field, amount)
    incr(coarse, field, amount)
    if c < g.n_core then incr(total, field, amount) end
    if g.in_baseline then incr(baseline, field, amount) end
  end
  redis.call('EXPIRE', fine, fine_ttl)
  redis.call('EXPIRE', coarse, coarse_ttl)
  for k = 0, g.n_preds - 1 do
    local at = g.preds_at + 1 + 3 * k
    remember_answer(g.endpoint, g.version, ARGV[at], ARGV[at + 1], ARGV[at + 2])
  end
end
for _, g in ipairs(versions) do
  for k = 0, g.n_copies - 1 do
    local at = g.copies_at + 1 + 3 * k
    pair_copy(g.endpoint, g.version, ARGV[at], ARGV[at + 1], ARGV[at + 2])
  end
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
end
return counted
"""
)

_APPLY_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local ttls = {ARGV[2], ARGV[3], ARGV[4]}
for k = 2, 4 do
  local key = KEYS[k]
  local n = tonumber(ARGV[5])
  for j = 0, n - 1 do
    local field, amount = ARGV[6 + 2 * j], ARGV[7 + 2 * j]
    if string.find(amount, '^%-?%d+$') then
      redis.call('HINCRBY', key, field, amount)
    else
      redis.call('HINCRBYFLOAT', key, field, amount)
    end
  end
  if ttls[k - 1] ~= '0' then redis.call('EXPIRE', key, ttls[k - 1]) end
end
return 1
"""


# Records where a version's feature baseline comes from, once: the first decision stands
# (another replica, or this one before a restart, may have made it already).
_DECIDE_BASELINE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
local n = tonumber(ARGV[5])
local chunk = {}
for j = 0, n - 1 do
  chunk[#chunk + 1] = ARGV[6 + 2 * j]
  chunk[#chunk + 1] = ARGV[7 + 2 * j]
  if #chunk >= 1000 or j == n - 1 then
    redis.call('HSET', KEYS[2], unpack(chunk))
    chunk = {}
  end
end
redis.call('HSET', KEYS[1], 'source', ARGV[1], 'rows', ARGV[2], 'reason', ARGV[3],
  'decided_at', ARGV[4])
return 1
"""


# Records an A/B experiment's start once: every arm's `:total` counters are copied as its
# zero point and the experiment's arms and start time are kept, all in one atomic step, so
# no record is counted between two arms' copies. An experiment started before keeps its
# first start (another replica, or a caller retrying, may have started it).
# KEYS: the experiment, then per arm its total and its zero point; ARGV: arms, start time.
_START_EXPERIMENT = """
local arms = redis.call('HGET', KEYS[1], 'arms')
if arms then return {0, arms, redis.call('HGET', KEYS[1], 'started_at')} end
for k = 2, #KEYS, 2 do
  redis.call('DEL', KEYS[k + 1])
  local counters = redis.call('HGETALL', KEYS[k])
  for j = 1, #counters, 1000 do
    redis.call('HSET', KEYS[k + 1], unpack(counters, j, math.min(j + 999, #counters)))
  end
end
redis.call('HSET', KEYS[1], 'arms', ARGV[1], 'started_at', ARGV[2])
return {1, ARGV[1], ARGV[2]}
"""


@dataclass(frozen=True, slots=True)
class ExperimentStart:
    """Where an experiment starts: its arms, when, and whether this call started it."""

    arms: list[str]
    started_at: float
    started: bool


class BaselineSource(Enum):
    """Where a version's feature baseline comes from."""

    FIRST_RECORDS = "first_records"
    VALIDATION_SET = "validation_set"


@dataclass(frozen=True, slots=True)
class BaselineDecision:
    """Where a version's feature baseline comes from, why, and from how many validation rows."""

    source: BaselineSource
    reason: str
    rows: int = 0
    decided_at: float = 0.0


@dataclass(frozen=True, slots=True)
class StoreTtls:
    """How long the store keeps what expires, in seconds."""

    seen_s: int
    prediction_s: int
    fine_s: int = 10 * 60
    coarse_s: int = 2 * 3600


@dataclass(frozen=True, slots=True)
class LoggedPrediction:
    """What the log said about one request: where it went and what the model answered."""

    endpoint: str
    model_version: str
    prediction: float | None


def _amount(value: int | float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _version_base(endpoint: str, model_version: str) -> str:
    return f"{PREFIX}:agg:{endpoint}{SEP}{model_version}"


def _experiment_key(endpoint: str, experiment_id: str) -> str:
    return f"{PREFIX}:experiment:{endpoint}{SEP}{experiment_id}"


class AggregateStore:
    """Reads and updates the per-version counters; knows the key layout and the scripts."""

    def __init__(self, client: redis.Redis, *, ttls: StoreTtls, baseline_records: int) -> None:
        self._redis = client
        self._ttls = ttls
        self._baseline_records = baseline_records
        self._apply_batch: Any = client.register_script(_APPLY_BATCH)
        self._apply_once: Any = client.register_script(_APPLY_ONCE)
        self._apply_merged: Any = client.register_script(_APPLY_MERGED)
        self._decide_baseline: Any = client.register_script(_DECIDE_BASELINE)
        self._start_experiment: Any = client.register_script(_START_EXPERIMENT)

    async def count_and_ack(
        self,
        *,
        stream: str,
        group: str,
        entries: Sequence[tuple[bytes, RecordContribution | None]],
        now: float,
    ) -> int:
        """Counts the records not counted before and acknowledges every entry, atomically.

        An entry whose contribution is None (malformed) is only acknowledged. Returns how
        many records were counted. The batch's increments are first summed per version and
        applied once (a few hundred Redis operations per batch instead of per record); when
        that cannot be done exactly (a record was seen before, or a baseline fills up inside
        the batch) the batch is applied record by record.
        """
        header = self._header(group, now)
        merged = await self._apply_merged(keys=[stream], args=header + _merged_args(entries))
        if int(merged) >= 0:
            return int(merged)
        args = [*header, str(len(entries))]
        for entry_id, part in entries:
            args.append(entry_id)
            if part is None:
                args.append("0")
                continue
            args += ["1", part.identity, part.endpoint, part.model_version, part.request_id]
            args += [part.shadow_request_id, *_prediction_args(part)]
            args += [str(len(part.core)), str(len(part.detail))]
            for name, value in (*part.core, *part.detail):
                args += [name, _amount(value)]
        return int(await self._apply_batch(keys=[stream], args=args))

    def _header(self, group: str, now: float) -> list[str | bytes]:
        fine, coarse = _bucket_suffixes(now)
        return [
            group,
            PREFIX,
            SEP,
            fine,
            coarse,
            str(self._ttls.seen_s),
            str(self._ttls.fine_s),
            str(self._ttls.coarse_s),
            str(self._ttls.prediction_s),
            str(self._baseline_records),
        ]

    async def endpoint_versions(self, endpoint: str) -> list[str]:
        """The versions of an endpoint that records were counted for, ordered by name."""
        members = await self._redis.smembers(f"{PREFIX}:versions:{endpoint}")
        return sorted(_text(m) for m in members)

    async def endpoints(self) -> list[str]:
        """Every endpoint that records were counted for, ordered by name."""
        members = await self._redis.smembers(f"{PREFIX}:endpoints")
        return sorted(_text(m) for m in members)

    async def window(
        self, endpoint: str, model_version: str, window: Window, now: float
    ) -> VersionAggregate:
        """A version's counters over a window ending at `now`, merged."""
        base = _version_base(endpoint, model_version)
        if window is Window.TOTAL:
            keys = [f"{base}:total"]
        else:
            step, scale = (
                (COARSE_STEP_S, "coarse") if window is Window.ONE_HOUR else (FINE_STEP_S, "fine")
            )
            last = int(now // step) * step
            keys = [f"{base}:{scale}:{last - k * step}" for k in range(window.value // step)]
        return await self._merged(keys)

    async def start_experiment(
        self, endpoint: str, experiment_id: str, arms: Sequence[str], now: float
    ) -> ExperimentStart:
        """Records each arm's totals as the experiment's zero point, unless the experiment
        was started before: then its first start stands and is returned, arms and all."""
        keys = [_experiment_key(endpoint, experiment_id)]
        for arm in arms:
            base = _version_base(endpoint, arm)
            keys += [f"{base}:total", f"{base}:experiment:{experiment_id}"]
        started, stored_arms, started_at = await self._start_experiment(
            keys=keys, args=[SEP.join(arms), repr(now)]
        )
        return ExperimentStart(
            arms=_text(stored_arms).split(SEP),
            started_at=float(_text(started_at)),
            started=bool(int(started)),
        )

    async def experiment_arms(self, endpoint: str, experiment_id: str) -> list[str] | None:
        """The arms an experiment of the endpoint was started with; None if never started."""
        raw = await self._redis.hget(_experiment_key(endpoint, experiment_id), "arms")
        return None if raw is None else _text(raw).split(SEP)

    async def since_experiment_start(
        self, endpoint: str, model_version: str, experiment_id: str
    ) -> VersionAggregate:
        """A version's totals minus its zero point in the experiment: what was counted after
        the experiment started."""
        base = _version_base(endpoint, model_version)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{base}:total")
            pipe.hgetall(f"{base}:experiment:{experiment_id}")
            total_raw, zero_raw = await pipe.execute()
        total, zero = VersionAggregate(), VersionAggregate()
        total.add_hash(total_raw)
        zero.add_hash(zero_raw)
        total.subtract(zero)
        return total

    async def baseline(self, endpoint: str, model_version: str) -> VersionAggregate:
        """The counters of the version's first `baseline_records` records."""
        return await self._merged([f"{_version_base(endpoint, model_version)}:baseline"])

    @property
    def baseline_records(self) -> int:
        return self._baseline_records

    async def reference(self, endpoint: str, model_version: str) -> VersionAggregate:
        """The feature counters of the validation set the version's baseline came from."""
        return await self._merged([f"{_version_base(endpoint, model_version)}:reference"])

    async def baseline_decision(self, endpoint: str, model_version: str) -> BaselineDecision | None:
        """Where the version's feature baseline comes from; None while undecided."""
        raw = await self._redis.hgetall(f"{_version_base(endpoint, model_version)}:baseline_source")
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return BaselineDecision(
            source=BaselineSource(fields["source"]),
            reason=fields.get("reason", ""),
            rows=int(fields.get("rows", "0")),
            decided_at=float(fields.get("decided_at", "0")),
        )

    async def decide_baseline(
        self,
        endpoint: str,
        model_version: str,
        decision: BaselineDecision,
        reference: Sequence[Increment] = (),
    ) -> bool:
        """Records the decision (and the validation set's counters) unless one was recorded
        before; True when this call recorded it."""
        base = _version_base(endpoint, model_version)
        args: list[str] = [
            decision.source.value,
            str(decision.rows),
            decision.reason,
            repr(decision.decided_at),
            str(len(reference)),
        ]
        for name, value in reference:
            args += [name, _amount(value)]
        keys = [f"{base}:baseline_source", f"{base}:reference"]
        return bool(await self._decide_baseline(keys=keys, args=args))

    async def logged_prediction(self, request_id: str) -> LoggedPrediction | None:
        """What the log said about a request, while it is remembered; None otherwise."""
        raw = await self._redis.get(f"{PREFIX}:pred:{request_id}")
        if raw is None:
            return None
        # endpoint, version, prediction, then (since shadow pairing) the label
        endpoint, model_version, prediction = _text(raw).split(SEP)[:3]
        return LoggedPrediction(endpoint, model_version, float(prediction) if prediction else None)

    async def add_outcome(
        self, request_id: str, logged: LoggedPrediction, increments: list[Increment], now: float
    ) -> bool:
        """Adds an outcome's increments to the version's buckets once per request; False if seen."""
        fine, coarse = _bucket_suffixes(now)
        base = _version_base(logged.endpoint, logged.model_version)
        keys = [f"{PREFIX}:outcome:{request_id}", base + fine, base + coarse, f"{base}:total"]
        args = [str(self._ttls.prediction_s), str(self._ttls.fine_s), str(self._ttls.coarse_s), "0"]
        args.append(str(len(increments)))
        for name, value in increments:
            args += [name, _amount(value)]
        return bool(await self._apply_once(keys=keys, args=args))

    async def _merged(self, keys: list[str]) -> VersionAggregate:
        aggregate = VersionAggregate()
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            for raw in await pipe.execute():
                aggregate.add_hash(raw)
        return aggregate


@dataclass(slots=True)
class _VersionBatch:
    """The records of one version in a batch, their increments summed."""

    identities: list[str]
    predictions: list[tuple[str, str, str]]
    copies: list[tuple[str, str, str]]
    core: dict[str, int | float]
    detail: dict[str, int | float]


def _merged_args(entries: Sequence[tuple[bytes, RecordContribution | None]]) -> list[str | bytes]:
    """The arguments of _APPLY_MERGED: every entry id, then per version its summed increments.

    A record that appears twice in the batch is summed once (the second is a duplicate).
    """
    versions: dict[tuple[str, str], _VersionBatch] = {}
    seen: set[str] = set()
    for _, part in entries:
        if part is None or part.identity in seen:
            continue
        seen.add(part.identity)
        batch = versions.setdefault(
            (part.endpoint, part.model_version), _VersionBatch([], [], [], {}, {})
        )
        batch.identities.append(part.identity)
        if part.request_id:
            batch.predictions.append((part.request_id, *_prediction_args(part)))
        elif part.shadow_request_id:
            batch.copies.append((part.shadow_request_id, *_prediction_args(part)))
        for sums, increments in ((batch.core, part.core), (batch.detail, part.detail)):
            for name, value in increments:
                sums[name] = sums.get(name, 0) + value
    args: list[str | bytes] = [str(len(entries)), *(entry_id for entry_id, _ in entries)]
    args.append(str(len(versions)))
    for (endpoint, model_version), batch in versions.items():
        args += [endpoint, model_version, str(len(batch.identities)), *batch.identities]
        for answers in (batch.predictions, batch.copies):
            args.append(str(len(answers)))
            for answer in answers:
                args += answer
        args += [str(len(batch.core)), str(len(batch.detail))]
        for name, value in (*batch.core.items(), *batch.detail.items()):
            args += [name, _amount(value)]
    return args


def _prediction_args(part: RecordContribution) -> tuple[str, str]:
    """A record's prediction and label as script arguments; empty when it has none."""
    prediction = "" if part.prediction is None else repr(part.prediction)
    return prediction, "" if part.label is None else str(part.label)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bucket_suffixes(now: float) -> tuple[str, str]:
    fine = int(now // FINE_STEP_S) * FINE_STEP_S
    coarse = int(now // COARSE_STEP_S) * COARSE_STEP_S
    return f":fine:{fine}", f":coarse:{coarse}"

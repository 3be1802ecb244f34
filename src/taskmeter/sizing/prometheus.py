"""Per task type figures for sizing, read from a Prometheus server that scrapes workers.

Only the HTTP API (``/api/v1/query``) is used. Every figure is exact, like the one
:func:`~taskmeter.sizing.stats.stats_from_reports` computes from the ledger, except
quantiles (within histogram bucket resolution):

* PromQL's ``increase()`` extrapolates to the edges of its window, so it is not used.
  Each query is a range-vector selector (``metric{...}[600000ms]``) evaluated at one
  instant, which returns the raw samples of the window; the increase of every series
  is computed here (:func:`counter_increase`) and summed over series (workers, pods).
* Maxima are the largest raw sample of the ``*_max`` gauges in the window.
* Quantiles interpolate linearly within a bucket, as ``histogram_quantile`` does.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import re
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskmeter.measure.report import STATES
from taskmeter.sizing.stats import TaskStats

__all__ = [
    "SourceError",
    "bucket_quantile",
    "counter_increase",
    "stats_from_prometheus",
]


class SourceError(RuntimeError):
    """Prometheus could not be read: unreachable, an error answer, or no usable data."""


Sample = tuple[float, float]  # (epoch seconds, value)


@dataclass(frozen=True)
class _Series:
    labels: dict[str, str]
    samples: list[Sample]

    def key(self, by: Sequence[str]) -> tuple[str, ...]:
        return tuple(self.labels.get(label, "") for label in by)


# -- the arithmetic ------------------------------------------------------------------------
def median_interval(samples: Sequence[Sample]) -> float | None:
    """Median spacing of the samples' timestamps (the scrape interval), None if < 2."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    return statistics.median(gaps) if gaps else None


def counter_increase(
    samples: Sequence[Sample],
    window_start: float,
    interval: float | None = None,
    restarts: Sequence[float] = (),
) -> float:
    """Exact increase of one counter series over a window, from its raw samples.

    A drop between consecutive samples is a counter reset (the process restarted and
    counted from 0), so the value after it is added whole. A series whose first sample
    comes later than ``window_start`` plus two scrape intervals (``interval``; the
    samples' own median spacing when None) was born inside the window and counted from
    0, so its first value is added too; otherwise counting starts at the first sample.
    With no interval known at all (a single sample and no ``interval``), a sample later
    than ``window_start`` counts as born. ``restarts``: times at which the process
    exporting the series is known to have restarted (its process_start_time_seconds
    changed); the first sample after one is a reset even when its value did not drop
    (the new process counted past the old value before its first scrape).
    """
    if not samples:
        return 0.0
    if interval is None:
        interval = median_interval(samples)
    first_t, first_v = samples[0]
    born = first_t > window_start + 2 * interval if interval is not None else first_t > window_start
    # Sum (end - base) per run between resets: fewer roundings than summing every delta.
    total = 0.0
    base = 0.0 if born else first_v
    prev_t, prev = first_t, first_v
    for t, value in samples[1:]:
        restarted = any(prev_t < r <= t for r in restarts)
        if value < prev or restarted:  # reset: the run ended at prev, the next began at 0
            total += prev - base
            base = 0.0
        prev_t, prev = t, value
    return total + (prev - base)


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``q``-quantile (0..1) from cumulative bucket counts ``{upper bound: count}``, as
    PromQL's ``histogram_quantile`` computes it: linear interpolation within the bucket
    where the rank falls, 0 as the lower bound of the first bucket, the largest finite
    bound when the rank falls in the +Inf bucket. None without observations (or
    without a +Inf bucket)."""
    if math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    counts: list[float] = []
    for le in bounds:  # cumulative counts never decrease (PromQL repairs them the same way)
        counts.append(max(buckets[le], counts[-1]) if counts else buckets[le])
    total = counts[-1]
    if total <= 0 or math.isnan(total):
        return None
    if len(bounds) < 2:
        return None
    rank = q * total
    b = next((i for i, c in enumerate(counts[:-1]) if c >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count) if count > 0 else end


def _target(series: _Series) -> tuple[str, str]:
    return series.labels.get("job", ""), series.labels.get("instance", "")


def restart_times(start_times: Iterable[_Series]) -> dict[tuple[str, str], list[float]]:
    """Per scrape target, the sample times at which process_start_time_seconds changed:
    the worker restarted between that sample and the one before."""
    out: dict[tuple[str, str], list[float]] = {}
    for series in start_times:
        times = [b[0] for a, b in itertools.pairwise(series.samples) if b[1] != a[1]]
        out.setdefault(_target(series), []).extend(times)
    return out


def _increases(
    series: Iterable[_Series],
    window_start: float,
    by: Sequence[str],
    fallback: float | None,
    restarts: Mapping[tuple[str, str], Sequence[float]] | None = None,
) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for s in series:
        interval = median_interval(s.samples) or fallback
        key = s.key(by)
        known = (restarts or {}).get(_target(s), ())
        out[key] = out.get(key, 0.0) + counter_increase(s.samples, window_start, interval, known)
    return out


def _maxima(series: Iterable[_Series], by: Sequence[str]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for s in series:
        key = s.key(by)
        for _, value in s.samples:
            if value > out.get(key, -math.inf):
                out[key] = value
    return out


def _overall_interval(series: Iterable[_Series]) -> float | None:
    gaps = [b[0] - a[0] for s in series for a, b in itertools.pairwise(s.samples)]
    return statistics.median(gaps) if gaps else None


# -- the HTTP API ------------------------------------------------------------------------
class _Client:
    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise SourceError(
                f"Prometheus URL {url!r} is not an http:// or https:// URL "
                "(e.g. http://prometheus:9090)"
            )
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if port is not None:
            netloc += f":{port}"
        base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.display = base  # never the credentials
        self.endpoint = base + "/api/v1/query"
        self.timeout_s = timeout_s
        self.headers = {"Accept": "application/json", "User-Agent": "taskmeter"}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def matrix(self, promql: str, at: float) -> list[_Series]:
        form = {"query": promql, "time": f"{at:.3f}", "timeout": f"{self.timeout_s:g}"}
        request = urllib.request.Request(
            self.endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers={**self.headers, "Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, promql) from exc
        except urllib.error.URLError as exc:
            raise SourceError(
                f"cannot reach Prometheus at {self.display}: {_reason(exc.reason)}"
            ) from exc
        except TimeoutError as exc:
            raise SourceError(
                f"Prometheus at {self.display} did not answer within {self.timeout_s:g} s "
                f"(query {_short(promql)}); try a shorter --since"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(
                f"cannot read from Prometheus at {self.display}: {_reason(exc)}"
            ) from exc
        body = self._json(raw)
        if body.get("status") != "success":
            raise SourceError(self._refusal(body, promql))
        data = body.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "matrix":
            kind = data.get("resultType") if isinstance(data, dict) else None
            raise SourceError(
                f"unexpected answer from Prometheus at {self.display} to {_short(promql)}: "
                f"expected a matrix, got {kind!r}"
            )
        return [self._series(item) for item in data.get("result") or []]

    def _json(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            head = raw[:80].decode(errors="replace")
            raise SourceError(
                f"{self.endpoint} did not answer with JSON (is {self.display} a Prometheus "
                f"server?): {head!r}"
            ) from exc
        if not isinstance(body, dict):
            raise SourceError(f"{self.endpoint} answered {type(body).__name__}, not a JSON object")
        return body

    def _http_error(self, exc: urllib.error.HTTPError, promql: str) -> SourceError:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            return SourceError(self._refusal(body, promql, exc.code))
        return SourceError(
            f"Prometheus at {self.display} answered HTTP {exc.code} {exc.reason} for "
            f"{self.endpoint} (is it a Prometheus server, and the URL its base URL?)"
        )

    def _refusal(self, body: dict[str, Any], promql: str, code: int | None = None) -> str:
        kind = body.get("errorType") or "error"
        error = str(body.get("error") or body.get("status") or "no error message")
        http = f"HTTP {code}, " if code is not None else ""
        message = f"Prometheus at {self.display} refused {_short(promql)} ({http}{kind}): {error}"
        if "too many samples" in error:
            message += (
                "; the window holds more samples than the server loads in one query "
                "(its --query.max-samples): use a shorter --since"
            )
        elif kind == "timeout" or "timed out" in error:
            message += "; use a shorter --since"
        return message

    def _series(self, item: Any) -> _Series:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise SourceError(f"unexpected series in the answer of Prometheus at {self.display}")
        samples: list[Sample] = []
        for pair in item.get("values") or []:  # native histograms ("histograms") are not used
            try:
                ts, value = float(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError) as exc:
                raise SourceError(
                    f"unexpected sample {pair!r} from Prometheus at {self.display}"
                ) from exc
            if not math.isnan(value):
                samples.append((ts, value))
        samples.sort()
        return _Series({str(k): str(v) for k, v in item["metric"].items()}, samples)


def _short(promql: str, limit: int = 160) -> str:
    """A query as named in messages (a long task list cut short)."""
    return promql if len(promql) <= limit else promql[: limit - 5] + "…" + promql[-4:]


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


# -- PromQL --------------------------------------------------------------------------------
def _string(value: str) -> str:
    """A PromQL double-quoted string literal (Go escapes: JSON's are a subset)."""
    return json.dumps(value, ensure_ascii=False)


def _user_matchers(selector: str) -> str:
    text = selector.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return text.strip().strip(",").strip()


def _task_matcher(tasks: Sequence[str]) -> str:
    return f"task=~{_string('|'.join(re.escape(t) for t in dict.fromkeys(tasks)))}"


def _range_ms(since_s: float) -> str:
    return f"{max(1, round(since_s * 1000))}ms"


# -- the figures ---------------------------------------------------------------------------
_RUNS = "celery_task_runs_total"
_START = "process_start_time_seconds"
_TOOL_RUNS = "celery_task_tool_runs_total"
_WALL_SUM = "celery_task_wall_seconds_sum"
_WALL_SPLIT = "celery_task_wall_seconds_total"
_CPU = "celery_task_cpu_seconds_total"
_AVG_SUM = "celery_task_memory_avg_bytes_sum"
_AVG_COUNT = "celery_task_memory_avg_bytes_count"
_AVG_BUCKET = "celery_task_memory_avg_bytes_bucket"
_PEAK_MAX = "celery_task_memory_peak_bytes_max"
_FOOTPRINT_MAX = "celery_task_footprint_peak_bytes_max"
_FOOTPRINT_BUCKET = "celery_task_footprint_peak_bytes_bucket"


def stats_from_prometheus(
    url: str,
    *,
    since_s: float,
    tasks: Sequence[str] | None = None,
    selector: str = "",
    percentile: float | None = None,
    progress: Callable[[str], None] | None = None,
    timeout_s: float = 30,
    now: float | None = None,
) -> dict[str, TaskStats]:
    """Per task figures of the window ``(now - since_s, now]`` from Prometheus at ``url``.

    ``selector``: extra label matchers added to every query (``'job="celery",
    namespace="prod"'``); ``tasks``: only these task names (absent from the result when
    they have no data); ``percentile`` (0..1): also the quantiles of average memory.
    ``progress`` is called before each query. Returns ``{}`` when no task ran in the
    window. Raises :class:`SourceError` when Prometheus cannot be read.
    """
    if not since_s > 0 or not math.isfinite(since_s):
        raise ValueError(f"since_s must be a positive number of seconds, not {since_s!r}")
    if percentile is not None and not 0 <= percentile <= 1:
        raise ValueError(f"percentile must be within 0..1 (0.9 for p90), not {percentile!r}")
    if tasks is not None and not tasks:
        return {}
    client = _Client(url, timeout_s)
    at = time.time() if now is None else now
    window_start = at - since_s
    user = _user_matchers(selector)

    plan: list[tuple[str, str]] = [
        (_RUNS, ""),
        (_START, ""),  # restarts of the workers' main processes
        (_TOOL_RUNS, 'outcome="killed"'),  # SIGKILL: what the OOM killer sends
        (_WALL_SUM, ""),
        (_WALL_SPLIT, ""),
        (_CPU, ""),
        (_AVG_SUM, ""),
        (_AVG_COUNT, ""),
        (_PEAK_MAX, 'component="overhead"'),
        (_FOOTPRINT_MAX, ""),
        (_FOOTPRINT_BUCKET, ""),
    ]
    if percentile is not None:
        plan.append((_AVG_BUCKET, ""))

    def fetch(step: int, names: Sequence[str] | None) -> list[_Series]:
        name, extra = plan[step - 1]
        if progress is not None:
            progress(f"querying {name} ({step}/{len(plan)})")
        matchers = [_task_matcher(names) if names and name != _START else "", user, extra]
        selector = ",".join(m for m in matchers if m)
        return client.matrix(f"{name}{{{selector}}}[{_range_ms(since_s)}]", at)

    results = {_RUNS: fetch(1, tasks)}
    # Series with a single sample take the scrape interval seen across other series.
    fallback = _overall_interval(results[_RUNS])

    restarts: dict[tuple[str, str], list[float]] = {}

    def inc(name: str, *by: str) -> dict[tuple[str, ...], float]:
        interval = _overall_interval(results[name]) or fallback
        return _increases(results[name], window_start, ("task", *by), interval, restarts)

    if not any(v > 0 for series in results[_RUNS] for _, v in series.samples):
        return {}  # no task ran in the window
    results[_START] = fetch(2, None)
    restarts.update(restart_times(results[_START]))
    runs = inc(_RUNS, "state")
    by_task: dict[str, dict[str, int]] = {}
    for (task, state), n in sorted(runs.items(), key=lambda kv: _state_order(kv[0][1])):
        if task and round(n) > 0:
            by_task.setdefault(task, {})[state] = round(n)
    if not by_task:
        return {}  # no task ran in the window
    # The other queries only fetch the tasks that ran: every task name a worker knows
    # has (zero) series, and the sample budget of a query is better spent on real ones.
    active = sorted(by_task)
    for step in range(3, len(plan) + 1):
        results[plan[step - 1][0]] = fetch(step, active)

    signals = inc(_TOOL_RUNS)
    wall = inc(_WALL_SUM)
    wall_split = inc(_WALL_SPLIT, "component")
    cpu = inc(_CPU, "component")
    avg_sum = inc(_AVG_SUM, "component")
    avg_count = inc(_AVG_COUNT, "component")
    peak_max = _maxima(results[_PEAK_MAX], ("task",))
    footprint_max = _maxima(results[_FOOTPRINT_MAX], ("task",))
    footprint_buckets = _buckets(inc(_FOOTPRINT_BUCKET, "le"))
    avg_buckets = _buckets(inc(_AVG_BUCKET, "component", "le")) if percentile is not None else {}

    def mean(task: str, component: str) -> float:
        count = avg_count.get((task, component), 0.0)
        return avg_sum.get((task, component), 0.0) / count if count > 0 else 0.0

    def q(buckets: dict[tuple[str, ...], dict[float, float]], key: tuple[str, ...]) -> float | None:
        assert percentile is not None
        return bucket_quantile(percentile, buckets.get(key, {}))

    out: dict[str, TaskStats] = {}
    for task in sorted(by_task):
        states = by_task[task]
        has_tool = avg_count.get((task, "tool"), 0.0) > 0
        out[task] = TaskStats(
            task=task,
            runs=sum(states.values()),
            runs_by_state=states,
            kills=states.get("killed", 0) + round(signals.get((task,), 0.0)),
            wall_sum_s=wall.get((task,), 0.0),
            wall_overhead_sum_s=wall_split.get((task, "overhead"), 0.0),
            wall_tool_sum_s=wall_split.get((task, "tool"), 0.0),
            cpu_overhead_sum_s=cpu.get((task, "overhead"), 0.0),
            cpu_tool_sum_s=cpu.get((task, "tool"), 0.0),
            mem_overhead_avg_mean_bytes=mean(task, "overhead"),
            mem_tool_avg_mean_bytes=mean(task, "tool"),
            mem_overhead_avg_quantile_bytes=(
                None if percentile is None else q(avg_buckets, (task, "overhead")) or 0.0
            ),
            mem_tool_avg_quantile_bytes=(
                None if percentile is None or not has_tool else q(avg_buckets, (task, "tool"))
            ),
            overhead_peak_max_bytes=round(peak_max.get((task,), 0.0)),
            footprint_max_bytes=round(footprint_max.get((task,), 0.0)),
            footprint_median_bytes=bucket_quantile(0.5, footprint_buckets.get((task,), {})) or 0.0,
        )
    return out


def _state_order(state: str) -> tuple[int, str]:
    return (STATES.index(state), "") if state in STATES else (len(STATES), state)


def _buckets(
    increases: Mapping[tuple[str, ...], float],
) -> dict[tuple[str, ...], dict[float, float]]:
    """``{(task, ..., le): n}`` -> ``{(task, ...): {upper bound: n}}``."""
    out: dict[tuple[str, ...], dict[float, float]] = {}
    for key, n in increases.items():
        try:
            le = float(key[-1])
        except ValueError:
            continue
        out.setdefault(key[:-1], {})[le] = n
    return out


def parent_rss_from_prometheus(
    url: str, *, since_s: float, selector: str = "", timeout_s: float = 30, now: float | None = None
) -> int | None:
    """The largest RSS of a worker's main process in the window: the "parent" of sizing.

    Read from ``process_resident_memory_bytes`` of the targets that also serve
    taskmeter's metrics (so Prometheus' own or other exporters' processes never
    count). None when no such target exposed it.
    """
    client = _Client(url, timeout_s)
    at = time.time() if now is None else now
    user = _user_matchers(selector)
    window = _range_ms(since_s)
    workers = client.matrix(f"celery_task_inflight{{{user}}}[{window}]", at)
    targets = {(w.labels.get("job", ""), w.labels.get("instance", "")) for w in workers}
    rss = client.matrix(f"process_resident_memory_bytes{{{user}}}[{window}]", at)
    values = [
        value
        for series in rss
        if (series.labels.get("job", ""), series.labels.get("instance", "")) in targets
        for _, value in series.samples
    ]
    return int(max(values)) if values else None

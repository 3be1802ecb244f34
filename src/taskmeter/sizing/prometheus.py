"""Per task type figures for sizing, read from a Prometheus server that scrapes workers.

Only the HTTP query API (``/api/v1/query``) is used, so any Prometheus-compatible
server (Thanos Query, Mimir, Cortex, VictoriaMetrics) works. Two methods give the same
:class:`~taskmeter.sizing.stats.TaskStats` as
:func:`~taskmeter.sizing.stats.stats_from_reports` does from ledgers:

``server`` (any window, any fleet): every figure is aggregated *inside* Prometheus and
only per task type results travel (a few KB whatever the fleet and window)::

    counts, sums   sum by (task, ...) (increase(x[window]))
                   + sum by (task, ...) (min_over_time(x[window])
                       unless last_over_time(x[15m] offset window))
    maxima         max by (task, component) (max_over_time(x_max[window]))
    median         histogram_quantile(0.5, ...) of the per (task, le) bucket increases
                   (the same interpolation, done here on those few numbers)
    means          increase(x_sum[window]) / increase(x_count[window])

``increase()`` handles counter resets (worker restarts) itself. It extrapolates the
increase between a series' first and last sample in the window to the window's edges:
by at most ~1.1 scrape interval per edge for a series that spans the window, so the
relative error is below ~2 x scrape interval / window (60 s / 7 d: < 0.02 %), and never
below zero toward the start. It cannot see the first value of a series born inside the
window (a new pod, a histogram or counter created at its first observation such as
``state="killed"``): that value is added by the second query of each figure,
``min_over_time(x[window]) unless last_over_time(x[15m] offset window)`` (a series with
no sample in the 15 minutes before the window start is born; its smallest value is its
first unless it was also reset inside the window). Not ``unless x offset window``: one
failed scrape at the window start (a stale marker) would make a long-lived series look
born and add its whole history. A series silent for more than 15 minutes right before
the window (a worker down that long, then back with its old counts) still does.

``exact`` (short windows on few series): the raw samples of the window are fetched and
counted here (:func:`counter_increase`), with no extrapolation at all. ``auto`` (the
default) takes ``exact`` only when the window holds few samples (a short window on a
small fleet: a bounded transfer; at most an hour, with series alive at its end),
else ``server``.

NaN and infinite values in an answer are skipped (and counted in ``notes``). A query
that the server refuses as too heavy (``--query.max-samples``, Thanos/Mimir limits)
raises :class:`SourceError` naming that limit.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import re
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from taskmeter.measure.report import STATES
from taskmeter.sizing.stats import TaskStats

__all__ = [
    "METHODS",
    "SourceError",
    "WorkerPools",
    "bucket_quantile",
    "counter_increase",
    "parent_rss_from_prometheus",
    "stats_from_prometheus",
    "worker_pools_from_prometheus",
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
        self._lock = threading.Lock()  # method "server" sends queries from threads
        self.queries = 0  # sent so far
        self.received_bytes = 0  # answers' size, for the benchmarks
        self.skipped = 0  # NaN / infinite values left out of instant vectors
        self.headers = {"Accept": "application/json", "User-Agent": "taskmeter"}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def matrix(self, promql: str, at: float) -> list[_Series]:
        """Raw samples of a range-vector selector evaluated at ``at``."""
        return [self._series(item) for item in self._result(promql, at, "matrix")]

    def vector(self, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        """An instant vector: (labels, value) per series; NaN and infinite values are
        left out and counted in ``self.skipped``."""
        out: list[tuple[dict[str, str], float]] = []
        for item in self._result(promql, at, "vector"):
            if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
                raise SourceError(
                    f"unexpected series in the answer of Prometheus at {self.display}"
                )
            try:
                value = float(item["value"][1])
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise SourceError(
                    f"unexpected sample {item.get('value')!r} from Prometheus at {self.display}"
                ) from exc
            if not math.isfinite(value):
                with self._lock:
                    self.skipped += 1
                continue
            out.append(({str(k): str(v) for k, v in item["metric"].items()}, value))
        return out

    def _result(self, promql: str, at: float, kind: str) -> list[Any]:
        form = {"query": promql, "time": f"{at:.3f}", "timeout": f"{self.timeout_s:g}"}
        request = urllib.request.Request(
            self.endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers={**self.headers, "Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        with self._lock:
            self.queries += 1
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
        with self._lock:
            self.received_bytes += len(raw)
        body = self._json(raw)
        if body.get("status") != "success":
            raise SourceError(self._refusal(body, promql))
        data = body.get("data")
        if not isinstance(data, dict) or data.get("resultType") != kind:
            got = data.get("resultType") if isinstance(data, dict) else None
            raise SourceError(
                f"unexpected answer from Prometheus at {self.display} to {_short(promql)}: "
                f"expected a {kind}, got {got!r}"
            )
        result = data.get("result") or []
        if not isinstance(result, list):
            raise SourceError(f"unexpected answer from Prometheus at {self.display}: {result!r}")
        return result

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
        limit = _server_limit(error)
        if limit is not None:
            message += (
                f"; the query is too heavy for this server (its limit: {limit}): use a "
                "shorter --since, fewer task types (--task), or ask its operator to raise it"
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
            if math.isfinite(value):
                samples.append((ts, value))
            else:  # a stale marker never reaches the API; a NaN or Inf sample is bad data
                with self._lock:
                    self.skipped += 1
        samples.sort()
        return _Series({str(k): str(v) for k, v in item["metric"].items()}, samples)


_LIMITS = (
    ("too many samples", "--query.max-samples, the samples one query may load"),
    ("max-samples", "--query.max-samples, the samples one query may load"),
    (
        "maximum number of series",
        "the series one query may touch (e.g. Mimir's -querier.max-fetched-series-per-query)",
    ),
    (
        "max-fetched-series",
        "the series one query may touch (-querier.max-fetched-series-per-query)",
    ),
    (
        "max-fetched-chunk",
        "the chunks or bytes one query may fetch (-querier.max-fetched-chunks-"
        "per-query / -querier.max-fetched-chunk-bytes-per-query)",
    ),
    ("exceeded the maximum number of chunks", "the chunks one query may fetch"),
    ("query time range exceeds", "the time range one query may cover (max_query_length)"),
    ("max_query_length", "the time range one query may cover (max_query_length)"),
    ("exceeded", "a per-query resource limit"),
    ("limit:", "a per-query resource limit"),
)


def _server_limit(error: str) -> str | None:
    """The server limit an error message names (a query too heavy), or None."""
    low = error.lower()
    return next((what for pattern, what in _LIMITS if pattern in low), None)


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


def _selector(*matchers: str) -> str:
    return "{" + ",".join(m for m in matchers if m) + "}"


# -- the figures ---------------------------------------------------------------------------
_RUNS = "celery_task_runs_total"
_KILLS = "celery_task_kills_total"
_START = "process_start_time_seconds"
_TOOL_RUNS = "celery_task_tool_runs_total"
_WALL_SUM = "celery_task_wall_seconds_sum"
_WALL_SPLIT = "celery_task_component_wall_seconds_total"
_CPU = "celery_task_cpu_seconds_total"
_AVG_SUM = "celery_task_memory_avg_bytes_sum"
_AVG_COUNT = "celery_task_memory_avg_bytes_count"
_PEAK_MAX = "celery_task_memory_peak_bytes_max"
_FOOTPRINT_MAX = "celery_task_footprint_peak_bytes_max"
_FOOTPRINT_BUCKET = "celery_task_footprint_peak_bytes_bucket"
_QW_SUM = "celery_task_queue_wait_seconds_sum"
_QW_COUNT = "celery_task_queue_wait_seconds_count"
_WORKER_INFO = "taskmeter_worker_info"
_TOOL_KILLS = 'outcome=~"killed|oom"'  # SIGKILLed tools: by the OOM killer or not

Method = Literal["auto", "exact", "server"]
METHODS: tuple[Method, ...] = ("auto", "exact", "server")
# ``auto`` fetches raw samples only below this many (an upper bound: series x window
# seconds, i.e. a 1 s scrape): a few tens of MB of client memory at most.
EXACT_MAX_SAMPLES = 500_000
EXACT_MAX_WINDOW_S = 3600  # and only for windows up to an hour
SERVER_QUERIES = 24  # the queries of method "server" (for progress messages)
PARALLEL_QUERIES = 4  # sent at once by method "server"

Key = tuple[str, ...]
# A series with no sample this long before the window start was born inside it. Longer
# than a few failed scrapes (a stale marker is not a birth), shorter than a restart gap
# worth noticing.
BORN_LOOKBACK = "15m"


@dataclass
class _Figures:
    """The per task type sums, counts and maxima both methods compute."""

    runs: dict[Key, float]  # (task, state)
    kills: dict[Key, float]  # (task, cause)
    tool_kills: dict[Key, float]  # (task, outcome): SIGKILLed tools
    wall: dict[Key, float]  # (task,)
    wall_split: dict[Key, float]  # (task, component)
    cpu: dict[Key, float]
    avg_sum: dict[Key, float]
    avg_count: dict[Key, float]
    peak_max: dict[Key, float]  # (task, component)
    footprint_max: dict[Key, float]  # (task,)
    footprint_median: dict[Key, float]  # (task,)
    queue_wait_sum: dict[Key, float] = field(default_factory=dict)  # (task,)
    queue_wait_count: dict[Key, float] = field(default_factory=dict)


def _active(runs: Mapping[Key, float]) -> dict[str, dict[str, int]]:
    by_task: dict[str, dict[str, int]] = {}
    for (task, state), n in sorted(runs.items(), key=lambda kv: _state_order(kv[0][1])):
        if task and round(n) > 0:
            by_task.setdefault(task, {})[state] = round(n)
    return by_task


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
    method: Method = "auto",
    notes: list[str] | None = None,
    parallel: int = PARALLEL_QUERIES,
) -> dict[str, TaskStats]:
    """Per task figures of the window ``(now - since_s, now]`` from Prometheus at ``url``.

    ``selector``: extra label matchers added to every query (``'job="celery",
    namespace="prod"'``); ``tasks``: only these task names (absent from the result when
    they have no data). ``percentile`` is refused (:class:`SourceError`): the scrape
    keeps only the mean of per-task average memory (a summary), its quantiles need the
    ledger. ``method``: see the module docstring (``server`` sends up to ``parallel``
    queries at once). ``progress`` is called before each
    query; ``notes`` collects remarks (values skipped, the method used). Returns ``{}``
    when no task ran in the window. Raises :class:`SourceError` when Prometheus cannot
    be read.
    """
    if not since_s > 0 or not math.isfinite(since_s):
        raise ValueError(f"since_s must be a positive number of seconds, not {since_s!r}")
    if percentile is not None and not 0 <= percentile <= 1:
        raise ValueError(f"percentile must be within 0..1 (0.9 for p90), not {percentile!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if percentile is not None:
        raise SourceError(
            "--percentile needs every task's average memory, which only ledgers keep: the "
            "workers export its mean (celery_task_memory_avg_bytes is a summary); size from "
            "the mean (no --percentile) or from ledgers (--ledger)"
        )
    if tasks is not None and not tasks:
        return {}
    client = _Client(url, timeout_s)
    at = time.time() if now is None else now
    user = _user_matchers(selector)
    if method == "auto":
        method = "server"
        if since_s <= EXACT_MAX_WINDOW_S:
            # The series alive at the window's end (an instant count: cheap). None alive
            # (the workers stopped, or the window ends before the data): no estimate.
            if progress is not None:
                progress("counting the series in the window")
            count = "count(" + _selector('__name__=~"celery_task_.+"', user) + ")"
            n_series = sum(v for _, v in client.vector(count, at))
            if 0 < n_series * since_s <= EXACT_MAX_SAMPLES:
                method = "exact"
    if method == "exact":
        figures = _exact(client, at, since_s, tasks, user, progress)
    else:
        figures = _server(client, at, since_s, tasks, user, progress, parallel)
    if notes is not None:
        notes.append(
            "figures computed inside Prometheus (increase, max_over_time, histogram_quantile)"
            if method == "server"
            else "figures counted exactly from the raw samples of the window"
        )
        if client.skipped:
            notes.append(
                f"{client.skipped} NaN or infinite value(s) in Prometheus' answers skipped"
            )
    return {} if figures is None else _stats(figures)


def _stats(f: _Figures) -> dict[str, TaskStats]:
    by_task = _active(f.runs)

    def mean(task: str, component: str) -> float:
        count = f.avg_count.get((task, component), 0.0)
        return f.avg_sum.get((task, component), 0.0) / count if count > 0 else 0.0

    out: dict[str, TaskStats] = {}
    for task in sorted(by_task):
        states = by_task[task]
        causes = {
            cause: round(n) for (t, cause), n in sorted(f.kills.items()) if t == task and round(n)
        }
        tool_oom = round(f.tool_kills.get((task, "oom"), 0.0))
        tool_killed = round(f.tool_kills.get((task, "killed"), 0.0))
        out[task] = TaskStats(
            task=task,
            runs=sum(states.values()),
            runs_by_state=states,
            kills=states.get("killed", 0) + tool_killed + tool_oom,
            wall_sum_s=f.wall.get((task,), 0.0),
            wall_overhead_sum_s=f.wall_split.get((task, "overhead"), 0.0),
            wall_tool_sum_s=f.wall_split.get((task, "tool"), 0.0),
            cpu_overhead_sum_s=f.cpu.get((task, "overhead"), 0.0),
            cpu_tool_sum_s=f.cpu.get((task, "tool"), 0.0),
            mem_overhead_avg_mean_bytes=mean(task, "overhead"),
            mem_tool_avg_mean_bytes=mean(task, "tool"),
            mem_overhead_avg_quantile_bytes=None,
            mem_tool_avg_quantile_bytes=None,
            overhead_peak_max_bytes=round(f.peak_max.get((task, "overhead"), 0.0)),
            footprint_max_bytes=round(f.footprint_max.get((task,), 0.0)),
            footprint_median_bytes=f.footprint_median.get((task,), 0.0),
            kills_by_cause=causes,
            tool_oom_kills=tool_oom,
            tool_peak_max_bytes=round(f.peak_max.get((task, "tool"), 0.0)),
            queue_wait_sum_s=f.queue_wait_sum.get((task,), 0.0),
            queue_wait_runs=round(f.queue_wait_count.get((task,), 0.0)),
        )
    return out


# -- method "server": aggregated by Prometheus -------------------------------------------


def _server(
    client: _Client,
    at: float,
    since_s: float,
    tasks: Sequence[str] | None,
    user: str,
    progress: Callable[[str], None] | None,
    parallel: int = PARALLEL_QUERIES,
) -> _Figures | None:
    w = _range_ms(since_s)
    step = 0
    lock = threading.Lock()

    def ask(what: str, promql: str, by: Sequence[str]) -> dict[Key, float]:
        nonlocal step
        with lock:
            step += 1
            if progress is not None:
                progress(f"querying {what} ({step}/{SERVER_QUERIES})")
        out: dict[Key, float] = {}
        for labels, value in client.vector(promql, at):
            key = tuple(labels.get(b, "") for b in by)
            out[key] = out.get(key, 0.0) + value
        return out

    def increase(name: str, sel: str, *by: str) -> list[tuple[str, str, Sequence[str]]]:
        """sum of increase() and, apart, the first value of the series born inside the
        window (which increase() cannot see: it only has the samples of the window)."""
        grouping = ", ".join(by)
        return [
            (name, f"sum by ({grouping}) (increase({name}{sel}[{w}]))", by),
            (
                f"{name}, series born in the window",
                f"sum by ({grouping}) (min_over_time({name}{sel}[{w}]) "
                f"unless last_over_time({name}{sel}[{BORN_LOOKBACK}] offset {w}))",
                by,
            ),
        ]

    def maximum(name: str, sel: str, *by: str) -> tuple[str, str, Sequence[str]]:
        return name, f"max by ({', '.join(by)}) (max_over_time({name}{sel}[{w}]))", by

    def run(queries: Sequence[tuple[str, str, Sequence[str]]]) -> list[dict[Key, float]]:
        # Prometheus evaluates queries concurrently (--query.max-concurrency, 20 by
        # default): a few at once keep its cores busy.
        if parallel <= 1:
            return [ask(*q) for q in queries]
        with ThreadPoolExecutor(min(parallel, len(queries))) as pool:
            return list(pool.map(lambda q: ask(*q), queries))

    def added(inc: dict[Key, float], born: dict[Key, float]) -> dict[Key, float]:
        for key, value in born.items():
            inc[key] = inc.get(key, 0.0) + value
        return inc

    first = _selector(_task_matcher(tasks) if tasks else "", user)
    runs = added(*run(increase(_RUNS, first, "task", "state")))
    by_task = _active(runs)
    if not by_task:
        return None  # no task ran in the window
    # Only the tasks that ran: every task name a worker knows has (zero) series.
    sel = _selector(_task_matcher(sorted(by_task)), user)
    tool_sel = _selector(_task_matcher(sorted(by_task)), user, _TOOL_KILLS)
    counted = [
        (_FOOTPRINT_BUCKET, sel, ("task", "le")),  # the heaviest first
        (_KILLS, sel, ("task", "cause")),
        (_TOOL_RUNS, tool_sel, ("task", "outcome")),
        (_WALL_SUM, sel, ("task",)),
        (_WALL_SPLIT, sel, ("task", "component")),
        (_CPU, sel, ("task", "component")),
        (_AVG_SUM, sel, ("task", "component")),
        (_AVG_COUNT, sel, ("task", "component")),
        (_QW_SUM, sel, ("task",)),
        (_QW_COUNT, sel, ("task",)),
    ]
    queries = [q for name, s, by in counted for q in increase(name, s, *by)]
    queries.append(maximum(_PEAK_MAX, sel, "task", "component"))
    queries.append(maximum(_FOOTPRINT_MAX, sel, "task"))
    answers = run(queries)
    sums = {
        name: added(answers[2 * i], answers[2 * i + 1]) for i, (name, _, _) in enumerate(counted)
    }
    figures = _Figures(
        runs=runs,
        kills=sums[_KILLS],
        tool_kills=sums[_TOOL_RUNS],
        wall=sums[_WALL_SUM],
        wall_split=sums[_WALL_SPLIT],
        cpu=sums[_CPU],
        avg_sum=sums[_AVG_SUM],
        avg_count=sums[_AVG_COUNT],
        peak_max=answers[-2],
        footprint_max=answers[-1],
        footprint_median={},
        queue_wait_sum=sums[_QW_SUM],
        queue_wait_count=sums[_QW_COUNT],
    )
    # histogram_quantile's own interpolation (bucket_quantile), over the per (task, le)
    # increases: a few numbers per task type travel, and born series count too.
    figures.footprint_median.update(_medians(sums[_FOOTPRINT_BUCKET]))
    return figures


# -- method "exact": raw samples counted here ----------------------------------------------
def _exact(
    client: _Client,
    at: float,
    since_s: float,
    tasks: Sequence[str] | None,
    user: str,
    progress: Callable[[str], None] | None,
) -> _Figures | None:
    window_start = at - since_s
    plan: list[tuple[str, str]] = [
        (_RUNS, ""),
        (_START, ""),  # restarts of the workers' main processes
        (_KILLS, ""),
        (_TOOL_RUNS, _TOOL_KILLS),
        (_WALL_SUM, ""),
        (_WALL_SPLIT, ""),
        (_CPU, ""),
        (_AVG_SUM, ""),
        (_AVG_COUNT, ""),
        (_PEAK_MAX, ""),
        (_FOOTPRINT_MAX, ""),
        (_FOOTPRINT_BUCKET, ""),
        (_QW_SUM, ""),
        (_QW_COUNT, ""),
    ]

    def fetch(step: int, names: Sequence[str] | None) -> list[_Series]:
        name, extra = plan[step - 1]
        if progress is not None:
            progress(f"querying {name} ({step}/{len(plan)})")
        matchers = [_task_matcher(names) if names and name != _START else "", user, extra]
        return client.matrix(f"{name}{_selector(*matchers)}[{_range_ms(since_s)}]", at)

    results = {_RUNS: fetch(1, tasks)}
    # Series with a single sample take the scrape interval seen across other series.
    fallback = _overall_interval(results[_RUNS])
    restarts: dict[tuple[str, str], list[float]] = {}

    def inc(name: str, *by: str) -> dict[Key, float]:
        interval = _overall_interval(results[name]) or fallback
        return _increases(results[name], window_start, ("task", *by), interval, restarts)

    if not any(v > 0 for series in results[_RUNS] for _, v in series.samples):
        return None  # no task ran in the window
    results[_START] = fetch(2, None)
    restarts.update(restart_times(results[_START]))
    runs = inc(_RUNS, "state")
    by_task = _active(runs)
    if not by_task:
        return None
    active = sorted(by_task)
    for step in range(3, len(plan) + 1):
        results[plan[step - 1][0]] = fetch(step, active)
    medians = _medians(inc(_FOOTPRINT_BUCKET, "le"))
    return _Figures(
        runs=runs,
        kills=inc(_KILLS, "cause"),
        tool_kills=inc(_TOOL_RUNS, "outcome"),
        wall=inc(_WALL_SUM),
        wall_split=inc(_WALL_SPLIT, "component"),
        cpu=inc(_CPU, "component"),
        avg_sum=inc(_AVG_SUM, "component"),
        avg_count=inc(_AVG_COUNT, "component"),
        peak_max=_maxima(results[_PEAK_MAX], ("task", "component")),
        footprint_max=_maxima(results[_FOOTPRINT_MAX], ("task",)),
        footprint_median=medians,
        queue_wait_sum=inc(_QW_SUM),
        queue_wait_count=inc(_QW_COUNT),
    )


def _state_order(state: str) -> tuple[int, str]:
    return (STATES.index(state), "") if state in STATES else (len(STATES), state)


def _medians(bucket_increases: Mapping[Key, float]) -> dict[Key, float]:
    """``{(task, le): n}`` -> the median per task, interpolated as histogram_quantile."""
    out: dict[Key, float] = {}
    for key, buckets in _buckets(bucket_increases).items():
        median = bucket_quantile(0.5, buckets)
        if median is not None:
            out[key] = median
    return out


def _buckets(increases: Mapping[Key, float]) -> dict[Key, dict[float, float]]:
    """``{(task, ..., le): n}`` -> ``{(task, ...): {upper bound: n}}``."""
    out: dict[Key, dict[float, float]] = {}
    for key, n in increases.items():
        try:
            le = float(key[-1])
        except ValueError:
            continue
        out.setdefault(key[:-1], {})[le] = n
    return out


# -- the worker processes ------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPools:
    """The pools and concurrencies of the workers seen in the window (from
    ``taskmeter_worker_info{pool,concurrency}``): ``{pool: {concurrency: workers}}``."""

    pools: dict[str, dict[int, int]]

    @property
    def concurrency(self) -> int | None:
        values = [c for by in self.pools.values() for c in by]
        return max(values) if values else None

    def concurrency_of(self, model: str) -> int | None:
        """The largest concurrency of the workers whose pool sizes as ``model``."""
        from taskmeter.sizing.recommend import pool_model

        values = [c for pool, by in self.pools.items() if pool_model(pool) == model for c in by]
        return max(values) if values else None


def _ran(tasks: Sequence[str] | None, sel_user: str, w: str) -> str:
    """`` and on (job, instance) (...)`` keeping the targets that ran one of ``tasks``
    in the window ("" when no task filter): --task narrows the workers too."""
    if not tasks:
        return ""
    runs = f"{_RUNS}{_selector(_task_matcher(tasks), sel_user)}[{w}]"
    return f" and on (job, instance) (max by (job, instance) (max_over_time({runs})) > 0)"


def worker_pools_from_prometheus(
    url: str, *, since_s: float, selector: str = "", timeout_s: float = 30,
    now: float | None = None, tasks: Sequence[str] | None = None,
) -> WorkerPools:
    """Which pools (prefork, solo, threads, ...) and concurrencies the workers ran with
    in the window (only the workers that ran one of ``tasks``, when given); empty when
    they export no ``taskmeter_worker_info``."""
    client = _Client(url, timeout_s)
    at = time.time() if now is None else now
    user = _user_matchers(selector)
    w = _range_ms(since_s)
    promql = (
        f"count by (pool, concurrency) "
        f"(max_over_time({_WORKER_INFO}{_selector(user)}[{w}]){_ran(tasks, user, w)})"
    )
    pools: dict[str, dict[int, int]] = {}
    for labels, n in client.vector(promql, at):
        try:
            concurrency = int(labels.get("concurrency", ""))
        except ValueError:
            concurrency = 0
        by = pools.setdefault(labels.get("pool", "") or "unknown", {})
        by[concurrency] = by.get(concurrency, 0) + round(n)
    return WorkerPools(pools)


def parent_rss_from_prometheus(
    url: str, *, since_s: float, selector: str = "", timeout_s: float = 30,
    now: float | None = None, tasks: Sequence[str] | None = None,
) -> int | None:
    """The largest RSS of a worker's main process in the window: the "parent" of sizing.

    ``max(max_over_time(process_resident_memory_bytes[window]))`` over the targets that
    also serve taskmeter's metrics (so Prometheus' own or other exporters' processes
    never count), computed by Prometheus. None when no such target exposed it.
    """
    client = _Client(url, timeout_s)
    at = time.time() if now is None else now
    user = _user_matchers(selector)
    sel = _selector(user)
    w = _range_ms(since_s)
    promql = (
        f"max(max_over_time(process_resident_memory_bytes{sel}[{w}]) and on (job, instance) "
        f"(max_over_time({_WORKER_INFO}{sel}[{w}]) "
        f"or max_over_time(celery_task_inflight{sel}[{w}])){_ran(tasks, user, w)})"
    )
    values = [value for _, value in client.vector(promql, at)]
    return int(max(values)) if values else None

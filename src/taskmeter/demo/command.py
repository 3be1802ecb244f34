"""``taskmeter demo``: DivBase-style VCF tasks in a real, instrumented Celery worker.

Embedded defaults need no server: moto's S3 server on 127.0.0.1 holds the VCFs, kombu's
filesystem transport is the broker, a ``celery worker`` subprocess (prefork) runs the
tasks and serves its metrics endpoint, and its ledger (``TASKMETER_LEDGER``) is where
results are read (no result backend). At the end: a table per task type next to
"bcftools alone", the sizing recommendation and its Kustomize patch. Everything is shut
down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from taskmeter.format import bytes_h, seconds_h
from taskmeter.measure.report import TaskReport

LEDGER_NAME = "reports.jsonl"
METRICS_NAME = "metrics.txt"
SUMMARY_NAME = "summary.json"
PATCH_NAME = "resources.yaml"
REPORT_NAME = "report.html"
WORKER_LOG_NAME = "worker.log"
DEFAULT_OUT = Path("taskmeter-demo")
TASKS_PER_KIND = 2
STALL_S = 300.0  # no task ended for this long: stop with the worker's log


class DemoError(RuntimeError):
    """Something the user must fix before the demo can run (it says what)."""


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@dataclass(frozen=True)
class Config:
    workdir: Path  # inputs, broker and S3 scratch (temporary unless --workdir)
    outdir: Path  # what the demo prints: ledger, metrics, summary, patch, report, log
    grid: tuple[tuple[int, int], ...]
    vcfs: tuple[Path, ...]
    broker: str | None
    s3_endpoint: str | None
    bucket: str
    prometheus: str | None
    tasks: int | None
    concurrency: int
    keep_running: bool
    metrics_port: int | None


@dataclass
class Alone:
    wall_s: float
    cpu_s: float


@dataclass
class Outcome:
    reports: list[TaskReport]
    kinds: dict[str, tuple[str, str]]  # task id -> (task type, input label)
    alone: dict[tuple[str, str], Alone]
    metrics_text: str
    metrics_url: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    failed: int = 0


# -- the run --------------------------------------------------------------------------------
@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - t0


def metric_sums(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_total(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbls), v in metric_sums(text).items()
        if n == name and all(dict(lbls).get(k) == want for k, want in labels.items())
    )


def _bcftools_alone(kind: str, inp: Any, work: Path) -> Alone:
    """The task's bcftools commands with no worker, S3 or Celery around them."""
    from taskmeter.demo import steps

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    region = inp.merge_region or inp.region if kind == steps.MERGE else inp.region
    plan = steps.plan(kind, inp.path, work, inp.samples, region)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    for argv in plan.argvs:
        subprocess.run(argv, check=True, capture_output=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Alone(wall, cpu)


def run_demo(cfg: Config, console: Console) -> Outcome:
    from taskmeter.demo import inputs, services, steps
    from taskmeter.export.ledger import read_ledgers

    timings: dict[str, float] = {}
    root = cfg.workdir
    ledger = cfg.outdir / LEDGER_NAME
    ledger.unlink(missing_ok=True)  # this run's tasks only
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(console.status("starting"))
        with _timed(timings, "inputs"):
            status.update("generating VCFs " + ", ".join(
                f"{s}×{v}" for s, v in cfg.grid))  # fmt: skip
            vcfs = inputs.generate_grid(root / "inputs", cfg.grid)
            for path in cfg.vcfs:
                status.update(f"preparing {path}")
                ready, index, done = inputs.prepare_user_vcf(path, root / "inputs" / "user")
                console.print(f"{path}: {done}", highlight=False, soft_wrap=True)
                vcfs.append(inputs.describe_user_vcf(path, ready, index))
        with _timed(timings, "services"):
            status.update("starting S3")
            if cfg.s3_endpoint:
                s3 = services.S3.external(cfg.s3_endpoint, cfg.bucket)
            else:
                s3 = services.S3.start_embedded(cfg.bucket)
                stack.callback(s3.stop)
            status.update(f"uploading {len(vcfs)} VCFs to s3://{s3.bucket}")
            for v in vcfs:
                s3.upload(v.path, v.key)
                s3.upload(v.index, v.index_key)
            if cfg.broker:
                services.check_broker(cfg.broker)
                broker, broker_dir = cfg.broker, None
            else:
                broker, broker_dir = services.filesystem_broker(root / "broker")
            status.update("starting the celery worker")
            worker = services.Worker.start(
                root, broker=broker, broker_dir=broker_dir, s3=s3, ledger=ledger,
                concurrency=cfg.concurrency, port=cfg.metrics_port,
                log=cfg.outdir / WORKER_LOG_NAME,
            )  # fmt: skip
            stack.callback(worker.stop)
            worker.wait_ready()
        status.stop()

        base = [(kind, v) for v in vcfs for kind in steps.KINDS
                if kind != steps.MERGE or len(v.samples) >= 2]  # fmt: skip
        n = cfg.tasks if cfg.tasks is not None else TASKS_PER_KIND * len(base)
        plan = [base[i % len(base)] for i in range(n)]
        client = services.client_app(broker, broker_dir, worker.queue)
        stack.callback(client.close)
        kinds: dict[str, tuple[str, str]] = {}
        t_start = time.time()
        with _timed(timings, "tasks"):
            for kind, v in plan:
                region = v.merge_region or v.region if kind == steps.MERGE else v.region
                result = client.send_task(
                    kind, args=[v.key, v.index_key, v.samples, region], queue=worker.queue
                )
                kinds[result.id] = (kind, v.label)
            _wait_for_tasks(console, worker, n)
            # The collector observes a report before the ledger writes it; both are in.
            text = worker.metrics()
            deadline = time.monotonic() + 10
            while metric_total(text, "celery_task_runs_total") < n:
                if time.monotonic() > deadline:
                    raise services.ServiceError("the metrics endpoint lags behind the ledger")
                time.sleep(0.1)
                text = worker.metrics()
        (cfg.outdir / METRICS_NAME).write_text(text)
        reports, problems = read_ledgers([ledger])
        if problems:
            raise DemoError("; ".join(map(str, problems)))
        with _timed(timings, "bcftools alone"), console.status("running bcftools alone"):
            pairs = {(kind, v.label): (kind, v) for kind, v in plan}
            alone = {
                key: _bcftools_alone(kind, v, root / "alone" / kind / v.path.name)
                for key, (kind, v) in pairs.items()
            }
        outcome = Outcome(reports, kinds, alone, text, worker.url, timings)
        outcome.failed = sum(1 for r in reports if r.state != "success")
        if cfg.prometheus:
            _print_prometheus(console, cfg.prometheus, worker.port, time.time() - t_start + 30,
                              sorted(steps.KINDS), n, outcome)  # fmt: skip
        if cfg.keep_running:
            _report(outcome, cfg, console)
            console.print(
                f"\nstill running: worker metrics {worker.url}/metrics, S3 "
                f"{s3.endpoint or 'AWS'} (bucket {s3.bucket}), broker {broker}"
                f"{' ' + str(broker_dir) if broker_dir else ''}, queue {worker.queue}. "
                "Ctrl-C to stop.",
                highlight=False, soft_wrap=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    worker.ensure_alive()
                    time.sleep(0.5)
    return outcome


def _wait_for_tasks(console: Console, worker: Any, n: int) -> None:
    with Progress(
        TextColumn("[bold]tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, transient=False,
    ) as progress:  # fmt: skip
        bar = progress.add_task("", total=n)
        last, last_change = -1, time.monotonic()
        while True:
            done = worker.ledger_lines()
            progress.update(bar, completed=done, description=f"ledger {worker.ledger.name}")
            if done >= n:
                return
            worker.ensure_alive()
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                raise DemoError(
                    f"no task ended for {STALL_S:.0f} s ({done} of {n} done); the worker's "
                    f"log ({worker.log}) ends with:\n{worker.log_tail()}"
                )
            time.sleep(0.2)


def _print_prometheus(console: Console, url: str, port: int, since: float,
                      tasks: list[str], n: int, outcome: Outcome) -> None:  # fmt: skip
    """Wait for Prometheus to have scraped every task, then size from it too."""
    from taskmeter.sizing import render
    from taskmeter.sizing.prometheus import SourceError, stats_from_prometheus
    from taskmeter.sizing.recommend import Options, SizingError, recommend

    selector = f'instance=~".*:{port}"'
    query = urllib.parse.urlencode({"query": f"sum(celery_task_runs_total{{{selector}}})"})
    deadline = time.monotonic() + 90
    seen = 0.0
    with console.status(f"waiting for Prometheus ({url}) to scrape 127.0.0.1:{port}"):
        while seen < n and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                from taskmeter.demo.services import http_get

                body = json.loads(http_get(f"{url.rstrip('/')}/api/v1/query?{query}"))
                result = body["data"]["result"]
                seen = float(result[0]["value"][1]) if result else 0.0
            if seen < n:
                time.sleep(1)
    if seen < n:
        console.print(
            f"[yellow]Prometheus at {url} has {seen:.0f} of {n} tasks from 127.0.0.1:{port} "
            "after 90 s: is it scraping that target (--metrics-port)? Skipped.[/]"
        )
        return
    try:
        stats = stats_from_prometheus(url, since_s=since, tasks=tasks, selector=selector)
        rec = recommend(stats, Options(concurrency=_concurrency(outcome), min_tasks=1,
                                       parent_bytes=_parent_bytes(outcome)))  # fmt: skip
    except (SourceError, SizingError) as exc:
        console.print(f"[yellow]sizing from Prometheus failed: {exc}[/]")
        return
    out = Console(width=max(Console().width, 140))
    out.print("\n[bold]The same recommendation, read from Prometheus[/]")
    out.print(render.as_table(rec))


# -- output ---------------------------------------------------------------------------------
def _parent_bytes(outcome: Outcome) -> int:
    from taskmeter.sizing.recommend import MiB

    rss = metric_total(outcome.metrics_text, "process_resident_memory_bytes")
    return int(rss) if rss > 0 else 128 * MiB


def _concurrency(outcome: Outcome) -> int:
    from taskmeter.sizing.stats import observed_concurrency

    return max(1, observed_concurrency(outcome.reports))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _phase_wall(r: TaskReport, name: str) -> float:
    return sum(p.wall_s for p in r.phases if p.name == name)


def summary(outcome: Outcome) -> dict[str, Any]:
    """The figures the demo prints, per task type, as data (``summary.json``)."""
    by_task: dict[str, dict[str, Any]] = {}
    for r in outcome.reports:
        t = by_task.setdefault(r.task, {"runs": 0, "runs_by_state": {}, "wall_s": 0.0,
                                        "cpu_overhead_s": 0.0, "cpu_tool_s": 0.0,
                                        "footprint_peak_max_bytes": 0})  # fmt: skip
        t["runs"] += 1
        t["runs_by_state"][r.state] = t["runs_by_state"].get(r.state, 0) + 1
        t["wall_s"] += r.wall_s
        t["cpu_overhead_s"] += r.overhead.cpu_s
        t["cpu_tool_s"] += r.tool_totals.cpu_s
        t["footprint_peak_max_bytes"] = max(t["footprint_peak_max_bytes"],
                                            r.footprint_peak_bytes)  # fmt: skip
    return {
        "tasks": len(outcome.reports),
        "metrics_url": outcome.metrics_url,
        "by_task": by_task,
        "timings_s": {k: v for k, v in outcome.timings.items() if not k.startswith("_")},
        "bcftools_alone": [
            {"task": k, "input": label, "wall_s": a.wall_s, "cpu_s": a.cpu_s}
            for (k, label), a in outcome.alone.items()
        ],
    }


def _task_tables(outcome: Outcome) -> list[Table]:
    """Two tables per task type (time, then CPU and memory), each within 100 columns;
    the report page has every figure per task."""
    groups: dict[str, dict[str, list[TaskReport]]] = defaultdict(lambda: defaultdict(list))
    for r in outcome.reports:
        kind, label = outcome.kinds.get(r.task_id or "", (r.task, "?"))
        groups[kind][label].append(r)
    tables = []
    for kind in sorted(groups):
        time_t = Table(title=f"{kind}: time (means per task)", title_justify="left")
        for col in ("input", "runs", "wall", "overhead wall", "S3 down/up", "bcftools",
                    "alone"):  # fmt: skip
            time_t.add_column(col, justify="left" if col == "input" else "right")
        res_t = Table(title=f"{kind}: CPU and memory (means; peaks are maxima)",
                      title_justify="left")  # fmt: skip
        for col in ("input", "CPU worker", "CPU bcftools", "CPU alone", "worker RSS avg/peak",
                    "bcftools RSS avg/peak", "footprint"):  # fmt: skip
            res_t.add_column(col, justify="left" if col == "input" else "right")
        for label, rs in groups[kind].items():
            alone = outcome.alone.get((kind, label))
            wall = _mean([r.wall_s for r in rs])
            o_wall = _mean([r.overhead.wall_s for r in rs])
            tool_avgs = [float(v) for r in rs if (v := r.tool_avg_rss_bytes) is not None]
            states = {r.state for r in rs}
            time_t.add_row(
                label,
                str(len(rs)) + ("" if states == {"success"} else f" ({', '.join(sorted(states))})"),
                seconds_h(wall),
                f"{seconds_h(o_wall)} ({o_wall / wall:.0%})" if wall > 0 else "-",
                f"{seconds_h(_mean([_phase_wall(r, 'download') for r in rs]))} / "
                f"{seconds_h(_mean([_phase_wall(r, 'upload') for r in rs]))}",
                seconds_h(_mean([r.tool_totals.wall_s for r in rs])),
                seconds_h(alone.wall_s) if alone else "-",
            )
            res_t.add_row(
                label,
                seconds_h(_mean([r.overhead.cpu_s for r in rs])),
                seconds_h(_mean([r.tool_totals.cpu_s for r in rs])),
                seconds_h(alone.cpu_s) if alone else "-",
                f"{bytes_h(_mean([r.overhead.rss_avg_bytes for r in rs]))} / "
                f"{bytes_h(max(r.overhead.rss_peak_bytes for r in rs))}",
                f"{bytes_h(_mean(tool_avgs))} / "
                f"{bytes_h(max(r.tool_totals.rss_peak_bytes for r in rs))}",
                bytes_h(max(r.footprint_peak_bytes for r in rs)),
            )
        time_t.caption = (
            "overhead = the worker's own share (S3 download/upload, Celery, Python); "
            "'alone' runs the same bcftools commands on the same local files with no "
            "worker around them (the ideal)."
        )
        tables += [time_t, res_t]
    return tables


def _overhead_lines(outcome: Outcome) -> list[str]:
    lines = []
    by_kind: dict[str, list[TaskReport]] = defaultdict(list)
    for r in outcome.reports:
        by_kind[outcome.kinds.get(r.task_id or "", (r.task, ""))[0]].append(r)
    for kind, rs in sorted(by_kind.items()):
        ideal = sum(
            outcome.alone[(kind, outcome.kinds[r.task_id or ""][1])].wall_s
            for r in rs if (kind, outcome.kinds.get(r.task_id or "", ("", ""))[1]) in outcome.alone
        )  # fmt: skip
        wall = sum(r.wall_s for r in rs)
        cpu_o = sum(r.overhead.cpu_s for r in rs)
        cpu = cpu_o + sum(r.tool_totals.cpu_s for r in rs)
        if ideal > 0:
            lines.append(
                f"{kind}: {len(rs)} tasks took {seconds_h(wall)} of wall in the worker vs "
                f"{seconds_h(ideal)} for bcftools alone (+{wall / ideal - 1:.0%}); the "
                f"worker's own CPU is {cpu_o / cpu:.1%} of the tasks' CPU."
            )
    return lines


def _html_report(outcome: Outcome, path: Path) -> Path | None:
    """The HTML report of ``taskmeter report``, when that module is installed."""
    try:
        reporting = importlib.import_module("taskmeter.reporting")
    except ImportError:
        return None
    render_fn = getattr(reporting, "render", None)
    data_cls = getattr(reporting, "ReportData", None)
    size_fn = getattr(reporting, "size", None)
    if render_fn is None or data_cls is None or size_fn is None:
        return None
    from datetime import datetime, timezone

    from taskmeter.sizing.recommend import DEFAULT_MARGIN
    from taskmeter.sizing.stats import stats_from_reports

    stats = stats_from_reports(outcome.reports)
    sizing = size_fn(stats, concurrency=_concurrency(outcome), concurrency_source="observed",
                     parent_bytes=_parent_bytes(outcome), margin=DEFAULT_MARGIN,
                     min_tasks=1)  # fmt: skip
    data = data_cls(
        source="taskmeter demo (ledger)", generated_at=datetime.now(timezone.utc),
        stats=stats, reports=outcome.reports, sizing=sizing,
    )  # fmt: skip
    path.write_text(render_fn(data))
    return path


def _report(outcome: Outcome, cfg: Config, console: Console) -> None:
    from taskmeter.sizing import render
    from taskmeter.sizing.recommend import Options, SizingError, recommend
    from taskmeter.sizing.stats import stats_from_reports

    if outcome.timings.get("_reported"):
        return
    outcome.timings["_reported"] = 1.0
    out = Console()  # rich's own width detection (COLUMNS when not a terminal)
    for table in _task_tables(outcome):
        out.print(table)
    for line in _overhead_lines(outcome):
        out.print(line, highlight=False)
    (cfg.outdir / SUMMARY_NAME).write_text(json.dumps(summary(outcome), indent=2) + "\n")
    concurrency = _concurrency(outcome)
    try:
        rec = recommend(
            stats_from_reports(outcome.reports),
            Options(concurrency=concurrency, parent_bytes=_parent_bytes(outcome), min_tasks=1),
        )
    except SizingError as exc:
        out.print(f"[yellow]no sizing recommendation: {exc}[/]")
    else:
        out.print(f"\n[bold]Sizing[/] (from the ledger; concurrency {concurrency} = the most "
                  "tasks seen at once; parent = the worker's main process RSS)")  # fmt: skip
        out.print(render.as_table(rec))
        patch = render.as_kustomize(rec, "celery-worker", "worker")
        (cfg.outdir / PATCH_NAME).write_text(patch)
        out.print(f"\n[bold]Kustomize patch[/] ({cfg.outdir / PATCH_NAME}):", highlight=False)
        out.print(patch, highlight=False, markup=False)
    try:
        html = _html_report(outcome, cfg.outdir / REPORT_NAME)
    except Exception as exc:  # a colleague's module in progress must not sink the demo
        out.print(f"[yellow]HTML report not written: {exc}[/]")
        html = None
    if html is not None:
        out.print(f"HTML report: {html}", highlight=False)
    timing = ", ".join(f"{k} {seconds_h(v)}" for k, v in outcome.timings.items()
                       if not k.startswith("_"))  # fmt: skip
    out.print(f"timings: {timing}", highlight=False)
    out.print(f"\n[bold]Outputs kept in {cfg.outdir}[/] (overwritten by the next run):",
              highlight=False)  # fmt: skip
    for name, what in ((LEDGER_NAME, "ledger (taskmeter report/recommend --ledger)"),
                       (METRICS_NAME, "metrics snapshot (the worker's /metrics)"),
                       (SUMMARY_NAME, "summary"), (PATCH_NAME, "Kustomize patch"),
                       (REPORT_NAME, "HTML report"), (WORKER_LOG_NAME, "worker log")):
        if (cfg.outdir / name).exists():
            out.print(f"  {cfg.outdir / name}  {what}", highlight=False, soft_wrap=True)


# -- the command ----------------------------------------------------------------------------
def _check_vcfs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
                ) -> tuple[Path, ...]:  # fmt: skip
    from taskmeter.demo.inputs import InputError, check_vcf

    paths = tuple(Path(v) for v in value)
    for p in paths:
        try:
            check_vcf(p)
        except InputError as exc:
            raise click.BadParameter(str(exc)) from None
    return paths


@click.command("demo")
@click.option("--out", "outdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the outputs here (ledger, metrics snapshot, summary, Kustomize "
                   "patch, HTML report, worker log), overwritten by the next run "
                   f"[default: --workdir if given, else ./{DEFAULT_OUT}].")  # fmt: skip
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the inputs (VCFs, broker, bcftools scratch) here too "
                   "[default: a temporary directory, removed at the end].")  # fmt: skip
@click.option("--quick", is_flag=True, help="Only the smallest generated VCF (a few seconds).")
@click.option("--vcf", "vcfs", multiple=True, callback=_check_vcfs,
              type=click.Path(exists=True, dir_okay=False),
              help="Also run the tasks on this VCF (.vcf or .vcf.gz; bgzipped and indexed "
                   "into the workdir when needed). Repeatable.")  # fmt: skip
@click.option("--broker", default=None,
              help="Broker URL (redis://..., amqp://...) [default: kombu's filesystem "
                   "transport in the workdir, no server].")  # fmt: skip
@click.option("--s3-endpoint", default=None,
              help="S3-compatible endpoint URL, credentials from the environment "
                   "(AWS_ACCESS_KEY_ID...) [default: an embedded moto server].")  # fmt: skip
@click.option("--bucket", default="taskmeter-demo", show_default=True,
              help="S3 bucket (created when missing).")  # fmt: skip
@click.option(
    "--prometheus",
    default=None,
    help="Prometheus URL scraping the worker (see --metrics-port): also size from it.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of the worker's metrics endpoint [default: a free port].",
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=None,
    help=f"Number of tasks [default: {TASKS_PER_KIND} per input and task type].",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=2, show_default=True,
              help="Prefork concurrency of the worker.")  # fmt: skip
@click.option(
    "--keep-running", is_flag=True, help="Leave S3, the worker and its endpoint up until Ctrl-C."
)
def demo(outdir: Path | None, workdir: Path | None, quick: bool, vcfs: tuple[Path, ...],
         broker: str | None,
         s3_endpoint: str | None, bucket: str, prometheus: str | None,
         metrics_port: int | None, tasks: int | None, concurrency: int,
         keep_running: bool) -> None:  # fmt: skip
    """Run DivBase-style VCF tasks (S3 download, bcftools view/query/merge, upload) in a
    real Celery worker instrumented by taskmeter, and compare each task type with running
    bcftools alone; then size the worker for Kubernetes.

    Needs no server: S3 is an embedded moto server, the broker kombu's filesystem
    transport; --s3-endpoint and --broker point it at real ones.
    """
    from taskmeter import extras

    extras.require("demo", "demo")
    from taskmeter.demo.inputs import DEFAULT_GRID, InputError
    from taskmeter.demo.pipeline import DemoError as MissingTool
    from taskmeter.demo.pipeline import require_bcftools
    from taskmeter.demo.services import ServiceError

    try:
        require_bcftools()
    except MissingTool as exc:
        raise click.ClickException(str(exc)) from exc
    outdir = (outdir or workdir or DEFAULT_OUT).resolve()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {outdir}: {exc.strerror}",
                                 param_hint="--out") from None  # fmt: skip
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=120)
    tmp = None if workdir is not None else Path(tempfile.mkdtemp(prefix="taskmeter-demo-"))
    root = workdir if workdir is not None else tmp
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        workdir=root.resolve(), outdir=outdir, vcfs=vcfs,
        grid=DEFAULT_GRID[:1] if quick else DEFAULT_GRID,
        broker=broker, s3_endpoint=s3_endpoint, bucket=bucket, prometheus=prometheus,
        tasks=tasks, concurrency=concurrency, keep_running=keep_running,
        metrics_port=metrics_port,
    )  # fmt: skip
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        outcome = run_demo(cfg, console)
        outcome.timings["total"] = time.monotonic() - t0
        _report(outcome, cfg, console)
    except KeyboardInterrupt:
        console.print("interrupted: the worker and S3 are stopped")
        raise SystemExit(130) from None
    except (DemoError, InputError, ServiceError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if outcome.failed:
        raise click.ClickException(
            f"{outcome.failed} task(s) did not succeed; see {cfg.outdir / WORKER_LOG_NAME}"
        )


if __name__ == "__main__":  # pragma: no cover
    demo()

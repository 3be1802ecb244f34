"""The ``taskmeter`` command: argument parsing and output only, no logic."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import taskmeter as tm
from taskmeter.cli_checks import FiniteFloat, SettingError, cannot_start, output_file
from taskmeter.format import bytes_h, seconds_h
from taskmeter.measure.sampler import interval_from_env
from taskmeter.options import duration_s, memory_bytes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="taskmeter")
def main() -> None:
    """What each Celery task really costs: wall, CPU and memory, split into the
    worker's own overhead and the tools it runs."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--json", "as_json", is_flag=True, help="Print the TaskReport as JSON.")
@click.option(
    "--interval",
    type=FiniteFloat(0.001, 60),
    default=None,
    help="Sampling interval in seconds [default: $TASKMETER_SAMPLE_INTERVAL or 0.1].",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    callback=output_file,
    help="Write the report to this file instead of standard error (checked before the "
    "command runs).",
)
@click.option("--name", default=None, help="Task name in the report [default: the command].")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    as_json: bool, interval: float | None, output: str | None, name: str | None, command: Any
) -> None:
    """Measure one command, like `/usr/bin/time -v`:  taskmeter run -- CMD ARGS...

    The command's own output is untouched; the report goes to standard error (or
    --output), and taskmeter exits with the command's exit code (128+N if it was
    killed by signal N; like a shell, 127 if it is not found and 126 if it cannot be
    executed).
    """
    argv = list(command)
    try:
        tm.configure(interval_s=interval if interval is not None else interval_from_env())
    except ValueError as exc:  # a bad TASKMETER_SAMPLE_INTERVAL
        raise SettingError(str(exc)) from exc
    # Like GNU time: a Ctrl-C reaches the command through the terminal; taskmeter
    # itself must survive it to report how the command ended. A handler (not SIG_IGN)
    # is reset by exec, so the command still gets the default disposition.
    old_int = signal.signal(signal.SIGINT, _ignore)
    old_quit = signal.signal(signal.SIGQUIT, _ignore)
    try:
        with tm.measure(name or os.path.basename(argv[0].rstrip(os.sep)) or "command") as m:
            try:
                proc = tm.Popen(argv)
            except OSError as exc:
                status, message = cannot_start(argv[0], exc)
                click.echo(f"taskmeter run: {message}", err=True)
                sys.exit(status)
            code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
    report = m.report
    text = report.to_json() + "\n" if as_json else None
    if output:
        try:
            with open(output, "w") as f:
                if text is not None:
                    f.write(text)
                else:
                    Console(file=f, width=100).print(summary_table(report))
        except OSError as exc:  # checked before the run, but the disk may fill up since
            click.echo(
                f"taskmeter run: cannot write {output!r}: {exc.strerror or exc}; "
                "the report follows on standard error",
                err=True,
            )
            output = None
    if output is None:
        if text is not None:
            sys.stderr.write(text)
        else:
            console = Console(stderr=True)
            if not console.is_terminal:
                console = Console(stderr=True, width=120)
            console.print(summary_table(report))
    sys.exit(code if code >= 0 else 128 - code)


@main.command()
@click.option(
    "--ledger",
    "ledgers",
    multiple=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Ledger file(s) written by workers (TASKMETER_LEDGER), or - for records on "
    "standard input (e.g. kubectl logs); repeatable. Read as a stream.",
)
@click.option(
    "--prometheus",
    "prometheus_url",
    default=None,
    help="Prometheus base URL, e.g. http://prometheus:9090.",
)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    callback=duration_s,
    help="Window of data read from Prometheus.",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="Size for these task names only (e.g. one queue's); repeatable.",
)
@click.option(
    "--selector",
    default="",
    help='Extra Prometheus label matchers, e.g. \'namespace="prod",job="celery"\'.',
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Prefork concurrency of the worker [default: the most tasks seen at once].",
)
@click.option(
    "--margin",
    type=FiniteFloat(0, 10),
    default=None,
    help="Safety margin for both request and limit (0.2 = 20 %) [default: 0.2].",
)
@click.option(
    "--request-margin", type=FiniteFloat(0, 10), default=None, help="Margin on the request."
)
@click.option(
    "--limit-margin", type=FiniteFloat(0, 10), default=None, help="Margin on the limit."
)
@click.option(
    "--percentile",
    type=FiniteFloat(0, 1, min_open=True, max_open=True),
    default=None,
    help="Size the request from this quantile of average use instead of the mean.",
)
@click.option(
    "--min-tasks",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Refuse to size a task type with fewer tasks than this.",
)
@click.option(
    "--parent-memory",
    callback=memory_bytes,
    default=None,
    help="RSS of the worker's main process [default: from Prometheus, else 128Mi].",
)
@click.option(
    "--cpu-limit",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Set a CPU limit (cores).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default=None,
    help="Celery pool to size for [default: the pool the workers ran with].",
)
@click.option(
    "--prometheus-method",
    type=click.Choice(["auto", "server", "exact"]),
    default="auto",
    show_default=True,
    help="server: aggregate inside Prometheus (any fleet, any window); exact: count raw "
    "samples (small windows); auto: exact only when the window holds few samples.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "kustomize"]),
    default="table",
    show_default=True,
)
@click.option(
    "--deployment",
    default="celery-worker",
    show_default=True,
    help="Deployment name in the Kustomize patch.",
)
@click.option(
    "--container",
    default="worker",
    show_default=True,
    help="Container name in the Kustomize patch.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    callback=output_file,
    help="Write the result here (only when it succeeds) instead of stdout.",
)
def recommend(
    ledgers: tuple[str, ...], prometheus_url: str | None, since: float, tasks: tuple[str, ...],
    selector: str, concurrency: int | None, margin: float | None,
    request_margin: float | None, limit_margin: float | None, percentile: float | None,
    min_tasks: int, parent_memory: int | None, cpu_limit: float | None, pool: str | None,
    prometheus_method: str, fmt: str, deployment: str, container: str, output: str | None,
) -> None:  # fmt: skip
    """Kubernetes requests and limits for a Celery worker, from measured tasks."""
    from taskmeter.sizing import render
    from taskmeter.sizing.recommend import (
        DEFAULT_MARGIN,
        MiB,
        Options,
        SizingError,
        choose_pool,
        pool_model,
        recommend,
    )

    if bool(ledgers) == bool(prometheus_url):
        raise click.UsageError("give either --ledger PATH... or --prometheus URL")
    err = Console(stderr=True)
    parent = parent_memory
    if ledgers:
        from taskmeter.export.records import RecordReader, WarningPrinter, check_sources
        from taskmeter.sizing.stats import ConcurrencyTracker, StatsAccumulator

        unreadable = check_sources(ledgers)
        if unreadable:
            raise click.ClickException(
                "; ".join(f"cannot read ledger {p.path}: {p.message}" for p in unreadable)
            )
        warn = WarningPrinter(lambda text: click.echo(text, err=True))
        reader = RecordReader(ledgers, on_bad=warn)
        # One accumulator per pool's sizing rules (a mixed input is refused or narrowed);
        # None: records that say no pool.
        by_pool: dict[str | None, tuple[StatsAccumulator, ConcurrencyTracker]] = {}
        pools_seen: dict[str | None, int] = {}
        for r in reader:  # one pass, nothing kept per task: memory ~ task types
            if tasks and r.task not in tasks:
                continue
            pools_seen[r.worker.pool] = pools_seen.get(r.worker.pool, 0) + 1
            acc, tracker = by_pool.setdefault(
                pool_model(r.worker.pool) if r.worker.pool else None,
                (StatsAccumulator(percentile), ConcurrencyTracker()),
            )
            acc.add(r)
            tracker.add(r)
        for line in (warn.tail(), reader.summary.text()):
            if line:
                click.echo(line, err=True)
        try:
            pool, why = choose_pool(pool, pools_seen, "task records")
        except SizingError as exc:
            raise click.ClickException(str(exc)) from exc
        err.print(why, highlight=False)
        if pool in by_pool:
            acc, tracker = by_pool[pool]
            left = sum(a.runs for key, (a, _) in by_pool.items() if key != pool)
            if left:
                err.print(f"{left} task record(s) of other pools or with no pool recorded "
                          f"left out (only pool {pool}'s are sized)", highlight=False)  # fmt: skip
        elif not by_pool:  # no records at all: recommend says so
            acc, tracker = StatsAccumulator(percentile), ConcurrencyTracker()
        elif len(by_pool) == 1:  # one group: sized by `pool`'s rules (--pool, or unrecorded)
            ((key, (acc, tracker)),) = by_pool.items()
            if key is not None:
                err.print(f"the {key} task records are sized by pool {pool}'s rules (--pool)",
                          highlight=False)  # fmt: skip
        else:
            have = ", ".join(f"{k or 'not recorded'}: {a.runs}"
                             for k, (a, _) in by_pool.items()) or "none"  # fmt: skip
            raise click.ClickException(f"no task records of pool {pool} (records by pool: {have})")
        if pool == "solo":
            concurrency = 1
        if concurrency is None and acc.runs:
            concurrency = tracker.value
            click.echo(f"concurrency {concurrency}: the most tasks seen running at once"
                       + ("" if tracker.exact else " (a lower bound: records far out of "
                          "order; --concurrency to set it)"), err=True)  # fmt: skip
        stats = acc.result()
    else:
        from taskmeter.sizing.prometheus import (
            SourceError,
            parent_rss_from_prometheus,
            stats_from_prometheus,
            worker_pools_from_prometheus,
        )

        url = prometheus_url or ""
        notes: list[str] = []
        try:
            with err.status("querying Prometheus") as status:
                stats = stats_from_prometheus(
                    url, since_s=since, tasks=tasks or None, selector=selector,
                    percentile=percentile, progress=status.update,
                    method=prometheus_method, notes=notes,  # type: ignore[arg-type]
                )  # fmt: skip
                for note in notes:
                    err.print(note, highlight=False)
                status.update("querying the workers' pools")
                workers = worker_pools_from_prometheus(url, since_s=since, selector=selector,
                                                       tasks=tasks or None)  # fmt: skip
                counts: dict[str | None, int] = {
                    p: sum(by.values()) for p, by in workers.pools.items()
                }
                pool, why = choose_pool(pool, counts, "workers")
                err.print(why, highlight=False)
                if pool == "solo":
                    concurrency = 1
                elif concurrency is None and workers.concurrency_of(pool):
                    concurrency = workers.concurrency_of(pool)
                    err.print(f"concurrency {concurrency}: from taskmeter_worker_info")
                if parent is None and stats and pool == "prefork":
                    status.update("querying the workers' main-process memory")
                    parent = parent_rss_from_prometheus(url, since_s=since, selector=selector,
                                                        tasks=tasks or None)  # fmt: skip
                    if parent is not None:
                        err.print(f"parent process memory {parent / 2**20:.0f} MiB: the largest "
                                  "process_resident_memory_bytes of the workers")  # fmt: skip
        except (SourceError, SizingError) as exc:
            raise click.ClickException(str(exc)) from exc
        if concurrency is None:
            raise click.UsageError(
                "--concurrency is needed with --prometheus (the workers export no "
                "taskmeter_worker_info)"
            )
    unknown = sorted(set(tasks) - set(stats))
    if unknown:
        known = ", ".join(sorted(stats)) or "none"
        raise click.ClickException(
            f"no data for task(s) {', '.join(unknown)} (tasks in the data: {known})"
        )
    if parent is None and pool == "prefork":
        parent = 128 * MiB
        err.print("parent process memory assumed 128Mi (--parent-memory to set it)")
    base = DEFAULT_MARGIN if margin is None else margin
    try:
        rec = recommend(
            stats,
            Options(
                concurrency=concurrency or 1,
                parent_bytes=parent or 0,
                pool=pool or "prefork",
                request_margin=base if request_margin is None else request_margin,
                limit_margin=base if limit_margin is None else limit_margin,
                percentile=percentile,
                min_tasks=min_tasks,
                cpu_limit_cores=cpu_limit,
            ),
        )
    except SizingError as exc:
        raise click.ClickException(str(exc)) from exc
    if fmt == "table":
        if output:
            buf = Console(file=io.StringIO(), width=120)
            buf.print(render.as_table(rec))
            text = buf.file.getvalue()  # type: ignore[attr-defined]
        else:
            Console().print(render.as_table(rec))  # rich's own width detection
            return
    else:
        text = (render.as_json(rec) if fmt == "json"
                else render.as_kustomize(rec, deployment, container))  # fmt: skip
    if output:
        from taskmeter.cli_checks import write_atomic

        target = Path(output)
        try:  # whole or not at all: checked at the start, the disk may fill up since
            if target.exists() and not target.is_file():  # /dev/stdout, a FIFO
                target.write_text(text)
            else:
                write_atomic(target, text)
        except OSError as exc:
            raise click.ClickException(f"cannot write {output!r}: {exc.strerror}") from exc
    else:
        click.echo(text, nl=False)


def _ignore(signum: int, frame: Any) -> None:
    """Survive the terminal's Ctrl-C; the command gets it too and decides."""


def summary_table(report: tm.TaskReport) -> Table:
    """The human summary of one report: worker overhead, each tool, and the total."""
    table = Table(title=f"taskmeter: {report.task} ({report.state})", title_justify="left")
    for col in ("", "wall", "CPU", "user", "sys", "RSS avg", "RSS peak", "peak from"):
        table.add_column(col, justify="left" if col in ("", "peak from") else "right")
    o = report.overhead
    table.add_row(
        "task (total)", seconds_h(report.wall_s), seconds_h(report.cpu_s), "", "", "", "", ""
    )
    table.add_row(
        "worker overhead",
        seconds_h(o.wall_s),
        seconds_h(o.cpu_s),
        seconds_h(o.user_s),
        seconds_h(o.sys_s),
        bytes_h(o.rss_avg_bytes),
        bytes_h(o.rss_peak_bytes),
        o.peak_method,
    )
    for t in report.tools:
        end = f"exit {t.exit_code}" if t.signal is None else f"signal {t.signal}"
        table.add_row(
            f"{t.exe} (pid {t.pid}, {end})",
            seconds_h(t.wall_s),
            seconds_h(t.cpu_s),
            seconds_h(t.user_s),
            seconds_h(t.sys_s),
            bytes_h(t.rss_avg_bytes),
            bytes_h(t.rss_peak_bytes),
            f"{t.peak_method}, {t.samples} samples",
        )
    table.caption = (
        f"footprint peak (worker + tools at once) {bytes_h(report.footprint_peak_bytes)}; "
        f"unattributed child CPU {seconds_h(report.unattributed_child_cpu_s)}; "
        f"sampled every {seconds_h(report.sampler.interval_s)}"
    )
    return table


def _register() -> None:
    # Commands defined in their own modules (the demo and report pull in Celery, boto3
    # and plotly only when used).
    from taskmeter.demo.command import demo
    from taskmeter.reporting.command import report

    main.add_command(demo)
    main.add_command(report)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()

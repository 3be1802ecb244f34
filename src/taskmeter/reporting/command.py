"""``taskmeter report``: one self-contained HTML page with plots, from ledgers or Prometheus.

Registered on the ``taskmeter`` group by ``cli.py``; also runnable on its own::

    python -c "from taskmeter.reporting.command import report; report()" --ledger L -o r.html
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import click

from taskmeter.cli_checks import FiniteFloat, write_atomic
from taskmeter.format import bytes_h
from taskmeter.options import DURATION_UNITS, duration_s, memory_bytes

__all__ = ["report", "write_atomic"]

MiB = 2**20
MAX_PAGE_WARNINGS = 50  # bad records listed on the page (all are counted)


@click.command("report")
@click.option(
    "--ledger",
    "ledgers",
    multiple=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Ledger file(s) written by workers (TASKMETER_LEDGER), or - for records on "
    "standard input (e.g. kubectl logs); repeatable, read as a stream. Rotated files "
    "(ledger.jsonl.1, ...) are read only when listed.",
)
@click.option(
    "--prometheus",
    "prometheus_url",
    default=None,
    help="Prometheus base URL, e.g. http://prometheus:9090 (aggregated figures only).",
)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    callback=duration_s,
    help="Window of data read from Prometheus.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Tasks a worker pod runs at once [default: the most seen at once in the ledger; "
    "with --prometheus no request/limit is drawn without it].",
)
@click.option(
    "--min-tasks",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Draw no request/limit when a task type has fewer tasks than this.",
)
@click.option(
    "--parent-memory",
    default=None,
    callback=memory_bytes,
    help="RSS of the worker's main process, counted once per pod [default: from "
    "Prometheus, else 128Mi], as in `taskmeter recommend`.",
)
@click.option(
    "--margin",
    type=FiniteFloat(0, 10),
    default=0.2,
    show_default=True,
    help="Safety margin on the memory request and limit (0.2 = 20 %).",
)
@click.option(
    "--heaviest",
    type=click.IntRange(0, 50),
    default=5,
    show_default=True,
    help="Tasks per type shown over time (largest footprint first).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default="taskmeter-report.html",
    show_default=True,
    help="The HTML file to write (replaced atomically, only on success).",
)
@click.pass_context
def report(
    ctx: click.Context,
    ledgers: tuple[str, ...],
    prometheus_url: str | None,
    since: float,
    concurrency: int | None,
    min_tasks: int,
    parent_memory: int | None,
    margin: float,
    heaviest: int,
    output: Path,
) -> None:
    """A self-contained HTML report with plots: time split overhead vs tools, memory
    distributions with the recommended request and limit, the heaviest tasks over time
    and a sortable table of tasks. Opens offline (plotly.js is inside the file)."""
    from taskmeter import extras, reporting

    extras.require("report", "report")
    from taskmeter.sizing.stats import ConcurrencyTracker, StatsAccumulator

    if bool(ledgers) == bool(prometheus_url):
        raise click.UsageError("give either --ledger PATH... or --prometheus URL")
    since_given = ctx.get_parameter_source("since") is not click.core.ParameterSource.DEFAULT
    if ledgers and since_given:
        raise click.UsageError("--since applies to --prometheus only (a ledger is read whole)")
    _check_output(output)

    from taskmeter.sizing.recommend import SizingError, choose_pool

    warnings: list[str] = []
    skipped = (0, 0)
    pool: str = "prefork"
    pool_why: str | None = None
    pool_refused: str | None = None
    digest: reporting.LedgerDigest | None = None
    if ledgers:
        from taskmeter.export.records import (
            LedgerProblem,
            RecordReader,
            WarningPrinter,
            check_sources,
        )

        unreadable = check_sources(ledgers)
        if unreadable:
            raise click.ClickException(
                "; ".join(f"cannot read ledger {p.path}: {p.message}" for p in unreadable)
            )
        warn = WarningPrinter(lambda text: click.echo(text, err=True))

        def on_bad(problem: LedgerProblem) -> None:
            warn(problem)
            if len(warnings) < MAX_PAGE_WARNINGS:
                warnings.append(str(problem))

        reader = RecordReader(ledgers, on_bad=on_bad)
        acc, tracker = StatsAccumulator(), ConcurrencyTracker()
        digest = reporting.LedgerDigest(heaviest)
        pools_seen: dict[str | None, int] = {}
        for r in reader:  # one pass, memory bounded by task types (see LedgerDigest)
            acc.add(r)
            tracker.add(r)
            digest.add(r)
            pools_seen[r.worker.pool] = pools_seen.get(r.worker.pool, 0) + 1
        summary = reader.summary
        for line in (warn.tail(), summary.text()):
            if line:
                click.echo(line, err=True)
        skipped = (summary.bad, summary.skipped)
        if not summary.records:
            if summary.bad or summary.skipped:
                what = (
                    f"no valid task record ({summary.bad} bad, {summary.skipped} not taskmeter "
                    "records)"
                )
            else:
                what = "no task records (empty)"
            where = ", ".join("standard input" if x == "-" else x for x in ledgers)
            raise click.ClickException(f"ledger {where}: {what}; nothing to report")
        stats = acc.result()
        source = ", ".join("standard input" if x == "-" else x for x in ledgers)
        conc_source: reporting.ConcurrencySource = "given"
        try:
            pool, pool_why = choose_pool(None, pools_seen, "task records")
        except SizingError as exc:  # mixed pools: the page still shows the tasks
            pool_refused = str(exc)
        if pool == "solo":
            concurrency, conc_source = 1, "solo"
        if concurrency is None:
            concurrency, conc_source = max(1, tracker.value), "observed"
    else:
        from taskmeter.sizing.prometheus import (
            SourceError,
            parent_rss_from_prometheus,
            stats_from_prometheus,
        )

        url = prometheus_url or ""
        source = f"{_public_url(url)} (last {_duration_h(since)})"
        try:
            stats = stats_from_prometheus(url, since_s=since)
            if parent_memory is None and stats:
                parent_memory = parent_rss_from_prometheus(url, since_s=since)
        except SourceError as exc:
            raise click.ClickException(str(exc)) from exc
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        if not stats:
            raise click.ClickException(
                f"Prometheus at {_public_url(url)} has no task runs in the last "
                f"{_duration_h(since)} (check the URL, the window and that it scrapes the workers)"
            )
        conc_source = "given" if concurrency is not None else "unknown"

    if parent_memory is None:
        parent_memory = 128 * MiB if pool == "prefork" else 0  # solo/threads: no parent
    sizing = reporting.size(
        stats,
        concurrency=concurrency,
        concurrency_source=conc_source,
        parent_bytes=parent_memory,
        margin=margin,
        min_tasks=min_tasks,
        pool=pool,
        pool_why=pool_why,
    )
    if pool_refused is not None:
        sizing = dataclasses.replace(sizing, recommendation=None, reason=pool_refused)
    if sizing.recommendation is None:
        click.echo(f"note: no request/limit drawn: {sizing.reason}", err=True)
    data = reporting.ReportData(
        source=source,
        generated_at=datetime.now(timezone.utc),
        stats=stats,
        reports=None,
        sizing=sizing,
        warnings=warnings,
        heaviest=heaviest,
        digest=digest,
        skipped=skipped,
    )
    page = reporting.render(data)
    try:
        write_atomic(output, page)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from exc
    runs = sum(s.runs for s in stats.values())
    click.echo(
        f"wrote {output} ({runs} tasks of {len(stats)} type(s), {bytes_h(len(page.encode()))})",
        err=True,
    )


def _check_output(output: Path) -> None:
    """Fail before any work when the page could not be written."""
    directory = output.parent
    if not directory.is_dir():
        raise click.ClickException(f"cannot write {output}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise click.ClickException(f"cannot write {output}: directory {directory} is not writable")


def _public_url(url: str) -> str:
    """The URL without credentials, for the page and messages."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _duration_h(seconds: float) -> str:
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"

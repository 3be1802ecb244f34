"""The ``taskmeter`` command: argument parsing and output only, no logic."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import taskmeter as tm
from taskmeter.format import bytes_h, seconds_h
from taskmeter.measure.sampler import interval_from_env


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="taskmeter")
def main() -> None:
    """What each Celery task really costs: wall, CPU and memory, split into the
    worker's own overhead and the tools it runs."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--json", "as_json", is_flag=True, help="Print the TaskReport as JSON.")
@click.option(
    "--interval",
    type=click.FloatRange(0.001, 60),
    default=None,
    help="Sampling interval in seconds [default: $TASKMETER_SAMPLE_INTERVAL or 0.1].",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the report to this file instead of standard error.",
)
@click.option("--name", default=None, help="Task name in the report [default: the command].")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    as_json: bool, interval: float | None, output: str | None, name: str | None, command: Any
) -> None:
    """Measure one command, like `/usr/bin/time -v`:  taskmeter run -- CMD ARGS...

    The command's own output is untouched; the report goes to standard error (or
    --output), and taskmeter exits with the command's exit code (128+N if it was
    killed by signal N).
    """
    argv = list(command)
    try:
        tm.configure(interval_s=interval if interval is not None else interval_from_env())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # Like GNU time: a Ctrl-C reaches the command through the terminal; taskmeter
    # itself must survive it to report how the command ended. A handler (not SIG_IGN)
    # is reset by exec, so the command still gets the default disposition.
    old_int = signal.signal(signal.SIGINT, _ignore)
    old_quit = signal.signal(signal.SIGQUIT, _ignore)
    try:
        with tm.measure(name or os.path.basename(argv[0])) as m:
            try:
                proc = tm.Popen(argv)
            except OSError as exc:
                raise click.ClickException(f"cannot run {argv[0]!r}: {exc.strerror}") from exc
            code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
    report = m.report
    text = report.to_json() + "\n" if as_json else None
    if output:
        with open(output, "w") as f:
            if text is not None:
                f.write(text)
            else:
                Console(file=f, width=100).print(summary_table(report))
    elif text is not None:
        sys.stderr.write(text)
    else:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=120)
        console.print(summary_table(report))
    sys.exit(code if code >= 0 else 128 - code)


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep VCFs, outputs and reports here [default: a temporary directory].",
)
@click.option("--quick", is_flag=True, help="Only the smallest VCF (a few seconds).")
def demo(workdir: Path | None, quick: bool) -> None:
    """Measure DivBase-style VCF tasks (bcftools on generated VCFs) and compare each
    with running bcftools alone."""
    from taskmeter.demo.pipeline import DEFAULT_GRID, DemoError, run_demo

    console = Console(stderr=True)
    grid = DEFAULT_GRID[:1] if quick else DEFAULT_GRID
    with tempfile.TemporaryDirectory(prefix="taskmeter-demo-") as tmp:
        root = workdir or Path(tmp)
        try:
            with console.status("starting") as status:
                results = run_demo(root, grid, progress=status.update)
        except DemoError as exc:
            raise click.ClickException(str(exc)) from exc
        ledger = root / "reports.jsonl"
        if workdir is not None:
            ledger.write_text("".join(r.report.to_json() + "\n" for r in results))
    table = Table(title="taskmeter demo: vcf.subset_query per input", title_justify="left")
    for col in ("input", "wall", "overhead wall", "bcftools wall", "bcftools alone",
                "CPU overhead", "CPU bcftools", "worker RSS avg/peak", "bcftools peak",
                "footprint"):  # fmt: skip
        table.add_column(col, justify="left" if col == "input" else "right")
    for res in results:
        r = res.report
        o, t = r.overhead, r.tool_totals
        table.add_row(
            f"{res.samples} samples × {res.variants} variants",
            seconds_h(r.wall_s),
            f"{seconds_h(o.wall_s)} ({o.wall_s / r.wall_s:.0%})",
            seconds_h(t.wall_s),
            seconds_h(res.bcftools_alone_wall_s),
            seconds_h(o.cpu_s),
            seconds_h(t.cpu_s),
            f"{bytes_h(o.rss_avg_bytes)} / {bytes_h(o.rss_peak_bytes)}",
            bytes_h(t.rss_peak_bytes),
            bytes_h(r.footprint_peak_bytes),
        )
    table.caption = (
        "overhead = the worker's own share (download, checks, orchestration); "
        "'bcftools alone' runs the same commands with no worker around them."
    )
    Console(width=max(console.width, 160)).print(table)
    if workdir is not None:
        click.echo(f"reports (one TaskReport per line): {workdir / 'reports.jsonl'}")


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


if __name__ == "__main__":  # pragma: no cover
    main()

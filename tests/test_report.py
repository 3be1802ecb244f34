"""`taskmeter report`: one self-contained HTML page from a ledger of real measured tasks
(or from a real Prometheus), opened in a real headless Chromium: plotly renders with no
network, no console or page errors, the table sorts on a header click."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import taskmeter
from taskmeter.export.ledger import Ledger, read_ledgers
from taskmeter.format import bytes_h, seconds_h
from taskmeter.sizing.recommend import Options, recommend
from taskmeter.sizing.stats import observed_concurrency, stats_from_reports

from helpers import child, require_module, require_path
from workerkit import free_port

MiB = 2**20
REPORT = [sys.executable, "-c", "from taskmeter.reporting.command import report; report()"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEIRD = "</script><img src=x onerror=alert(1)>"  # a task name that must stay text
# A script, stylesheet, image or frame loaded from elsewhere than the file itself.
EXTERNAL_REF = re.compile(
    r"<(?:script|link|img|iframe|source|embed|object)\b[^>]*\b(?:src|href|data)\s*=\s*"
    r"[\"']?\s*(?:https?:)?//",
    re.IGNORECASE,
)


def in_figure(label: str) -> str:
    """``label`` as it appears inside a figure's JSON: non-ASCII escaped, and ``<``,
    ``>`` and ``/`` too (plotly's guard against ``</script>``)."""
    text = json.dumps(label)[1:-1]
    for char in "<>/":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def run_report(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REPORT, *map(str, args)], capture_output=True, text=True, timeout=120)


def have_bcftools() -> bool:
    return shutil.which("bcftools") is not None and shutil.which("bgzip") is not None


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real tasks measured by taskmeter and written by the real Ledger, then two
    damaged lines appended (as a crash or a stray editor would leave them)."""
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "ledger.jsonl"
    with Ledger(path) as led:
        if have_bcftools():
            from taskmeter.demo.vcfgen import generate_vcf

            vcf = generate_vcf(tmp / "in.vcf.gz", samples=40, variants=4_000, seed=11)
            for i in range(3):
                out = tmp / f"sub{i}.vcf.gz"
                with taskmeter.measure("vcf.subset", task_id=f"vcf-{i}", on_report=led.write):
                    taskmeter.run(["bcftools", "view", "-s", "S0001,S0002", "-Oz", "-o",
                                   str(out), str(vcf)], check=True)  # fmt: skip
                    taskmeter.run(["bcftools", "index", "-f", str(out)], check=True)
                    taskmeter.run(["bcftools", "query", "-f", "%POS\\n", str(out)],
                                  capture_output=True, check=True)  # fmt: skip
        for i, mib in enumerate((20, 45, 70, 95)):
            with taskmeter.measure("mem.hold", task_id=f"mem-{i}", on_report=led.write) as m:
                with m.phase("download"):
                    time.sleep(0.02)
                hold = f"""
                    import time
                    b = bytearray({mib} << 20)
                    for j in range(0, len(b), 4096):
                        b[j] = 1
                    time.sleep(0.15)
                """
                taskmeter.run(child(hold), check=True)
                taskmeter.run(["sh", "-c", "sleep 0.05; echo done"], capture_output=True)

        def shell_steps(i: int) -> None:
            with taskmeter.measure("shell.steps", task_id=f"sh-{i}", on_report=led.write):
                taskmeter.run(["sh", "-c", "sleep 0.2"], check=True)
                taskmeter.run(["sh", "-c", "seq 1 20000 | sort -r | head -n 1"],
                              capture_output=True, check=True)  # fmt: skip

        # Two tasks at once, as a worker with concurrency 2 would run them.
        threads = [threading.Thread(target=shell_steps, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        with taskmeter.measure("mem.hold", task_id="mem-killed", on_report=led.write):
            hold = "b = bytearray(30 << 20)\nprint('held', flush=True)\ninput()"
            proc = taskmeter.Popen(child(hold), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
            proc.send_signal(signal.SIGKILL)  # as the OOM killer would
            proc.communicate()
        with (
            pytest.raises(RuntimeError),
            taskmeter.measure(WEIRD, task_id="weird-1", on_report=led.write),
        ):
            taskmeter.run(["sh", "-c", "exit 3"])
            raise RuntimeError("the task failed")
    good = len(path.read_text().splitlines())
    with open(path, "a") as f:
        f.write('{"schema": "taskmeter.task/1", "task": "trunc')  # a torn line
        f.write("\n" + '{"schema": "other/9"}' + "\n")
    (tmp / "good_lines").write_text(str(good))
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_path(CHROMIUM, "Debian package 'chromium'; scripts/setup.sh")
    sync_api: Any = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Opened:
    """A page opened from a file with every non-file request blocked and recorded."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.console: list[str] = []
        self.errors: list[str] = []
        self.external: list[str] = []
        self.dialogs: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page = self.page
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", on_dialog)

        def route(r: Any) -> None:
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                self.external.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(path.resolve().as_uri())
        page.wait_for_function(
            "document.querySelectorAll('.plotly .main-svg').length >= 3", timeout=30_000
        )

    def console_errors(self) -> list[str]:
        return [c for c in self.console if c.startswith(("error", "warning"))]

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.console_errors() == [], self.console
        assert self.external == [], f"the page asked the network for {self.external}"
        assert self.dialogs == [], f"something in the page ran script: {self.dialogs}"

    def column(self, table: str, index: int, attr: str = "data-v") -> list[str]:
        return list(
            self.page.eval_on_selector_all(
                f"#{table} tbody tr",
                f"rows => rows.map(r => r.cells[{index}].getAttribute('{attr}') "
                f"?? r.cells[{index}].textContent)",
            )
        )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_self_contained(text: str) -> None:
    assert EXTERNAL_REF.search(text) is None, EXTERNAL_REF.search(text)
    assert "<script src" not in text.lower() and "<link" not in text.lower()
    assert "Plotly.newPlot" in text and "plotly.js v" in text  # the library is inside


# -- from a ledger ------------------------------------------------------------------------------
def test_ledger_report_is_self_contained_and_renders_offline(ledger, browser, tmp_path):
    out = tmp_path / "report.html"
    t0 = time.monotonic()
    res = run_report("--ledger", ledger, "-o", out)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert elapsed < 30, elapsed
    good = int((ledger.parent / "good_lines").read_text())
    # A damaged record is a warning naming file:line; a line of other JSON is skipped
    # silently and counted; the rest is used.
    assert f"warning: {ledger}:{good + 1}: not JSON" in res.stderr
    assert f"{ledger}:{good + 2}" not in res.stderr
    assert (
        f"read {good} records from {ledger}; skipped 1 bad record (warnings above) and 1 "
        "line that is not a taskmeter record"
    ) in res.stderr
    assert f"wrote {out}" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"], "no temp file left"

    text = out.read_text()
    assert_self_contained(text)
    reports, _ = read_ledgers([ledger])
    types = sorted({r.task for r in reports})
    expected = {"mem.hold", "shell.steps", WEIRD} | ({"vcf.subset"} if have_bcftools() else set())
    assert set(types) == expected
    for name in types:
        assert html.escape(name) in text
    assert WEIRD not in text, "a task name must never become markup"
    for r in reports:
        assert html.escape(r.task_id or "") in text
    assert "Gantt-style view of which tools ran when and how big they got" in text

    # The lines are the recommendation of taskmeter.sizing divided by the concurrency.
    n = observed_concurrency(reports)
    assert n == 2, "two tasks ran at once in threads"
    rec = recommend(stats_from_reports(reports), Options(concurrency=n, parent_bytes=128 * MiB,
                                                         min_tasks=1))  # fmt: skip
    assert f"N = {n} (observed" in text
    labels = [
        f"request per task: {rec.memory_request} ÷ {n} = {bytes_h(rec.memory_request_bytes / n)}",
        f"limit per task: {rec.memory_limit} ÷ {n} = {bytes_h(rec.memory_limit_bytes / n)}",
    ]
    for label in labels:
        assert text.count(in_figure(label)) == len(types), label

    page = Opened(browser, out)
    try:
        page.assert_clean()
        p = page.page
        assert p.evaluate("document.querySelectorAll('.plotly .main-svg').length") >= 3
        # Per type: time split, memory, heaviest tasks over time; each drew its SVG.
        assert p.evaluate("document.querySelectorAll('.js-plotly-plot').length") == 3 * len(types)
        assert p.evaluate(
            "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".every(d => d.querySelectorAll('.main-svg .trace').length > 0)"
        )
        svg_text = p.evaluate(
            "Array.from(document.querySelectorAll('.main-svg text')).map(t => t.textContent)"
            ".join('\\n')"
        )
        for label in labels:
            assert svg_text.count(label) == len(types), (label, svg_text)
        assert "seconds since task start" in svg_text
        assert p.title() == f"taskmeter report: {ledger}"

        # The table holds every task; a header click sorts it, a second reverses it.
        assert len(page.column("tasks", 0, "title")) == len(reports)
        walls = [float(v) for v in page.column("tasks", 3)]
        assert walls == [r.wall_s for r in reports]  # ledger order to start with
        p.click("#tasks th:nth-child(4) button")
        assert [float(v) for v in page.column("tasks", 3)] == sorted(walls)
        assert p.get_attribute("#tasks th:nth-child(4)", "aria-sort") == "ascending"
        p.click("#tasks th:nth-child(4) button")
        assert [float(v) for v in page.column("tasks", 3)] == sorted(walls, reverse=True)
        p.click("#tasks th:nth-child(9) button")  # footprint
        footprints = [int(float(v)) for v in page.column("tasks", 8)]
        assert footprints == sorted(r.footprint_peak_bytes for r in reports)
        p.click("#tasks th:nth-child(1) button")  # a text column
        names = [c.strip() for c in page.column("tasks", 0, "none")]
        assert names == sorted(names, key=str.lower)
        page.assert_clean()

        shot = tmp_path / "report.png"
        p.screenshot(path=str(shot), full_page=True)
        width, height = png_size(shot)
        assert width >= 1000 and height >= 2000, (width, height)
        assert shot.stat().st_size > 100_000
        print(f"\nscreenshot: {shot}")
    finally:
        page.page.close()


def test_too_few_tasks_draws_no_lines_and_says_why(ledger, tmp_path):
    out = tmp_path / "r.html"
    res = run_report("--ledger", ledger, "--min-tasks", "50", "--concurrency", "3", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "no request/limit drawn: too few tasks" in res.stderr
    text = out.read_text()
    assert "No memory request or limit is drawn:</strong> too few tasks to size from" in text
    assert "request per task" not in text
    assert in_figure("no request/limit lines: see Sizing") in text
    assert "N = 3 (--concurrency)" in text


def test_given_concurrency_divides_the_pod_figures(ledger, tmp_path):
    out = tmp_path / "r.html"
    res = run_report("--ledger", ledger, "--concurrency", "4", "--parent-memory", "200Mi",
                     "--margin", "0.3", "--heaviest", "2", "-o", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    reports, _ = read_ledgers([ledger])
    options = Options(concurrency=4, parent_bytes=200 * MiB, request_margin=0.3,
                      limit_margin=0.3, min_tasks=1)  # fmt: skip
    rec = recommend(stats_from_reports(reports), options)
    text = out.read_text()
    label = f"limit per task: {rec.memory_limit} ÷ 4 = {bytes_h(rec.memory_limit_bytes / 4)}"
    assert in_figure(label) in text
    assert "The 2 tasks with the largest footprint" in text


# -- failures: a clear message, a non-zero exit, no file --------------------------------------
def test_bad_sources_fail_cleanly_and_write_nothing(ledger, tmp_path):
    out = tmp_path / "r.html"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n[1, 2]\n")
    cases = [
        (["--ledger", tmp_path / "nope.jsonl"], 1, "no such file"),
        (["--ledger", ledger, "--ledger", tmp_path / "nope.jsonl"], 1, "no such file"),
        (["--ledger", empty], 1, "no task records (empty)"),
        (["--ledger", garbage], 1, "no valid task record (0 bad, 2 not taskmeter records)"),
        ([], 2, "give either --ledger PATH... or --prometheus URL"),
        (["--ledger", ledger, "--prometheus", "http://127.0.0.1:9"], 2, "give either"),
        (["--ledger", ledger, "--since", "1d"], 2, "--since applies to --prometheus only"),
        (["--prometheus", f"http://127.0.0.1:{free_port()}"], 1, "cannot reach Prometheus"),
        (["--prometheus", "prometheus:9090"], 1, "not an http:// or https:// URL"),
        (["--prometheus", f"http://me:s3cret@127.0.0.1:{free_port()}"], 1, "cannot reach"),
        (["--prometheus", "http://127.0.0.1:9", "--since", "soon"], 2, "expected a duration"),
    ]
    for args, code, message in cases:
        res = run_report(*args, "-o", out)
        assert res.returncode == code, (args, res.stdout, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and "s3cret" not in res.stderr
        assert not out.exists(), args
    # An existing report is left as it was when a new one fails.
    out.write_text("the previous report")
    res = run_report("--ledger", empty, "-o", out)
    assert res.returncode == 1 and out.read_text() == "the previous report"
    res = run_report("--ledger", ledger, "-o", tmp_path / "no" / "such" / "dir.html")
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "garbage.jsonl", "r.html"]


# -- from Prometheus --------------------------------------------------------------------------
@pytest.mark.slow
def test_prometheus_report_shows_aggregates_and_says_per_task_needs_a_ledger(
    ledger, prometheus, browser, tmp_path
):
    """The ledger's reports fed to the real exporter, scraped by a real Prometheus."""
    from prometheus_client import CollectorRegistry

    from taskmeter.export.metrics import TaskMetrics
    from taskmeter.export.server import ServerConfig, start_server

    reports, _ = read_ledgers([ledger])
    metrics = TaskMetrics()
    registry = CollectorRegistry()
    registry.register(metrics)
    server = start_server(registry, ServerConfig(port=0, addr="127.0.0.1"))
    try:
        port = server.socket.getsockname()[1]
        prom = prometheus([f"127.0.0.1:{port}"])
        prom.wait_scrape_after(time.time())
        # Nothing ran yet: an error naming the window, and no file.
        out = tmp_path / "prom.html"
        res = run_report("--prometheus", prom.url + "/", "--since", "1h", "-o", out)
        assert res.returncode == 1, res.stderr
        assert f"Prometheus at {prom.url}/ has no task runs in the last 1h" in res.stderr
        assert not out.exists()
        for r in reports:
            metrics.observe(r)
        prom.wait_scrape_after(time.time())

        res = run_report("--prometheus", prom.url, "--since", "1h", "--concurrency", "2",
                         "-o", out)  # fmt: skip
        assert res.returncode == 0, res.stderr
        text = out.read_text()
        assert_self_contained(text)
        stats = stats_from_reports(reports)
        rec = recommend(stats, Options(concurrency=2, parent_bytes=128 * MiB, min_tasks=1))
        assert f"{prom.url} (last 1h)" in text and "aggregated metrics only" in text
        assert f"{len(reports)} tasks of {len(stats)} types" in text
        assert "need a ledger" in text
        for task, s in stats.items():  # the wall split of the ledger, from Prometheus
            wall_o, wall_t = s.wall_overhead_sum_s / s.runs, s.wall_tool_sum_s / s.runs
            assert wall_o + wall_t == pytest.approx(s.wall_mean_s, rel=1e-6), task
            for name, value in (("worker overhead", wall_o), ("tools", wall_t)):
                assert in_figure(f"{name}: {seconds_h(value)}") in text, (task, name)
        assert in_figure(f"request per task: {rec.memory_request} ÷ 2") in text
        assert 'id="tasks"' not in text  # no per-task table without a ledger

        page = Opened(browser, out)
        try:
            page.assert_clean()
            count = page.page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
            assert count == 2 * len(stats)
        finally:
            page.page.close()

        # Without --concurrency nothing tells how many tasks ran at once: no lines, and why.
        bare = tmp_path / "prom-bare.html"
        res = run_report("--prometheus", prom.url, "--since", "1h", "-o", bare)
        assert res.returncode == 0, res.stderr
        assert "concurrency of the worker is not known" in bare.read_text()
    finally:
        server.close()


def test_a_solo_ledger_is_sized_as_recommend_sizes_it(tmp_path):
    """The seed's example: a solo worker, tasks averaging 600 MiB and peaking at 900 MiB,
    20 % margins: 720Mi / 1080Mi, no parent process, as `taskmeter recommend` says."""
    from recordgen import T0, line, record

    ledger = tmp_path / "solo.jsonl"
    records = [
        record(i, start=T0 + 2 * i, wall=1.5, tools=0, pool="solo", worker_avg=600 * MiB,
               worker_peak=900 * MiB)
        for i in range(25)
    ]  # fmt: skip
    ledger.write_text("".join(line(r) + "\n" for r in records))
    out = tmp_path / "solo.html"
    res = run_report("--ledger", ledger, "-o", out)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "Pool solo (pool solo: the pool the workers ran with)" in text
    assert "N = 1 (a solo worker runs one task at a time)" in text
    rec = subprocess.run(
        [sys.executable, "-c", "from taskmeter.cli import main; main()", "recommend",
         "--ledger", str(ledger), "--format", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    resources = json.loads(rec)["resources"]
    assert resources["requests"]["memory"] == "720Mi"
    assert resources["limits"]["memory"] == "1080Mi"
    for quantity in ("720Mi", "1080Mi"):
        assert f"<code>{quantity}</code>" in text

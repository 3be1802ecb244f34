"""How close taskmeter, GNU time and psutil polling come to the kernel's own figures.

    .venv/bin/python benchmarks/bench_accuracy.py           # full run, about 3 minutes
    .venv/bin/python benchmarks/bench_accuracy.py --quick   # under a minute

Cases (those of tests/test_measure_accuracy.py, plus real bcftools):

(i)   a ~20 MB tool started from a worker holding 320 MB;
(ii)  a tool holding 200 MB for 30 ms in the middle of a 1 s life;
(iii) eight short tools of ~50 ms CPU each (their CPU summed);
(iv)  a 200 MB, 0.2 s spike in the worker process itself, between two tool runs;
(v)   bcftools on a generated VCF: a streaming ``view``, a buffering ``sort`` and a
      ~3 ms header read (``view -h``);
(vi)  (not in the tests) a 0.2 s tool that peaks at ~60 MB in its last milliseconds,
      started from a worker holding 320 MB: the peak falls after the last sample, and
      wait4's figure is the worker's, so nothing taskmeter reads sees it;
(vii) (not in the tests) ``true``: a tool that lives about a millisecond.

Ground truth, per run: a tool's peak is its own ``VmHWM`` read by the tool itself at
exit (Python children print it; bcftools and ``true`` get it from a tiny
``LD_PRELOAD`` destructor compiled here with ``cc``); tool CPU is this process's
``getrusage(RUSAGE_CHILDREN)`` delta over the run; the worker's peak is this process's
own ``VmHWM``, reset (``/proc/self/clear_refs``) before the run and read at its end.
Since Linux 6.2 live RSS readings (VmHWM included) are approximate by a few hundred KiB
(per-CPU counter batches), so a few % on a 4 MB tool is noise in the truth itself.

Methods: taskmeter (defaults: worker sampled every 0.1 s, tools every 20 ms); GNU time
(``/usr/bin/time -f '%e %U %S %M'`` wrapping the same command); a psutil polling
monitor at 10 ms and at 500 ms, a re-implementation of the old approach (a thread
polling ``psutil.Process(pid)`` and its children's ``memory_info().rss`` and
``cpu_times()``, keeping the largest RSS and the last CPU times seen); and ``os.wait4``
of a plain ``subprocess.Popen`` (its ``ru_maxrss`` for peaks, ``ru_utime + ru_stime``
for CPU). Every method runs the tool itself, interleaved with the others in each
repetition, and is compared with the truth of its own run; cells show medians over the
repetitions, and a second table the worst error.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import taskmeter
from _common import MiB, machine, median, table
from taskmeter.measure import wait_idle
from taskmeter.measure.sampler import SAMPLER

PY = sys.executable
PIPE, QUIET = subprocess.PIPE, subprocess.DEVNULL  # bcftools sort chats on stderr
GNU_TIME = "/usr/bin/time"

# The child's own peak, printed as its last line (as tests/helpers.py does).
PRINT_OWN_HWM = """
for _line in open("/proc/self/status"):
    if _line.startswith("VmHWM:"):
        print(int(_line.split()[1]) * 1024, flush=True)
"""

# Appends "comm pid VmHWM_KiB" to $BENCH_HWM_OUT when the process exits normally.
HWM_HOOK_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((destructor)) static void bench_report_own_hwm(void) {
    const char *out = getenv("BENCH_HWM_OUT");
    char buf[8192], comm[64] = {0}, line[160];
    ssize_t n;
    int fd, len;
    char *p;
    if (!out) return;
    fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) {
        n = read(fd, comm, sizeof comm - 1);
        if (n > 0 && comm[n - 1] == '\n') comm[n - 1] = 0;
        close(fd);
    }
    fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0) return;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    p = strstr(buf, "VmHWM:");
    if (!p) return;
    len = snprintf(line, sizeof line, "%s %d %ld\n", comm, (int)getpid(), strtol(p + 6, 0, 10));
    fd = open(out, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd < 0) return;
    if (write(fd, line, len) < 0) { /* nothing to do */ }
    close(fd);
}
"""


def py_child(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code) + PRINT_OWN_HWM]


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def reset_own_hwm() -> None:
    """Reset this process's VmHWM to its current RSS, so each run starts level."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def own_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def touched(n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):
        buf[i] = 1
    return buf


# -- the old approach: psutil polling ----------------------------------------------------
class PsutilMonitor:
    """Poll a process (and, with ``tree``, its children) every ``interval_s``: the
    largest RSS seen and, per pid, the last CPU times seen. What the old system did."""

    def __init__(self, pid: int, interval_s: float, *, tree: bool = True) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s, self.tree = interval_s, tree
        self.peak_rss = 0
        self.samples = 0
        self.cpu_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psutil-monitor", daemon=True)

    def _poll(self) -> None:
        try:
            procs = [self.proc, *(self.proc.children(recursive=True) if self.tree else [])]
        except psutil.Error:
            return
        rss, seen = 0, False
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    cpu = p.cpu_times()
            except psutil.Error:
                continue
            seen = True
            self.cpu_by_pid[p.pid] = cpu.user + cpu.system
        if seen:
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while True:
            self._poll()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> PsutilMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())


# -- one tool run under each method --------------------------------------------------------
@dataclass(frozen=True)
class ToolResult:
    stdout: bytes
    peak_bytes: float | None
    cpu_s: float
    method: str = ""


Runner = Callable[[Sequence[str], dict[str, str]], ToolResult]


def run_taskmeter(argv: Sequence[str], env: dict[str, str]) -> ToolResult:
    with taskmeter.measure("bench") as m:
        out = taskmeter.run(list(argv), stdout=PIPE, stderr=QUIET, env=env, check=True).stdout
    wait_idle()
    tool = m.report.tools[0]
    return ToolResult(out or b"", tool.rss_peak_bytes, tool.cpu_s, tool.peak_method)


def run_gnu_time(argv: Sequence[str], env: dict[str, str]) -> ToolResult:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        out = subprocess.run(
            [GNU_TIME, "-f", "%e %U %S %M", "-o", f.name, *argv],
            stdout=PIPE,
            stderr=QUIET,
            env=env,
            check=True,
        ).stdout
        _, user, sys_, maxrss_kib = f.read().split()[-4:]
    return ToolResult(out, int(maxrss_kib) * 1024, float(user) + float(sys_))


def psutil_runner(interval_s: float) -> Runner:
    def run(argv: Sequence[str], env: dict[str, str]) -> ToolResult:
        proc = subprocess.Popen(list(argv), stdout=PIPE, stderr=QUIET, env=env)
        mon = PsutilMonitor(proc.pid, interval_s).start()
        out, _ = proc.communicate()
        mon.stop()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv)
        return ToolResult(out, mon.peak_rss, mon.cpu_s, f"{mon.samples} samples")

    return run


def run_wait4(argv: Sequence[str], env: dict[str, str]) -> ToolResult:
    proc = subprocess.Popen(list(argv), stdout=PIPE, stderr=QUIET, env=env)
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return ToolResult(out, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime)


TOOL_METHODS: dict[str, Runner] = {
    "taskmeter": run_taskmeter,
    "GNU time": run_gnu_time,
    "psutil 10 ms": psutil_runner(0.01),
    "psutil 500 ms": psutil_runner(0.5),
    "wait4 (plain Popen)": run_wait4,
}
COLUMNS = list(TOOL_METHODS)


# -- results ---------------------------------------------------------------------------
@dataclass
class Cell:
    truths: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    def add(self, truth: float | None, value: float | None, method: str = "") -> None:
        if truth is None or value is None:
            return
        self.truths.append(truth)
        self.values.append(value)
        self.methods.append(method)

    def errors(self) -> list[float]:
        return [(v - t) / t for v, t in zip(self.values, self.truths, strict=True) if t]


@dataclass
class Row:
    case: str
    metric: str  # "peak" or "cpu"
    cells: dict[str, Cell] = field(default_factory=lambda: {c: Cell() for c in COLUMNS})


def fmt(metric: str, value: float) -> str:
    return f"{value / MiB:.1f} MiB" if metric == "peak" else f"{value * 1e3:.0f} ms"


def render(rows: list[Row], worst: bool) -> str:
    out = []
    for row in rows:
        truths = [t for c in row.cells.values() for t in c.truths]
        line = [row.case, "peak RSS" if row.metric == "peak" else "CPU"]
        line.append(fmt(row.metric, median(truths)) if truths else "N/A")
        for col in COLUMNS:
            cell = row.cells[col]
            errs = cell.errors()
            if not errs:
                line.append("N/A")
            elif worst:
                line.append(f"{max(errs, key=abs) * 100:+.1f} %")
            else:
                line.append(f"{fmt(row.metric, median(cell.values))} ({median(errs) * 100:+.1f} %)")
        tm = Counter(row.cells["taskmeter"].methods)
        counts = ", ".join(f"{m} x{n}" for m, n in sorted(tm.items()))
        line.append(counts if row.metric == "peak" else "")
        out.append(line)
    return table(["case", "metric", "truth", *COLUMNS, "taskmeter peak_method"], out)


# -- the cases -------------------------------------------------------------------------
@dataclass
class ToolCase:
    case: str
    argv: list[str]
    peak_truth: Callable[[bytes], float | None]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    ballast_bytes: int = 0
    rows: tuple[Row, Row] | None = None

    def __post_init__(self) -> None:
        self.rows = (Row(self.case, "peak"), Row(self.case, "cpu"))


def stdout_truth(out: bytes) -> float | None:
    return float(out.split()[-1])


@contextmanager
def ballast(n_bytes: int) -> Iterator[None]:
    held = touched(n_bytes) if n_bytes else None
    try:
        yield
    finally:
        del held


def run_tool_case(tc: ToolCase, order: list[str]) -> None:
    assert tc.rows is not None
    peak_row, cpu_row = tc.rows
    with ballast(tc.ballast_bytes):
        for col in order:
            reset_own_hwm()
            c0 = children_cpu_s()
            res = TOOL_METHODS[col](tc.argv, tc.env)
            cpu_truth = children_cpu_s() - c0
            peak_row.cells[col].add(tc.peak_truth(res.stdout), res.peak_bytes, res.method)
            cpu_row.cells[col].add(cpu_truth, res.cpu_s, res.method)


def run_short_tools(row: Row, order: list[str], count: int, cpu_s: float) -> None:
    argv = [
        PY,
        "-c",
        f"import time\nt0 = time.process_time()\nwhile time.process_time() - t0 < {cpu_s}: pass",
    ]
    env = dict(os.environ)
    for col in order:
        c0 = children_cpu_s()
        if col == "taskmeter":  # one task running the eight tools, as in the tests
            with taskmeter.measure("eight") as m:
                for _ in range(count):
                    taskmeter.run(argv, env=env, check=True)
            wait_idle()
            total = m.report.tool_totals.cpu_s
        else:
            total = sum(TOOL_METHODS[col](argv, env).cpu_s for _ in range(count))
        row.cells[col].add(children_cpu_s() - c0, total)


def worker_spike(row: Row, order: list[str], delay_s: float) -> None:
    """A task: tool, wait, a 200 MB spike in this process for 0.2 s, wait, tool."""

    def body(tool: Callable[[list[str]], object]) -> int:
        tool(["true"])
        time.sleep(delay_s)
        spike = b"x" * (200 * MiB)
        time.sleep(0.2)
        del spike
        time.sleep(0.2)
        tool(["true"])
        return own_hwm_bytes()

    for col in order:
        reset_own_hwm()
        if col == "taskmeter":
            with taskmeter.measure("spike") as m:
                truth = body(taskmeter.run)
            wait_idle()
            over = m.report.overhead
            row.cells[col].add(truth, over.rss_peak_bytes, over.peak_method)
        elif col.startswith("psutil"):
            interval = 0.01 if col == "psutil 10 ms" else 0.5
            mon = PsutilMonitor(os.getpid(), interval, tree=False).start()
            truth = body(subprocess.run)
            mon.stop()
            row.cells[col].add(truth, mon.peak_rss)


# -- bcftools --------------------------------------------------------------------------
def build_hwm_hook(workdir: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = workdir / "hwm_hook.c", workdir / "hwm_hook.so"
    src.write_text(HWM_HOOK_C)
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)])
    return lib if done.returncode == 0 else None


def make_vcf(path: Path, samples: int, variants: int) -> None:
    try:
        from taskmeter.demo.vcfgen import generate_vcf
    except ImportError:
        simple_vcf(path, samples, variants)
    else:
        generate_vcf(path, samples=samples, variants=variants, seed=1)


def simple_vcf(path: Path, samples: int, variants: int) -> None:
    """Fallback generator: random biallelic SNVs, bgzip-compressed and indexed."""
    rng = random.Random(1)
    names = [f"S{i:04d}" for i in range(1, samples + 1)]
    header = [
        "##fileformat=VCFv4.2",
        f"##contig=<ID=chr1,length={10_000 + variants * 100}>",
        '##INFO=<ID=AF,Number=A,Type=Float,Description="Allele frequency">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(names),
    ]
    with open(path, "wb") as sink:
        bgzip = subprocess.Popen(["bgzip", "-c"], stdin=subprocess.PIPE, stdout=sink)
        assert bgzip.stdin is not None
        with bgzip.stdin as pipe:
            pipe.write(("\n".join(header) + "\n").encode())
            for i in range(variants):
                af = rng.random() ** 3
                gts = "\t".join(
                    ("0", "1")[rng.random() < af] + "/" + ("0", "1")[rng.random() < af]
                    for _ in names
                )
                pos = 10_000 + i * 100
                pipe.write(f"chr1\t{pos}\t.\tA\tG\t60\tPASS\tAF={af:.3f}\tGT\t{gts}\n".encode())
        if bgzip.wait():
            raise RuntimeError("bgzip failed")
    subprocess.run(["bcftools", "index", "-f", str(path)], check=True)


class HwmHook:
    """The ``LD_PRELOAD`` destructor that makes any dynamically linked tool report its
    own VmHWM at exit; ``truth(comm)`` reads it back (None without a C compiler)."""

    def __init__(self, workdir: Path) -> None:
        self.lib = build_hwm_hook(workdir)
        self.out = workdir / "hwm.txt"
        self.env = dict(os.environ)
        if self.lib is not None:
            self.env.update(LD_PRELOAD=str(self.lib), BENCH_HWM_OUT=str(self.out))

    def truth(self, comm: str) -> Callable[[bytes], float | None]:
        def read(_: bytes) -> float | None:
            if self.lib is None or not self.out.exists():
                return None
            lines = [ln.split() for ln in self.out.read_text().splitlines()]
            self.out.unlink()
            kib = [int(f[2]) for f in lines if f[0] == comm]
            return kib[-1] * 1024 if kib else None

        return read


def bcftools_cases(workdir: Path, hook: HwmHook, samples: int, variants: int) -> list[ToolCase]:
    if shutil.which("bcftools") is None or shutil.which("bgzip") is None:
        print("note: bcftools or bgzip not installed: case (v) skipped", file=sys.stderr)
        return []
    if hook.lib is None:
        print("note: no C compiler: bcftools peaks have no ground truth", file=sys.stderr)
    vcf = workdir / "cohort.vcf.gz"
    make_vcf(vcf, samples, variants)
    truth, env = hook.truth("bcftools"), hook.env
    view = ["bcftools", "view", "-i", "INFO/AF>0.05", "-Oz", "-o", str(workdir / "v.vcf.gz")]
    sort = ["bcftools", "sort", "-T", str(workdir / "sort.XXXXXX"), "-Oz", "-o"]
    header = ["bcftools", "view", "-h", str(vcf)]
    return [
        ToolCase("(v) `bcftools view -i` (streaming)", [*view, str(vcf)], truth, env),
        ToolCase(
            "(v) `bcftools sort` (buffering)",
            [*sort, str(workdir / "s.vcf.gz"), str(vcf)],
            truth,
            env,
        ),
        ToolCase("(v) `bcftools view -h` (header, ~3 ms)", header, truth, env),
    ]


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions, small VCF: < 1 min")
    ap.add_argument("--reps", type=int, help="repetitions of every case (default 5; quick 2)")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    samples, variants = (100, 5_000) if args.quick else (200, 20_000)
    if not sys.platform.startswith("linux"):
        print("bench_accuracy needs Linux (/proc ground truth)", file=sys.stderr)
        return 2
    if shutil.which(GNU_TIME) is None:
        print(f"{GNU_TIME} not found: install the Debian package 'time'", file=sys.stderr)
        return 2

    case_i = ToolCase(
        "(i) 20 MB tool from a 320 MB worker",
        py_child('blob = b"x" * (10 * 1024 * 1024)\nimport time; time.sleep(0.3)'),
        stdout_truth,
        ballast_bytes=320 * MiB,
    )
    case_ii = ToolCase(
        "(ii) 200 MB for 30 ms in a 1 s tool",
        py_child(
            """
            import time
            time.sleep(0.5)
            spike = b"x" * (200 * 1024 * 1024)
            time.sleep(0.03)
            del spike
            time.sleep(0.5)
            """
        ),
        stdout_truth,
    )
    case_vi = ToolCase(
        "(vi) 60 MB peak at the end of a 0.2 s tool, 320 MB worker",
        py_child('import time; time.sleep(0.2)\nblob = b"x" * (50 * 1024 * 1024)'),
        stdout_truth,
        ballast_bytes=320 * MiB,
    )
    row_iii = Row("(iii) 8 tools x ~50 ms CPU, summed", "cpu")
    row_iv = Row("(iv) 200 MB, 0.2 s spike in the worker", "peak")
    rng = random.Random(7)

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        hook = HwmHook(Path(tmp))
        bcf = bcftools_cases(Path(tmp), hook, samples, variants)
        extra = [case_vi]
        if hook.lib is not None:
            extra.append(ToolCase("(vii) `true` (~1 ms)", ["true"], hook.truth("true"), hook.env))
        for rep in range(reps):
            order = COLUMNS[rep % len(COLUMNS) :] + COLUMNS[: rep % len(COLUMNS)]
            for tc in (case_i, case_ii):
                run_tool_case(tc, order)
            run_short_tools(row_iii, order, 8, 0.05)
            worker_spike(row_iv, order, delay_s=rng.uniform(0.1, 0.6))
            for tc in bcf:
                run_tool_case(tc, order)
            for tc in extra:
                run_tool_case(tc, order)
            print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)

    rows: list[Row] = []
    for tc in (case_i, case_ii):
        assert tc.rows is not None
        rows.append(tc.rows[0])
    rows += [row_iii, row_iv]
    for tc in bcf:
        assert tc.rows is not None
        rows += list(tc.rows)
    for tc in extra:
        assert tc.rows is not None
        rows.append(tc.rows[0])

    print(f"# bench_accuracy ({'quick' if args.quick else 'full'})\n")
    print(f"Machine: {machine()}\n")
    print(
        f"{reps} repetitions, methods interleaved; taskmeter sampling interval "
        f"{SAMPLER.interval_s:g} s; VCF {samples} samples x {variants} variants; "
        f"{time.monotonic() - t_start:.0f} s.\n"
    )
    print("### Median value (median relative error vs the truth of the same run)\n")
    print(render(rows, worst=False), end="\n\n")
    print("### Worst relative error over the repetitions\n")
    print(render(rows, worst=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

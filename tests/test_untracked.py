"""Subprocesses a task did not start through taskmeter: found by the sampler
(untracked, sampled lower bounds), or routed through taskmeter by the opt-in patch
(TASKMETER_PATCH_SUBPROCESS / ``instrument(app, patch_subprocess=True)``)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import pytest

import taskmeter
from taskmeter.measure import patch as patch_module
from taskmeter.measure.sampler import SAMPLER

from helpers import PRINT_OWN_HWM, burn_child, child, linux_only

MiB = 1024 * 1024

# A child that holds MIB of touched memory for SECONDS, then prints its own VmHWM and
# (last line) its own CPU seconds: the ground truth.
HOLD = """
import resource, sys, time
mib, seconds = int(sys.argv[1]), float(sys.argv[2])
blob = bytearray(mib * 1024 * 1024)
for i in range(0, len(blob), 4096):
    blob[i] = 1
time.sleep(seconds)
"""
PRINT_OWN_CPU = """
ru = resource.getrusage(resource.RUSAGE_SELF)
print(ru.ru_utime + ru.ru_stime, flush=True)
"""


def hold(mib: int, seconds: float) -> list[str]:
    return [*child(HOLD, PRINT_OWN_HWM, PRINT_OWN_CPU), str(mib), str(seconds)]


def truth_of(stdout: bytes | str) -> tuple[int, float]:
    """(own VmHWM bytes, own CPU seconds) that a ``hold`` child printed."""
    lines = stdout.split()
    return int(lines[-2]), float(lines[-1])


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@pytest.fixture
def interval():
    before = SAMPLER.interval_s
    yield lambda seconds: taskmeter.configure(interval_s=seconds)
    SAMPLER.interval_s = before


@pytest.fixture
def patched():
    assert patch_module.patch()
    yield
    assert patch_module.unpatch()
    assert subprocess.Popen is patch_module.ORIGINAL


# -- (a) found by the sampler ------------------------------------------------------------
@linux_only
def test_a_200_mb_tool_run_by_plain_subprocess_run_counts_in_the_footprint():
    before = children_cpu()
    with taskmeter.measure("plain-run") as m:
        out = subprocess.run(hold(200, 1.0), capture_output=True, check=True)
    child_cpu = children_cpu() - before
    hwm, _ = truth_of(out.stdout)
    r = m.report
    assert hwm >= 200 * MiB
    # Sampled: a lower bound, here within one interval of a held peak.
    assert r.footprint_peak_bytes >= r.overhead.rss_peak_bytes + 0.9 * hwm
    [tool] = r.tools
    assert (tool.tracked, tool.outcome, tool.peak_method) == (False, "untracked", "sampled")
    assert tool.exe.startswith("python") and tool.argv[1] == "-c"
    assert 0.9 * hwm <= tool.rss_peak_bytes <= hwm * 1.02
    assert tool.samples >= 5
    assert 0.7 <= tool.wall_s <= r.wall_s + 0.05
    assert (tool.exit_code, tool.signal) == (None, None)
    # CPU sampled from /proc/PID/stat (ticks): at most the kernel's exact figure; the
    # rest, after the last sample, stays unattributed: never counted twice.
    assert 0 < tool.cpu_s <= child_cpu + 0.02
    assert tool.cpu_s + r.unattributed_child_cpu_s == pytest.approx(child_cpu, abs=0.03)
    assert r.tool_totals.runs == 1 and r.tool_totals.rss_peak_bytes == tool.rss_peak_bytes


@linux_only
def test_an_untracked_tools_name_is_its_executables_not_its_argv0(tmp_path):
    # argv[0] is any text its starter chose (setproctitle, exec -a): never a label.
    sleep = shutil.which("sleep")
    assert sleep is not None
    with taskmeter.measure("argv0") as m:
        subprocess.run(["task-3f2a9c-retry-7", "1"], executable=sleep, check=True)
    [tool] = m.report.tools
    assert not tool.tracked and tool.argv[0] == "task-3f2a9c-retry-7"
    assert tool.exe == os.path.basename(os.path.realpath(sleep))
    # Nor the kernel's name of the process (the name it was executed by; a process can
    # also change it with PR_SET_NAME) when its executable's name differs.
    link = tmp_path / "task-3f2a9c"
    link.symlink_to(os.path.realpath(sleep))
    with taskmeter.measure("comm") as m:
        subprocess.run([str(link), "1"], check=True)
    [tool] = m.report.tools
    assert not tool.tracked and tool.exe == os.path.basename(os.path.realpath(sleep))


@linux_only
def test_children_from_before_the_task_are_not_the_tasks():
    old = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.05)
        with taskmeter.measure("after") as m:
            time.sleep(0.35)
        assert m.report.tools == ()
    finally:
        old.kill()
        old.wait()


def _fork_hold(seconds: float, then_exec: list[str] | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(seconds)
            if then_exec:
                os.execv(then_exec[0], then_exec)
        finally:
            os._exit(0)
    return pid


@linux_only
def test_a_forked_child_that_never_execs_is_not_counted_as_the_workers_memory_again():
    # Between fork and exec (and for good without exec) a child maps the worker's
    # pages: its RSS is the worker's, copy-on-write. It must not double the footprint.
    ballast = bytearray(150 * MiB)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    with taskmeter.measure("forker") as m:
        pid = _fork_hold(0.5)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    r = m.report
    assert r.overhead.rss_peak_bytes >= 150 * MiB
    assert r.footprint_peak_bytes < r.overhead.rss_peak_bytes + 20 * MiB
    [tool] = r.tools  # seen at several samples: listed, with no memory of its own
    assert not tool.tracked and tool.rss_peak_bytes == 0 and tool.peak_method == "none"
    del ballast


@linux_only
def test_a_child_counts_from_its_exec_not_before():
    ballast = bytearray(150 * MiB)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    with taskmeter.measure("fork-then-exec") as m:
        # Half a second as a copy of this 150 MB process, then a 30 MB tool for 0.8 s.
        pid = _fork_hold(0.5, then_exec=hold(30, 0.8))
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    r = m.report
    [tool] = r.tools
    assert not tool.tracked and tool.argv[-2:] == ("30", "0.8")
    assert 30 * MiB <= tool.rss_peak_bytes < 60 * MiB  # its own, not the worker's copy
    assert r.footprint_peak_bytes < r.overhead.rss_peak_bytes + 60 * MiB
    del ballast


@linux_only
def test_a_tracked_tools_descendants_are_not_counted_again():
    grandchild = child(HOLD)  # a 100 MB grandchild, under the tracked tool
    code = f"import subprocess, sys; subprocess.run({[*grandchild, '100', '0.6']!r}, check=True)"
    with taskmeter.measure("tracked") as m:
        taskmeter.run([sys.executable, "-c", code], check=True)
    r = m.report
    [tool] = r.tools
    assert tool.tracked and tool.rss_peak_bytes >= 100 * MiB
    assert r.footprint_peak_bytes < r.overhead.rss_peak_bytes + tool.rss_peak_bytes + 30 * MiB


@linux_only
def test_a_zombies_cpu_is_subtracted_from_unattributed_cpu_once(interval):
    interval(1.0)
    short, longer = burn_child(0.1), burn_child(0.3)
    before = children_cpu()
    with taskmeter.measure("zombie") as m:
        # Ends before the first sample (at 1 s): never seen, wholly unattributed.
        subprocess.run(short, check=True)
        c0 = children_cpu()
        z = subprocess.Popen(longer)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a zombie through at least one sample
            with open(f"/proc/{z.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        time.sleep(1.1)  # a sample sees it as a zombie, then it is reaped
        z.wait()
    unseen = c0 - before
    zombie_cpu = children_cpu() - c0
    r = m.report
    [tool] = r.tools
    assert tool.pid == z.pid and tool.outcome == "untracked"
    # As a zombie it was sampled whole (to the kernel's tick).
    assert tool.cpu_s == pytest.approx(zombie_cpu, abs=0.03)
    assert r.unattributed_child_cpu_s == pytest.approx(unseen, abs=0.03)
    assert unseen >= 0.1


@linux_only
def test_tasks_overlapping_in_threads_each_get_only_their_own_children():
    reports: dict[int, taskmeter.TaskReport] = {}

    def task(mib: int) -> None:
        with taskmeter.measure(f"thread-{mib}") as m:
            subprocess.run(hold(mib, 0.8), capture_output=True, check=True)
        reports[mib] = m.report

    threads = [threading.Thread(target=task, args=(mib,)) for mib in (40, 80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mib, r in reports.items():
        assert r.overhead.cpu_method == "thread"  # they overlapped
        [tool] = r.tools
        assert not tool.tracked and tool.argv[-2:] == (str(mib), "0.8")
        assert mib * MiB <= tool.rss_peak_bytes < (mib + 30) * MiB


# -- (b) the opt-in patch ----------------------------------------------------------------
@linux_only
def test_patched_plain_subprocess_run_is_a_full_tracked_tool_run(patched):
    with taskmeter.measure("patched") as m:
        out = subprocess.run(hold(200, 0.5), capture_output=True, check=True)
    hwm, own_cpu = truth_of(out.stdout)
    r = m.report
    [tool] = r.tools
    assert tool.tracked and tool.outcome == "ok" and tool.exit_code == 0
    assert tool.rss_peak_bytes == pytest.approx(hwm, rel=0.10)
    # wait4's exact CPU: the child's own figure plus its few ms of exit after printing.
    assert own_cpu <= tool.cpu_s <= own_cpu + 0.05
    assert r.unattributed_child_cpu_s < 0.01
    assert r.footprint_peak_bytes >= r.overhead.rss_peak_bytes + 0.9 * hwm


@linux_only
def test_patched_popen_keeps_subprocess_semantics_inside_a_task(patched):
    with taskmeter.measure("semantics") as m:
        assert subprocess.check_output(["echo", "hi"]) == b"hi\n"
        with pytest.raises(subprocess.CalledProcessError) as err:
            subprocess.run(["sh", "-c", "echo out; exit 3"], capture_output=True, check=True)
        assert (err.value.returncode, err.value.stdout) == (3, b"out\n")
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(["sleep", "30"], timeout=0.3)
        assert time.monotonic() - t0 < 5
        with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
            assert p.communicate(b"x" * 100_000, timeout=10)[0] == b"x" * 100_000
        assert p.returncode == 0
        with pytest.raises(FileNotFoundError):
            subprocess.Popen(["/nonexistent/tool"])
        p = subprocess.Popen(["sleep", "0.2"])
        while p.poll() is None:
            time.sleep(0.02)
        assert p.returncode == 0
    r = m.report
    assert [t.exe for t in r.tools] == ["echo", "sh", "sleep", "cat", "sleep"]
    assert all(t.tracked for t in r.tools)
    assert [t.outcome for t in r.tools] == ["ok", "error", "killed", "ok", "ok"]


@linux_only
def test_patch_changes_nothing_outside_a_task_or_in_other_threads(patched):
    assert isinstance(patch_module.ORIGINAL(["true"]), subprocess.Popen)
    p = subprocess.Popen(["true"])
    assert p.wait(5) == 0 and p._taskmeter_watch is None  # type: ignore[attr-defined]
    assert isinstance(p, patch_module.ORIGINAL) and isinstance(p, subprocess.Popen)
    assert issubclass(patch_module.ORIGINAL, subprocess.Popen)
    assert subprocess.run(["false"]).returncode == 1
    seen: list[object] = []

    def other() -> None:  # a thread that is not running the task
        q = subprocess.Popen(["sleep", "0.05"])
        q.wait()
        seen.append(q._taskmeter_watch)  # type: ignore[attr-defined]

    with taskmeter.measure("task-thread") as m:
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == [None]
    assert not [t for t in m.report.tools if t.tracked]
    assert patch_module.patch() is False  # idempotent


@linux_only
def test_patched_asyncio_subprocesses_are_left_to_asyncio(patched):
    import asyncio

    async def main() -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "sleep 0.3; echo done", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    with taskmeter.measure("asyncio") as m:
        assert asyncio.run(main()) == (0, b"done\n")
    # asyncio reaps its own children: a tracked run would never see its exit. The
    # sampler still found it (untracked), and nothing is left being sampled.
    assert [t.tracked for t in m.report.tools] in ([], [False])
    assert taskmeter.wait_idle()


def test_a_subclass_made_after_the_patch_is_an_ordinary_class(patched):
    class MyPopen(subprocess.Popen):  # type: ignore[type-arg]
        pass

    plain = patch_module.ORIGINAL(["true"])
    plain.wait(5)
    assert not isinstance(plain, MyPopen) and isinstance(plain, subprocess.Popen)
    assert not issubclass(patch_module.ORIGINAL, MyPopen)
    mine = MyPopen(["true"])
    mine.wait(5)
    assert isinstance(mine, MyPopen) and isinstance(mine, subprocess.Popen)
    assert issubclass(MyPopen, MyPopen) and issubclass(MyPopen, patch_module.ORIGINAL)


def test_patch_leaves_another_librarys_popen_alone(monkeypatch, caplog):
    class Theirs(subprocess.Popen):  # type: ignore[type-arg]
        pass

    monkeypatch.setattr(subprocess, "Popen", Theirs)
    assert patch_module.patch() is False
    assert subprocess.Popen is Theirs and "not patching" in caplog.text


def test_unpatch_restores_the_original_class():
    original = subprocess.Popen
    assert patch_module.patch()
    assert subprocess.Popen is patch_module.PatchedPopen and patch_module.patched()
    assert patch_module.unpatch()
    assert subprocess.Popen is original and not patch_module.patched()
    assert patch_module.unpatch() is False


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("patch", ["0", "1"])
def test_a_celery_task_calling_plain_subprocess_run(start_worker, patch):
    # Default: the 200 MB tool is found by the sampler. TASKMETER_PATCH_SUBPROCESS=1: it
    # is a tracked tool run, exact.
    w = start_worker("redis", "prefork", 1, TASKMETER_PATCH_SUBPROCESS=patch)
    w.send("sub.run", hold(200, 1.0))
    [r] = w.wait_reports(1, timeout=40)
    assert r.task == "sub.run" and r.state == "success"
    [tool] = r.tools
    assert tool.exe.startswith("python") and tool.cpu_s > 0
    assert tool.rss_peak_bytes >= 200 * MiB
    assert r.footprint_peak_bytes >= r.overhead.rss_peak_bytes + 0.9 * tool.rss_peak_bytes
    if patch == "1":
        assert tool.tracked and tool.outcome == "ok"
        assert r.unattributed_child_cpu_s < 0.01
    else:
        assert not tool.tracked and tool.outcome == "untracked" and tool.samples >= 5
    outcome = "ok" if patch == "1" else "untracked"
    labels = {f'outcome="{outcome}"', 'task="sub.run"', 'tool="python"'}
    [line] = [
        ln
        for ln in w.metrics().splitlines()
        if ln.startswith("celery_task_tool_runs_total{") and all(lb in ln for lb in labels)
    ]
    assert line.endswith(" 1.0")


def test_instrument_keyword_sets_the_worker_setting():
    from celery import Celery

    from taskmeter.celery import instrument, uninstrument
    from taskmeter.config import load_settings

    app = Celery("kw", broker="memory://")
    instrument(app, patch_subprocess=True)
    try:
        assert load_settings(app.conf, {}).patch_subprocess is True
        # The environment wins over app.conf, as for every setting.
        env = {"TASKMETER_PATCH_SUBPROCESS": "0"}
        assert load_settings(app.conf, env).patch_subprocess is False
    finally:
        uninstrument(app)
    assert load_settings(Celery("plain").conf, {}).patch_subprocess is False

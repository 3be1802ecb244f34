"""No orphaned tools: when a pool child dies mid-task, the main worker process kills the
tools it left running (their whole tree), lists them in the task's report as
``orphan-killed``, and never signals a process that merely reused a tool's pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from taskmeter.celery.hub import Hub
from taskmeter.measure import cgroup, orphans
from taskmeter.measure.report import TaskReport

from helpers import linux_only
from workerkit import wait_for

pytestmark = linux_only
DEAD_PID = 2**22 + 12345  # above any pid_max: a pool process that died
# The cause of a SIGKILL without an OOM kill: "signal" where a memory cgroup tells.
NO_OOM = "signal" if cgroup.oom_kills() is not None else "unknown"


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if orphans.read_stat(p) is None:
            continue
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def alive(pid: int, ticks: int | None) -> bool:
    """``pid`` is still the same live process (a reused pid is another process)."""
    st = orphans.read_stat(pid)
    return st is not None and st.state != "Z" and st.start_tick == ticks


def test_kill_9_of_a_pool_child_leaves_no_process_of_its_task(start_worker):
    w = start_worker("redis", "prefork", 2)
    w.send("tool.hold", 100, 120, 1)  # a tool holding 100 MiB, its child another 100
    row = wait_for(
        lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 190 << 20],
        40,
        "the tool tree holding its 200 MiB",
    )[0]
    seen_at = time.time()
    child = row["pid"]
    task_procs = {p: orphans.start_ticks(p) for p in tree(child) if p != child}
    assert len(task_procs) == 2, task_procs  # the tool and its own child
    (tool_pid,) = [p for p in task_procs if orphans.read_stat(p).ppid == child]  # type: ignore[union-attr]
    os.kill(child, signal.SIGKILL)
    killed_at = time.time()

    # Nothing of that task survives: the tool and its child are gone within a few ticks.
    wait_for(
        lambda: not any(alive(p, t) for p, t in task_procs.items()),
        10,
        f"the orphaned tools {sorted(task_procs)} to be killed",
        interval=0.05,
    )
    gone_after = time.time() - killed_at
    (report,) = w.wait_reports(1, timeout=30)
    assert report.task == "tool.hold" and report.state == "killed"
    # A kill -9 with no OOM kill in the cgroup ("unknown" where there is no counter).
    assert report.cause == NO_OOM
    (tool,) = report.tools
    assert (tool.pid, tool.cause, tool.outcome, tool.signal) == (
        tool_pid, "orphan-killed", "orphan-killed", 9,
    )  # fmt: skip
    assert tool.exe.startswith("python")
    # Its last figures: the tree held its 200 MiB (as the test saw) until it was killed.
    assert tool.rss_peak_bytes >= 190 << 20
    assert 0 < tool.rss_avg_bytes <= tool.rss_peak_bytes
    # It ran from before it was seen holding its memory until after the child's death.
    assert killed_at - seen_at - 0.05 <= tool.wall_s <= killed_at + gone_after - seen_at + 30
    assert tool.cpu_s > 0
    assert report.tool_totals.runs == 1
    assert report.footprint_peak_bytes >= 190 << 20
    assert gone_after < 5
    text = w.log_text()
    assert "left running by the dead pool process" in text


def test_hard_time_limit_with_a_tool_running_kills_the_tool(start_worker):
    w = start_worker("redis", "prefork", 1)
    w.send("tool.hold", 20, 120, 0, time_limit=3)
    row = wait_for(
        lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 15 << 20], 40, "tool"
    )[0]
    procs = {p: orphans.start_ticks(p) for p in tree(row["pid"]) if p != row["pid"]}
    (report,) = w.wait_reports(1, timeout=30)
    assert (report.state, report.cause) == ("killed", "time_limit")
    # Celery's SIGTERM first lets taskmeter.run kill its tool on the way out ("killed");
    # when SIGKILL follows too soon, the main process kills it ("orphan-killed").
    (tool,) = report.tools
    assert tool.signal == 9 and tool.outcome in ("killed", "orphan-killed"), tool
    assert not any(alive(p, t) for p, t in procs.items())


# -- the pid-reuse guard ---------------------------------------------------------------------
@pytest.fixture
def orphan() -> tuple[int, int]:
    """A real orphan: a `sleep` whose parent (a shell) has exited, re-parented away from
    this process; (pid, start ticks). Killed at the end if still there."""
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(out.stdout)
    ticks = orphans.start_ticks(pid)
    assert ticks is not None
    yield pid, ticks
    if alive(pid, ticks):
        os.kill(pid, signal.SIGKILL)


def test_a_pid_whose_start_time_differs_is_never_killed(orphan):
    pid, ticks = orphan
    me = os.getpid()
    # The recorded start time is not this process's: the pid was reused.
    assert orphans.still_running(pid, ticks + 1, me) is False
    assert orphans.kill_tool(pid, ticks + 1, me) is None
    assert orphans.kill_tool(pid, ticks - 50, me) is None
    assert orphans.kill_tool(pid, None, me) is None
    time.sleep(0.05)
    assert alive(pid, ticks), "a process that merely reused a tool's pid was signalled"
    # Its pool process still lives (it is still its parent's): not an orphan either.
    parent = orphans.read_stat(pid).ppid  # type: ignore[union-attr]
    assert orphans.still_running(pid, ticks, parent) is None
    assert orphans.kill_tool(pid, ticks, parent) is None
    assert alive(pid, ticks)
    # The recorded identity, orphaned: killed, with its figures.
    assert orphans.still_running(pid, ticks, me) is True
    killed = orphans.kill_tool(pid, ticks, me)
    assert killed is not None and killed.processes == 1 and killed.rss_bytes > 0
    wait_for(lambda: not alive(pid, ticks), 5, "the verified orphan to die", interval=0.02)


def test_hub_kills_only_the_dead_childs_verified_tools(orphan):
    """The hub, told a pool child is gone, kills its recorded tool only when pid and
    start time both match, and lists it in the killed task's report."""
    pid, ticks = orphan
    reports: list[TaskReport] = []
    hub = Hub([reports.append], hostname="h", pool="prefork", interval_s=0.05)
    dead_child = DEAD_PID
    now = time.monotonic()
    for run_id, tool_ticks in (("reused", ticks + 7), ("real", ticks)):
        hub.started(run_id, "t." + run_id, run_id + "-id", dead_child, time.time())
        hub.tool_started(run_id, pid, tool_ticks, ("sleep", "60"), "sleep", now)
    hub.process_gone(dead_child)
    hub.tick(final=True)
    by_task = {r.task: r for r in reports}
    assert set(by_task) == {"t.reused", "t.real"}
    assert by_task["t.reused"].tools == ()
    assert [t.cause for t in by_task["t.real"].tools] == ["orphan-killed"]
    assert by_task["t.real"].state == "killed" and by_task["t.real"].cause == NO_OOM
    wait_for(lambda: not alive(pid, ticks), 5, "the verified tool to die", interval=0.02)


def test_a_tool_in_its_own_process_group_has_its_group_killed():
    """A tool that leads its own group (start_new_session) takes its group with it,
    including a member that left its tree (re-parented after its parent exited)."""
    code = (
        "import subprocess, sys, time\n"
        "sh = ['sh', '-c', 'sleep 60 >/dev/null 2>&1 & echo $!']\n"
        "out = subprocess.run(sh, capture_output=True)\n"
        "print(int(out.stdout), flush=True)\n"
        "time.sleep(60)\n"
    )
    tool = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert tool.stdout is not None
    sleeper = int(tool.stdout.readline())
    ticks, sleeper_ticks = orphans.start_ticks(tool.pid), orphans.start_ticks(sleeper)
    try:
        st, sleeper_st = orphans.read_stat(tool.pid), orphans.read_stat(sleeper)
        assert st is not None and sleeper_st is not None
        assert st.pgid == tool.pid == sleeper_st.pgid and sleeper_st.ppid != tool.pid
        assert sleeper not in tree(tool.pid), "the sleeper left the tool's tree"
        killed = orphans.kill_tool(tool.pid, ticks, DEAD_PID)
        assert killed is not None and killed.processes == 1
        wait_for(
            lambda: not alive(tool.pid, ticks) and not alive(sleeper, sleeper_ticks),
            5,
            "the tool and the rest of its group to die",
            interval=0.02,
        )
    finally:
        for p, t in ((tool.pid, ticks), (sleeper, sleeper_ticks)):
            if alive(p, t):
                os.kill(p, signal.SIGKILL)
        tool.wait()


def test_a_task_ending_during_a_warm_shutdown_is_recorded_with_its_tool(start_worker):
    """A warm shutdown (SIGTERM: a Kubernetes rollout) waits for the running task; its
    report, sent after taskmeter's step was stopped, still reaches the ledger."""
    w = start_worker("redis", "prefork", 1)
    result = w.send("tool.hold", 20, 3, 0)
    wait_for(lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 15 << 20], 30, "tool")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    (report,) = [r for r in w.reports() if r.task_id == result.id]
    assert (report.state, report.cause) == ("success", None)
    assert [t.outcome for t in report.tools] == ["ok"]
    assert "could not deliver" not in w.log_text()


@pytest.mark.parametrize(("sig", "outcome"), [("SIGTERM", "killed"), ("SIGKILL", "orphan-killed")])
def test_revoke_terminate_leaves_no_process_of_the_task(start_worker, sig, outcome):
    """SIGTERM: taskmeter.run kills its tool on the way out (as subprocess.run does) but
    not the tool's own child, which the main process kills once the pool process is
    gone. SIGKILL: the main process kills the whole tool tree."""
    w = start_worker("redis", "prefork", 1)
    result = w.send("tool.hold", 20, 60, 1)
    row = wait_for(
        lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 35 << 20], 30, "the tools"
    )[0]
    procs = {p: orphans.start_ticks(p) for p in tree(row["pid"]) if p != row["pid"]}
    assert len(procs) == 2, procs
    w.client().control.revoke(result.id, terminate=True, signal=sig)
    wait_for(
        lambda: not any(alive(p, t) for p, t in procs.items()),
        15,
        f"no process of the revoked task left ({procs})",
        interval=0.05,
    )
    (report,) = wait_for(lambda: [r for r in w.reports() if r.task_id == result.id], 30, "report")
    assert (report.state, report.cause) == ("revoked", None)
    assert [(t.outcome, t.signal) for t in report.tools] == [(outcome, 9)]


def test_a_cold_shutdown_records_the_task_it_kills_and_leaves_no_tool(start_worker):
    """A cold shutdown (SIGQUIT, or a second SIGTERM) kills the running task: it is
    recorded killed, and no process of its tool tree survives the worker."""
    w = start_worker("redis", "prefork", 1)
    result = w.send("tool.hold", 20, 60, 1)
    row = wait_for(
        lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 35 << 20], 30, "the tools"
    )[0]
    procs = {p: orphans.start_ticks(p) for p in tree(row["pid"]) if p != row["pid"]}
    w.proc.send_signal(signal.SIGQUIT)
    assert w.proc.wait(30) == 0
    wait_for(lambda: not any(alive(p, t) for p, t in procs.items()), 5, "no tool left")
    (report,) = [r for r in w.reports() if r.task_id == result.id]
    assert report.state == "killed" and report.cause in ("signal", "unknown")
    assert [t.signal for t in report.tools] == [9]


def test_a_run_whose_death_handling_raises_stops_no_other_run(monkeypatch):
    reports: list[TaskReport] = []
    hub = Hub([reports.append], hostname="h", pool="prefork", interval_s=0.05)
    for name in ("bad", "good"):
        hub.started(name, "t." + name, name + "-id", DEAD_PID, time.time())
    real = hub._after_death

    def after_death(run):  # e.g. an EIO reading /proc, a bug: for one run only
        if run.task == "t.bad":
            raise OSError(5, "Input/output error")
        real(run)

    monkeypatch.setattr(hub, "_after_death", after_death)
    hub.process_gone(DEAD_PID)
    hub.tick()  # every tick handles every run: no exception escapes
    hub.tick(final=True)
    assert sorted(r.task for r in reports) == ["t.bad", "t.good"]
    assert {r.state for r in reports} == {"killed"}


def test_a_stat_read_empty_is_gone_not_an_error():
    from taskmeter.measure.proc import parse_stat

    assert parse_stat(b"") is None  # read as the process exited
    assert parse_stat(b"12 (x") is None  # cut short
    me = orphans.read_stat(os.getpid())
    assert me is not None and me.ppid == os.getppid() and me.state in "RS"
    assert orphans.read_stat(2**22 + 1) is None  # above pid_max: gone


@pytest.mark.skipif(not hasattr(os, "P_PIDFD"), reason="needs pidfds (Linux >= 5.4)")
def test_reaping_a_killed_tool_never_waits_for_it():
    # A child of this process that does not die at once (a SIGKILLed tool in D state
    # behaves alike): the reap returns at once, and a later tick reaps it.
    proc = subprocess.Popen(["sleep", "60"])
    handle = orphans._Handle(proc.pid, os.pidfd_open(proc.pid))
    try:
        t0 = time.monotonic()
        orphans._reap_if_mine([handle])
        assert time.monotonic() - t0 < 0.05
        assert orphans.read_stat(proc.pid).state != "Z"
        assert orphans._pending
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(
            lambda: orphans.reap_pending() or orphans.read_stat(proc.pid) is None, 5,
            "the killed child reaped at a tick", 0.01,
        )  # fmt: skip
        assert not orphans._pending
    finally:
        handle.close()
        proc.kill()
        proc.wait(5)

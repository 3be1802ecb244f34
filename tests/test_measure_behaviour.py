"""Behaviour of measure / run / Popen: failures, kills, pipes, threads, nesting."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import threading
import time

import pytest

import taskmeter
from taskmeter.measure import wait_idle
from taskmeter.measure.report import TaskReport, union_length

from helpers import burn_child, burn_cpu, child, rss_now


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "taskmeter-sampler"]


def test_a_raising_block_is_reported_as_failure_and_the_exception_propagates():
    m = taskmeter.measure("boom", task_id="id-1")
    with pytest.raises(KeyError, match="missing"), m:
        burn_cpu(0.05)
        raise KeyError("missing")
    assert m.report.state == "failure"
    assert m.report.task_id == "id-1"
    assert m.report.overhead.cpu_s >= 0.04
    assert taskmeter.current() is None


def test_a_tool_killed_by_sigkill_is_recorded_with_its_signal():
    with taskmeter.measure("killed-tool") as m:
        proc = taskmeter.Popen(["sleep", "30"])
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=5) == -signal.SIGKILL
    tool = m.report.tools[0]
    assert (tool.exit_code, tool.signal, tool.outcome) == (None, signal.SIGKILL, "killed")
    assert 0.1 <= tool.wall_s < 5
    assert tool.samples >= 1


def test_a_tool_writing_one_mib_to_stderr_through_a_pipe_does_not_block():
    one_mib = 1024 * 1024
    with taskmeter.measure("chatty") as m:
        out = taskmeter.run(
            child(f"import sys; sys.stderr.write('e' * {one_mib}); sys.stdout.write('ok')"),
            capture_output=True,
            timeout=30,
        )
    assert len(out.stderr) == one_mib and out.stdout == b"ok"
    tool = m.report.tools[0]
    assert tool.exit_code == 0 and tool.cpu_s > 0


def test_run_keeps_subprocess_semantics():
    with taskmeter.measure("semantics") as m:
        with pytest.raises(subprocess.CalledProcessError) as err:
            taskmeter.run(["sh", "-c", "echo no >&2; exit 3"], capture_output=True, check=True)
        assert err.value.returncode == 3 and err.value.stderr == b"no\n"
        with pytest.raises(subprocess.TimeoutExpired):
            taskmeter.run(["sleep", "30"], timeout=0.2)
        done = taskmeter.run(["cat"], input="hi", capture_output=True, text=True)
        assert done.stdout == "hi" and done.returncode == 0
        with pytest.raises(FileNotFoundError):
            taskmeter.run(["/nonexistent/tool"])
    outcomes = [(t.exe, t.outcome) for t in m.report.tools]
    assert outcomes == [
        ("sh", "error"),
        ("sleep", "killed"),
        ("cat", "ok"),
    ]  # run() kills on timeout
    # Outside a measurement it is plain subprocess.
    assert taskmeter.run(["true"]).returncode == 0


def test_popen_poll_loop_reaps_with_exact_cpu():
    with taskmeter.measure("poller") as m:
        proc = taskmeter.Popen(burn_child(0.1))
        while proc.poll() is None:
            time.sleep(0.01)
    assert proc.returncode == 0
    assert m.report.tools[0].cpu_s >= 0.1


def test_one_parked_sampler_thread_serves_every_measurement_and_memory_stays_flat():
    # The sampler thread lives with the process (parked while nothing is measured):
    # measurements never add threads, and never start one each.
    assert wait_idle(2.0)
    assert len(sampler_threads()) <= 1
    for _ in range(200):  # warm up allocator pools and caches
        with taskmeter.measure("loop") as m, m.phase("p"):
            pass
    assert wait_idle(2.0)
    [thread] = sampler_threads()
    before = rss_now()
    for _ in range(1000):
        with taskmeter.measure("loop") as m, m.phase("p"):
            pass
    assert wait_idle(2.0)
    assert sampler_threads() == [thread], "the same thread, parked: none started per task"
    assert rss_now() - before < 1024 * 1024, "1000 measurements must not grow memory"


def test_parked_sampler_thread_takes_no_cpu():
    with taskmeter.measure("wake"):
        pass
    assert wait_idle(2.0)
    [thread] = sampler_threads()
    assert thread.native_id is not None

    def cpu_ns() -> int:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0])

    time.sleep(0.3)  # it may look once more at the time it last waited for
    before = cpu_ns()
    time.sleep(1.0)
    assert cpu_ns() - before < 1_000_000, "a parked sampler wakes up for nothing"


def test_a_stream_of_short_tasks_wakes_the_sampler_once_an_interval_not_once_a_task():
    # Short tasks back to back, as in a busy pool process: each is over long before its
    # first sample is due. The thread waits out an interval after each quiet look
    # instead of parking, so a new task never has to wake it: about one wake-up per
    # 100 ms interval. (Parking after every look, a task arriving after the park
    # notified it, then it waited for that task's due: 30-45 wake-ups a second here.)
    from taskmeter.measure.sampler import SAMPLER

    assert SAMPLER.interval_s == 0.1
    with taskmeter.measure("warm"):  # the thread exists
        pass
    assert wait_idle(2.0)
    time.sleep(0.25)  # parked
    woken, arms, tasks = SAMPLER.wakeups, SAMPLER.arms, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        with taskmeter.measure("short"):
            burn_cpu(0.0005)
        time.sleep(0.0013)
        tasks += 1
    wakeups = SAMPLER.wakeups - woken
    span = time.monotonic() - t0
    assert tasks > 200, tasks
    assert wakeups <= 1.5 * span / 0.1 + 2, (wakeups, tasks, span)
    # With the kernel timer, the tasks leave it armed at their ends and the later ones
    # arm nothing: the thread re-arms it when it wakes, not a system call per task.
    assert SAMPLER.arms - arms <= 2 * span / 0.1 + 3, (SAMPLER.arms - arms, tasks)
    # and it parks once the stream stops: one more interval, then no wake-up
    time.sleep(0.35)
    parked = SAMPLER.wakeups
    time.sleep(0.5)
    assert SAMPLER.wakeups == parked


def test_one_sampler_thread_serves_many_concurrent_measurements():
    barrier = threading.Barrier(5)
    seen: list[int] = []

    def task() -> None:
        with taskmeter.measure("concurrent"):
            barrier.wait()
            seen.append(len(sampler_threads()))
            time.sleep(0.2)

    threads = [threading.Thread(target=task) for _ in range(4)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    assert seen == [1, 1, 1, 1]
    assert wait_idle(2.0)


def test_overlapping_tasks_in_threads_get_their_own_thread_cpu():
    reports: dict[float, TaskReport] = {}
    barrier = threading.Barrier(2)

    def task(cpu_s: float) -> None:
        with taskmeter.measure(f"t{cpu_s}") as m:
            barrier.wait()
            burn_cpu(cpu_s)
        reports[cpu_s] = m.report

    threads = [threading.Thread(target=task, args=(s,)) for s in (0.2, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cpu_s, report in reports.items():
        assert report.overhead.cpu_method == "thread"
        assert report.overhead.cpu_s == pytest.approx(cpu_s, rel=0.10)


def test_nested_measurements_both_see_the_inner_tool():
    with taskmeter.measure("outer") as outer:
        with taskmeter.measure("inner") as inner:
            assert taskmeter.current() is inner
            taskmeter.run(burn_child(0.05))
        assert taskmeter.current() is outer
    assert len(inner.report.tools) == len(outer.report.tools) == 1
    assert inner.report.tools[0].cpu_s == outer.report.tools[0].cpu_s


def test_phases_are_merged_by_name_with_their_own_figures():
    slept = 0.0  # the truth, timed around each phase here (sleep may overshoot on load)
    with taskmeter.measure("phased") as m:
        for _ in range(3):
            t0 = time.monotonic()
            with m.phase("download"):
                time.sleep(0.05)
            slept += time.monotonic() - t0
        with m.phase("check"):
            burn_cpu(0.1)
    phases = {p.name: p for p in m.report.phases}
    assert list(phases) == ["download", "check"]
    assert 0.15 <= phases["download"].wall_s <= slept
    assert phases["download"].cpu_s < 0.02
    assert phases["check"].cpu_s == pytest.approx(0.1, rel=0.2)
    assert phases["check"].rss_peak_bytes > 0


def test_decorator_measures_each_call():
    reports: list[TaskReport] = []

    @taskmeter.measure("decorated", on_report=reports.append)
    def work(n: int) -> int:
        taskmeter.run(["true"])
        return n * 2

    assert work(2) == 4 and work(3) == 6
    assert [r.task for r in reports] == ["decorated", "decorated"]
    assert all(r.tool_totals.runs == 1 for r in reports)


def test_overhead_wall_subtracts_the_union_of_tool_runs():
    with taskmeter.measure("parallel-tools") as m:
        procs = [taskmeter.Popen(["sleep", "0.3"]) for _ in range(2)]
        for p in procs:
            p.wait()
        time.sleep(0.1)
    r = m.report
    assert r.tool_totals.wall_s == pytest.approx(0.3, abs=0.05)  # union, not 0.6
    assert r.overhead.wall_s == pytest.approx(r.wall_s - r.tool_totals.wall_s)
    assert r.overhead.wall_s >= 0.1


def test_union_length():
    assert union_length([]) == 0
    assert union_length([(0, 1), (2, 3)]) == 2
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_length([(0, 10), (1, 2)]) == 10


def test_report_round_trips_through_json_and_rejects_malformed_records():
    with taskmeter.measure("json", task_id="abc") as m, m.phase("x"):
        taskmeter.run(["true"])
    d = json.loads(m.report.to_json())
    assert d["schema"] == "taskmeter.task/1"
    assert set(d["overhead"]) >= {
        "wall_s",
        "cpu_s",
        "user_s",
        "sys_s",
        "rss_avg_bytes",
        "rss_peak_bytes",
        "peak_method",
    }
    assert TaskReport.from_dict(d) == m.report
    # The hand-made to_dict is dataclasses.asdict in JSON's terms, key order included.
    generic = dataclasses.asdict(m.report)
    generic = {"schema": generic.pop("schema"), **generic}
    assert json.dumps(m.report.to_dict()) == json.dumps(generic)
    assert list(d) == list(generic) and d["tools"][0]["argv"] == ["true"]
    with pytest.raises(ValueError, match="schema"):
        TaskReport.from_dict({**d, "schema": "other/9"})
    with pytest.raises(ValueError, match="state"):
        TaskReport.from_dict({**d, "state": "exploded"})
    broken = {**d, "overhead": {"wall_s": 1}}
    with pytest.raises(ValueError, match="ProcessStats"):
        TaskReport.from_dict(broken)

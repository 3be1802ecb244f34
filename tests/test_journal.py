"""No lost in-flight task: the journal of tasks in flight survives the SIGKILL of a whole
worker (what a container OOM kill does), and the next incarnation records those tasks
as ``lost``, once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import taskmeter
from taskmeter.celery.hub import Hub, Run, SeenTool
from taskmeter.celery.journal import (
    SLOT_SIZE,
    Journal,
    Slot,
    SlotError,
    decode_slot,
    node_folder_name,
)
from taskmeter.config import journal_dir, load_settings
from taskmeter.measure.report import TaskReport

from workerkit import wait_for

MIB = 1 << 20
DEAD_PID = 2**22 + 4321  # above any pid_max: a process of a previous incarnation


def fresh(tmp_path: Path, oom: tuple[int | None, str] = (None, "")) -> Journal:
    j = Journal.open(tmp_path / "journal", "w1@host", oom_reading=lambda: oom)
    assert j is not None
    return j


def die(j: Journal) -> None:
    """The main process dies: the lock goes with it, nothing else is done."""
    assert j._lock_fd is not None
    os.close(j._lock_fd)
    j._lock_fd = None


def recover(j: Journal) -> list[TaskReport]:
    got: list[TaskReport] = []
    out = j.recover([got.append], hostname="h", pool="prefork", interval_s=0.1)
    assert [r.task_id for r in out] == [r.task_id for r in got]
    return got


# -- the record format ---------------------------------------------------------------------
def test_slot_holds_the_task_until_it_ends(tmp_path):
    j = fresh(tmp_path)
    j.recover([], hostname="h", pool="prefork", interval_s=0.1)
    j.begin(7, "vcf.query", "id-1", 1_700_000_000.25, 1.5)
    path = j.folder / f"{os.getpid()}-0.slot"
    assert path.stat().st_size == SLOT_SIZE
    task = decode_slot(path.read_bytes())
    assert task is not None
    assert (task.seq, task.pid, task.task, task.task_id) == (7, os.getpid(), "vcf.query", "id-1")
    assert (task.started, task.cpu0_s, task.observed) == (1_700_000_000.25, 1.5, None)
    j.end()
    assert decode_slot(path.read_bytes()) is None
    j.begin(8, "noop", None, 1_700_000_001.0, None)
    task = decode_slot(path.read_bytes())
    assert task is not None and (task.seq, task.task_id, task.cpu0_s) == (8, None, None)


def test_torn_and_garbage_records_are_ignored_with_a_warning(tmp_path, caplog):
    j = fresh(tmp_path)
    folder = j.folder
    torn = Slot(folder / f"{DEAD_PID}-0.slot", DEAD_PID)
    torn.begin(1, "vcf.query", "torn-id", time.time(), 0.0)
    torn.mm[40] ^= 0xFF  # a byte of the task half changed after its checksum
    torn.close()
    (folder / f"{DEAD_PID + 1}-0.slot").write_bytes(os.urandom(SLOT_SIZE))
    (folder / f"{DEAD_PID + 2}-0.slot").write_bytes(b"TMJ1\x01short")
    (folder / f"{DEAD_PID + 3}-0.slot").write_bytes(bytes(SLOT_SIZE))  # never written
    (folder / "junk.slot").write_bytes(b"x")
    good = Slot(folder / f"{DEAD_PID + 4}-0.slot", DEAD_PID + 4)
    good.begin(1, "noop", "good-id", time.time(), 0.0)
    good.close()
    with pytest.raises(SlotError, match="torn"):
        decode_slot((folder / f"{DEAD_PID}-0.slot").read_bytes())
    die(j)
    caplog.set_level(logging.WARNING, "taskmeter.journal")
    reports = recover(fresh(tmp_path))
    assert [r.task_id for r in reports] == ["good-id"]  # the valid one is still used
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{DEAD_PID}-0.slot: torn record" in warned
    assert f"{DEAD_PID + 1}-0.slot: not a taskmeter journal record" in warned
    assert f"{DEAD_PID + 2}-0.slot" in warned and "junk.slot" in warned
    assert f"{DEAD_PID + 3}-0.slot" not in warned  # an empty record is no problem
    assert not list(folder.glob("*.slot"))  # all removed: the journal never grows


def test_lost_report_carries_what_the_main_process_observed(tmp_path):
    j = fresh(tmp_path)
    j.recover([], hostname="h", pool="prefork", interval_s=0.1)
    started = time.time() - 30
    child = Slot(j.folder / f"{DEAD_PID}-0.slot", DEAD_PID)  # a pool child's record
    child.begin(3, "vcf.query", "abc", started, 2.0)
    run = Run(f"{DEAD_PID}:3", "vcf.query", "abc", DEAD_PID, started, time.monotonic() - 30)
    run.worker_rss, run.hwm, run.footprint, run.cpu_s = 90 * MIB, 120 * MIB, 400 * MIB, 9.5
    run.rss.add(0.0, 80 * MIB)
    run.rss.add(1.0, 100 * MIB)
    tool = SeenTool(4242, None, ("bcftools", "view", "x.vcf"), "bcftools", time.monotonic() - 10)
    tool.rss.add(0.0, 250 * MIB)
    tool.rss.add(1.0, 200 * MIB)
    run.tools[4242] = tool
    j.observe([run])
    die(j)
    (r,) = recover(fresh(tmp_path))
    assert (r.task, r.task_id, r.state, r.cause) == ("vcf.query", "abc", "lost", "unknown")
    assert r.worker.pid == DEAD_PID and r.worker.pool == "prefork"
    assert 29 < r.wall_s < 60  # until the last observation (a lower bound)
    assert r.cpu_s == pytest.approx(7.5)
    assert r.overhead.rss_peak_bytes == 120 * MIB and r.overhead.rss_avg_bytes == 90 * MIB
    assert r.overhead.peak_method == "sampled"
    assert r.footprint_peak_bytes == 400 * MIB
    (t,) = r.tools
    assert (t.pid, t.argv, t.exe, t.cause, t.outcome) == (
        4242, ("bcftools", "view", "x.vcf"), "bcftools", "lost", "lost",
    )  # fmt: skip
    assert (t.rss_peak_bytes, t.rss_avg_bytes, t.samples) == (250 * MIB, 200 * MIB, 2)
    assert 9 < t.start_s < 25 and t.end_s == pytest.approx(r.wall_s)
    assert TaskReport.from_json(r.to_json()) == r


def test_a_task_that_ended_or_was_reported_is_never_recovered(tmp_path):
    j = fresh(tmp_path)
    j.recover([], hostname="h", pool="prefork", interval_s=0.1)
    j.begin(1, "noop", "ended", time.time(), 0.0)
    j.end()
    # a pool child killed mid-task: the hub reported it killed, its record is cleared
    killed = Slot(j.folder / f"{DEAD_PID}-0.slot", DEAD_PID)
    killed.begin(1, "hog", "killed-id", time.time(), 0.0)
    j.child_gone(DEAD_PID)  # holds an unreported task: kept
    assert (j.folder / f"{DEAD_PID}-0.slot").exists()
    report = TaskReport.from_dict(
        {**_report_dict(), "task": "hog", "task_id": "killed-id", "state": "killed",
         "worker": {"hostname": "h", "pid": DEAD_PID, "pool": "prefork"}}
    )  # fmt: skip
    j.report_done(report)
    assert not (j.folder / f"{DEAD_PID}-0.slot").exists()  # its process is gone: removed
    long_id = "é" * 300  # cut in the record (mid-character): still recognised
    Slot(j.folder / f"{DEAD_PID}-0.slot", DEAD_PID).begin(2, "hog", long_id, time.time(), 0.0)
    j.report_done(dataclasses.replace(report, task_id=long_id))
    assert not (j.folder / f"{DEAD_PID}-0.slot").exists()
    # an empty record of a child that exited is removed
    Slot(j.folder / f"{DEAD_PID + 1}-0.slot", DEAD_PID + 1).close()
    j.child_gone(DEAD_PID + 1)
    assert not (j.folder / f"{DEAD_PID + 1}-0.slot").exists()
    die(j)
    assert recover(fresh(tmp_path)) == []


def _report_dict() -> dict[str, object]:
    return {
        "schema": "taskmeter.task/1", "task": "t", "task_id": None, "state": "success",
        "started_at": "2026-01-01T00:00:00.000000+00:00",
        "ended_at": "2026-01-01T00:00:01.000000+00:00", "wall_s": 1.0, "cpu_s": 0.0,
        "overhead": {"wall_s": 1.0, "cpu_s": 0.0, "user_s": 0.0, "sys_s": 0.0,
                     "rss_avg_bytes": 0, "rss_peak_bytes": 0, "peak_method": "none"},
        "tools": [], "tool_totals": {"runs": 0, "wall_s": 0.0, "cpu_s": 0.0, "rss_peak_bytes": 0},
        "footprint_peak_bytes": 0, "phases": [], "unattributed_child_cpu_s": 0.0,
        "worker": {"hostname": "h", "pid": 1, "pool": "prefork"}, "sampler": {"interval_s": 0.1},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("before", "after", "cause"),
    [
        ((3, "/sys/fs/cgroup/memory/pod"), (4, "/sys/fs/cgroup/memory/pod"), "oom"),
        ((3, "/sys/fs/cgroup/memory/pod"), (3, "/sys/fs/cgroup/memory/pod"), "unknown"),
        ((3, "/sys/fs/cgroup/memory/a"), (9, "/sys/fs/cgroup/memory/b"), "unknown"),  # other cgroup
        ((5, "/cg"), (0, "/cg"), "unknown"),  # a new cgroup with the same path: counter reset
        ((None, ""), (None, ""), "unknown"),  # no counter (macOS, no memory controller)
    ],
)
def test_cause_is_oom_only_when_the_cgroup_counter_rose(tmp_path, before, after, cause):
    j = fresh(tmp_path, before)
    j.recover([], hostname="h", pool="prefork", interval_s=0.1)
    Slot(j.folder / f"{DEAD_PID}-0.slot", DEAD_PID).begin(1, "hog", "x", time.time(), 0.0)
    die(j)
    (r,) = recover(fresh(tmp_path, after))
    assert r.cause == cause


def test_lock_held_by_another_live_worker(tmp_path, caplog):
    code = textwrap.dedent(
        f"""
        import sys, time
        from taskmeter.celery.journal import Journal
        j = Journal.open({str(tmp_path / "journal")!r}, "w1@host")
        print("locked" if j else "refused", flush=True)
        time.sleep(60)
        """
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "locked"
        caplog.set_level(logging.WARNING, "taskmeter.journal")
        assert Journal.open(tmp_path / "journal", "w1@host") is None
        assert "another live worker holds the in-flight journal" in caplog.text
        assert Journal.open(tmp_path / "journal", "w2@host") is not None  # another name
    finally:
        other.kill()
        other.wait()
    assert Journal.open(tmp_path / "journal", "w1@host") is not None  # its lock died with it


def test_clean_close_leaves_nothing(tmp_path):
    j = fresh(tmp_path)
    j.recover([], hostname="h", pool="prefork", interval_s=0.1)
    j.begin(1, "noop", "a", time.time(), 0.0)
    j.end()
    j.close()
    assert not (tmp_path / "journal").exists()  # it made the folder: it removes it
    (tmp_path / "mine").mkdir()
    j = Journal.open(tmp_path / "mine", "w1@host")
    assert j is not None
    j.recover([], hostname="h", pool="solo", interval_s=0.1)
    j.close()
    assert list((tmp_path / "mine").iterdir()) == []  # a folder it did not make stays


def test_settings(tmp_path):
    def journal(**env: str) -> str | None:
        return load_settings({}, env).journal

    assert journal(TASKMETER_LEDGER="/data/t.jsonl") == "/data/t.jsonl.inflight"
    assert journal(TASKMETER_LEDGER="/data/t.jsonl", TASKMETER_JOURNAL="off") is None
    assert journal(TASKMETER_JOURNAL="0") is None
    assert journal(TASKMETER_LEDGER="/d/t", TASKMETER_JOURNAL="/vol/j") == "/vol/j"
    private = journal_dir(None, None)
    assert private is not None and f"taskmeter-{os.getuid()}" in private
    assert journal(TASKMETER_LEDGER="stdout") == private == journal()
    assert journal(TASKMETER_LEDGER="/d/t", TASKMETER_JOURNAL="on") == "/d/t.inflight"
    assert node_folder_name("celery@pod-7f9c/../x y") == "celery@pod-7f9c_.._x_y"
    assert node_folder_name("..") == "worker"


def test_journal_off_creates_nothing(start_worker, tmp_path):
    w = start_worker("redis", "solo", 1, TASKMETER_JOURNAL="off")
    w.send("noop")
    w.wait_reports(1)
    assert not Path(str(w.ledger) + ".inflight").exists()


# -- a real worker, killed whole ---------------------------------------------------------------
def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_whole_worker_sigkilled_its_tasks_in_flight_are_recorded_lost_once(start_worker):
    node = f"h5-{uuid.uuid4().hex[:6]}@%h"
    w1 = start_worker("redis", "prefork", 2, ("-n", node))
    folder = Path(str(w1.ledger) + ".inflight")

    # A pool child killed alone: the main process reports the task killed, and clears
    # its record (it must not come back as lost).
    killed = w1.send("sleep", 60)
    row = wait_for(lambda: [r for r in w1.inflight() if r["task_id"] == killed.id], 30, "sleep")
    os.kill(row[0]["pid"], signal.SIGKILL)
    wait_for(lambda: [r for r in w1.reports() if r.task_id == killed.id], 30, "the killed report")

    tool = w1.send("tool.hold", 64, 120)  # a Python tool holding 64 MiB
    hog = w1.send("hog", 80, 120)  # the task's own Python body holding 80 MiB
    wait_for(
        lambda: (
            {
                r["task_id"]
                for r in w1.inflight()
                if (r["task_id"] == tool.id and r["tools_rss_bytes"] > 60 * MIB)
                or (r["task_id"] == hog.id and r["worker_rss_bytes"] > 76 * MIB)
            }
            == {tool.id, hog.id}
        ),
        40,
        "both tasks in flight, holding their memory",
    )
    time.sleep(0.6)  # a few ticks of the main process: its observations are in the records
    pids = [w1.proc.pid] + [p.pid for p in psutil.Process(w1.proc.pid).children(recursive=True)]
    assert len(pids) >= 4, pids  # main, 2 pool children, the tool
    try:
        _kill_all(pids)  # the whole worker at once, as a container OOM kill does
        w1.proc.wait(10)
        wait_for(lambda: not [p for p in pids if psutil.pid_exists(p) and
                              psutil.Process(p).status() != psutil.STATUS_ZOMBIE], 10,
                 "every process of the worker gone")  # fmt: skip
        before = w1.reports()
        assert [r.task_id for r in before] == [killed.id]  # nothing of the two yet
        assert len(list(folder.glob("*/*.slot"))) == 2  # the two records, left by the kill

        # The same worker restarted (same node name, queue, ledger): both tasks, lost.
        w2 = start_worker("redis", "prefork", 2, ("-n", node), TM_QUEUE=w1.queue)
        reports = w2.wait_reports(3)
        lost = {r.task_id: r for r in reports if r.state == "lost"}
        assert set(lost) == {tool.id, hog.id}, [(r.task, r.task_id, r.state) for r in reports]
        assert [r.task_id for r in reports].count(killed.id) == 1
        t, h = lost[tool.id], lost[hog.id]
        assert (t.task, h.task) == ("tool.hold", "hog")
        assert t.cause in ("unknown", "oom") and h.cause == t.cause
        assert t.wall_s >= 0.5 and h.wall_s >= 0.5
        assert h.overhead.rss_peak_bytes >= 76 * MIB  # its last sampled RSS (80 MiB held)
        (tl,) = t.tools
        assert tl.cause == "lost" and tl.exe.startswith("python") and tl.rss_peak_bytes > 60 * MIB
        assert t.footprint_peak_bytes >= tl.rss_peak_bytes
        metrics = samples(w2.metrics())
        assert metrics[("celery_task_runs_total", (("state", "lost"), ("task", "tool.hold")))] == 1
        assert metrics[("celery_task_runs_total", (("state", "lost"), ("task", "hog")))] == 1
        assert metrics[("taskmeter_journal_recovered_tasks_total", ())] == 2
        assert not list(folder.glob("*/*.slot"))

        # A clean stop and another restart: nothing is recorded twice.
        assert w2.stop() == 0
        assert not list(folder.iterdir())  # a clean stop leaves no record, no node folder
        w3 = start_worker("redis", "prefork", 2, ("-n", node), TM_QUEUE=w1.queue)
        w3.send("noop")
        reports = w3.wait_reports(4)
        ids = [r.task_id for r in reports]
        assert len(ids) == len(set(ids)) == 4, ids
        lost_now = {k: v for k, v in samples(w3.metrics()).items() if ("state", "lost") in k[1]}
        assert not any(lost_now.values()), lost_now
    finally:
        _kill_all(pids)  # leftover tool processes, whatever happened


def test_solo_worker_killed_its_task_is_recorded_lost(start_worker):
    """solo (and threads): tasks run in the main process, whose own record survives."""
    node = f"h5s-{uuid.uuid4().hex[:6]}@%h"
    w1 = start_worker("redis", "solo", 1, ("-n", node))
    task = w1.send("sleep", 60)
    wait_for(lambda: [r for r in w1.inflight() if r["task_id"] == task.id], 30, "the task")
    time.sleep(0.5)  # heartbeats of the main process after the start
    w1.proc.kill()
    w1.proc.wait(10)
    assert w1.reports() == []
    w2 = start_worker("redis", "solo", 1, ("-n", node), TM_QUEUE=w1.queue)
    (r,) = w2.wait_reports(1)
    assert (r.task, r.task_id, r.state, r.worker.pid) == ("sleep", task.id, "lost", w1.proc.pid)
    assert 0.3 <= r.wall_s < 30  # until the last heartbeat: a lower bound
    assert r.overhead.peak_method == "none"  # never observed by a tick: no figures


def test_recycled_children_leave_no_records(start_worker):
    """--max-tasks-per-child 1: a new pool process (a new record) per task; the records
    of exited processes are removed, so the journal never grows."""
    w = start_worker("redis", "prefork", 2, ("--max-tasks-per-child", "1"))
    folder = Path(str(w.ledger) + ".inflight")
    for _ in range(6):
        w.send("noop")
    w.wait_reports(6)
    time.sleep(1.0)  # the last child's exit reaches the main process
    records = list(folder.glob("*/*.slot"))
    assert len(records) <= 2, records  # at most one per live pool process
    assert w.stop() == 0
    assert not folder.exists()  # a clean stop removes the folder it made


def test_a_task_whose_report_fails_is_not_left_running_in_the_journal(tmp_path, monkeypatch):
    from taskmeter.celery import integration, otel

    j = fresh(tmp_path)
    j.recover([], hostname="h", pool="solo", interval_s=0.1)
    worker = integration._Worker(load_settings({}, {}), "solo", ["t.a"])
    worker.journal = j
    reports: list[TaskReport] = []
    worker.hub = Hub([reports.append], hostname="h", pool="solo", interval_s=0.1)
    path = j.folder / f"{os.getpid()}-0.slot"

    def annotate(report):
        raise RuntimeError("the user's tracer")

    # The span annotation (third-party code) raises: the report still goes out.
    monkeypatch.setattr(otel, "AVAILABLE", True)
    monkeypatch.setattr(otel, "annotate", annotate)
    worker.task_started("t.a", "id-1")
    assert decode_slot(path.read_bytes()) is not None
    worker.task_ended("id-1", "SUCCESS")
    assert decode_slot(path.read_bytes()) is None
    assert [(r.task_id, r.state) for r in reports] == [("id-1", "success")]
    # The measurement itself raises: the slot is still cleared (never recovered lost).
    worker.task_started("t.a", "id-2")
    run = worker.runs[("id-2", threading.get_ident())]

    def finish(**kw):
        raise ValueError("a taskmeter bug")

    really_finish = run.m.finish
    monkeypatch.setattr(run.m, "finish", finish)
    with pytest.raises(ValueError):
        worker.task_ended("id-2", "SUCCESS")
    assert decode_slot(path.read_bytes()) is None
    really_finish(state="success")  # end the measurement: this thread runs other tests
    assert taskmeter.current() is None
    j.close()

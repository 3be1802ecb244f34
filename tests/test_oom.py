"""OOM named: a real prefork worker inside a real memory cgroup limited to 300 MiB.

A tool that allocates 500 MiB and a task whose Python body does are both killed by the
kernel's OOM killer, and recorded as such (tool ``cause="oom"``; task ``state="killed",
cause="oom"``), distinct from a ``kill -9`` of a tool (``outcome="killed"``, no cause)
and from Celery's hard time limit (``cause="time_limit"``). The ground truth is the
cgroup's own OOM-kill counter, read by the test.

Needs root and a memory cgroup controller (v1 ``/sys/fs/cgroup/memory`` or v2 with the
memory controller); without them the test says so, and fails under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskmeter.measure import cgroup, orphans
from taskmeter.measure.report import TaskReport

from helpers import unavailable
from workerkit import CELERY, Worker, broker_url, wait_for, worker_env

pytestmark = pytest.mark.slow

LIMIT = 300 << 20


@dataclass
class Cgroup:
    path: Path
    version: int

    @property
    def counter_file(self) -> Path:
        return self.path / ("memory.oom_control" if self.version == 1 else "memory.events")

    def oom_kills(self) -> int:
        for line in self.counter_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError(f"no oom_kill in {self.counter_file}")

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]


def _make_cgroup() -> Cgroup:
    if not sys.platform.startswith("linux"):
        unavailable("memory cgroups need Linux")
    name = f"taskmeter-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    v1 = Path("/sys/fs/cgroup/memory")
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            path = v1 / name
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(LIMIT))
            with contextlib.suppress(OSError):  # no swap to escape to, where it exists
                (path / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
            return Cgroup(path, 1)
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            subtree = (v2 / "cgroup.subtree_control").read_text().split()
            if "memory" not in subtree:
                (v2 / "cgroup.subtree_control").write_text("+memory")
            path = v2 / name
            path.mkdir()
            (path / "memory.max").write_text(str(LIMIT))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
            return Cgroup(path, 2)
    except OSError as exc:
        unavailable(f"no memory cgroup can be made here ({exc}; needs root)")
    unavailable("no memory cgroup controller is mounted (v1 memory or v2 with memory)")


def _remove(cg: Cgroup) -> None:
    deadline = time.monotonic() + 10
    while True:
        for pid in cg.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            cg.path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Cgroup]]:
    """A prefork worker (-c 1) started inside a fresh 300 MiB memory cgroup: a shell
    moves itself into the cgroup, then execs `celery worker`."""
    url = broker_url("redis")
    cg = _make_cgroup()
    tmp = tmp_path_factory.mktemp("oom")
    env = worker_env(tmp, url)
    log = tmp / "worker.log"
    cmd = [
        "sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs"),
        *CELERY, "-A", "tmapp", "worker", "-P", "prefork", "-c", "1",
        "-Q", env["TM_QUEUE"], "-n", f"tm-oom-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    w = Worker(
        proc, int(env["TASKMETER_PORT"]), Path(env["TASKMETER_LEDGER"]), log,
        env["TM_QUEUE"], url, env,
    )  # fmt: skip
    try:
        wait_for(
            lambda: proc.poll() is not None or "ready." in w.log_text(), 60, "the worker ready"
        )
        assert proc.poll() is None, f"worker exited: {w.log_text()[-3000:]}"
        assert proc.pid in cg.procs(), "the worker runs inside the test's cgroup"
        yield w, cg
    finally:
        w.stop()
        _remove(cg)


def report_of(w: Worker, task_id: str, timeout: float = 40) -> TaskReport:
    found = wait_for(
        lambda: [r for r in w.reports() if r.task_id == task_id],
        timeout,
        f"the report of {task_id} (log: {w.log_text()[-2000:]})",
    )
    assert len(found) == 1, found
    return found[0]


def kills_metric(w: Worker, task: str, cause: str) -> float:
    """celery_task_kills_total{task,cause} as the worker exposes it (0 when absent)."""
    for line in w.metrics().splitlines():
        if (
            line.startswith("celery_task_kills_total{")
            and f'task="{task}"' in line
            and f'cause="{cause}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_worker_reads_its_cgroups_counter(worker):
    _w, cg = worker
    # This process's own cgroup (not the test's): the reader finds a counter here too.
    found = cgroup.find()
    assert found is not None and found.version in (1, 2)
    # The worker's cgroup, as the worker sees it.
    pid = _w.proc.pid
    seen = cgroup.find(f"/proc/{pid}/cgroup", f"/proc/{pid}/mountinfo")
    assert seen is not None and Path(seen.directory) == cg.path
    assert seen.version == cg.version and Path(seen.file) == cg.counter_file


def test_a_tool_killed_by_the_oom_killer_is_named_oom(worker):
    w, cg = worker
    before = cg.oom_kills()
    result = w.send("tool.hold", 500, 30)
    report = report_of(w, result.id)
    assert cg.oom_kills() > before, "ground truth: the kernel OOM-killed something"
    # The task survived its tool: it returned the tool's exit code (-9).
    assert (report.state, report.cause) == ("success", None)
    (tool,) = report.tools
    assert (tool.signal, tool.cause, tool.outcome) == (9, "oom", "oom")
    # Killed at the limit: its peak lies below 300 MiB and well above the worker's share.
    assert 100 << 20 < tool.rss_peak_bytes <= LIMIT
    assert kills_metric(w, "tool.hold", "oom") == 0, "the task itself was not killed"


def test_a_task_whose_python_body_is_oom_killed_is_killed_with_cause_oom(worker):
    w, cg = worker
    before = cg.oom_kills()
    # Grows 10 MiB every 20 ms: killed at the limit after about half a second.
    result = w.send("grow", 500)
    report = report_of(w, result.id)
    assert cg.oom_kills() > before
    assert (report.state, report.cause) == ("killed", "oom")
    assert report.overhead.rss_peak_bytes > 100 << 20, "its last observed memory"
    assert report.footprint_peak_bytes <= LIMIT
    wait_for(lambda: kills_metric(w, "grow", "oom") == 1, 10, "celery_task_kills_total oom")
    # All at once, in one call that holds the GIL: still named oom.
    before = cg.oom_kills()
    result = w.send("hog", 500, 5)
    report = report_of(w, result.id)
    assert cg.oom_kills() > before
    assert (report.state, report.cause) == ("killed", "oom")
    wait_for(lambda: kills_metric(w, "hog", "oom") == 1, 10, "celery_task_kills_total oom")


def test_kill_9_of_a_tool_is_killed_not_oom(worker):
    w, cg = worker
    wait_for(lambda: not w.inflight(), 30, "the worker idle")
    before = cg.oom_kills()
    result = w.send("tool.hold", 50, 60)
    row = wait_for(
        lambda: [r for r in w.inflight() if r["tools_rss_bytes"] > 45 << 20], 30, "the tool"
    )[0]
    with open(f"/proc/{row['pid']}/task/{row['pid']}/children") as f:
        (tool_pid,) = (int(p) for p in f.read().split())
    os.kill(tool_pid, signal.SIGKILL)
    report = report_of(w, result.id)
    assert cg.oom_kills() == before
    assert (report.state, report.cause) == ("success", None)
    (tool,) = report.tools
    assert (tool.pid, tool.signal, tool.cause, tool.outcome) == (tool_pid, 9, None, "killed")


def test_a_hard_time_limit_is_time_limit_not_oom(worker):
    w, cg = worker
    wait_for(lambda: not w.inflight(), 30, "the worker idle")
    before = cg.oom_kills()
    result = w.send("sleep", 30, time_limit=2)
    report = report_of(w, result.id)
    assert cg.oom_kills() == before
    assert (report.state, report.cause) == ("killed", "time_limit")
    wait_for(lambda: kills_metric(w, "sleep", "time_limit") == 1, 10, "kills time_limit")
    assert kills_metric(w, "sleep", "oom") == 0
    # No process of the worker was left behind by any of these deaths.
    main = w.proc.pid
    strays = [
        p
        for p in cg.procs()
        if p != main and (st := orphans.read_stat(p)) is not None and st.ppid != main
    ]
    assert not strays, f"processes left in the cgroup: {strays}"


# -- finding the counter: the layouts a worker meets (files the test writes) ----------------
def _layout(
    tmp: Path, cgroup_lines: str, mounts: list[tuple[str, str, str, str]]
) -> tuple[str, str]:
    """A /proc/self/cgroup and a mountinfo whose mounts (root, point under tmp, fstype,
    super options) point into ``tmp``."""
    proc = tmp / "cgroup"
    proc.write_text(cgroup_lines)
    info = tmp / "mountinfo"
    rows = [
        f"{30 + i} 23 0:{40 + i} {root} {str(tmp / point).replace(' ', chr(92) + '040')} "
        f"rw,relatime - {fstype} {fstype} rw,{opts}"
        for i, (root, point, fstype, opts) in enumerate(mounts)
    ]
    info.write_text("\n".join(["22 1 0:21 / /proc rw - proc proc rw", *rows]) + "\n")
    return str(proc), str(info)


def _counter(path: Path, name: str, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_v1_memory_controller_wins_on_a_hybrid_host(tmp_path: Path):
    _counter(tmp_path / "mem/process_api/x1", "memory.oom_control",
             "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")  # fmt: skip
    _counter(tmp_path / "unified", "memory.events", "oom_kill 99\n")  # not the memory one
    proc, info = _layout(
        tmp_path,
        "9:name=systemd:/\n4:memory:/process_api/x1\n1:cpu:/\n0::/\n",
        [("/", "mem", "cgroup", "memory"), ("/", "unified", "cgroup2", "nsdelegate")],
    )
    found = cgroup.find(proc, info)
    assert found == cgroup.MemoryCgroup(
        1, str(tmp_path / "mem/process_api/x1"),
        str(tmp_path / "mem/process_api/x1/memory.oom_control"),
    )  # fmt: skip
    assert cgroup._counter_in(found.file) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_v2_in_a_container_and_a_bind_mounted_sub_tree(tmp_path: Path):
    events = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n"
    # A container with its own cgroup namespace: "/" is the container's cgroup.
    _counter(tmp_path / "ns cg", "memory.events", events)
    proc, info = _layout(tmp_path, "0::/\n", [("/", "ns cg", "cgroup2", "")])
    found = cgroup.find(proc, info)
    assert found is not None and found.version == 2
    assert found.directory == str(tmp_path / "ns cg") and cgroup._counter_in(found.file) == 2
    # No namespace: the host path, with the container's sub-tree mounted.
    sub = tmp_path / "sub"
    sub.mkdir()
    _counter(sub / "cg", "memory.events", "oom_kill 5\n")
    proc, info = _layout(
        sub, "0::/kubepods/pod1/c1\n", [("/kubepods/pod1/c1", "cg", "cgroup2", "")]
    )
    found = cgroup.find(proc, info)
    assert found is not None and found.directory == str(sub / "cg")
    assert cgroup._counter_in(found.file) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_no_counter_where_there_is_none(tmp_path: Path):
    # The root cgroup of a v2 host has no memory.events; no memory controller at all.
    (tmp_path / "cg").mkdir()
    proc, info = _layout(tmp_path, "0::/\n", [("/", "cg", "cgroup2", "")])
    assert cgroup.find(proc, info) is None
    proc, info = _layout(tmp_path, "1:cpu:/\n", [("/", "cg", "cgroup", "cpu")])
    assert cgroup.find(proc, info) is None
    assert cgroup.find(str(tmp_path / "missing"), info) is None
    assert not cgroup.rose(None, 3) and not cgroup.rose(3, None) and not cgroup.rose(3, 3)
    assert cgroup.rose(3, 4)


def test_the_counter_line_is_read_exactly():
    assert cgroup._parse(b"oom_kill_disable 0\nunder_oom 0\noom_kill 13\n") == 13
    assert cgroup._parse(b"low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n") == 2
    assert cgroup._parse(b"oom_kill 4") == 4
    assert cgroup._parse(b"oom_kill_disable 1\noom_group_kill 3\n") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_another_thread_holds_the_lock_does_not_deadlock_the_child():
    import threading

    cgroup.oom_kills()  # something cached in this process
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cgroup._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its first reading must not wait for the parent's lock
            code = 1
            try:
                cgroup.oom_kills()
                code = 0 if cgroup._cached is not None and cgroup._cached[0] == os.getpid() else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child deadlocked on the cgroup lock")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join()

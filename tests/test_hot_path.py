"""The per-task hot path leaves nothing behind: no thread or file descriptor of
taskmeter accumulates over 10 000 tasks in a real prefork worker, and a forked process
never inherits a running sampler thread (issue 10)."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import taskmeter
from taskmeter.measure import wait_idle
from taskmeter.measure.core import _PACKED
from taskmeter.measure.sampler import SAMPLER

from helpers import is_timerfd
from workerkit import Worker, broker_url, launch, wait_for, worker_env

N_TASKS = 10_000


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
    return out


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _send(w: Worker, n: int) -> None:
    """n no-op tasks through one producer (a quick sender: the test measures the worker)."""
    client = w.client()
    with client.producer_or_acquire() as producer:
        for _ in range(n):
            client.send_task("noop", queue=w.queue, task_id=str(uuid.uuid4()), producer=producer)


@pytest.fixture
def quiet_worker(tmp_path: Path) -> Iterator[Worker]:
    """A real prefork worker (-c 2, Redis) logging at WARNING: Celery's own two INFO
    lines per task would make this test about logging. Ready once it ran a task."""
    url = broker_url("redis")
    env = worker_env(tmp_path, url)
    proc, log = launch(tmp_path, env, "prefork", 2, "--loglevel", "WARNING")
    w = Worker(
        proc, int(env["TASKMETER_PORT"]), Path(env["TASKMETER_LEDGER"]), log,
        env["TM_QUEUE"], url, env,
    )  # fmt: skip
    try:
        yield w
    finally:
        w.stop()


def test_no_thread_or_fd_accumulates_over_10000_tasks_in_a_real_worker(quiet_worker: Worker):
    w = quiet_worker
    main = w.proc.pid
    _send(w, 200)  # warm up: both pool processes ran tasks, channels and samplers exist
    wait_for(
        lambda: w.proc.poll() is not None or _lines(w.ledger) >= 200,
        90,
        f"200 warm-up records (log: {w.log})",
    )
    assert w.proc.poll() is None, w.log_text()[-3000:]
    time.sleep(0.3)  # the last run's sample client gone, the sampler parked
    pool = _children(main)
    assert len(pool) == 2
    before = {pid: (_threads(pid), _fds(pid)) for pid in [main, *pool]}

    t0 = time.monotonic()
    _send(w, N_TASKS)
    wait_for(
        lambda: _lines(w.ledger) >= 200 + N_TASKS,
        120,
        f"{N_TASKS} more records (log: {w.log_text()[-2000:]})",
        interval=0.5,
    )
    elapsed = time.monotonic() - t0
    time.sleep(0.3)

    assert _children(main) == pool, "the pool processes were not replaced"
    for pid in [main, *pool]:
        threads0, fds0 = before[pid]
        fds1 = _fds(pid)
        new = {fd: target for fd, target in fds1.items() if fds0.get(fd) != target}
        role = "main process" if pid == main else f"pool process {pid}"
        assert _threads(pid) == threads0, f"{role}: threads {threads0} -> {_threads(pid)}"
        assert len(fds1) <= len(fds0), f"{role}: file descriptors grew: {new}"
    for pid in pool:
        # the task's thread and the sampler's, parked: never one per task
        assert _threads(pid) <= 2, f"pool process {pid} has {_threads(pid)} threads"
    assert _lines(w.ledger) == 200 + N_TASKS  # each task recorded once
    # The ends came through the pool processes' outboxes (one per process, made once),
    # not a message each: as many entries as tasks, less a few (each at least its head
    # and the packed figures), all collected (read position = write position).
    boxes = sorted(Path(f"{w.ledger}.inflight").glob("*/*.outbox"))
    assert sorted(int(p.name.split("-")[0]) for p in boxes) == pool
    written = 0
    for p in boxes:
        wpos, rpos = struct.unpack_from("<QQ", p.read_bytes(), 16)
        assert rpos == wpos, f"{p.name}: {wpos - rpos} bytes not collected"
        written += wpos
    least = 8 + 1 + 8 + _PACKED.size  # an entry's head, "R", the run's number, figures
    assert written >= (N_TASKS - 2) * least, (written, least)
    for pid in pool:
        with open(f"/proc/{pid}/maps") as f:
            assert f.read().count(".outbox") == 1
    print(f"{N_TASKS} tasks in {elapsed:.1f} s")


def test_a_task_killed_before_its_start_was_announced_is_still_recorded(quiet_worker: Worker):
    # A pool process tells the main process of a short task only with its end; one
    # that dies at once never sends it: the main process recalls the run from the
    # in-flight journal when the pool process dies / Celery reports it lost.
    w = quiet_worker
    _send(w, 1)
    wait_for(
        lambda: w.proc.poll() is not None or _lines(w.ledger) >= 1,
        90,
        f"the worker ready (log: {w.log})",
    )
    task_id = str(uuid.uuid4())
    w.client().send_task("die.now", queue=w.queue, task_id=task_id)
    reports = wait_for(
        lambda: [r for r in w.reports() if r.task_id == task_id],
        60,
        f"the killed task's record (log: {w.log_text()[-2000:]})",
    )
    [report] = reports
    assert report.task == "die.now"
    assert report.state == "killed"
    assert report.cause in ("signal", "unknown")  # SIGKILL, not by the OOM killer
    assert report.worker.pid != w.proc.pid  # the pool process that died
    assert 0 <= report.wall_s < 30


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "taskmeter-sampler"]


def test_a_forked_child_does_not_inherit_a_running_sampler():
    with taskmeter.measure("parent") as outer:
        time.sleep(0.25)  # the sampler thread runs and has sampled
        assert SAMPLER.thread is not None and SAMPLER.thread.is_alive()
        assert SAMPLER._timer is not None and SAMPLER._timer.fd is not None
        parents = SAMPLER._timer.fd
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report by exit status, never return into pytest
            code = 0
            try:
                os.close(r)
                checks = [
                    SAMPLER.thread is None,  # reset at fork: no thread object at all
                    _sampler_threads() == [],
                    len(os.listdir("/proc/self/task")) == 1,  # only the forking thread
                    SAMPLER.idle,  # and no client inherited from the parent
                    SAMPLER._timer is None,  # nor its timer: the copy is closed
                    not is_timerfd(parents),
                ]
                # Measuring in the child starts the child's own sampler.
                with taskmeter.measure("child") as m:
                    time.sleep(0.25)
                checks += [
                    m.report.overhead.rss_peak_bytes > 0,
                    len(_sampler_threads()) == 1,
                    m.report.worker.pid == os.getpid(),
                    SAMPLER._timer is not None,  # a timer of its own
                ]
                os.write(wfd, "".join("1" if c else "0" for c in checks).encode())
            except BaseException:
                code = 1
            os._exit(code)
        os.close(wfd)
        n0 = outer.rss.n
        _, status = os.waitpid(pid, 0)
        time.sleep(0.25)  # the parent's own timer still wakes its thread
        n1 = outer.rss.n
        with os.fdopen(r, "rb") as f:
            checks = f.read().decode()
        assert os.waitstatus_to_exitcode(status) == 0
        assert checks == "1" * 10, f"child checks: {checks}"
        assert n1 - n0 >= 4 and SAMPLER._timer.fd == parents, (n0, n1)
        time.sleep(0.15)
    # The parent's measurement went on being sampled across the fork.
    assert outer.report.overhead.rss_avg_bytes > 0
    assert wait_idle(2.0)
    assert len(_sampler_threads()) == 1


class _Loop:
    """The part of kombu's hub the listener uses, driven by hand."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[object, tuple[object, ...]]] = {}
        self.timers: list[object] = []

    def add_reader(self, fd: object, cb: object, *args: object) -> None:
        self.readers[fd.fileno()] = (cb, args)  # type: ignore[attr-defined]

    def remove_reader(self, fd: object) -> None:
        self.readers.pop(fd.fileno(), None)  # type: ignore[attr-defined]

    def call_later(self, delay: float, cb: object) -> None:
        self.timers.append(cb)

    def run_once(self) -> None:
        import select

        fds = list(self.readers)
        ready, _, _ = select.select(fds, [], [], 0.5)
        for fd in ready:
            if fd in self.readers:
                cb, args = self.readers[fd]
                cb(*args)  # type: ignore[operator]

    def run_until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self.run_once()


def _listener_on(loop: _Loop) -> tuple[Any, list[dict[str, object]], list[int]]:
    """A Listener served by ``loop`` (a loop without kombu's on_tick: its channels are
    readers of the loop), with the messages it handled and the message count at each
    flush of buffered sinks."""
    from taskmeter.celery.transport import Listener

    got: list[dict[str, object]] = []
    flushed: list[int] = []
    listener = Listener(
        lambda msg, pid: got.append(msg), lambda pid: None, lambda: flushed.append(len(got))
    )
    listener.attach(loop)
    return listener, got, flushed


def test_end_lines_arrive_whole_through_an_event_loop_and_sinks_flush_per_round():
    from taskmeter.celery.transport import Sender

    loop = _Loop()
    listener, got, batches = _listener_on(loop)
    try:
        sender = Sender(listener.address, listener.token)
        record = b'{"schema":"taskmeter.task/1","task":"t\\tx"}'
        for n in range(3):
            sender.send_line(b'E["run:%d",true,null]\t' % n + record + b"\n")
        sender.send({"type": "tool", "run": "run:9"})
        loop.run_until(lambda: len(got) >= 4)
        assert [m["type"] for m in got] == ["end-line"] * 3 + ["tool"]
        assert [m["head"] for m in got[:3]] == [[f"run:{n}", True, None] for n in range(3)]
        assert all(m["body"] == record for m in got[:3])  # the record as encoded, unparsed
        # the flush waits for its timer (one per round; [0]: attaching flushes, nothing)
        assert loop.timers and batches == [0]
        loop.timers.pop(0)()  # type: ignore[operator]
        assert batches == [0, 4]
        sender.send_line(b'E["run:10",false,null]\t' + record + b"\n")
        sender.close()
    finally:
        listener.close()  # reads what is left, and flushes
    assert got[-1]["head"] == ["run:10", False, None]
    assert batches[-1] == 5


def test_the_lasting_sampler_survives_a_client_due_never():
    class Never:
        next_due = float("inf")
        is_tool = True

        def sample(self, now: float, self_rss: int) -> None:  # pragma: no cover
            raise AssertionError("never due")

    never = Never()
    SAMPLER.add(never)
    try:
        time.sleep(0.05)
        with taskmeter.measure("after") as m:
            time.sleep(0.25)
    finally:
        SAMPLER.remove(never)
    assert SAMPLER.thread is not None and SAMPLER.thread.is_alive()
    assert m.rss.n >= 3, "sampled between its start and end (the thread still samples)"
    assert wait_idle(2.0)


def test_the_channels_survive_an_event_loop_reset():
    # Celery resets its hub after a lost broker connection (every reader dropped,
    # pending timers cancelled), then calls register_with_event_loop again.
    from taskmeter.celery.transport import Sender

    loop = _Loop()
    listener, got, flushed = _listener_on(loop)
    try:
        sender = Sender(listener.address, listener.token)
        record = b'{"schema":"taskmeter.task/1"}'
        sender.send_line(b'E["run:1",true,null]\t' + record + b"\n")
        loop.run_until(lambda: bool(got))
        assert len(got) == 1 and loop.timers
        loop.readers.clear()  # the reset: no reader, the flush timer lost
        loop.timers.clear()
        sender.send_line(b'E["run:2",true,null]\t' + record + b"\n")
        time.sleep(0.1)
        assert len(got) == 1  # nobody listens meanwhile: it waits in the socket
        listener.attach(loop)  # the loop starts again
        assert [m["head"][0] for m in got] == ["run:1", "run:2"]  # read at once
        assert flushed and flushed[-1] == 2  # and the buffered records flushed
        sender.send_line(b'E["run:3",true,null]\t' + record + b"\n")
        loop.run_until(lambda: len(got) >= 3)
        assert got[-1]["head"][0] == "run:3"  # served by the loop again
        sender.close()
    finally:
        listener.close()


def test_reports_still_flow_after_the_worker_lost_its_broker_connection(quiet_worker: Worker):
    # Celery resets its event loop's hub after a lost connection: the report channels
    # must be registered again, or every later task would go unrecorded.
    import psutil
    import redis

    w = quiet_worker
    _send(w, 50)
    wait_for(
        lambda: w.proc.poll() is not None or _lines(w.ledger) >= 50,
        90,
        f"50 records (log: {w.log})",
    )
    r = redis.Redis.from_url(w.broker)
    mine = [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process(w.proc.pid).net_connections("tcp")
        if c.raddr and c.raddr.port == 6379 and c.status == psutil.CONN_ESTABLISHED
    ]
    assert mine, "the worker's main process holds broker connections"
    for addr in mine:  # only this worker's connections: Redis is shared
        with contextlib.suppress(redis.ResponseError):  # closed meanwhile
            r.client_kill(addr)
    wait_for(
        lambda: "onnection" in w.log_text() or w.proc.poll() is not None,
        30,
        f"the worker to notice the lost connection (log: {w.log})",
    )
    _send(w, 50)
    wait_for(
        lambda: w.proc.poll() is not None or _lines(w.ledger) >= 100,
        90,
        f"50 more records after the reconnect (log: {w.log_text()[-3000:]})",
    )
    assert w.proc.poll() is None


def test_a_task_its_pool_process_ended_reaches_metrics_and_ledger_without_a_rebuilt_report(
    tmp_path, monkeypatch, caplog
):
    """The main process takes the metrics' figures the pool process computed and writes
    the record as it came: it never parses the record nor rebuilds the report. The same
    figures as a report observed directly; a repeated message counts once; one cut
    short (a stalled send gives up mid-line) is dropped, not written."""
    from prometheus_client import CollectorRegistry, generate_latest

    from taskmeter.celery import integration
    from taskmeter.celery.hub import Hub
    from taskmeter.celery.transport import Listener, Sender
    from taskmeter.config import load_settings
    from taskmeter.export.ledger import open_ledger
    from taskmeter.export.metrics import TaskMetrics
    from taskmeter.measure.report import TaskReport

    settings = load_settings({}, {})
    main = integration._Worker(settings, "prefork", ["t.a"])
    main.ledger = open_ledger(str(tmp_path / "ledger.jsonl"))
    main.hub = Hub(
        [main.metrics.observe, main._write_ledger], hostname="h", pool="prefork", interval_s=0.1
    )
    main._own_sinks = list(main.hub.sinks)  # as open() sets them
    listener = Listener(main._on_message, lambda pid: None, main._flush_ledger)
    listener.start()
    pool = integration._Worker(settings, "prefork", ["t.a"])
    pool.sender = Sender(listener.address, listener.token)
    sent: list[bytes] = []
    send_line = pool.sender.send_line

    def spy(data: bytes) -> None:  # the real send, and a copy of what it sent
        sent.append(data)
        if data.startswith(b"E"):  # first cut short, as when a stalled send gave up
            send_line(data[:-41] + b"\n")
        send_line(data)

    monkeypatch.setattr(pool.sender, "send_line", spy)

    def never(*args: object) -> TaskReport:
        raise AssertionError("the main process rebuilt a report")

    try:
        pool.task_started("t.a", "id-1")
        with taskmeter.current().phase("load"):  # type: ignore[union-attr]
            taskmeter.run(["true"])
        with monkeypatch.context() as m:  # from here only the main process reads
            m.setattr(TaskReport, "from_trusted", classmethod(never))
            m.setattr(TaskReport, "from_dict", classmethod(never))
            pool.task_ended("id-1", "SUCCESS")
            end = sent[-1]
            assert end.startswith(b"E")
            pool.sender.send_line(end)  # the same end again (a late duplicate)
            wait_for(lambda: _lines(tmp_path / "ledger.jsonl") >= 1, 5, "the record", 0.01)
            time.sleep(0.2)  # the duplicate, had it counted
    finally:
        pool.sender.close()
        listener.close()
        main.ledger.close()
    lines = (tmp_path / "ledger.jsonl").read_bytes().splitlines()
    assert lines == [end[end.index(b"\t") + 1 : -1]]  # once, byte for byte as sent
    assert caplog.text.count("dropped a report message cut short") == 2
    report = TaskReport.from_json(lines[0])
    assert (report.task_id, report.state, [t.argv for t in report.tools]) == (
        "id-1", "success", [("true",)],
    )  # fmt: skip
    # The figures equal those of the report observed directly by another collector.
    direct = TaskMetrics()
    direct.declare(["t.a"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(direct)
    direct.observe(report)
    mine = CollectorRegistry(auto_describe=False)
    mine.register(main.metrics)
    assert generate_latest(mine) == generate_latest(registry)
    assert b'celery_task_runs_total{state="success",task="t.a"} 1.0' in generate_latest(mine)


def test_a_short_task_ends_packed_in_the_outbox_and_the_main_process_writes_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A task with no tool and no phase that its pool process ended: its figures go
    packed into the outbox (no record built, encoded or read as JSON in the pool
    process), and the main process writes the record the pool process would have
    written, and counts it, as for a record sent whole."""
    from prometheus_client import CollectorRegistry, generate_latest

    from taskmeter.celery import integration, outbox
    from taskmeter.celery.hub import Hub
    from taskmeter.celery.transport import Listener, Sender
    from taskmeter.config import load_settings
    from taskmeter.export.ledger import open_ledger
    from taskmeter.export.metrics import TaskMetrics
    from taskmeter.measure.report import TaskReport

    settings = load_settings({}, {})
    main = integration._Worker(settings, "prefork", ["t.a"])
    main.ledger = open_ledger(str(tmp_path / "ledger.jsonl"))
    main.hub = Hub(
        [main.metrics.observe, main._write_ledger], hostname="h", pool="prefork", interval_s=0.1
    )
    main._own_sinks = list(main.hub.sinks)
    listener = Listener(main._on_message, lambda pid: None, main._flush_ledger)
    listener.start()
    pool = integration._Worker(settings, "prefork", ["t.a"])
    pool.sender = Sender(listener.address, listener.token, listener.dirty, listener.outbox_dir)
    entries: list[bytes] = []
    put = outbox.Outbox.put

    def spy(self: outbox.Outbox, entry: bytes) -> bool:
        ok = put(self, entry)
        if ok:
            entries.append(bytes(entry))
        return ok

    monkeypatch.setattr(outbox.Outbox, "put", spy)

    me = threading.current_thread()  # the pool process's; the main's is the listener's
    build, to_json = taskmeter.Measurement._build, TaskReport.to_json_bytes

    def never(original: Any) -> Any:
        def call(*args: Any) -> Any:
            if threading.current_thread() is me:
                raise AssertionError("the pool process built or encoded a record")
            return original(*args)

        return call

    measurements = []
    try:
        pool.task_started("t.a", "id-0")  # connects: its outbox attached from now on
        pool.task_ended("id-0", "SUCCESS")
        wait_for(lambda: _lines(tmp_path / "ledger.jsonl") == 1, 5, "the first record", 0.01)
        entries.clear()  # (the first end went either way: the hello may come first)
        assert pool.sender.outbox_ready()
        for i in range(1, 4):
            pool.task_started("t.a", f"id-{i}")
            measurements.append(pool.runs[(f"id-{i}", threading.get_ident())].m)
            with monkeypatch.context() as m:
                m.setattr(taskmeter.Measurement, "_build", never(build))
                m.setattr(TaskReport, "to_json_bytes", never(to_json))
                pool.task_ended(f"id-{i}", "FAILURE" if i == 2 else "SUCCESS")
        listener.collect()
    finally:
        pool.sender.close()
        listener.close()
        main.ledger.close()
    assert [e[:1] for e in entries] == [b"R", b"R", b"R"]
    assert all(len(e) < 200 for e in entries)  # against ~900 bytes for the record
    lines = (tmp_path / "ledger.jsonl").read_bytes().splitlines()
    assert lines[1:] == [m.report.to_json_bytes() for m in measurements]
    reports = [TaskReport.from_json(line) for line in lines]
    assert [(r.task_id, r.state) for r in reports] == [
        ("id-0", "success"), ("id-1", "success"), ("id-2", "failure"), ("id-3", "success"),
    ]  # fmt: skip
    assert all(r.worker.pid == os.getpid() and r.worker.pool == "prefork" for r in reports)
    assert all(r.wall_s > 0 and r.overhead.rss_peak_bytes > 0 for r in reports)
    direct = TaskMetrics()
    direct.declare(["t.a"])
    for r in reports:
        direct.observe(r)
    registry, mine = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    registry.register(direct)
    mine.register(main.metrics)
    assert generate_latest(mine) == generate_latest(registry)

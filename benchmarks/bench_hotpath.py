"""taskmeter's own CPU per task in a prefork worker, pool side and main side, without
Celery around it.

    .venv/bin/python benchmarks/bench_hotpath.py                        # about 40 s
    .venv/bin/python benchmarks/bench_hotpath.py --quick                # about 10 s
    .venv/bin/python benchmarks/bench_hotpath.py --baseline /tmp/old/src   # two trees
    .venv/bin/python benchmarks/bench_hotpath.py --gap-ms 20   # cold: a sleep before each task

``bench_worker.py`` measures what a real worker spends per task with taskmeter on and
off; its difference mixes taskmeter's code with Celery's own reaction to slower tasks,
and moves by a few hundred µs between runs on a shared machine. This benchmark
isolates taskmeter's code, precisely enough to compare two source trees:

- the main process of a worker (``_Worker.open``: hub, journal, ledger, metrics
  endpoint) serves its channels from a kombu event loop, as in a Celery worker: at
  the loop's ticks, which a byte per task on a pipe starts (Celery's result for the
  task does that in a worker), and at its timer (the outboxes, where a tree has them);
- a forked child runs what a pool process runs per task, the Celery signal handlers
  ``_on_prerun`` and ``_on_postrun`` (measurement, journal slot, the record encoded,
  one line sent over the real channel) and writes that byte, N times back to back
  (or ``--gap-ms`` apart); its CPU (``time.process_time``) over the N tasks, minus
  that of the same loop without the handlers, is the **pool side**;
- the main process's CPU (every thread of it) from the start of those N tasks until
  the ledger holds their records (parse, hub, metrics, journal, ledger write) and
  their figures are in the metrics (a scrape's work, without rendering), minus its
  CPU over the loop without the handlers, is the **main side**.

Each round runs every tree in its own subprocess (``--child``), order alternating;
medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine, median, table

REPO = Path(__file__).resolve().parent.parent


def child(
    src: Path, n: int, gap_s: float = 0.0, mark: Callable[[], None] | None = None
) -> dict[str, float]:
    """One tree, one run: the pool side in a forked child, the main side here.

    ``gap_s``: the pool process sleeps that long before each task, as one that waits
    for its next task does; its caches have gone cold by then, the usual case in a
    worker that keeps up. The pool side is its CPU over the tasks minus that of the
    same loop without them (measured first: the sleeps and the result bytes), so
    taskmeter's sampler thread waking between tasks is counted. ``mark`` is called in
    each process as the N tasks start (``profile_sections.py`` resets its clocks)."""
    sys.path.insert(0, str(src))
    from kombu.asynchronous import Hub

    from taskmeter.celery import integration as tm
    from taskmeter.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    settings = Settings(
        enabled=True,
        port=0,
        addr="127.0.0.1",
        ledger=str(tmp / "ledger.jsonl"),
        journal=str(tmp / "journal"),
    )
    w = tm._Worker(settings, "prefork", ["noop"])
    w.open()
    hub = Hub()  # the worker's event loop, as Celery runs it (the channels at its ticks)
    w.start_threads(hub)
    tm._WORKER = w
    assert w.ledger is not None
    written = [0]
    write_many = w.ledger.write_many

    def count(records: list[bytes]) -> None:
        written[0] += len(records)
        write_many(records)

    w.ledger.write_many = count  # type: ignore[method-assign]

    class Task:  # what the handlers read of Celery's task: its name and request
        name = "noop"
        request = None

    task = Task()
    warm = 200
    # Celery's result for each task wakes the main loop: one byte per task here.
    results_r, results_w = os.pipe()
    # "C" when the loop without the handlers starts, "S" when the timed tasks start,
    # then the pool process's CPU over them
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pool process
        try:
            os.close(results_r)
            os.close(status_r)
            w.after_fork_in_child()
            for i in range(warm):
                tm._on_prerun(sender=task, task_id=f"w{i}", task=task)
                tm._on_postrun(sender=task, task_id=f"w{i}", state="SUCCESS")
                os.write(results_w, b".")
            os.write(status_w, b"C")
            p0 = time.process_time()
            for _ in range(n):
                if gap_s:
                    time.sleep(gap_s)
                os.write(results_w, b".")
            idle = time.process_time() - p0
            if mark is not None:
                mark()
            os.write(status_w, b"S")
            p0 = time.process_time()
            for i in range(n):
                if gap_s:
                    time.sleep(gap_s)
                tm._on_prerun(sender=task, task_id=f"t{i}", task=task)
                tm._on_postrun(sender=task, task_id=f"t{i}", state="SUCCESS")
                os.write(results_w, b".")
            os.write(status_w, f"{time.process_time() - p0 - idle}\n".encode())
        finally:
            os._exit(0)
    os.close(results_w)
    os.close(status_w)
    status = bytearray()
    marks: dict[int, float] = {}  # "C" and "S": the main process's CPU then

    def on_results() -> None:
        if not os.read(results_r, 1 << 16):  # the pool process exited: stop polling it
            hub.remove_reader(results_r)

    hub.add_reader(results_r, on_results)
    # Figures a tree defers to the next scrape (TaskMetrics.defer_figures), accounted
    # as a scrape would (without rendering); nothing to do in a tree without them.
    apply_deferred = getattr(w.metrics, "apply_deferred", lambda: None)
    # Ends a tree leaves in outboxes, collected at the POLL_S timer (none: read at ticks)
    collect = getattr(w.listener, "collect", lambda: None)

    def on_status() -> None:
        data = os.read(status_r, 256)
        if b"C" in data:  # the warm-up tasks' ends and figures: not billed to the run
            collect()
            apply_deferred()
        if b"S" in data and mark is not None:
            mark()
        for letter in b"CS":
            if letter in data:
                marks[letter] = time.process_time()
        status.extend(data)
        if not data:
            hub.remove_reader(status_r)

    hub.add_reader(status_r, on_status)
    loop = hub.create_loop()
    deadline = time.monotonic() + 60 + n * gap_s
    while written[0] < warm + n or not status.endswith(b"\n"):
        next(loop)
        if time.monotonic() > deadline:
            raise SystemExit(f"the ledger got {written[0]} of {warm + n} records")
    apply_deferred()  # the timed tasks' deferred figures are part of their cost
    # minus what the main process spent over the loop without the handlers (waking
    # for the result bytes, its threads' own work)
    main_s = time.process_time() - marks[ord("S")] - (marks[ord("S")] - marks[ord("C")])
    os.waitpid(pid, 0)
    pool_s = float(status[2:].strip())
    w.close()
    hub.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"pool_us": pool_s / n * 1e6, "main_us": main_s / n * 1e6}


CHANNELS = (2, 8, 32)  # pool processes connected (celery worker -c N)


def channels_child(src: Path, n: int) -> dict[str, float]:
    """One tree: the main process's read of the channels at a tick of Celery's loop
    (``Listener._poll(flush=False)``, what ``_on_tick`` does when a pool process sent
    something), with N channels connected and one of them sending one task's line
    before each read, for each N in CHANNELS: µs per read."""
    sys.path.insert(0, str(src))
    from taskmeter.celery.transport import Listener, Sender

    line = b"E" + json.dumps(["1:1", True, None]).encode() + b"\t{}\n"
    out: dict[str, float] = {}
    for channels in CHANNELS:
        got: list[object] = []
        listener = Listener(lambda msg, pid, got=got: got.append(msg), lambda pid: None)
        senders = [Sender(listener.address, listener.token) for _ in range(channels)]
        for sender in senders:
            sender.send_line(b"\n")  # connects and says hello
        deadline = time.monotonic() + 10
        while len(listener._buffers) < channels and time.monotonic() < deadline:
            listener._drain()  # accepts them (on Celery's loop: _on_ready) and reads
        if len(listener._buffers) < channels:
            raise SystemExit(f"{len(listener._buffers)} of {channels} channels connected")
        spent = 0.0
        for i in range(n):
            senders[i % channels].send_line(line)
            t0 = time.thread_time()
            listener._poll(flush=False)
            spent += time.thread_time() - t0
        if len(got) != n:
            raise SystemExit(f"{channels} channels: {len(got)} of {n} lines read")
        out[str(channels)] = spent / n * 1e6
        for sender in senders:
            sender.close()
        listener.close()
    return out


def run_child(src: Path, n: int, part: str = "--child", gap_ms: float = 0.0) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, part, str(src), "--tasks", str(n), "--gap-ms", str(gap_ms)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2000 tasks")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--tasks", type=int)
    ap.add_argument("--baseline", type=Path, help="another src/ folder, run side by side")
    ap.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="the pool process sleeps this long before each task (cold caches, as in a "
        "worker that keeps up); default 0: back to back",
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--channels-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.tasks or (2000 if args.quick else 5000)
    if args.gap_ms and not args.tasks:  # n sleeps twice per tree and round
        n = 100 if args.quick else 300
    if args.child is not None:
        print(json.dumps(child(args.child, n, args.gap_ms / 1000)))
        return 0
    if args.channels_child is not None:
        print(json.dumps(channels_child(args.channels_child, n)))
        return 0
    rounds = args.rounds or (3 if args.quick else 7)
    trees = {"this tree": REPO / "src"}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    print(f"# bench_hotpath{' (quick)' if args.quick else ''}\n\nMachine: {machine()}\n")
    gap = f", the pool process sleeping {args.gap_ms:g} ms before each" if args.gap_ms else ""
    print(f"{rounds} rounds of {n} no-op tasks per tree{gap}, order alternating\n")
    for i in range(rounds):
        for name in trees if i % 2 == 0 else reversed(list(trees)):
            results[name].append(run_child(trees[name], n, gap_ms=args.gap_ms))
        print(f"round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    base = results.get("baseline")
    for name, runs in results.items():
        pool = [r["pool_us"] for r in runs]
        main_ = [r["main_us"] for r in runs]
        total = [p + m for p, m in zip(pool, main_, strict=True)]
        vs = "-"
        if base is not None and name != "baseline":
            b = median(r["pool_us"] + r["main_us"] for r in base)
            vs = f"{median(total) / b:.2f}"
        rows.append(
            [
                name,
                f"{median(pool):.1f}",
                f"{min(pool):.1f}-{max(pool):.1f}",
                f"{median(main_):.1f}",
                f"{min(main_):.1f}-{max(main_):.1f}",
                f"{median(total):.1f}",
                vs,
            ]
        )
    header = [
        "tree",
        "pool side µs/task",
        "range",
        "main side µs/task",
        "range",
        "total µs/task",
        "vs baseline",
    ]
    print(table(header, rows))

    if args.gap_ms:
        return 0
    # The main process's read at a tick, by the number of pool processes connected.
    ch: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for i in range(rounds):
        for name in trees if i % 2 == 0 else reversed(list(trees)):
            ch[name].append(run_child(trees[name], n, "--channels-child"))
        print(f"channels round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    print(
        f"\nThe main process's read of the channels at a tick of Celery's loop, one pool "
        f"process having sent one line: µs per read, median of {rounds} rounds of {n}\n"
    )
    rows = []
    for c in CHANNELS:
        per = {name: median(r[str(c)] for r in ch[name]) for name in trees}
        row = [str(c), *(f"{v:.1f}" for v in per.values())]
        if base is not None:
            row.append(f"{per['this tree'] / per['baseline']:.2f}")
        rows.append(row)
    header = ["pool processes", *(f"{name} µs/read" for name in trees)]
    print(table(header + (["vs baseline"] if base is not None else []), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

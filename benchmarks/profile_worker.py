"""Where a real worker's per-task CPU goes: py-spy or strace on a prefork worker.

    .venv/bin/python benchmarks/profile_worker.py pyspy            # about 30 s
    .venv/bin/python benchmarks/profile_worker.py strace           # about 30 s
    .venv/bin/python benchmarks/profile_worker.py strace --off     # taskmeter off
    .venv/bin/python benchmarks/profile_worker.py pyspy --src /tmp/old/src  # another tree

A ``celery -A tmapp worker -P prefork -c 2`` on Redis (database 13) with the ledger on
(``bench_worker.start_worker``), warmed up with 200 no-op tasks, then N no-op tasks
(``--tasks``) sent at once while the profiler is attached:

- ``pyspy``: ``py-spy record --subprocesses --nonblocking -r 500 -f raw`` (not a
  dependency of taskmeter: ``.venv/bin/pip install py-spy``). Prints, for the main
  process and for the pool processes, the share of their active samples in taskmeter's
  frames, by entry point and by the deepest taskmeter frame and what it called.
- ``strace``: ``strace -f -c`` on the main process and on the pool processes; prints
  the system calls per task, by call.

Profilers slow the worker down; read shares and counts, not times.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_worker as bw

REPO = Path(__file__).resolve().parent.parent


def analyse_pyspy(path: Path) -> str:
    """Shares of py-spy's raw (collapsed) stacks in taskmeter's frames."""
    total: collections.Counter[str] = collections.Counter()
    mine: collections.Counter[str] = collections.Counter()
    entry: collections.Counter[tuple[str, str]] = collections.Counter()
    inner: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        kind = "pool" if len(frames) > 1 and frames[1].startswith("process ") else "main"
        total[kind] += n
        ours = [i for i, f in enumerate(frames) if "taskmeter/" in f]
        if not ours:
            continue
        mine[kind] += n
        entry[(kind, re.sub(r":\d+\)", ")", frames[ours[0]]))] += n
        deepest = ours[-1]
        callee = frames[deepest + 1] if deepest + 1 < len(frames) else "<self>"
        inner[(kind, re.sub(r":\d+\)", ")", f"{frames[deepest]} -> {callee}"))] += n
    out = []
    for kind in ("main", "pool"):
        t = max(total[kind], 1)
        out.append(
            f"{kind} process(es): {total[kind]} samples, {mine[kind] / t * 100:.1f} % in "
            "taskmeter's frames"
        )
        out += [
            f"  entry {c / t * 100:5.1f} %  {e}" for (k, e), c in entry.most_common() if k == kind
        ][:6]
        out += [
            f"  deep  {c / t * 100:5.1f} %  {e}" for (k, e), c in inner.most_common() if k == kind
        ][:12]
    return "\n".join(out)


def analyse_strace(path: Path, n: int) -> str:
    rows = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls = int(f[3])
            rows.append((calls, f[-1]))
        elif f and f[-1] == "total":
            rows.append((int(f[3]), "TOTAL"))
    rows.sort(reverse=True)
    return ", ".join(f"{name} {calls / n:.1f}" for calls, name in rows if calls / n >= 0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tool", choices=("pyspy", "strace"))
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--off", action="store_true", help="taskmeter off (ENABLE_WORKER_METRICS=0)")
    ap.add_argument("--src", type=Path, help="run taskmeter from this src/ folder")
    args = ap.parse_args(argv)
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.tool == "pyspy" and not Path(exe).exists():
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")
    if args.tool == "strace" and shutil.which("strace") is None:
        raise SystemExit("strace is not installed")
    client = bw.Client()
    label = "off" if args.off else ("base" if args.src else "on")
    with tempfile.TemporaryDirectory(prefix="profile-worker-") as tmp:
        w = bw.start_worker(Path(tmp), label, not args.off, args.src)
        try:
            client.batch(w, "noop", (), 1, timeout=90)
            client.batch(w, "noop", (), 200, timeout=90)
            pool = bw.descendants(w.proc.pid)
            out = Path(tmp) / "profile"
            if args.tool == "pyspy":
                cmd = [exe, "record", "--pid", str(w.proc.pid), "--subprocesses", "-r", "500"]
                cmd += ["-f", "raw", "-o", f"{out}.txt", "--nonblocking", "-d", "600"]
                procs = [
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                ]
            else:
                procs = []
                for name, pids in (("main", [w.proc.pid]), ("pool", pool)):
                    cmd = ["strace", "-f", "-c", "-o", f"{out}.{name}"]
                    for p in pids:
                        cmd += ["-p", str(p)]
                    procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
            time.sleep(1.5)
            batch = client.batch(w, "noop", (), args.tasks, timeout=600)
            time.sleep(0.3)
            for p in procs:
                p.send_signal(2)
            for p in procs:
                p.wait(60)
            print(f"# profile_worker {args.tool}, taskmeter {label}, {args.tasks} no-op tasks")
            print(f"({batch.rate:.0f} tasks/s under the profiler; src {bw.source_state()})\n")
            if args.tool == "pyspy":
                print(analyse_pyspy(Path(f"{out}.txt")))
            else:
                for name in ("main", "pool"):
                    print(f"{name}: system calls per task: ", end="")
                    print(analyse_strace(Path(f"{out}.{name}"), args.tasks))
        finally:
            w.stop()
            client.cleanup([w.queue])
    return 0


if __name__ == "__main__":
    sys.exit(main())

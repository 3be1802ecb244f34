"""`taskmeter.run(timeout=...)` side by side with `subprocess.run`: same exception,
same output so far, same time to return, even when a grandchild holds the pipes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import taskmeter

TIMEOUT = 0.5
# The grandchild sleeps this long holding the output pipes: waiting for their EOF
# would take it.
HOLD_S = 8


@pytest.fixture
def sessions() -> Iterator[list[int]]:
    """Process groups to kill at the end (the grandchildren outlive the runs)."""
    pgids: list[int] = []
    yield pgids
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def timed_timeout(
    runner: Callable[..., Any], argv: list[str], pgids: list[int], **kw: Any
) -> tuple[float, subprocess.TimeoutExpired]:
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as err:
        runner(argv, timeout=TIMEOUT, start_new_session=True, **kw)
    elapsed = time.monotonic() - t0
    return elapsed, err.value


def pgid_of(marker: str) -> list[int]:
    """Process groups of processes whose environment holds ``marker`` (inherited by
    the grandchildren)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"TM_TIMEOUT_MARKER={marker}".encode() in f.read():
                    out.append(os.getpgid(int(pid)))
        except (OSError, ProcessLookupError):
            continue
    return out


@pytest.mark.parametrize(
    "script",
    [
        # the tool runs past the timeout, its grandchild too, both holding the pipes
        f"echo partial; echo err >&2; sleep {HOLD_S} & exec sleep {HOLD_S}",
        # the tool exits at once; the grandchild it left behind holds the pipes
        f"echo partial; echo err >&2; sleep {HOLD_S} &",
    ],
    ids=["tool-and-grandchild", "grandchild-only"],
)
def test_timeout_with_captured_output_returns_like_subprocess_run(
    script: str, sessions: list[int]
) -> None:
    marker = f"tm-timeout-{os.getpid()}-{len(script)}"
    argv = ["sh", "-c", script]
    env = {**os.environ, "TM_TIMEOUT_MARKER": marker}
    base_s, base = timed_timeout(subprocess.run, argv, sessions, capture_output=True, env=env)
    sessions.extend(pgid_of(marker))
    with taskmeter.measure("tm.timeout") as m:
        ours_s, ours = timed_timeout(
            taskmeter.run, argv, sessions, capture_output=True, env=env
        )
    sessions.extend(pgid_of(marker))
    assert sessions, "the grandchildren holding the pipes were not found"

    # The same exception with the same output read so far.
    assert (ours.cmd, ours.timeout) == (base.cmd, base.timeout) == (argv, TIMEOUT)
    assert ours.stdout == base.stdout == b"partial\n"
    assert ours.stderr == base.stderr == b"err\n"
    # As fast as subprocess.run: about the timeout, never the grandchild's 8 s.
    assert TIMEOUT <= base_s < HOLD_S / 2
    assert TIMEOUT <= ours_s < HOLD_S / 2
    assert abs(ours_s - base_s) < 1.0, (ours_s, base_s)

    (tool,) = m.report.tools
    assert tool.exe == "sh" and tool.pid > 0
    if "exec sleep" in script:  # the tool itself was killed by the timeout
        assert tool.signal == signal.SIGKILL and tool.exit_code is None
        assert tool.outcome == "killed"
    else:  # it had ended on its own before the timeout
        assert tool.exit_code == 0 and tool.outcome == "ok"
    assert tool.wall_s < HOLD_S / 2


def test_timeout_without_capture_kills_and_waits_like_subprocess_run() -> None:
    argv = ["sleep", "30"]
    base_s, base = timed_timeout(subprocess.run, argv, [])
    with taskmeter.measure("tm.timeout") as m:
        ours_s, ours = timed_timeout(taskmeter.run, argv, [])
    # Without pipes subprocess.run's wait reports the time that was left of the timeout.
    assert (ours.cmd, ours.stdout, ours.stderr) == (base.cmd, base.stdout, base.stderr)
    assert ours.timeout == pytest.approx(base.timeout, abs=0.05)
    assert TIMEOUT <= ours_s < 5 and abs(ours_s - base_s) < 1.0
    (tool,) = m.report.tools
    assert tool.signal == signal.SIGKILL and tool.outcome == "killed"
    # Killed and waited for: reaped, so not a zombie nor alive.
    assert not os.path.exists(f"/proc/{tool.pid}") or _state(tool.pid) not in ("Z", "S", "R")


def test_timeout_outside_a_measurement_is_plain_subprocess_run() -> None:
    _, ours = timed_timeout(taskmeter.run, ["sleep", "30"], [])
    assert ours.cmd == ["sleep", "30"] and ours.timeout == pytest.approx(TIMEOUT, abs=0.05)


def test_no_timeout_and_a_fast_tool_is_unchanged() -> None:
    with taskmeter.measure("tm.timeout") as m:
        out = taskmeter.run(["sh", "-c", "echo hi"], capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"hi\n"
    assert m.report.tools[0].outcome == "ok"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_a_timeout_kill_is_never_named_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cgroup's OOM-kill counter rises meanwhile (another process's OOM kill).
    from taskmeter.measure import cgroup

    readings = iter(range(100))
    monkeypatch.setattr(cgroup, "oom_kills", lambda: next(readings))
    with taskmeter.measure("tm.timeout") as m:
        with pytest.raises(subprocess.TimeoutExpired):
            taskmeter.run(["sleep", "30"], timeout=0.2)
        # The same counter, but a SIGKILL from outside taskmeter: the OOM killer's.
        p = taskmeter.Popen(["sleep", "30"])
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    timed_out, outside = m.report.tools
    assert timed_out.signal == signal.SIGKILL and timed_out.cause is None
    assert timed_out.outcome == "killed"
    assert outside.signal == signal.SIGKILL and outside.cause == "oom"

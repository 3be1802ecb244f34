"""Strict CI: under CI (env CI=true) a missing tool, service or Debian package fails the
run instead of skipping; locally tests skip with the reason. Shown on real pytest
sessions, the real scripts/setup.sh (with apt and dpkg stand-ins) and scripts/services.sh
(starting a real redis-server)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from taskmeter.demo.services import free_port, port_open

from helpers import require, strict
from workerkit import wait_for

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SETUP = ROOT / "scripts" / "setup.sh"
SERVICES = ROOT / "scripts" / "services.sh"
PYTHONPATH = os.environ.get("PYTHONPATH", "")

INNER = """
import pytest
from helpers import require, require_service, requires, unavailable

def test_a_missing_tool():
    require("taskmeter-no-such-tool")

def test_a_service_not_running():
    require_service("Redis", "127.0.0.1", {port})

@requires("sh", "taskmeter-no-such-tool")
def test_decorated(tmp_path):
    pass

@requires("sh")
def test_decorated_present_keeps_its_fixtures(tmp_path):
    assert tmp_path.is_dir()

def test_a_present_tool():
    assert require("sh").endswith("/sh")
"""


def env_without_ci(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(extra)
    return env


def inner_session(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A pytest session of INNER in a subprocess, with tests/ importable (helpers)."""
    port = free_port()  # nothing listens there
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER.format(port=port)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "test_inner.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=env_without_ci(PYTHONPATH=os.pathsep.join([str(TESTS), PYTHONPATH]), **env),
    )  # fmt: skip


@pytest.mark.parametrize("ci", ["true", "1", "TRUE", "yes"])
def test_under_ci_a_missing_tool_or_service_fails_the_test(tmp_path: Path, ci: str):
    out = inner_session(tmp_path, CI=ci)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "3 failed, 2 passed" in out.stdout, out.stdout
    assert "taskmeter-no-such-tool not installed" in out.stdout
    assert "Redis is not running on 127.0.0.1:" in out.stdout
    assert "CI=true: a missing tool or service fails the run" in out.stdout
    assert "skipped" not in out.stdout


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_locally_a_missing_tool_or_service_skips_with_the_reason(tmp_path: Path, ci: str | None):
    out = inner_session(tmp_path, **({} if ci is None else {"CI": ci}))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed, 3 skipped" in out.stdout, out.stdout
    assert "SKIPPED" in out.stdout and "taskmeter-no-such-tool not installed" in out.stdout
    assert "scripts/services.sh starts it" in out.stdout


def test_strict_reads_ci_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CI", "true")
    assert strict()
    monkeypatch.setenv("CI", "false")
    assert not strict()
    monkeypatch.delenv("CI")
    assert not strict()


def test_no_test_skips_for_a_missing_tool_without_the_helpers():
    """Every missing-tool or missing-service check goes through helpers.unavailable (so
    CI fails instead of skipping); platform conditions may still skip. A line that must
    skip anyway says so with ``# strict-ci: not a missing tool``."""
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("helpers.py", Path(__file__).name):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "strict-ci: not a missing tool" in line:
                continue
            direct = re.search(r"pytest\.skip\(|importorskip\(", line)
            tool_mark = "skipif(" in line and re.search(r"which\(|install|port_open", line)
            if direct or tool_mark:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == [], "use helpers.require/require_service/unavailable instead"


# -- scripts/setup.sh --------------------------------------------------------------------------
def fake_apt(tmp_path: Path, missing: str) -> dict[str, str]:
    """dpkg, apt-cache and apt-get stand-ins: every package is installed but ``missing``,
    which apt has no candidate for (a package this Debian release lacks)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    scripts = {
        "dpkg": f'[ "$2" = "{missing}" ] && exit 1; echo "Status: install ok installed"',
        "apt-cache": f'[ "$2" = "{missing}" ] && echo "Candidate: (none)" || echo "Candidate: 1"',
        "apt-get": f'echo "apt-get $*" >> {log}',
    }  # fmt: skip
    for name, body in scripts.items():
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(0o755)
    return env_without_ci(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the apt path runs as root"
)  # strict-ci: not a missing tool
def test_setup_fails_under_ci_when_a_debian_package_cannot_be_installed(tmp_path: Path):
    env = fake_apt(tmp_path, "chromium")
    out = subprocess.run(
        ["bash", str(SETUP), "--packages-only"], env={**env, "CI": "true"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ERROR: Debian packages not installed: chromium" in out.stderr
    assert "no apt candidate for: chromium" in out.stderr
    assert "apt-get update" in (tmp_path / "apt.log").read_text()  # it did try


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the apt path runs as root"
)  # strict-ci: not a missing tool
def test_setup_only_warns_locally_when_a_debian_package_cannot_be_installed(tmp_path: Path):
    env = fake_apt(tmp_path, "chromium")
    out = subprocess.run(
        ["bash", str(SETUP), "--packages-only"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING: Debian packages not installed: chromium" in out.stderr
    assert "tests that need them will be skipped" in out.stderr


def test_setup_with_everything_installed_calls_no_apt(tmp_path: Path):
    env = fake_apt(tmp_path, "no-package-is-missing")
    out = subprocess.run(
        ["bash", str(SETUP), "--packages-only"], env={**env, "CI": "true"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Debian packages already installed" in out.stdout
    assert not (tmp_path / "apt.log").exists()


# -- scripts/services.sh -----------------------------------------------------------------------
def test_services_starts_redis_when_it_is_not_running(tmp_path: Path):
    require("redis-server")
    redis_port, rabbit_port = free_port(), free_port()
    assert not port_open("127.0.0.1", redis_port)
    # RabbitMQ's port: a listener stands in for a running broker (one node per machine)
    with_rabbit = subprocess.Popen(
        [sys.executable, "-c", "import socket, time; s = socket.socket(); "
         f"s.bind(('127.0.0.1', {rabbit_port})); s.listen(); time.sleep(120)"],
    )  # fmt: skip
    try:
        wait_for(lambda: port_open("127.0.0.1", rabbit_port), 10, "the stand-in listener")
        out = subprocess.run(
            ["bash", str(SERVICES)],
            env=env_without_ci(REDIS_PORT=str(redis_port), RABBITMQ_PORT=str(rabbit_port)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"starting redis-server on 127.0.0.1:{redis_port}" in out.stdout
        assert f"redis is up on 127.0.0.1:{redis_port}" in out.stdout
        assert f"rabbitmq already running on 127.0.0.1:{rabbit_port}" in out.stdout
        assert port_open("127.0.0.1", redis_port)
    finally:
        with_rabbit.kill()
        with_rabbit.wait()
        stop_redis(redis_port)


def stop_redis(port: int) -> None:
    """Stop the redis-server this test started (by the pid it reports, not by name)."""
    cli = shutil.which("redis-cli")
    if cli is None or not port_open("127.0.0.1", port):
        return
    info = subprocess.run([cli, "-p", str(port), "info", "server"], capture_output=True, text=True)
    pid = re.search(r"process_id:(\d+)", info.stdout)
    subprocess.run([cli, "-p", str(port), "shutdown", "nosave"], capture_output=True)
    if pid and port_open("127.0.0.1", port):
        os.kill(int(pid.group(1)), 9)


def services_without_servers(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """services.sh on a PATH without redis-server and rabbitmq-server, ports unused."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout", "sleep"):
        path = shutil.which(tool)
        assert path is not None
        (bin_dir / tool).symlink_to(path)
    env = {"PATH": str(bin_dir), "REDIS_PORT": str(free_port()), "RABBITMQ_PORT": str(free_port())}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [shutil.which("bash") or "bash", str(SERVICES)], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_services_fails_under_ci_when_a_server_is_not_installed(tmp_path: Path):
    out = services_without_servers(tmp_path, "true")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ERROR: redis-server is not installed and CI=true" in out.stderr


def test_services_only_notes_locally_that_a_server_is_not_installed(tmp_path: Path):
    out = services_without_servers(tmp_path, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "redis-server not installed; Redis tests will skip" in out.stdout
    assert "rabbitmq-server not installed; RabbitMQ tests will skip" in out.stdout

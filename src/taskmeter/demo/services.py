"""The demo's services, embedded by default so nothing needs installing: an
S3-compatible endpoint (moto's server on 127.0.0.1), a broker folder for kombu's
filesystem transport, and a real ``celery worker`` subprocess with its metrics
endpoint. Each one stops cleanly, also on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskmeter.demo import appconfig as demo_app


class ServiceError(RuntimeError):
    """A service the demo needs did not start or answer; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


# -- S3 -------------------------------------------------------------------------------------
@dataclass
class S3:
    """An S3 endpoint: moto's in-process server, or one the user names."""

    endpoint: str | None
    bucket: str
    embedded: bool
    _server: Any = None
    _client: Any = None

    @classmethod
    def start_embedded(cls, bucket: str) -> S3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        # moto accepts any credentials; set dummy ones so no real ones are ever used.
        for key, value in (("AWS_ACCESS_KEY_ID", "taskmeter-demo"),
                           ("AWS_SECRET_ACCESS_KEY", "taskmeter-demo"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
            os.environ[key] = value
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3 = cls(f"http://127.0.0.1:{port}", bucket, True, server)
        s3.ensure_bucket()
        return s3

    @classmethod
    def external(cls, endpoint: str | None, bucket: str) -> S3:
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        s3 = cls(endpoint, bucket, False)
        s3.ensure_bucket()
        return s3

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3  # type: ignore[import-untyped]

            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        return self._client

    def ensure_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self.client.create_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            where = self.endpoint or "AWS S3"
            raise ServiceError(f"cannot use bucket {self.bucket!r} at {where}: {exc}") from exc

    def upload(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def count(self, prefix: str) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sum(page.get("KeyCount", 0) for page in pages)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# -- broker ---------------------------------------------------------------------------------
def filesystem_broker(root: Path) -> tuple[str, str]:
    """``filesystem://`` and its folder (created), for the worker and the client."""
    for sub in ("queue", "processed", "control"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://", str(root)


def check_broker(url: str) -> None:
    """Fail fast, with the address, when a network broker does not answer."""
    parts = urllib.parse.urlsplit(url)
    default = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}
    if parts.scheme not in default:
        return
    host, port = parts.hostname or "localhost", parts.port or default[parts.scheme]
    if not port_open(host, port, timeout=2):
        raise ServiceError(f"the broker {parts.scheme}://{host}:{port} does not answer")


def client_app(broker: str, broker_dir: str | None, queue: str) -> Any:
    from celery import Celery

    return demo_app.configure(Celery("taskmeter-demo-client"), broker, broker_dir, queue)


# -- the worker -----------------------------------------------------------------------------
@dataclass
class Worker:
    """A ``celery -A taskmeter.demo.app worker`` subprocess in its own session."""

    proc: subprocess.Popen[bytes]
    port: int
    ledger: Path
    log: Path
    queue: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        broker: str,
        broker_dir: str | None,
        s3: S3,
        ledger: Path,
        concurrency: int,
        port: int | None = None,
        log: Path | None = None,
    ) -> Worker:
        queue = f"taskmeter-demo-{uuid.uuid4().hex[:10]}"
        scratch = workdir / "worker"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMETER_", "ENABLE_"))}
        port = port or free_port()
        env.update({
            "ENABLE_WORKER_METRICS": "1",
            "TASKMETER_PORT": str(port),
            "TASKMETER_ADDR": "127.0.0.1",
            "TASKMETER_LEDGER": str(ledger),
            demo_app.BROKER_ENV: broker,
            demo_app.QUEUE_ENV: queue,
            demo_app.S3_ENDPOINT_ENV: s3.endpoint or "",
            demo_app.BUCKET_ENV: s3.bucket,
            demo_app.SCRATCH_ENV: str(scratch),
        })  # fmt: skip
        if broker_dir:
            env[demo_app.BROKER_DIR_ENV] = broker_dir
        log = log or workdir / "worker.log"
        cmd = [
            sys.executable, "-m", "celery", "-A", "taskmeter.demo.app", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", queue,
            "-n", f"taskmeter-demo-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=scratch,
                stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C is ours to relay
            )  # fmt: skip
        return cls(proc, port, ledger, log, queue, env)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ensure_alive(self) -> None:
        if not self.alive():
            raise ServiceError(
                f"the celery worker exited with status {self.proc.returncode}; "
                f"its log ({self.log}) ends with:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.ensure_alive()
            if "ready." in self.log_tail(20_000):
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.metrics()
                    return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the celery worker was not ready after {timeout:.0f} s; "
                    f"its log ({self.log}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def metrics(self) -> str:
        return http_get(self.url + "/metrics")

    def ledger_lines(self) -> int:
        try:
            with open(self.ledger, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def stop(self, timeout: float = 15) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL of its whole session after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Pool children or tools left behind by a killed main process: same session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

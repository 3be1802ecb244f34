"""The metrics endpoint over real sockets: routes, bind errors, TLS, basic auth, close."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

import taskmeter
from taskmeter.export.metrics import TaskMetrics
from taskmeter.export.server import MetricsServer, ServerConfig, ServerError, start_server

from helpers import require

TIMEOUT = 5.0


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    c = Counter("celery_task_runs", "Task runs.", ["task", "state"], registry=reg)
    c.labels(task="demo.add", state="success").inc(3)
    return reg


@pytest.fixture
def servers() -> Iterator[list[MetricsServer]]:
    started: list[MetricsServer] = []
    yield started
    for s in started:
        s.close()


def serve(
    servers: list[MetricsServer],
    registry: CollectorRegistry,
    config: ServerConfig | None = None,
    **routes: object,
) -> MetricsServer:
    extra = {f"/{name}": (lambda v=value: v) for name, value in routes.items()}
    s = start_server(registry, config or ServerConfig(port=0, addr="127.0.0.1"), extra)
    servers.append(s)
    return s


def get(
    url: str,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "taskmeter-metrics-server"]


# ------------------------------------------------------------------ plain HTTP routes


def test_serves_metrics_json_routes_and_404(
    registry: CollectorRegistry, servers: list[MetricsServer]
) -> None:
    s = serve(servers, registry, inflight={"demo.add": 2})
    assert s.port > 0
    assert s.url == f"http://127.0.0.1:{s.port}"

    for path in ("/metrics", "/"):
        status, headers, body = get(s.url + path)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert 'celery_task_runs_total{state="success",task="demo.add"} 3.0' in body.decode()

    status, headers, body = get(s.url + "/inflight")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"demo.add": 2}

    status, _, _ = get(s.url + "/nope")
    assert status == 404


@pytest.fixture
def task_registry() -> tuple[CollectorRegistry, TaskMetrics]:
    """A registry as the worker builds it: TaskMetrics (fed a real measured task) beside
    another collector formatted by prometheus_client."""
    metrics = TaskMetrics(inflight=lambda: [], pool="prefork", concurrency=2)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics)
    Counter("other_things", "Another collector.", registry=reg).inc(2)
    with taskmeter.measure("tm.scraped", "tid-0001") as m:
        with m.phase("prepare"):
            pass
        taskmeter.run(["true"], check=True)
    metrics.observe(m.report)
    return reg, metrics


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def test_text_by_default_openmetrics_when_asked_exemplars_only_there_and_gzip(
    task_registry: tuple[CollectorRegistry, TaskMetrics], servers: list[MetricsServer]
) -> None:
    registry, _ = task_registry
    s = serve(servers, registry)
    status, headers, body = get(s.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert "# EOF" not in text and "tid-0001" not in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"celery_task_runs", "celery_task_wall_seconds", "other_things"} <= names

    # Prometheus's own Accept header: OpenMetrics, with the task id as exemplars.
    status, headers, body = get(s.url + "/metrics", {"Accept": OPENMETRICS})
    assert status == 200
    assert headers["Content-Type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    om = body.decode()
    assert om.endswith("# EOF\n")
    families = {f.name: f for f in om_parse(om)}
    assert families["other_things"].samples[0].value == 2
    exemplars = [
        smp.exemplar.labels["task_id"]
        for f in families.values()
        for smp in f.samples
        if smp.exemplar is not None
    ]
    assert exemplars and set(exemplars) == {"tid-0001"}
    # q=0 is a refusal; a scraper preferring the text format gets it.
    for accept in (
        "application/openmetrics-text;q=0",
        "text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0;q=0.5",
        "application/openmetrics-text;version=9.9.9",
    ):
        _, headers, _ = get(s.url + "/metrics", {"Accept": accept})
        assert headers["Content-Type"].startswith("text/plain"), accept
    # Prometheus 3's default header: protobuf first (not served), then OpenMetrics.
    prom3 = (
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
        "encoding=delimited;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4,"
        "application/openmetrics-text;version=0.0.1;q=0.3,text/plain;version=0.0.4;q=0.2,"
        "*/*;q=0.1"
    )
    _, headers, _ = get(s.url + "/metrics", {"Accept": prom3})
    assert headers["Content-Type"].startswith("application/openmetrics-text")

    for accept, expected in (("", text), (OPENMETRICS, om)):
        status, headers, body = get(
            s.url + "/metrics", {"Accept": accept, "Accept-Encoding": "gzip"}
        )
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert int(headers["Content-Length"]) == len(body)
        assert gzip.decompress(body).decode() == expected
        # Unchanged registry: the very same compressed bytes again.
        assert get(s.url + "/metrics", {"Accept": accept, "Accept-Encoding": "gzip"})[2] == body


def test_head_options_and_other_methods(
    task_registry: tuple[CollectorRegistry, TaskMetrics], servers: list[MetricsServer]
) -> None:
    registry, _ = task_registry
    s = serve(servers, registry)
    _, get_headers, body = get(s.url + "/metrics")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
    try:
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b""
        assert resp.getheader("Content-Type") == get_headers["Content-Type"]
        assert int(resp.getheader("Content-Length") or -1) == len(body)
        conn.request("OPTIONS", "/metrics")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Allow") == "GET,HEAD,OPTIONS"
        conn.request("POST", "/metrics", body=b"x")
        resp = conn.getresponse()
        assert resp.status == 405 and b"use GET or HEAD" in resp.read()
        assert resp.getheader("Allow") == "GET,HEAD,OPTIONS"
    finally:
        conn.close()


def test_name_filter(
    task_registry: tuple[CollectorRegistry, TaskMetrics], servers: list[MetricsServer]
) -> None:
    registry, _ = task_registry
    s = serve(servers, registry)

    def families(query: str, accept: str = "") -> dict[str, list[str]]:
        status, _, body = get(s.url + "/metrics?" + query, {"Accept": accept})
        assert status == 200, body
        parse = om_parse if accept else text_string_to_metric_families
        return {f.name: sorted({smp.name for smp in f.samples}) for f in parse(body.decode())}

    # Sample names (prometheus_client's semantics), repeatable.
    assert families("name[]=celery_task_runs_total&name[]=other_things_total") == {
        "celery_task_runs": ["celery_task_runs_total"],
        "other_things": ["other_things_total"],
    }
    assert families("name%5B%5D=celery_task_wall_seconds_count") == {
        "celery_task_wall_seconds": ["celery_task_wall_seconds_count"]
    }
    # A family name gives the whole family, in OpenMetrics too.
    whole = ["celery_task_wall_seconds_bucket", "celery_task_wall_seconds_count",
             "celery_task_wall_seconds_sum"]  # fmt: skip
    assert families("name[]=celery_task_wall_seconds", OPENMETRICS) == {
        "celery_task_wall_seconds": whole
    }
    assert families("name[]=no_such_metric") == {}
    # Anything but name[] is refused with a message.
    status, _, body = get(s.url + "/metrics?names=celery_task_runs_total")
    assert status == 400 and b"unknown parameter 'names'" in body and b"name[]" in body


def test_scrape_follows_new_records(
    task_registry: tuple[CollectorRegistry, TaskMetrics], servers: list[MetricsServer]
) -> None:
    registry, metrics = task_registry
    s = serve(servers, registry)
    before = get(s.url + "/metrics")[2].decode()
    assert 'celery_task_runs_total{state="success",task="tm.scraped"} 1.0' in before
    assert get(s.url + "/metrics")[2].decode() == before  # nothing new: the same text
    with taskmeter.measure("tm.scraped", "tid-0002") as m:
        pass
    metrics.observe(m.report)
    after = get(s.url + "/metrics")[2].decode()
    assert 'celery_task_runs_total{state="success",task="tm.scraped"} 2.0' in after
    assert 'celery_task_wall_seconds_count{task="tm.scraped"} 2.0' in after


def test_extra_route_is_called_per_request(
    registry: CollectorRegistry, servers: list[MetricsServer]
) -> None:
    calls = []

    def inflight() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    s = start_server(registry, ServerConfig(port=0, addr="127.0.0.1"), {"/inflight": inflight})
    servers.append(s)
    assert json.loads(get(s.url + "/inflight")[2]) == {"n": 1}
    assert json.loads(get(s.url + "/inflight")[2]) == {"n": 2}


def test_slow_request_does_not_block_another(
    registry: CollectorRegistry, servers: list[MetricsServer]
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow() -> str:
        entered.set()
        release.wait(TIMEOUT)
        return "done"

    s = start_server(registry, ServerConfig(port=0, addr="127.0.0.1"), {"/slow": slow})
    servers.append(s)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(get(s.url + "/slow")[2]))
    t.start()
    try:
        assert entered.wait(TIMEOUT)
        # A client that connects and sends nothing must not hold up anyone either.
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT):
            t0 = time.monotonic()
            status, _, _ = get(s.url + "/metrics")
            assert status == 200
            assert time.monotonic() - t0 < 2.0
    finally:
        release.set()
        t.join(TIMEOUT)
    assert result == [b'"done"']


def test_no_request_logging_on_stderr(
    registry: CollectorRegistry, servers: list[MetricsServer], capfd: pytest.CaptureFixture[str]
) -> None:
    s = serve(servers, registry)
    get(s.url + "/metrics")
    get(s.url + "/missing")
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------ bind errors


def test_port_in_use_is_a_clear_error(registry: CollectorRegistry) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError) as info:
            start_server(registry, ServerConfig(port=port, addr="127.0.0.1"))
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg
    assert "TASKMETER_PORT" in msg
    assert "ENABLE_WORKER_METRICS=0" in msg
    assert not server_threads()


def test_bad_address_is_a_clear_error(registry: CollectorRegistry) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this host.
    with pytest.raises(ServerError, match=r"192\.0\.2\.1:0.*TASKMETER_ADDR"):
        start_server(registry, ServerConfig(port=0, addr="192.0.2.1"))
    with pytest.raises(ServerError, match=r"no-such-host\.invalid:0"):
        start_server(registry, ServerConfig(port=0, addr="no-such-host.invalid"))


# ------------------------------------------------------------------ close


def test_close_frees_port_and_stops_thread(
    registry: CollectorRegistry, servers: list[MetricsServer]
) -> None:
    s = serve(servers, registry)
    assert get(s.url + "/metrics")[0] == 200
    assert server_threads() == ["taskmeter-metrics-server"]
    s.close()
    s.close()  # idempotent
    assert not server_threads()
    with pytest.raises(OSError):
        urllib.request.urlopen(s.url + "/metrics", timeout=TIMEOUT)
    # The port is free again: for a plain socket and for a new server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", s.port))
        again.listen()
    s2 = serve(servers, registry, ServerConfig(port=s.port, addr="127.0.0.1"))
    assert get(s2.url + "/metrics")[0] == 200


# ------------------------------------------------------------------ TLS


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    openssl = require("openssl")  # to make a test certificate
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"]
    argv += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1"]
    argv += ["-keyout", str(key), "-out", str(crt)]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return str(crt), str(key)


def test_tls(
    registry: CollectorRegistry, servers: list[MetricsServer], cert: tuple[str, str]
) -> None:
    crt, key = cert
    s = serve(servers, registry, ServerConfig(port=0, addr="127.0.0.1", certfile=crt, keyfile=key))
    assert s.url == f"https://127.0.0.1:{s.port}"
    trust = ssl.create_default_context(cafile=crt)

    status, _, body = get(s.url + "/metrics", context=trust)
    assert status == 200
    assert b"celery_task_runs_total" in body

    # Plain HTTP to the TLS port gets no metrics.
    with pytest.raises((OSError, http.client.HTTPException)):
        get(f"http://127.0.0.1:{s.port}/metrics")

    # TLS below 1.2 is refused.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(crt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pass
    else:
        with pytest.raises(OSError):
            get(s.url + "/metrics", context=old)

    # A client that connects and never starts its handshake blocks nobody.
    with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT):
        t0 = time.monotonic()
        status, _, _ = get(s.url + "/metrics", context=trust)
        assert status == 200
        assert time.monotonic() - t0 < 2.0


def test_tls_config_errors(
    registry: CollectorRegistry, cert: tuple[str, str], tmp_path: Path
) -> None:
    crt, key = cert
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ServerError, match=r"missing\.pem"):
        start_server(
            registry, ServerConfig(port=0, addr="127.0.0.1", certfile=missing, keyfile=key)
        )
    with pytest.raises(ServerError, match=r"missing\.pem"):
        start_server(
            registry, ServerConfig(port=0, addr="127.0.0.1", certfile=crt, keyfile=missing)
        )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ServerError, match=r"garbage\.pem"):
        start_server(
            registry, ServerConfig(port=0, addr="127.0.0.1", certfile=str(garbage), keyfile=key)
        )
    with pytest.raises(ServerError, match="both"):
        start_server(registry, ServerConfig(port=0, addr="127.0.0.1", certfile=crt))
    with pytest.raises(ServerError, match="both"):
        start_server(registry, ServerConfig(port=0, addr="127.0.0.1", keyfile=key))
    assert not server_threads()


# ------------------------------------------------------------------ basic auth


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth(registry: CollectorRegistry, servers: list[MetricsServer]) -> None:
    cfg = ServerConfig(port=0, addr="127.0.0.1", basic_auth=("prom", "s3cret:pw"))
    assert "s3cret" not in repr(cfg)
    s = serve(servers, registry, cfg, inflight={})

    for path in ("/metrics", "/", "/inflight", "/nope"):
        status, headers, _ = get(s.url + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == 'Basic realm="taskmeter"'

    for bad in (
        basic("prom", "wrong"),
        basic("other", "s3cret:pw"),
        basic("prom", "s3cret"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer s3cret:pw"},
    ):
        assert get(s.url + "/metrics", bad)[0] == 401

    status, _, body = get(s.url + "/metrics", basic("prom", "s3cret:pw"))
    assert status == 200
    assert b"celery_task_runs_total" in body
    assert get(s.url + "/inflight", basic("prom", "s3cret:pw"))[0] == 200
    assert get(s.url + "/nope", basic("prom", "s3cret:pw"))[0] == 404


# ------------------------------------------------------------------ IPv6


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback(registry: CollectorRegistry, servers: list[MetricsServer]) -> None:
    s = serve(servers, registry, ServerConfig(port=0, addr="::1"))
    assert s.url == f"http://[::1]:{s.port}"
    status, _, body = get(s.url + "/metrics")
    assert status == 200
    assert b"celery_task_runs_total" in body

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match=rf"\[::1\]:{port}"):
            start_server(registry, ServerConfig(port=port, addr="::1"))


# ------------------------------------------------------------------ fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_close_in_forked_child_leaves_parent_serving(
    registry: CollectorRegistry, servers: list[MetricsServer]
) -> None:
    s = serve(servers, registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child: no accept thread here; close() must not wait for one
        code = 1
        try:
            signal.alarm(5)
            s.close()
            code = 0 if s.closed else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get(s.url + "/metrics")[0] == 200

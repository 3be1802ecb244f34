"""The worker's metrics HTTP endpoint.

``/metrics`` (and ``/``) serves the registry in the Prometheus text format (0.0.4), or
in OpenMetrics 1.0 when the scraper's ``Accept`` header names
``application/openmetrics-text`` (Prometheus does by default); only OpenMetrics carries
the exemplars. ``gzip`` when the client accepts it, ``HEAD`` answers the headers alone,
and ``?name[]=x`` restricts the output to the families or samples named ``x``
(prometheus_client's semantics, plus whole families by name). Extra routes (e.g.
``/inflight``) serve ``application/json``. Anything else is a 404.

The scrape is cheap for the process that dispatches tasks: :class:`TaskMetrics`
families come pre-rendered from their cache (only series that changed since the last
scrape are formatted again), other collectors (the process metrics) are formatted by
prometheus_client, and the gzip of an unchanged body is reused.

The server runs one daemon thread for the accept loop and one daemon thread per
connection, so a slow scrape or a client that connects and sends nothing never holds
up another request. With TLS the handshake happens in the connection's own thread,
never in the accept loop. Failing to bind is an error with a message that says what
to change: a worker must not run on silently without its endpoint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import gzip
import hmac
import json
import logging
import os
import socket
import socketserver
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics_format

from taskmeter.config import ENV_ADDR, ENV_ENABLE, ENV_PORT, ENV_TLS_CERT, ENV_TLS_KEY
from taskmeter.export.metrics import CachedFamily

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["MetricsServer", "Renderer", "ServerConfig", "ServerError", "start_server"]

log = logging.getLogger(__name__)

METRICS_PATHS = frozenset({"/", "/metrics"})
REALM = "taskmeter"
# A connection that has not completed its TLS handshake / sent its request within this
# many seconds is dropped. It only ever costs its own thread, never another request.
CONNECTION_TIMEOUT_S = 30.0
_JOIN_TIMEOUT_S = 5.0


class ServerError(RuntimeError):
    """The metrics endpoint cannot be served; the message says where and what to change."""


@dataclass(frozen=True, repr=False)
class ServerConfig:
    """Where and how to serve. TLS is on when both ``certfile`` and ``keyfile`` are given."""

    port: int = 8101
    addr: str = "0.0.0.0"
    certfile: str | None = None
    keyfile: str | None = None
    basic_auth: tuple[str, str] | None = None  # (user, password)

    @property
    def tls(self) -> bool:
        return bool(self.certfile) and bool(self.keyfile)

    def __repr__(self) -> str:  # never shows the password
        auth = None if self.basic_auth is None else (self.basic_auth[0], "***")
        return (
            f"ServerConfig(port={self.port!r}, addr={self.addr!r}, "
            f"certfile={self.certfile!r}, keyfile={self.keyfile!r}, basic_auth={auth!r})"
        )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_error(addr: str, port: int, reason: str, hint: str) -> ServerError:
    return ServerError(
        f"taskmeter: cannot serve metrics on {_hostport(addr, port)}: {reason}; {hint}"
    )


_PORT_HINT = (
    f"set {ENV_PORT} (or --metrics-port) to a free port, "
    f"or {ENV_ENABLE}=0 to run the worker without metrics"
)
_ADDR_HINT = (
    f"set {ENV_ADDR} to an address of this host (0.0.0.0 or :: for all interfaces), "
    f"or {ENV_ENABLE}=0 to run the worker without metrics"
)


def _resolve(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The socket family and numeric host to bind, chosen from ``addr`` like
    prometheus_client and http.server do (so ``::1`` or ``::`` give an IPv6 socket)."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise _bind_error(addr, port, f"cannot resolve address ({exc})", _ADDR_HINT) from None
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def _tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    for what, path in (("certificate", certfile), ("private key", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            env = ENV_TLS_CERT if what == "certificate" else ENV_TLS_KEY
            raise ServerError(
                f"taskmeter: cannot read TLS {what} file {path!r}: "
                f"{exc.strerror or exc}; check {env}"
            ) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ServerError(
            f"taskmeter: cannot load TLS certificate {certfile!r} with key {keyfile!r}: "
            f"{exc}; both must be PEM files and the key must match the certificate"
        ) from None
    return ctx


class _QuietHandler(WSGIRequestHandler):
    """No per-request lines on stderr; connection-level timeout for idle clients."""

    timeout = CONNECTION_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """Thread-per-connection WSGI server; handshakes TLS in the connection's thread."""

    daemon_threads = True
    allow_reuse_address = True  # rebinding right after close despite TIME_WAIT
    allow_reuse_port = False  # never share a port with another listener

    def __init__(
        self,
        family: socket.AddressFamily,
        server_address: tuple[str, int],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.address_family = family
        self._tls = tls
        super().__init__(server_address, _QuietHandler, bind_and_activate=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the FQDN of the bind address, which can
        # stall on DNS; the WSGI environ only needs a name, the address will do.
        if self.address_family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            # "::" serves IPv4 too where the OS allows it (dual stack).
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def server_activate(self) -> None:
        super().server_activate()
        if self._tls is not None:
            # No handshake in accept(): it runs in finish_request, per connection.
            self.socket = self._tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="taskmeter-metrics-conn",
            daemon=True,
        )
        thread.start()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(CONNECTION_TIMEOUT_S)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # plain HTTP, scanner, stalled client
                log.debug("metrics: TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; a dropped scrape is not worth it.
        log.debug("metrics: error serving %s", client_address, exc_info=True)


def _text(
    start_response: StartResponse,
    status: str,
    body: str,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = body.encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(data))),
        *extra_headers,
    ]
    start_response(status, headers)
    return [data]


TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_METRICS_ALLOW = "GET,HEAD,OPTIONS"
_OPENMETRICS_VERSIONS = frozenset({"", "0.0.1", "1.0.0"})


def _media_items(header: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(media type or coding, parameters)`` of each item of an Accept* header."""
    for item in header.split(","):
        token, *params = item.split(";")
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip().lower()] = value.strip().strip('"')
        yield token.strip().lower(), values


def _q(params: dict[str, str]) -> float:
    try:
        return float(params.get("q", "1"))
    except ValueError:
        return 0.0


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header prefers OpenMetrics 1.0 to the text format: its best
    q above 0 and not below the text format's (``text/plain``, ``text/*`` or ``*/*``).
    Prometheus's default header does; one configured to prefer the text format not."""
    om_q = text_q = 0.0
    for media, params in _media_items(accept):
        if media == "application/openmetrics-text":
            if params.get("version", "") in _OPENMETRICS_VERSIONS:
                om_q = max(om_q, _q(params))
        elif media in ("text/plain", "text/*", "*/*"):
            text_q = max(text_q, _q(params))
    return om_q > 0 and om_q >= text_q


def _accepts_gzip(accept_encoding: str) -> bool:
    return any(c == "gzip" and _q(p) > 0 for c, p in _media_items(accept_encoding))


class _One:
    """A collector of one metric, to format it with prometheus_client."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> list[Metric]:
        return [self._metric]


# Untyped upstream.
_openmetrics_latest: Callable[[Any], bytes] = openmetrics_format.generate_latest


def _format(metric: Metric, openmetrics: bool) -> str:
    if openmetrics:
        return _openmetrics_latest(_One(metric)).decode().removesuffix("# EOF\n")
    return text_format.generate_latest(_One(metric)).decode()


def _restrict(metric: Metric, names: frozenset[str]) -> Metric | None:
    """``metric`` limited to the samples named in ``names`` (all of them when the family
    is named), None when nothing is left."""
    if metric.name in names:
        return metric
    if isinstance(metric, CachedFamily) and set(metric.sample_names) <= names:
        return metric
    samples = [s for s in metric.samples if s.name in names]
    if not samples:
        return None
    restricted = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    restricted.samples = samples
    return restricted


class Renderer:
    """Renders a registry for scrapes in the text or OpenMetrics format.

    Families of a :class:`TaskMetrics` come from their cache (only series that changed
    since the last scrape are formatted again); any other collector is formatted by
    prometheus_client. The gzip of a body equal to the last one is reused."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._gzip: dict[bool, tuple[bytes, bytes]] = {}

    def render(self, openmetrics: bool = False, names: Iterable[str] | None = None) -> bytes:
        wanted = None if names is None else frozenset(names)
        parts: list[str] = []
        for metric in self.registry.collect():
            if wanted is not None:
                restricted = _restrict(metric, wanted)
                if restricted is None:
                    continue
                metric = restricted
            if isinstance(metric, CachedFamily):
                parts.append(metric.exposition(openmetrics))
            else:
                parts.append(_format(metric, openmetrics))
        if openmetrics:
            parts.append("# EOF\n")
        return "".join(parts).encode()

    def gzip(self, body: bytes, openmetrics: bool) -> bytes:
        with self._lock:
            last = self._gzip.get(openmetrics)
        if last is not None and last[0] == body:
            return last[1]
        # Level 1: several times faster than 9, and this text still shrinks ~10x.
        data = gzip.compress(body, compresslevel=1, mtime=0)
        with self._lock:
            self._gzip[openmetrics] = (body, data)
        return data


def _make_app(
    registry: CollectorRegistry,
    routes: Mapping[str, Callable[[], object]],
    basic_auth: tuple[str, str] | None,
) -> WSGIApplication:
    renderer = Renderer(registry)
    expected: tuple[bytes, bytes] | None = None
    if basic_auth is not None:
        expected = (basic_auth[0].encode(), basic_auth[1].encode())

    def authorized(environ: WSGIEnvironment) -> bool:
        assert expected is not None
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Compare both halves every time: no early exit on a wrong user name.
        user_ok = hmac.compare_digest(user, expected[0])
        password_ok = hmac.compare_digest(password, expected[1])
        return bool(sep) and user_ok and password_ok

    def serve_metrics(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            return _text(start_response, "200 OK", "", [("Allow", _METRICS_ALLOW)])
        if method not in ("GET", "HEAD"):
            return _text(
                start_response,
                "405 Method Not Allowed",
                f"405 Method Not Allowed: {method}; use GET or HEAD\n",
                [("Allow", _METRICS_ALLOW)],
            )
        query = urllib.parse.parse_qs(str(environ.get("QUERY_STRING", "")))
        names = query.get("name[]")
        unknown = sorted(k for k in query if k != "name[]")
        if unknown:
            return _text(
                start_response,
                "400 Bad Request",
                f"400 Bad Request: unknown parameter {unknown[0]!r}; the only one is "
                "name[] (a metric family or sample name, repeatable)\n",
            )
        openmetrics = wants_openmetrics(str(environ.get("HTTP_ACCEPT", "")))
        try:
            body = renderer.render(openmetrics, names)
        except Exception:
            log.exception("metrics: rendering the scrape failed")
            return _text(start_response, "500 Internal Server Error", "500 Internal Server Error\n")
        headers = [
            ("Content-Type", OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE),
            ("Vary", "Accept, Accept-Encoding"),
        ]
        if _accepts_gzip(str(environ.get("HTTP_ACCEPT_ENCODING", ""))):
            body = renderer.gzip(body, openmetrics)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [] if method == "HEAD" else [body]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if expected is not None and not authorized(environ):
            return _text(
                start_response,
                "401 Unauthorized",
                "401 Unauthorized\n",
                [("WWW-Authenticate", f'Basic realm="{REALM}"')],
            )
        path = str(environ.get("PATH_INFO", "")) or "/"
        if path in METRICS_PATHS:
            return serve_metrics(environ, start_response)
        route = routes.get(path)
        if route is None:
            return _text(start_response, "404 Not Found", f"404 Not Found: {path}\n")
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            return _text(start_response, "200 OK", "", [("Allow", "OPTIONS,GET")])
        if method != "GET":
            return _text(
                start_response,
                "405 Method Not Allowed",
                f"405 Method Not Allowed: {method}; use GET\n",
                [("Allow", "OPTIONS,GET")],
            )
        try:
            data = json.dumps(route()).encode()
        except Exception:
            log.exception("metrics: route %s failed", path)
            return _text(start_response, "500 Internal Server Error", "500 Internal Server Error\n")
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [data]

    return app


class MetricsServer:
    """A running endpoint. ``port`` is the bound port (useful with ``port=0``)."""

    def __init__(self, server: _Server, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.port: int = server.server_port
        self.url: str = url

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> socket.socket:
        """The listening socket (read-only access, e.g. for its ``fileno()``)."""
        return self._server.socket

    def close(self) -> None:
        """Stop accepting, close the listening socket and join the accept thread.

        Idempotent. Connections already being served finish on their own threads.
        Fork-safe: in a forked child (which has no accept thread) it only closes the
        child's copy of the listening socket; the parent keeps serving."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                self._server.server_close()
                return
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(_JOIN_TIMEOUT_S)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<MetricsServer {self.url} {state}>"


def _url(scheme: str, addr: str, bound_host: str, port: int) -> str:
    """A URL a local client can use: wildcard binds are reached through loopback."""
    if bound_host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif bound_host == "::":
        host = "::1"
    elif ":" in bound_host:
        host = bound_host
    else:
        host = addr  # keep a name such as "localhost" as given
    if ":" in host:
        host = "[" + host.replace("%", "%25") + "]"
    return f"{scheme}://{host}:{port}"


def start_server(
    registry: CollectorRegistry,
    config: ServerConfig,
    extra_routes: Mapping[str, Callable[[], object]] | None = None,
) -> MetricsServer:
    """Serve ``registry`` at ``/metrics`` (and ``/``) plus JSON ``extra_routes``.

    Raises :class:`ServerError` when the endpoint cannot be served (port in use, bad
    address, unreadable certificate, half a TLS or auth configuration)."""
    routes = dict(extra_routes or {})
    for path in routes:
        if not path.startswith("/") or path in METRICS_PATHS:
            raise ValueError(f"extra route {path!r}: must start with '/' and not be /metrics")

    port = config.port
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServerError(f"taskmeter: metrics port {port!r} is not a TCP port (0 to 65535)")
    addr = config.addr or "0.0.0.0"

    certfile, keyfile = config.certfile or None, config.keyfile or None
    if (certfile is None) != (keyfile is None):
        raise ServerError(
            "taskmeter: TLS needs both a certificate and a key file "
            f"({ENV_TLS_CERT} and {ENV_TLS_KEY}), or neither"
        )
    tls = _tls_context(certfile, keyfile) if certfile and keyfile else None

    if config.basic_auth is not None:
        user, password = config.basic_auth
        if not user or ":" in user:
            raise ServerError("taskmeter: basic auth user must be non-empty and contain no ':'")
        if not password:
            raise ServerError("taskmeter: basic auth password must not be empty")

    family, host = _resolve(addr, port)
    try:
        server = _Server(family, (host, port), tls)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            hint = _ADDR_HINT
        elif exc.errno == errno.EACCES:
            hint = f"ports below 1024 need privileges; {_PORT_HINT}"
        else:
            hint = _PORT_HINT
        raise _bind_error(addr, port, reason, hint) from None

    server.set_app(_make_app(registry, routes, config.basic_auth))
    url = _url("https" if tls else "http", addr, host, server.server_port)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.5},
        name="taskmeter-metrics-server",
        daemon=True,
    )
    thread.start()
    log.debug("metrics: serving on %s (pid %d)", url, os.getpid())
    return MetricsServer(server, thread, url)

"""Worker settings: environment first (12-factor, as a Kubernetes Deployment sets it),
then the Celery app's configuration, then defaults.

A value in the environment wins over ``app.conf`` because the environment is what
operators change per deployment without a code change; ``app.conf`` holds a
project's defaults. Every bad value is an error that names the variable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from taskmeter.measure.sampler import DEFAULT_INTERVAL_S, ENV_INTERVAL, interval_from_env

ENV_ENABLE = "ENABLE_WORKER_METRICS"
ENV_PORT = "TASKMETER_PORT"
ENV_ADDR = "TASKMETER_ADDR"
ENV_LEDGER = "TASKMETER_LEDGER"
ENV_LEDGER_MAX_BYTES = "TASKMETER_LEDGER_MAX_BYTES"
ENV_JOURNAL = "TASKMETER_JOURNAL"
ENV_LEDGER_BACKUPS = "TASKMETER_LEDGER_BACKUPS"
ENV_TLS_CERT = "TASKMETER_TLS_CERT"
ENV_TLS_KEY = "TASKMETER_TLS_KEY"
ENV_AUTH_USER = "TASKMETER_BASIC_AUTH_USER"
ENV_AUTH_PASSWORD = "TASKMETER_BASIC_AUTH_PASSWORD"
ENV_PATCH_SUBPROCESS = "TASKMETER_PATCH_SUBPROCESS"

DEFAULT_PORT = 8101
DEFAULT_LEDGER_MAX_BYTES = 100 * 2**20
DEFAULT_LEDGER_BACKUPS = 5
MAX_LEDGER_BACKUPS = 1000

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting has a value taskmeter cannot use; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    enabled: bool
    port: int = DEFAULT_PORT
    addr: str = "0.0.0.0"
    sample_interval_s: float = DEFAULT_INTERVAL_S
    ledger: str | None = None
    ledger_max_bytes: int = DEFAULT_LEDGER_MAX_BYTES
    # folder of the in-flight journal (celery/journal.py); None = off
    journal: str | None = None
    ledger_backups: int = DEFAULT_LEDGER_BACKUPS
    tls_cert: str | None = None
    tls_key: str | None = None
    basic_auth: tuple[str, str] | None = None
    # route subprocess.Popen inside measured tasks through taskmeter (measure/patch.py)
    patch_subprocess: bool = False


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"{name}={raw!r} is not a boolean; use one of "
        f"{'/'.join(_TRUE)} to enable or {'/'.join(_FALSE)} to disable"
    )


def load_settings(
    conf: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    enabled_default: bool = True,
) -> Settings:
    """Resolve every setting; raises :class:`ConfigError` naming the first bad one.

    ``conf`` is the Celery ``app.conf`` (keys are the variable names in lower case,
    e.g. ``taskmeter_port``, ``enable_worker_metrics``).
    """
    env = os.environ if environ is None else environ
    conf = conf or {}

    def raw(name: str) -> str | None:
        if name in env and env[name].strip() != "":
            return env[name]
        value = conf.get(name.lower())
        return None if value is None else str(value)

    enabled_raw = raw(ENV_ENABLE)
    enabled = enabled_default if enabled_raw is None else parse_bool(ENV_ENABLE, enabled_raw)

    port_raw = raw(ENV_PORT)
    port = DEFAULT_PORT
    if port_raw is not None:
        try:
            port = int(port_raw)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise ConfigError(f"{ENV_PORT}={port_raw!r}: expected a TCP port, 0 to 65535")

    interval_raw = raw(ENV_INTERVAL)
    try:
        interval = (
            DEFAULT_INTERVAL_S
            if interval_raw is None
            else interval_from_env({ENV_INTERVAL: interval_raw})
        )
    except ValueError as exc:  # the sampler's own check, as a ConfigError
        raise ConfigError(str(exc)) from exc

    max_raw = raw(ENV_LEDGER_MAX_BYTES)
    max_bytes = DEFAULT_LEDGER_MAX_BYTES
    if max_raw is not None:
        try:
            max_bytes = int(max_raw)
        except ValueError:
            max_bytes = 0
        if max_bytes < 4096:
            raise ConfigError(f"{ENV_LEDGER_MAX_BYTES}={max_raw!r}: expected bytes >= 4096")

    backups_raw = raw(ENV_LEDGER_BACKUPS)
    backups = DEFAULT_LEDGER_BACKUPS
    if backups_raw is not None:
        try:
            backups = int(backups_raw)
        except ValueError:
            backups = -1
        if not 0 <= backups <= MAX_LEDGER_BACKUPS:
            raise ConfigError(
                f"{ENV_LEDGER_BACKUPS}={backups_raw!r}: expected a whole number of rotated "
                f"files to keep, 0 to {MAX_LEDGER_BACKUPS} (default {DEFAULT_LEDGER_BACKUPS})"
            )

    cert, key = raw(ENV_TLS_CERT), raw(ENV_TLS_KEY)
    if (cert is None) != (key is None):
        raise ConfigError(f"TLS needs both {ENV_TLS_CERT} and {ENV_TLS_KEY}, or neither")

    user, password = raw(ENV_AUTH_USER), raw(ENV_AUTH_PASSWORD)
    if (user is None) != (password is None):
        raise ConfigError(f"basic auth needs both {ENV_AUTH_USER} and {ENV_AUTH_PASSWORD}")

    return Settings(
        enabled=enabled,
        port=port,
        addr=raw(ENV_ADDR) or "0.0.0.0",
        sample_interval_s=interval,
        ledger=raw(ENV_LEDGER),
        ledger_max_bytes=max_bytes,
        journal=journal_dir(raw(ENV_JOURNAL), raw(ENV_LEDGER)),
        ledger_backups=backups,
        tls_cert=cert,
        tls_key=key,
        basic_auth=None if user is None or password is None else (user, password),
        patch_subprocess=_bool_setting(raw, ENV_PATCH_SUBPROCESS),
    )


def _bool_setting(raw: Callable[[str], str | None], name: str) -> bool:
    value = raw(name)
    return False if value is None else parse_bool(name, value)


def journal_dir(value: str | None, ledger: str | None) -> str | None:
    """``TASKMETER_JOURNAL`` resolved: the folder of the in-flight journal, None = off.

    Unset (or ``on``): ``<ledger>.inflight`` next to a ledger file; with no ledger file
    (unset, ``stdout`` or ``-``), a private folder of this user in ``/dev/shm`` (the
    temporary directory where there is none). ``off`` (or ``0/false/no``) disables it.
    """
    v = (value or "").strip()
    if v.lower() in _FALSE:
        return None
    if v and v.lower() not in _TRUE:
        return v
    if ledger and ledger.strip() not in ("stdout", "-"):
        return ledger + ".inflight"
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(base, f"taskmeter-{uid}")

"""No-code-change route: an entry point the ``celery`` command loads at start.

Celery reads no plugin list for workers, but it imports every ``celery.commands``
entry point when its command line starts. Loading this module (kept cheap: it runs for
every ``celery`` command) adds ``celery worker --metrics-port`` and, when a worker
starts, the taskmeter bootstep, which stays off unless ENABLE_WORKER_METRICS is set
true or ``--metrics-port`` is given. ``celery taskmeter`` prints the resolved settings.
"""

from __future__ import annotations

from typing import Any

import click
from celery import signals


@click.command(name="taskmeter")
@click.pass_context
def command(ctx: click.Context) -> None:
    """Show the taskmeter settings a worker started here would use."""
    from taskmeter.config import ConfigError, load_settings

    app = ctx.obj.app if ctx.obj is not None else None
    try:
        settings = load_settings(app.conf if app is not None else None, enabled_default=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, value in vars(settings).items():
        if name == "basic_auth" and value is not None:
            value = (value[0], "***")
        click.echo(f"{name}: {value}")


def _on_celeryd_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
    from taskmeter.celery.integration import AutoTaskmeterStep, TaskmeterStep

    steps = instance.app.steps["worker"]
    if not any(isinstance(s, type) and issubclass(s, TaskmeterStep) for s in steps):
        steps.add(AutoTaskmeterStep)


def _add_worker_option() -> None:
    try:
        from celery.bin.worker import worker
    except ImportError:  # pragma: no cover - a Celery without the click CLI
        return
    if not any("--metrics-port" in getattr(p, "opts", ()) for p in worker.params):
        worker.params.append(
            click.Option(
                ["--metrics-port"],
                type=int,
                default=None,
                help="taskmeter: serve worker metrics on this port (enables them).",
            )
        )


_add_worker_option()
signals.celeryd_init.connect(_on_celeryd_init, weak=False)

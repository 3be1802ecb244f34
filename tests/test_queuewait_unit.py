"""queuewait.wait_s at unit level (tests/test_queue_wait.py runs a real worker)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from taskmeter.celery.queuewait import HEADER, wait_s

START = 1_700_000_100.0


def request(published: Any = None, eta: Any = None, in_headers: bool = False) -> Any:
    if in_headers:
        return SimpleNamespace(headers={HEADER: published}, eta=eta)
    return SimpleNamespace(**{HEADER: published}, eta=eta)


@pytest.mark.parametrize("in_headers", [False, True])
def test_a_stamp_gives_the_wait_from_it(in_headers: bool) -> None:
    assert wait_s(request(START - 2.5, in_headers=in_headers), START) == 2.5
    assert wait_s(request(int(START) - 3, in_headers=in_headers), START) == 3.0
    assert wait_s(request(START + 1.0), START) == 0.0  # clock skew: clamped


@pytest.mark.parametrize(
    "published", [None, "1700000000", True, math.nan, math.inf, -math.inf, [1.0]]
)
def test_no_finite_stamp_no_wait(published: Any) -> None:
    assert wait_s(request(published), START) is None
    assert wait_s(request(published, in_headers=True), START) is None


def test_a_huge_stamp_never_gives_a_non_finite_wait() -> None:
    for published in (1e308, -1.7976931348623157e308, 1.7976931348623157e308):
        wait = wait_s(request(published), START)
        assert wait is None or math.isfinite(wait)


@pytest.mark.parametrize(
    "eta",
    [
        "2023-11-14T22:13:30Z",
        "2023-11-14T22:13:30+00:00",
        "2023-11-14T22:13:30",  # naive: UTC
        "2023-11-14T23:13:30+01:00",
        datetime(2023, 11, 14, 22, 13, 30, tzinfo=timezone.utc),
    ],
)
def test_an_eta_waits_from_the_eta(eta: Any) -> None:
    eta_epoch = datetime(2023, 11, 14, 22, 13, 30, tzinfo=timezone.utc).timestamp()
    got = wait_s(request(eta_epoch - 60, eta=eta), eta_epoch + 4.0)
    assert got == pytest.approx(4.0)


def test_a_bad_or_past_eta_leaves_the_publish_time() -> None:
    assert wait_s(request(START - 5, eta="not a date"), START) == 5.0
    assert wait_s(request(START - 5, eta="2000-01-01T00:00:00Z"), START) == 5.0

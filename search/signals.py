"""Interrupts and time limits: how a running trial is ended without losing the study.

SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread: the running trial is
marked FAIL "interrupted" and its MLflow run KILLED, and the process exits non-zero. A
per-trial time limit (SIGALRM) turns a trial that runs too long into a failed one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from strategies.base import CompressionError

INTERRUPTED = "interrupted"  # the fail_reason of a trial whose process was stopped


class TrialTimeout(CompressionError):
    """The trial ran past `search.trial_timeout`."""


_signalled: list[str] = []


def _raise_interrupt(signum: int, frame: Any) -> None:
    _signalled.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_signalled[-1])


def handle_termination() -> None:
    """Make SIGINT and SIGTERM both end the running trial the same way, even when the shell
    started us with SIGINT ignored (a background job of a script)."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)


def _quiet_interrupts(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """An interrupt raised inside a finalizer cannot propagate; Python would print it as
    "Exception ignored". It is recorded instead, and `check_interrupted` raises it again."""

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)

    return unraisable


def check_interrupted() -> None:
    """Raise again a signal whose KeyboardInterrupt a library swallowed (one raised inside a
    finalizer is only printed), so an interrupted trial never counts as finished."""
    if _signalled:
        raise KeyboardInterrupt(_signalled[-1])


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TrialTimeout in the main thread once `seconds` have passed (0: no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TrialTimeout(f"time limit: the trial ran longer than search.trial_timeout = {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def worker_threads(workers: int) -> int:
    """Training threads per worker, so N workers share the cores instead of oversubscribing them."""
    return max(1, (os.cpu_count() or 1) // workers)

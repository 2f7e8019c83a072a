"""Ctrl-C and SIGTERM as exceptions in the main thread, so that a command ends with one line.

`liftplace` and the study scripts wrap their work in ``stoppable()``: from the moment it is
entered (before torch and Ray load, which takes seconds) a Ctrl-C raises KeyboardInterrupt and
a SIGTERM raises ``Stopped``, and the command says in one line where it stopped. The training
loops' own handlers (a run's, a Tune study's) take over while they run and give these back.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Stopped(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt (a BaseException
    like it, so that no library's ``except Exception`` swallows it)."""


def status(stop: BaseException) -> int:
    """The exit status of a command that stop ended: 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (signal.SIGTERM if isinstance(stop, Stopped) else signal.SIGINT)


@contextmanager
def stoppable():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(sig, frame):
        raise Stopped

    # SIGINT explicitly: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and `kill -INT` must still stop it with its one line.
    previous = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def quiet() -> None:
    """While the command says where it stopped: a second Ctrl-C or SIGTERM is the same stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

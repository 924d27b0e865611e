"""Exceptions the scripts raise to end a run, and the stop flag that SIGTERM/SIGUSR1 set.

A leaf module: every other module of the package may import it, it imports none of them."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2, before any work starts."""


class TrainingDiverged(Exception):
    """A loss became non-finite: exit status 1, rows and checkpoints written before are kept."""


class RunFinished(Exception):
    """--resume of a run that has final.pt: nothing to train, exit status 0. done: what --resume completed of
    the finish step a killed process left undone (actor.pt, removing latest.pt)."""

    def __init__(self, path, done=()):
        super().__init__(str(path))
        self.done = list(done)


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived and a resumable latest.pt was written (or, with a note, work outside a run
    folder stopped and left nothing half-written): exit status 128 + signal."""

    def __init__(self, signum, note: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, note


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
stop_requested: list[int] = []  # the signals received; the run folder saves latest.pt and raises Preempted


def request_stop(signum, frame):
    stop_requested.append(signum)


@contextlib.contextmanager
def stop_raises(note: str):
    """Inside: a stop signal raises Preempted(note) at once, for library calls (Minari's writes and downloads)
    that no loop of ours can check, whose output is discarded when they end early. Only where run_main
    installed request_stop (elsewhere the signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(s) is not request_stop for s in STOP_SIGNALS
    ):
        yield
        return

    def raise_now(signum, frame):
        if signum != signal.SIGALRM:
            stop_requested.append(signum)
        raise Preempted(stop_requested[0], note)

    def unraisable(info):
        """Raised inside a weakref callback or a destructor, where Python only prints it: raise it again 10 ms
        later (SIGALRM), silently."""
        if isinstance(info.exc_value, Preempted):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
        else:
            previous_hook(info)

    if stop_requested:
        raise Preempted(stop_requested[0], note)
    previous_hook, previous_alarm = sys.unraisablehook, signal.getsignal(signal.SIGALRM)
    sys.unraisablehook = unraisable
    for signum in (*STOP_SIGNALS, signal.SIGALRM):
        signal.signal(signum, raise_now)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)
        sys.unraisablehook = previous_hook
    if stop_requested:  # a stop that came as the work ended
        raise Preempted(stop_requested[0], note)


def checkpoint_error(error: BaseException) -> str:
    """Why torch.load failed, in one complete sentence (torch's own text runs over a dozen lines)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return (
            f"{type(error).__name__}: it holds a pickled {refused.group(1)}, which torch.load(weights_only=True) "
            f"refuses to build because unpickling it could run code; this project's checkpoints hold only tensors "
            f"and plain values"
        )
    text = str(error).strip() or ("the file ends early" if isinstance(error, EOFError) else "no details given")
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}"

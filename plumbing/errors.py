"""Exceptions the scripts raise to end a run, and the stop flag that SIGTERM/SIGUSR1 set.

A leaf module: every other module of the package may import it, it imports none of them."""

from __future__ import annotations

import signal


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2, before any work starts."""


class TrainingDiverged(Exception):
    """A loss became non-finite: exit status 1, rows and checkpoints written before are kept."""


class RunFinished(Exception):
    """--resume of a run that has final.pt: nothing to do, exit status 0."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived and a resumable latest.pt was written: exit status 128 + signal."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
stop_requested: list[int] = []  # the signals received; the run folder saves latest.pt and raises Preempted


def request_stop(signum, frame):
    stop_requested.append(signum)

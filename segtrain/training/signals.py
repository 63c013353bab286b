"""Stopping a run cleanly on SIGTERM, SIGUSR2 or Ctrl-C: the handler only sets a flag.

    with StopSignals() as stop:
        ...                       # after each optimizer step:
        if stop.requested():      # all ranks agree (one all-reduce under DDP)
            ...                   # write last.pt, then raise RunStopped

SLURM sends SIGTERM before a preemption or at the time limit, submitit uses SIGUSR2 for its own
requeue (NCCL keeps SIGUSR1), and a terminal sends SIGINT. The handler a signal had before (submitit's
requeue handler in a submitit job) is called once the checkpoint is written (``RunStopped.hand_over``).
Saving inside a signal handler can deadlock (the handler may interrupt a collective or a half-written
file), so the handler records the signal and the training loop acts on it at the next step boundary.
A second Ctrl-C restores the default handler and interrupts at once. A run stopped this way exits with ``STOPPED_EXIT_CODE``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from segtrain import distributed

# In this order of precedence when ranks received different ones: SIGUSR2 asks for a requeue.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# EX_TEMPFAIL (sysexits.h): a temporary failure, worth running again (trainer.resume=auto).
STOPPED_EXIT_CODE = 75


class RunStopped(Exception):
    """Training stopped on a signal after writing last.pt at ``step``."""

    def __init__(self, signame: str, step: int, checkpoint, previous=None) -> None:
        super().__init__(f"stopped by {signame} at step {step}; {checkpoint} written: continue with "
                         "trainer.resume=auto in the same run directory")
        self.signame, self.step = signame, step
        self.previous = previous  # the handler the signal had before the run installed its own

    def hand_over(self) -> None:
        """Call the signal's previous handler if it was a Python function. In a submitit job SIGUSR2's is
        submitit's own: on the job's first task it pickles the job again (the Hydra launcher's ``checkpoint``),
        requeues it (``scontrol requeue`` on SLURM) and exits; on the other tasks it returns."""
        handler = self.previous
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.Signals[self.signame], None)


class StopSignals:
    """Installs the flag-setting handlers while the ``with`` block runs (main thread only)."""

    def __init__(self, signals=STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self.previous: dict[str, object] = {}  # signal name -> the handler before install()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: out at once
        self.received = signal.Signals(signum).name

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self.previous[signal.Signals(signum).name] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for name, handler in self.previous.items():
            signal.signal(signal.Signals[name], handler)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def requested(self, device: torch.device | str = "cpu") -> str | None:
        """The signal to stop on, if this rank or any other received one: the same answer on every rank (the
        first of ``signals`` that any rank received), so that the first rank hands SIGUSR2 over to submitit
        even when only another rank received it."""
        if not distributed.is_distributed():
            return self.received
        names = [signal.Signals(s).name for s in self.signals]
        flags = torch.tensor([float(self.received == name) for name in names], device=device)
        counts = distributed.all_reduce_sum(flags).tolist()
        return next((name for name, count in zip(names, counts) if count), None)


class Interrupted(BaseException):
    """A stop signal during work that has no step to finish first (an export): raised by the handler itself, so that
    every ``finally`` and ``atomic_write`` on the way out removes what was half-written. A ``BaseException``, as
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"stopped by {signame}")
        self.signame = signame


@contextmanager
def interrupt_on(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, the ``signals`` raise ``Interrupted`` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, handle) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

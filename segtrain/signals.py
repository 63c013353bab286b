"""Stopping a run cleanly on SIGTERM, SIGUSR2 or Ctrl-C: the handler only sets a flag.

    with StopSignals() as stop:
        ...                       # after each optimizer step:
        if stop.requested():      # all ranks agree (one all-reduce under DDP)
            ...                   # write last.pt, then raise RunStopped

SLURM sends SIGTERM before a preemption or at the time limit, submitit uses SIGUSR2 for its own
requeue (NCCL keeps SIGUSR1), and a terminal sends SIGINT. Saving inside a signal handler can
deadlock (the handler may interrupt a collective or a half-written file), so the handler records
the signal and the training loop acts on it at the next step boundary. A second Ctrl-C restores
the default handler and interrupts at once. A run stopped this way exits with ``STOPPED_EXIT_CODE``.
"""

from __future__ import annotations

import signal
import threading

import torch

from segtrain import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
# EX_TEMPFAIL (sysexits.h): a temporary failure, worth running again (trainer.resume=auto).
STOPPED_EXIT_CODE = 75


class RunStopped(Exception):
    """Training stopped on a signal after writing last.pt at ``step``."""

    def __init__(self, signame: str, step: int, checkpoint) -> None:
        super().__init__(f"stopped by {signame} at step {step}; {checkpoint} written: continue with "
                         "trainer.resume=auto in the same run directory")
        self.signame, self.step = signame, step


class StopSignals:
    """Installs the flag-setting handlers while the ``with`` block runs (main thread only)."""

    def __init__(self, signals=STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: out at once
        self.received = signal.Signals(signum).name

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def requested(self, device: torch.device | str = "cpu") -> str | None:
        """The signal to stop on, if this rank or any other received one (the same answer on every rank)."""
        if not distributed.is_distributed():
            return self.received
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if distributed.all_reduce_sum(flag).item() == 0:
            return None
        return self.received or "a signal on another rank"

"""A graceful stop on SIGINT / SIGTERM: the current step (of training or of the LLM warm-up)
finishes, its state is written (a checkpoint, or the warm-up's partial state), then TrainingStopped
is raised. A second SIGINT aborts at once (KeyboardInterrupt)."""

from __future__ import annotations

import os
import signal
import threading

import torch

from .distributed import DistEnv, all_reduce_max

__all__ = ["StopSignals", "TrainingStopped"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(RuntimeError):
    """Training or the LLM warm-up stopped on a signal, after writing its state; ``signum`` is the
    signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Within ``with``, SIGINT and SIGTERM only set ``signum``; ``requested(env)`` tells every rank
    (the largest signal number any rank received, 0 for none) at a step boundary."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving its state "
                    f"(Ctrl-C again to abort without saving)\n".encode())

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self, env: DistEnv) -> int:
        if env.mode == "none":
            return self.signum
        return int(all_reduce_max(torch.tensor(self.signum, device=env.device), env))

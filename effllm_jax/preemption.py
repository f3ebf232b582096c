"""Preemption: SIGTERM or SIGINT ends a run at a step boundary with a checkpoint, exit 0.

`watch()` wraps a run: while it lasts, the first SIGTERM/SIGINT only sets a flag (a second one
acts as it would have without us: SIGINT raises KeyboardInterrupt, SIGTERM terminates); the
loop asks `reached(step)` after each step, saves that step, waits for the async write and
raises `Preempted`, which the CLI turns into one line and exit status 0. The earlier handlers
are restored when the run ends, however it ends.

Several processes must stop at the same step, or the checkpoint barrier hangs: there JAX's
preemption service (multihost_utils.reached_preemption_sync_point, the one Orbax uses) owns
SIGTERM, spreads the notice to every host and names the step all of them stop at (the next
one that every host can still reach). SIGINT is forwarded to it as SIGTERM. Without the
service (jax_enable_preemption_service=False) each host watches its own signals.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving the checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step
        self.signal_name = signal_name


class Watcher:
    """Whether the run was asked to stop, and (multi-host) at which step all hosts stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def reached(self, step: int) -> bool:
        """True when the run should save `step` and stop (called after every step)."""
        if self.stopped_at is None and self._stop_here(step):
            self.stopped_at = step
            self.signal_name = self.signal_name or "SIGTERM"
        return self.stopped_at is not None

    def _stop_here(self, step: int) -> bool:
        if jax.process_count() > 1 and signal.SIGTERM not in self._previous:
            from jax.experimental import multihost_utils  # the service owns SIGTERM
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the service is off: this host's own signals decide
                return self.signal_name is not None
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # asked twice: behave as if we were not here
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name  # no print here: stderr may be mid-write
        if signum == signal.SIGINT and signal.SIGTERM not in self._previous:
            os.kill(os.getpid(), signal.SIGTERM)  # multi-host: let the service spread it

    def install(self) -> None:
        """Takes over SIGTERM (unless JAX's preemption service has it) and SIGINT."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a run in a thread is not watched
        for signum in SIGNALS:
            if signum == signal.SIGTERM and _preemption_service_running():
                continue
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _preemption_service_running() -> bool:
    """Whether JAX's multi-host preemption service is up (it then handles SIGTERM itself)."""
    if jax.process_count() == 1:
        return False
    from jax._src import distributed  # the service's handle has no public accessor
    return distributed.global_state.preemption_sync_manager is not None


@contextlib.contextmanager
def watch() -> Iterator[Watcher]:
    """Watches for SIGTERM/SIGINT while the block runs; restores the old handlers after."""
    watcher = Watcher()
    watcher.install()
    try:
        yield watcher
    finally:
        watcher.restore()

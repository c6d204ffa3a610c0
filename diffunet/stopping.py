"""How SIGINT and SIGTERM stop a command: at once, or, in a training run, after the current
step, and in every case within seconds, whatever the command is doing.

- **A command without a run** (``sample``, ``eval``, ``import``, ...): the first SIGINT or
  SIGTERM raises :class:`~diffunet.errors.Stopped` in the main thread at once (a blocked
  ``open()`` or ``read()`` is interrupted: Python runs the handler on EINTR), so ``finally``
  blocks and atomic writes clean up and the command line prints one line (exit 128 + the
  signal's number: 130, 143).
- **A training run** (:func:`graceful`, entered by :class:`~diffunet.runs.Run`): the first
  signal is a request: the loop finishes its step, saves its state and stops, and says so
  (:meth:`Stopper.acknowledge` when it has seen the request). A second signal, or the first one
  when the loop has not acknowledged it within :data:`GRACE_S` (a step, a preview or a data read
  is blocked), raises :class:`~diffunet.errors.Stopped` there and then: the run folder's lock is
  released on the way out, and no state is written that the loop did not finish (states are
  committed by one rename). A save in progress (:meth:`Stopper.critical`) is let finish first:
  it is bounded by the disk, and cutting it short would throw the step away.
- **The last resort**: if the process still runs :data:`HARD_S` after the raise (its main thread
  stuck in native code that does not return on a signal), it writes one line and exits at once
  (``os._exit``); the kernel releases the locks, and nothing half-written is ever taken for a
  state.

A forked child (a DataLoader worker) inherits the handler: inside a run it leaves the signal to
its parent (the main process decides when the run stops, as before), elsewhere it does what
Python does by default (SIGINT raises KeyboardInterrupt, SIGTERM ends it).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from .errors import Stopped

__all__ = ["GRACE_S", "HARD_S", "MAX_GRACE_S", "STEP_FACTOR", "Stopper", "active", "graceful",
           "handling_signals"]

GRACE_S = 5.0
"""Seconds a training run has, after the first signal, to reach the end of its step (at least:
a run whose steps are slow gets :data:`STEP_FACTOR` of its typical step, up to
:data:`MAX_GRACE_S`, so a 20-second step on a CPU still ends in a saved state)."""
STEP_FACTOR = 3.0
"""The grace in typical steps (the median of the last :data:`_RECENT` intervals between steps)."""
MAX_GRACE_S = 120.0
"""The longest grace, however slow the steps: a stop still comes within two minutes."""
_RECENT = 9
HARD_S = 10.0
"""Seconds after :class:`~diffunet.errors.Stopped` is raised before the process exits outright."""
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: Stopper | None = None
_forced: list[tuple[int, str]] = []  # (signal, label) of a raised stop: armed again at exit


class Stopper:
    """The SIGINT/SIGTERM handler of one command (see the module docstring); ``label`` names the
    command in the last-resort line (e.g. ``"diffunet train"``). Made in the main thread."""

    def __init__(self, label: str = "diffunet", grace: float | None = None,
                 hard: float | None = None) -> None:
        self.label = label
        self.grace = GRACE_S if grace is None else grace
        self.hard = HARD_S if hard is None else hard
        self.requested: str | None = None  # the signal that asked for a stop
        self._signum = 0
        self._since = 0.0  # when it was asked, or the loop last moved (several processes)
        self._busy_until = 0.0  # when the last save ended
        self._critical = 0  # saves in progress
        self._graceful = 0  # runs entered
        self._acknowledged = False
        self._last_step: float | None = None  # when the loop last finished a step
        self._steps: collections.deque[float] = collections.deque(maxlen=_RECENT)
        self._deliveries = 0  # signals the watchdog sent that the handler has not seen yet
        self._raised = False
        self._kicked: float | None = None  # when the stop was raised (or sent to be)
        self._closed = False
        self._pid = os.getpid()
        self._main = threading.main_thread().ident
        # The watchdog waits on a pipe: a write to it is all a signal handler may do safely (an
        # Event or a thread started in a handler could deadlock on a lock the interrupted main
        # thread holds).
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._watch, name="diffunet-stop", daemon=True)
        self._thread.start()

    # -- the handler (runs in the main thread, between two bytecodes) ---------------------------

    def handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked child inherited the handler
            if self._graceful:
                return  # a DataLoader worker: its parent decides when the run stops
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self._deliveries:  # the watchdog's: the run did not get to the end of its step
            self._deliveries -= 1
            if self._raised:
                return
            self._raise(self._signum, f"the run did not finish its step within "
                        f"{self.grace_now():.3g} s: a step, a preview or a data read is blocked")
        if self._raised:
            self._exit_now(signum, "a further signal while stopping")
        if self._graceful and self.requested is None:
            self.requested, self._signum, self._since = name, signum, time.monotonic()
            self._poke()
            return
        self._raise(signum, "" if self.requested is None
                    else "a second signal while the run was finishing its step")

    def _raise(self, signum: int, why: str) -> None:
        self._raised = True
        self._signum = signum
        if self._kicked is None:
            self._kicked = time.monotonic()
        _forced.append((signum, self.label))
        if len(_forced) == 1:
            atexit.register(_exit_timer, self.hard)
        self._poke()
        raise Stopped(signal.Signals(signum).name, signum, why)

    # -- what a run tells it ------------------------------------------------------------------

    def acknowledge(self) -> None:
        """The loop has seen the request and is saving and stopping: no deadline any more."""
        if self.requested is not None:
            self._acknowledged = True
            self._poke()

    def step_done(self) -> None:
        """The loop finished a step: its interval sets how long a first signal may wait."""
        now = time.monotonic()
        if self._last_step is not None:
            self._steps.append(now - self._last_step)
        self._last_step = now

    def grace_now(self) -> float:
        """Seconds a first signal waits for the end of the step: :data:`GRACE_S`, or
        :data:`STEP_FACTOR` typical steps when longer, at most :data:`MAX_GRACE_S` (a median,
        so the odd preview or save between steps does not stretch it)."""
        steps = sorted(self._steps)  # a copy: the main thread may append meanwhile
        typical = steps[len(steps) // 2] if steps else 0.0
        return max(self.grace, min(STEP_FACTOR * typical, MAX_GRACE_S))

    def progress(self) -> None:
        """The loop finished a step without being able to agree on stopping yet (several
        processes agree only at check points): the deadline starts again from now."""
        if self.requested is not None:
            self._since = time.monotonic()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A save: a first signal's deadline waits for it to end (a second signal does not)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            self._busy_until = time.monotonic()
            self._poke()

    # -- the watchdog thread ------------------------------------------------------------------

    def _poke(self) -> None:
        """Wake the watchdog to look at the state again (safe in a signal handler)."""
        with contextlib.suppress(OSError):  # full: it is awake anyway
            os.write(self._wake_w, b"\0")

    def _watch(self) -> None:
        while not self._closed:
            now, left = time.monotonic(), None
            if self._kicked is not None:
                left = self._kicked + self.hard - now
                if left <= 0:
                    self._exit_now(self._signum, f"still running {self.hard:g} s after the "
                                   "stop (stuck in native code)")
            elif self.requested is not None and not self._acknowledged:
                if self._critical:
                    left = None  # the save's end wakes this
                else:
                    left = max(self._since, self._busy_until) + self.grace_now() - now
                    if left <= 0:  # raise it in the main thread (its blocked call returns EINTR)
                        self._kicked = now
                        self._deliveries += 1
                        with contextlib.suppress(OSError, ValueError):
                            signal.pthread_kill(self._main, self._signum)
                        continue
            # a change after the state was read has written to the pipe: no wake-up is lost
            select.select([self._wake_r], [], [], None if left is None else max(left, 0.0))
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)

    def _exit_now(self, signum: int, why: str) -> None:
        name = signal.Signals(signum).name if signum else "a signal"
        with contextlib.suppress(OSError):
            os.write(2, f"{self.label}: stopped by {name} ({why}); exited at once\n".encode())
        os._exit(128 + signum)

    def close(self) -> None:
        """End the watchdog (after the handlers are restored: nothing pokes it any more)."""
        self._closed = True
        self._poke()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)


def _exit_timer(hard: float) -> None:
    """At interpreter exit after a raised stop: if the exit itself hangs (a worker process that
    will not end), end the process after ``hard`` seconds."""
    signum, label = _forced[-1]

    def end() -> None:
        time.sleep(hard)
        with contextlib.suppress(OSError):
            os.write(2, f"{label}: stopped by {signal.Signals(signum).name} (the exit did not "
                     f"finish within {hard:g} s); exited at once\n".encode())
        os._exit(128 + signum)

    threading.Thread(target=end, name="diffunet-exit", daemon=True).start()


def active() -> Stopper | None:
    """The handler in place (None: none, e.g. outside the command line and any run)."""
    return _active


@contextlib.contextmanager
def handling_signals(label: str = "diffunet") -> Iterator[Stopper | None]:
    """Handle SIGINT and SIGTERM with a :class:`Stopper` for the ``with`` block (the one already
    in place, if any), restoring the previous handlers after it. Yields None where signals
    cannot be handled (not the main thread)."""
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield _active
        return
    stopper = Stopper(label)
    previous: dict[int, Any] = {}
    try:
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, stopper.handle)
    except ValueError:  # not the main interpreter: leave signals alone
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        stopper.close()
        yield None
        return
    _active = stopper
    try:
        yield stopper
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        stopper.close()


@contextlib.contextmanager
def graceful() -> Iterator[Stopper | None]:
    """A training run's span: a first signal is a request to stop after the current step
    (read :attr:`Stopper.requested`, answer with :meth:`Stopper.acknowledge`). Leaving it with a
    request acknowledged ends the request (the run stopped as asked); one not acknowledged stays
    and runs out as usual."""
    with handling_signals() as stopper:
        if stopper is None:
            yield None
            return
        stopper._graceful += 1
        try:
            yield stopper
        finally:
            stopper._graceful -= 1
            if stopper._acknowledged:
                stopper.requested, stopper._acknowledged = None, False
                stopper._poke()

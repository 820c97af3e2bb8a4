"""Builder progress and cancellation: a display for TensorRT's phases, and Ctrl-C that cancels a build.

TensorRT reports progress through an ``IProgressMonitor`` (:func:`anchorflow.engines.compat.progress_monitor`
forwards it to a :class:`ProgressDisplay`); returning False from ``step_complete`` asks the
builder to stop. :func:`run_cancellable` runs the build in a worker thread (``build_serialized_network``
releases the GIL) while the main thread waits in short joins with a SIGINT handler installed, so
Ctrl-C is seen at once and turns into a cancellation through the monitor instead of a Python
exception raised inside one of TensorRT's C++ callbacks (logger, monitor), which TensorRT
would report as a failed build.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

from ..base.errors import ConfigError


class ProgressDisplay:
    """Shows TensorRT builder phases: one tqdm bar per active phase, or elapsed-time lines without tqdm.

    Thread-safe (TensorRT may report from several threads). ``cancel()`` makes the next
    ``step_complete`` return False, which asks TensorRT to stop the build.
    """

    def __init__(self, stream: Optional[TextIO] = None, use_tqdm: Optional[bool] = None, label: str = "",
                 quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet  # no output at all; cancellation still works (``--no-progress``)
        self.label = label
        self.cancelled = False
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._phases: dict[str, dict] = {}
        self._spin = itertools.cycle("|/-\\")
        self._tqdm = _tqdm_class() if use_tqdm in (None, True) and not quiet else None
        if use_tqdm and self._tqdm is None:
            raise ConfigError("tqdm is not installed; pip install tqdm or pass use_tqdm=False")

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def phase_start(self, name: str, parent: Optional[str], steps: int) -> None:
        with self._lock:
            depth = self._phases[parent]["depth"] + 1 if parent in self._phases else 0
            phase = {"depth": depth, "steps": max(int(steps), 1), "done": 0}
            if self._tqdm is not None and not self.quiet:
                phase["bar"] = self._tqdm(total=phase["steps"], desc=f"{self.label}{'  ' * depth}{name}",
                                          position=depth, leave=False, file=self.stream, mininterval=0.25)
            self._phases[name] = phase
            self._line(name, phase)

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            phase = self._phases.get(name)
            if phase is not None:
                phase["done"] = min(int(step) + 1, phase["steps"])
                if "bar" in phase:
                    phase["bar"].n = phase["done"]
                    phase["bar"].refresh()
                self._line(name, phase)
            return not self.cancelled

    def phase_finish(self, name: str) -> None:
        with self._lock:
            phase = self._phases.pop(name, None)
            if phase is not None and "bar" in phase:
                phase["bar"].close()

    def cancel(self) -> None:
        self.cancelled = True

    def _line(self, name: str, phase: dict) -> None:
        if self._tqdm is None and not self.quiet:
            indent = "  " * phase["depth"]
            self.stream.write(f"\r{next(self._spin)} [{self.elapsed():7.1f} s] {self.label}{indent}{name} "
                              f"{phase['done']}/{phase['steps']}\x1b[K")
            self.stream.flush()


def _tqdm_class() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def run_cancellable(fn: Callable[[], Any], display: ProgressDisplay, poll: float = 0.1) -> Any:
    """``fn()`` in a worker thread; Ctrl-C meanwhile cancels through ``display`` and raises KeyboardInterrupt.

    The first Ctrl-C calls ``display.cancel()`` (TensorRT stops at its next progress step) and, once
    ``fn`` has returned, KeyboardInterrupt is raised instead of its result; a second Ctrl-C raises
    at once. Off the main thread (no signal handlers there) ``fn`` just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = exc

    def on_sigint(signum: int, frame: Any) -> None:
        if display.cancelled:
            raise KeyboardInterrupt
        display.cancel()
        if not display.quiet:
            display.stream.write("\ncancelling the build (TensorRT stops at its next step; Ctrl-C again to quit now)\n")
            display.stream.flush()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        worker = threading.Thread(target=work, name="tensorrt-build", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(poll)
    finally:
        signal.signal(signal.SIGINT, previous)
    if display.cancelled:
        raise KeyboardInterrupt
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")

"""How onnxruntime's CPU threads are shared between a bundle's sessions (backbone, SideNet).

onnxruntime gives each session its own *spinning* intra-op pool by default; the BA-solver
alternates two sessions whose spinning pools then steal each other's cores. Measured on 2 cores
(``benchmarks/threads.py``, README): turning spinning off is what matters, so the policy,
decided once per process when the first session is made, is:

- ``session`` (the ``auto`` default): a pool per session of ``threads`` threads, spinning off;
  ``threads`` defaults to the CPUs this process may use on a quiet machine and to 1 when the
  machine is oversubscribed (1-minute load average at least the CPU count);
- ``shared`` (only when asked, e.g. ``--thread-mode shared``): one process-wide pool that every
  anchorflow session joins.

``shared`` is never chosen automatically: onnxruntime allows one global pool per process,
created before any session that uses it and never replaced, and once it exists *every* later
session in the process (a user's own ``onnxruntime.InferenceSession``, an exporter's validation)
must set ``use_per_session_threads = False`` or is refused. A library may not do that to its
host process behind its back; a CLI command that owns its process may. The first decision holds
for the life of the process (:func:`policy` reports it). numpy + onnxruntime only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ...base.errors import ConfigError

MODES = ("auto", "shared", "session")


@dataclass(frozen=True)
class ThreadPolicy:
    """What this process's sessions run with: ``mode`` shared|session, ``threads``, ``spin``."""

    mode: str
    threads: int
    spin: bool
    reason: str

    def describe(self) -> str:
        pool = "one shared pool" if self.mode == "shared" else "a pool per session"
        return f"{pool} of {self.threads} thread(s), spinning {'on' if self.spin else 'off'} ({self.reason})"


_POLICY: Optional[ThreadPolicy] = None


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def oversubscribed() -> bool:
    """Is the machine busier than its CPUs (1-minute load average >= CPU count)?"""
    try:
        return os.getloadavg()[0] >= cpus()
    except (AttributeError, OSError):
        return False


def max_threads() -> int:
    """The most onnxruntime threads a session may ask for: 4 per usable CPU (at least 16). More only
    oversubscribes the machine, and a huge number makes onnxruntime spawn threads until the
    process runs out (``--threads 100000`` hung)."""
    return max(16, 4 * cpus())


def _check(threads: Optional[int], mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown thread mode {mode!r}; choose from {', '.join(MODES)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if threads is not None and threads > max_threads():
        raise ConfigError(f"--threads {threads} is more than {max_threads()} (4 per CPU this process may use, "
                          f"{cpus()}); give at most {max_threads()}")


def check_threads(threads: Optional[int]) -> None:
    """Refuse a thread count no session may ask for (ConfigError): not a positive integer, or above
    :func:`max_threads`. For options checked before any session exists (``serve --threads``)."""
    _check(threads, "auto")


def decide(threads: Optional[int] = None, mode: str = "auto") -> ThreadPolicy:
    """The policy a first session would get for these wishes (nothing is created)."""
    _check(threads, mode)
    busy = oversubscribed()
    if mode == "shared":
        return ThreadPolicy("shared", threads or cpus(), True, "asked")
    if mode == "auto":
        reason = "auto: machine oversubscribed" if busy else "auto: machine not oversubscribed"
        return ThreadPolicy("session", threads or (1 if busy else cpus()), False, reason)
    return ThreadPolicy("session", threads or 1, threads is not None and not busy, "asked")


def policy() -> Optional[ThreadPolicy]:
    """The policy this process's sessions run with, or None before the first session."""
    return _POLICY


def apply(opts: Any, threads: Optional[int] = None, mode: str = "auto") -> ThreadPolicy:
    """Set ``opts`` (an ``onnxruntime.SessionOptions``) for this process's policy, deciding and
    (for ``shared``) creating the global pool on the first call."""
    global _POLICY
    _check(threads, mode)
    if _POLICY is None:
        import onnxruntime as ort

        chosen = decide(threads, mode)
        if chosen.mode == "shared":
            try:
                ort.set_global_thread_pool_sizes(chosen.threads, 1)
            except Exception:  # another user of onnxruntime in this process made the pools first
                chosen = ThreadPolicy("shared", chosen.threads, True, "pool made elsewhere in this process")
        _POLICY = chosen
    if _POLICY.mode == "shared":
        opts.use_per_session_threads = False  # onnxruntime refuses per-session pools once a global one exists
    else:
        opts.intra_op_num_threads = int(threads or _POLICY.threads)
        opts.inter_op_num_threads = 1
        if not _POLICY.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return _POLICY


def configure(threads: Optional[int] = None, mode: str = "auto") -> ThreadPolicy:
    """Decide this process's policy now (before any session), e.g. from a ``--threads`` option.
    Refused once sessions exist with another policy: onnxruntime cannot change it then."""
    global _POLICY
    wanted = decide(threads, mode)
    if _POLICY is not None:
        if (_POLICY.mode, _POLICY.threads) != (wanted.mode, wanted.threads) and mode != "auto":
            raise ConfigError(f"this process already runs onnxruntime with {_POLICY.describe()}; the thread policy "
                              "is fixed once the first session exists (set it before loading a bundle)")
        return _POLICY
    import onnxruntime as ort

    if wanted.mode == "shared":
        ort.set_global_thread_pool_sizes(wanted.threads, 1)
    _POLICY = wanted
    return _POLICY

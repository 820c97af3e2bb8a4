"""Leave no Ray process behind, however ``anchorflow serve`` ends (SIGKILL included). Linux /proc; stdlib only.

:class:`Watchdog` starts this file as a small separate process (its own session, so Ctrl-C in
the terminal does not reach it) whose stdin is a pipe from the server. The server tells it the
process ids of the local Ray processes it started (with their start times, so a reused id is
never touched). When the pipe closes, which the kernel does however the server ends, the watchdog
sends SIGTERM to those processes and everything below them, waits :data:`GRACE_S`, then SIGKILL:
the cleanup ``ray stop`` does, limited to this server's own processes (other Ray instances on
the machine are left alone). After a clean stop (the server wrote ``done``) it only checks, after
:data:`GRACE_S`, that nothing it was told about is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

GRACE_S = 10.0


def _stat(pid: int) -> Optional[tuple[int, str, int]]:
    """(parent pid, state, start time) of a process from /proc, or None when gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


def _kill_all(watched: dict[int, int]) -> None:
    """SIGTERM the watched processes (still the same ones) and their trees; SIGKILL what is left."""
    def live() -> dict[int, int]:
        procs = {p: s for p, s in watched.items() if _alive(p, s)}
        for p in list(procs):
            for d in descendants(p):
                st = _stat(d)
                if st is not None:
                    procs.setdefault(d, st[2])
        return procs

    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2.0)):
        procs = live()
        for p, s in procs.items():
            if _alive(p, s):
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in procs.items()):
            time.sleep(0.2)


def main() -> None:
    """Read 'PID START' lines until 'done' or EOF; then clean up (see the module docstring)."""
    watched: dict[int, int] = {}
    clean = False
    for line in sys.stdin:
        words = line.split()
        if words == ["done"]:
            clean = True
        elif len(words) == 2 and all(w.isdigit() for w in words):
            watched[int(words[0])] = int(words[1])
    if clean:
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in watched.items()):
            time.sleep(0.2)
    _kill_all(watched)


class Watchdog:
    """The server's side: start the watchdog, tell it Ray's processes, say ``done`` after a clean stop."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     close_fds=True)
        self.told: set[int] = set()

    def watch_children(self) -> None:
        """Tell the watchdog every process below this one (Ray's, once ray.init has started them)."""
        lines = []
        for pid in descendants(os.getpid()) - {self.proc.pid} - self.told:
            st = _stat(pid)
            if st is not None:
                lines.append(f"{pid} {st[2]}\n")
                self.told.add(pid)
        self._send("".join(lines))

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """After a clean stop: 'done'; the watchdog checks and exits on its own (not waited for)."""
        self._send("done\n")
        try:
            self.proc.stdin.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()

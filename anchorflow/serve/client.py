"""A small stdlib client for the service, and a context manager that runs ``anchorflow serve``.

Used by the tests and ``benchmarks/serve_load.py``; handy from a notebook too::

    with ServiceProcess(["default", "--num-cpus", "2"]) as svc:
        status, headers, body = svc.client.sample({"solver": "ba", "nfe": 6, "n": 4})
        x = decode_npy(body)            # (4, 1, 8, 8) float32 samples, t = 0
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..base.errors import BackendError


class Client:
    """HTTP calls to a running service; every call returns (status, lower-case headers, body bytes)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return self._open(urllib.request.Request(self.url + path))

    def sample(self, body: "bytes | dict") -> tuple[int, dict, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._open(urllib.request.Request(self.url + "/v1/sample", data=data, method="POST",
                                                 headers={"Content-Type": "application/json"}))

    def stats(self) -> dict:
        return json.loads(self.get("/v1/stats")[2])

    def _open(self, request: urllib.request.Request) -> tuple[int, dict, bytes]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def decode_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """Run ``anchorflow serve ARGS --port P`` (P: a free loopback port) until the context ends.

    ``args``: the command's arguments after ``serve`` (MODEL first), without ``--port``.
    The service's output goes to ``log`` (a file path; default: discarded).
    """

    def __init__(self, args: Sequence[str], cwd: Optional[str] = None, log: Optional[str] = None,
                 start_timeout_s: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = Client(self.url)
        self.args, self.cwd, self.log_path, self.start_timeout_s = list(args), cwd, log, start_timeout_s
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServiceProcess":
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "anchorflow.cli", "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.client.get("/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(1.0)
        tail = Path(self.log_path).read_text()[-3000:] if self.log_path else ""
        self.stop(kill=True)
        raise BackendError(f"anchorflow serve did not come up within {self.start_timeout_s:.0f} s\n{tail}")

    def stop(self, kill: bool = False, timeout: float = 120.0) -> int:
        """SIGTERM (or SIGKILL) the service and wait; returns its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Starting and stopping the service on Ray: local (this machine) or joining a cluster.

:func:`run_forever` is what ``anchorflow serve`` calls: it starts Ray (``address=None``: a new
local instance with ``num_cpus`` CPUs; else joins the cluster at ``address``), deploys the
sampler behind Ray Serve's HTTP proxy on ``host:port``, reports the URL, waits for Ctrl-C or
SIGTERM and then takes everything down: on a local instance no Ray process is left.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .._deps import require
from ..errors import BackendError, ConfigError

APP_NAME = "anchorflow"


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``anchorflow serve`` takes (see its --help)."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    replica_cpus: float = 1.0
    max_batch: Optional[int] = None
    max_batch_requests: int = 64
    batch_wait_ms: float = 10.0
    max_n: int = 1024
    max_queue: int = 256
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    backend: str = "auto"
    precision: str = "fp32"
    bandit_dir: Optional[str] = None
    mu_factor: Optional[float] = None
    threads: Optional[int] = None  # onnxruntime threads per replica; None: the replica's CPUs (at least 1)

    def service_kwargs(self) -> dict:
        return dict(model=self.model, backend=self.backend, precision=self.precision, max_batch=self.max_batch,
                    max_n=self.max_n, max_queue=self.max_queue, bandit_dir=self.bandit_dir, mu_factor=self.mu_factor,
                    threads=self.threads or max(1, int(self.replica_cpus)))


def check(opts: ServeOptions) -> None:
    """Refuse bad options and models before Ray starts (cheap checks, no session opened)."""
    from ..runtime.models import locate
    from ..runtime.bundle import network_file, read_meta

    for name in ("replicas", "max_batch_requests", "max_n", "max_queue", "port"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if opts.batch_wait_ms < 0 or opts.replica_cpus <= 0:
        raise ConfigError("--batch-wait-ms must be >= 0 and --replica-cpus > 0")
    files = locate(opts.model)
    if files.bundle is None:
        raise ConfigError(f"{opts.model} has no exported bundle; the service is torch-free and serves bundles "
                          f"only: run 'anchorflow export {opts.model} --out BUNDLE' and serve BUNDLE")
    network_file(files.bundle, read_meta(files.bundle), "backbone", opts.precision)


def build_app(opts: ServeOptions):
    """The Ray Serve application (bound deployment) for ``opts``."""
    from .deployment import deployment

    options = {"service": opts.service_kwargs(), "max_batch_requests": opts.max_batch_requests,
               "batch_wait_s": opts.batch_wait_ms / 1e3}
    return deployment(opts.replicas, opts.replica_cpus, opts.max_queue).bind(options)


def start(opts: ServeOptions) -> str:
    """Start (or join) Ray, deploy the app, return its base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require("ray", extra="serve", purpose="the HTTP service")
    serve = require("ray.serve", extra="serve", purpose="the HTTP service")
    local = opts.address is None
    init = dict(address="local", num_cpus=opts.num_cpus, object_store_memory=128 * 1024**2) if local \
        else dict(address=opts.address)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **init)
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts), name=APP_NAME, route_prefix="/")
    except Exception as exc:
        stop(local)
        raise BackendError(f"Ray Serve could not start the sampler on {opts.host}:{opts.port}: {exc}") from None
    return f"http://{opts.host}:{opts.port}"


def stop(local: bool) -> None:
    """Delete the app; on a local instance also stop Serve and Ray (no process left)."""
    import ray
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def run_forever(opts: ServeOptions, announce: Callable[[str], None] = print) -> None:
    """Start, announce the URL, wait for Ctrl-C / SIGTERM, stop cleanly."""
    check(opts)
    stop_event = threading.Event()

    def on_signal(*_) -> None:
        stop_event.set()

    # Handlers first, so a signal while Ray starts still ends in a clean stop; again after ray.init,
    # whose C++ core installs its own SIGTERM handler (it would kill the driver without cleanup).
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = start(opts)
        for s in previous:
            signal.signal(s, on_signal)
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    try:
        announce(url)
        while not stop_event.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop(opts.address is None)

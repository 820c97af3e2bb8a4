"""Starting and stopping the service on Ray: local (this machine) or joining a cluster.

:func:`run_forever` is what ``anchorflow serve`` calls: it checks every option and opens the
sampler once in this process (so a bad option or bundle is one ``error:`` line before Ray
starts), starts Ray (``address=None``: a new local instance with ``num_cpus`` CPUs; else joins
the cluster at ``address``, which must answer within :data:`ADDRESS_TIMEOUT_S`), deploys the
sampler behind Ray Serve's HTTP proxy on ``host:port`` (a replica that fails to start, or cannot
be placed within ``start_timeout_s``, is reported with its own error), reports the URL, waits for
Ctrl-C or SIGTERM, drains the requests in flight and then takes everything down. On a local
instance no Ray process is left, even when this process is killed with SIGKILL: a small
watchdog (:mod:`.watchdog`) holds a pipe to it and stops Ray's processes when the pipe closes.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..base._deps import require
from ..base.errors import AnchorflowError, BackendError, ConfigError

APP_NAME = "anchorflow"
# A cluster address (--address) that does not accept a TCP connection within this time is refused.
ADDRESS_TIMEOUT_S = 10.0
MAX_BATCH_WAIT_MS = 10_000.0
MAX_BODY_MB = 1024.0


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
    max_cost: int = 16384
    max_body_mb: float = 16.0
    time_budget_s: float = 60.0
    start_timeout_s: float = 180.0
    quality: Optional[str] = None  # the requests' default configuration: a preset recorded by `tune --target-psnr`

    def service_kwargs(self) -> dict:
        return dict(model=self.model, backend=self.backend, precision=self.precision, max_batch=self.max_batch,
                    max_n=self.max_n, max_queue=self.max_queue, bandit_dir=self.bandit_dir, mu_factor=self.mu_factor,
                    threads=self.threads or max(1, int(self.replica_cpus)), max_cost=self.max_cost,
                    max_body=int(self.max_body_mb * 1024**2), time_budget_s=self.time_budget_s,
                    quality=self.quality)


def _finite(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite number {rng}, got {value!r}")


def check_options(opts: ServeOptions) -> None:
    """Refuse bad option values (no model opened, nothing started)."""
    for name in ("replicas", "max_batch_requests", "max_n", "max_queue", "port", "max_cost"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if opts.port > 65535:
        raise ConfigError(f"--port must be in 1..65535, got {opts.port}")
    cpus = opts.num_cpus or os.cpu_count() or 1
    _finite("batch_wait_ms", opts.batch_wait_ms, 0.0, MAX_BATCH_WAIT_MS)
    _finite("replica_cpus", opts.replica_cpus, 0.0, float(cpus) if opts.address is None else 1e6, lo_open=True)
    _finite("time_budget_s", opts.time_budget_s, 0.0, 24 * 3600.0, lo_open=True)
    _finite("max_body_mb", opts.max_body_mb, 0.0, MAX_BODY_MB, lo_open=True)
    _finite("start_timeout_s", opts.start_timeout_s, 0.0, 3600.0, lo_open=True)
    if opts.mu_factor is not None:
        _finite("mu_factor", opts.mu_factor, 0.0, 1e6, lo_open=True)
    if opts.address is None and opts.replicas * opts.replica_cpus > cpus:
        raise ConfigError(f"--replicas {opts.replicas} x --replica-cpus {opts.replica_cpus:g} needs "
                          f"{opts.replicas * opts.replica_cpus:g} CPUs and the local Ray instance has {cpus} "
                          "(--num-cpus); ask for fewer")
    if opts.address is not None:
        _parse_address(opts.address)
    if opts.quality is not None and not str(opts.quality).strip():
        raise ConfigError("--quality is empty; give a preset name or a number of dB")
    # bounded as the CLI bounds them, before Ray starts (the pre-flight opens the
    # sampler with 1 thread, and --max-n had no upper end: both passed on to Ray and never returned)
    from ..runtime.plan import MAX_N
    from ..runtime.bundles.threads import check_threads

    if opts.max_n > MAX_N:
        raise ConfigError(f"--max-n {opts.max_n} is above the cap of {MAX_N} (the most samples one request "
                          "may ask for)")
    check_threads(opts.threads)


def _parse_address(address: str) -> tuple[Optional[str], Optional[int]]:
    """(host, port) of a cluster address 'HOST:PORT' or 'ray://HOST:PORT'; (None, None) for 'auto'."""
    if address == "auto":
        return None, None
    m = re.fullmatch(r"(?:ray://)?\[?([A-Za-z0-9_.\-:]+?)\]?:(\d{1,5})", address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--address must be HOST:PORT (the Ray head's GCS port, e.g. 10.0.0.5:6379), "
                          f"ray://HOST:PORT or 'auto', got {address!r}")
    return m.group(1), int(m.group(2))


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray Client server)
# answers with its own SETTINGS frame (type 4); a port that merely accepts TCP does not.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a cluster address that does not answer as a gRPC server within ``timeout_s`` (else
    ``ray.init`` would wait on it without end)."""
    host, port = _parse_address(address)
    if host is None:
        return
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(_H2_HELLO)
            head = b""
            while len(head) < 9:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        reason = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise BackendError(f"no Ray cluster answers at {address} within {timeout_s:g} s ({reason}); "
                           "check --address, or leave it out to start Ray locally") from None
    if len(head) < 9 or head[3] != 4:
        raise BackendError(f"no Ray cluster answers at {address} within {timeout_s:g} s (the port answered, but "
                           "not as Ray's gRPC server); check --address, or leave it out to start Ray locally")


def check(opts: ServeOptions):
    """Refuse bad options and models before Ray starts: the sampler is opened here once, exactly as a
    replica opens it, so a bundle a replica could not serve (or a ``--quality`` it has not recorded)
    fails now, in one line. Returns the ``--quality`` preset the replicas will use (None without one)."""
    check_options(opts)
    from ..runtime.bundles.load import network_file, read_meta
    from ..runtime.bundles.models import locate

    files = locate(opts.model)
    if files.bundle is None:
        raise ConfigError(f"{opts.model} has no exported bundle; the service is torch-free and serves bundles "
                          f"only: run 'anchorflow export {opts.model} --out BUNDLE' and serve BUNDLE")
    network_file(files.bundle, read_meta(files.bundle), "backbone", opts.precision)
    return open_sampler(opts, threads=1)[0].preset


def open_sampler(opts: ServeOptions, threads: Optional[int] = None):
    """What a replica opens (:func:`.service.open_replica`); any failure as one AnchorflowError line."""
    from .service import open_replica

    kwargs = opts.service_kwargs()
    if threads is not None:
        kwargs["threads"] = threads
    try:
        return open_replica(kwargs)
    except AnchorflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - the replica would die of it: say what it was, in one line
        raise BackendError(f"the sampler cannot open {opts.model}: {type(exc).__name__}: {str(exc)[:300]}") from None


def build_app(opts: ServeOptions):
    """The Ray Serve application (bound deployment) for ``opts``."""
    from .deployment import deployment

    options = {"service": opts.service_kwargs(), "max_batch_requests": opts.max_batch_requests,
               "batch_wait_s": opts.batch_wait_ms / 1e3}
    return deployment(opts.replicas, opts.replica_cpus, opts.max_queue).bind(options)


def start(opts: ServeOptions, guard=None) -> str:
    """Start (or join) Ray, deploy the app, return its base URL. ``guard``: a :class:`Watchdog` told the
    local Ray processes once they exist."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require("ray", extra="serve", purpose="the HTTP service")
    serve = require("ray.serve", extra="serve", purpose="the HTTP service")
    local = opts.address is None
    if not local:
        check_address(opts.address)
    init = dict(address="local", num_cpus=opts.num_cpus, object_store_memory=128 * 1024**2) if local \
        else dict(address=opts.address)
    try:  # in the main thread: Ray installs signal handlers and its core worker there
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **init)
    except Exception as exc:  # noqa: BLE001 - Ray's own errors (a cluster that does not answer: ~20 s): one line
        raise BackendError(f"{'Ray did not start' if local else f'could not join the Ray cluster at {opts.address}'}"
                           f": {type(exc).__name__}: {_first_line(str(exc))}") from None
    if guard is not None and local:
        guard.watch_children()
    try:
        if not local:
            have = float(ray.cluster_resources().get("CPU", 0))
            if opts.replicas * opts.replica_cpus > have:
                raise ConfigError(f"--replicas {opts.replicas} x --replica-cpus {opts.replica_cpus:g} needs "
                                  f"{opts.replicas * opts.replica_cpus:g} CPUs and the cluster has {have:g}")
        serve.start(http_options={"host": opts.host, "port": opts.port})
        _deploy(serve, build_app(opts), opts.start_timeout_s)
        if guard is not None and local:
            guard.watch_children()
    except BaseException as exc:
        stop(local)
        if isinstance(exc, AnchorflowError):
            raise
        if not isinstance(exc, Exception):
            raise
        raise BackendError(f"Ray Serve could not start the sampler on {opts.host}:{opts.port}: "
                           f"{type(exc).__name__}: {_first_line(str(exc))}") from None
    return f"http://{opts.host}:{opts.port}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


def _deploy(serve, app, timeout_s: float) -> None:
    """``serve.run`` in a thread; fail fast with the replica's own error, or after ``timeout_s``."""
    done: dict = {}

    def run() -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done["error"] = exc
        done["end"] = True

    thread = threading.Thread(target=run, name="anchorflow-deploy", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        thread.join(0.5)
        if "end" in done:
            if "error" in done:
                raise BackendError(f"a sampler replica failed to start: {_replica_error(serve, done['error'])}")
            return
        failure = _status_failure(serve)
        if failure:
            raise BackendError(f"a sampler replica failed to start: {failure}")
    raise BackendError(f"the sampler was not running within {timeout_s:g} s (--start-timeout-s): "
                       f"{_status_message(serve) or 'Ray gave no reason'}")


def _status(serve):
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - the controller is still starting
        return None
    return app


def _status_message(serve) -> str:
    app = _status(serve)
    if app is None:
        return ""
    msgs = [d.message for d in app.deployments.values() if d.message] + ([app.message] if app.message else [])
    return _first_line(msgs[0]) if msgs else ""


def _status_failure(serve) -> str:
    """The replica's own error once Ray reports the deployment failed ('' while it is starting)."""
    app = _status(serve)
    if app is None:
        return ""
    failed = str(app.status).endswith("DEPLOY_FAILED") or any(
        str(d.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")) or "failed to start" in (d.message or "")
        for d in app.deployments.values())
    return _status_message(serve) if failed else ""


def _replica_error(serve, exc: BaseException) -> str:
    return _status_message(serve) or f"{type(exc).__name__}: {_first_line(str(exc))}"


def stop(local: bool, drain_s: Optional[float] = None) -> None:
    """Delete the app (its replicas finish the requests in flight, up to the deployment's graceful
    shutdown time), then on a local instance stop Serve and Ray (no process left)."""
    import ray
    from ray import serve

    try:
        try:
            serve.delete(APP_NAME)  # blocking: waits for the replicas' graceful shutdown (drain)
        except Exception:  # noqa: BLE001 - nothing deployed yet
            pass
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()


def run_forever(opts: ServeOptions, announce: Callable[[str], None] = print,
                chosen: Optional[Callable] = None) -> None:
    """Check, start, announce the URL, wait for Ctrl-C / SIGTERM, drain and stop cleanly. ``chosen``
    is told the ``--quality`` preset (:class:`~anchorflow.runtime.bundles.presets.Preset`) before Ray starts."""
    preset = check(opts)
    if preset is not None and chosen is not None:
        chosen(preset)
    from .watchdog import Watchdog

    stop_event = threading.Event()

    def on_signal(*_) -> None:
        stop_event.set()

    guard = Watchdog() if opts.address is None else None
    # Handlers first, so a signal while Ray starts still ends in a clean stop; again after ray.init,
    # whose C++ core installs its own SIGTERM handler (it would kill the driver without cleanup).
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = start(opts, guard)
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
            stop(opts.address is None)
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        if guard is not None:
            guard.close()

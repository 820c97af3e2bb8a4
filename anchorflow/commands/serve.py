"""`anchorflow serve`: an HTTP sampling service on Ray Serve (needs anchorflow[serve])."""

from __future__ import annotations

import click

from .common import BACKENDS, PRECISIONS, positive


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", type=int, default=8000, show_default=True, callback=positive, help="HTTP port.")
@click.option("--replicas", type=int, default=1, show_default=True, callback=positive,
              help="Sampler replicas (processes) Ray spreads over the machine or cluster.")
@click.option("--replica-cpus", type=float, default=1.0, show_default=True, help="CPUs Ray reserves per replica.")
@click.option("--max-batch", type=int, default=None, callback=positive,
              help="Most sample rows per solve (default: what the bundle's batch range allows).")
@click.option("--max-batch-requests", type=int, default=64, show_default=True, callback=positive,
              help="Most requests serve.batch gathers per batch.")
@click.option("--batch-wait-ms", type=float, default=10.0, show_default=True,
              help="How long a replica waits for more requests before solving a partial batch.")
@click.option("--max-n", type=int, default=1024, show_default=True, callback=positive,
              help="Most samples per request (over one solve's rows: split over several solves).")
@click.option("--max-queue", type=int, default=256, show_default=True, callback=positive,
              help="Requests admitted at once per replica; beyond: HTTP 503 with Retry-After.")
@click.option("--address", default=None, help="Join the Ray cluster at this address (default: start Ray locally).")
@click.option("--num-cpus", type=int, default=None, callback=positive, help="CPUs of the local Ray instance.")
@click.option("--backend", type=click.Choice([b for b in BACKENDS if b != "torch"]), default="auto",
              show_default=True, help="Execution backend of the replicas (torch-free).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Which of the bundle's ONNX variants to run.")
@click.option("--bandit-dir", type=click.Path(file_okay=False), default=None,
              help="fastflow: folder of the shared bandit state files [default: ~/.cache/anchorflow/serve/bandits].")
@click.option("--mu-factor", type=float, default=None, help="fastflow: mu factor of new bandit states.")
@click.option("--threads", type=int, default=None, callback=positive,
              help="onnxruntime threads per replica [default: --replica-cpus, at least 1].")
@click.option("--max-cost", type=int, default=16384, show_default=True, callback=positive,
              help="Most n x nfe (backbone row-calls) per request; more: HTTP 400.")
@click.option("--max-body-mb", type=float, default=16.0, show_default=True,
              help="Most MiB per request body; more: HTTP 413.")
@click.option("--time-budget-s", type=float, default=60.0, show_default=True,
              help="Wall time a request may take from arrival; past it its remaining solves are dropped (HTTP 504).")
@click.option("--start-timeout-s", type=float, default=180.0, show_default=True,
              help="Fail if the replicas are not running within this time (e.g. not enough CPUs in the cluster).")
@click.option("--quality", default=None,
              help="Default configuration of requests that name no solver, nfe, grid, first_call or quality: a preset "
                   "recorded by 'anchorflow tune --target-psnr' (its name, or a number of dB: the fastest preset "
                   "whose bound meets it) [default: ba at NFE 7].")
def serve(model, host, port, replicas, replica_cpus, max_batch, max_batch_requests, batch_wait_ms, max_n,
          max_queue, address, num_cpus, backend, precision, bandit_dir, mu_factor, threads, max_cost, max_body_mb,
          time_budget_s, start_timeout_s, quality) -> None:
    """Serve MODEL (an exported bundle; `default` = the bundled digits model) over HTTP on Ray Serve.

    Runs in the foreground until Ctrl-C or SIGTERM, then lets the requests in flight finish and
    stops Ray (no process left, even after SIGKILL). Concurrent
    requests with the same solver, NFE, grid and guidance are merged into one solve; each result
    equals `anchorflow sample` with the same arguments and seed.

    \b
    Endpoints:
      POST /v1/sample  {"solver": "ba", "nfe": 6, "n": 4, "labels": [0, 1], "cfg": 1.5, "seed": 0,
                        "format": "npy" | "png" | "json"}
                       or {"quality": "balanced", "n": 4} (a preset recorded by `anchorflow tune`)
      GET  /healthz, /v1/model, /v1/stats  (HEAD too)
    Status codes: 400 bad request, 405 wrong method, 413 body over --max-body-mb,
    503 queue full (Retry-After), 504 over --time-budget-s; errors are {"error": "..."}.
    \b
    Example:
      anchorflow serve default --port 8000 &
      curl -s localhost:8000/v1/sample -d '{"solver": "ba", "nfe": 6, "n": 4}' -o x.npy
    """
    from ..base._deps import require_extra

    require_extra("serve", "anchorflow serve", modules=("ray", "starlette"))
    from ..serve.app import ServeOptions, run_forever

    opts = ServeOptions(model=model, host=host, port=port, replicas=replicas, replica_cpus=replica_cpus,
                        max_batch=max_batch, max_batch_requests=max_batch_requests, batch_wait_ms=batch_wait_ms,
                        max_n=max_n, max_queue=max_queue, address=address, num_cpus=num_cpus, backend=backend,
                        precision=precision, bandit_dir=bandit_dir, mu_factor=mu_factor, threads=threads,
                        max_cost=max_cost, max_body_mb=max_body_mb, time_budget_s=time_budget_s,
                        start_timeout_s=start_timeout_s, quality=quality)
    from ..autoconfig import describe

    run_forever(opts, announce=lambda url: click.echo(f"anchorflow serve: {model} at {url} (Ctrl-C to stop)"),
                chosen=lambda p: click.echo(f"anchorflow serve: default {describe(p)}", err=True))
    click.echo("anchorflow serve: stopped")

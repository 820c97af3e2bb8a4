"""`anchorflow verify`: the click layer over :mod:`anchorflow.runtime.evaluation.parity.verify` (torch-free).

One bundle, the same inputs (built from the inputs bundle.json declares) through every available
backend, per network and end to end (BA-solver at 7 NFE), one table. With ``--backends ort-cpu``
this runs on numpy + onnxruntime only.
"""

from __future__ import annotations

import click

from ..runtime.evaluation.parity.verify import BACKEND_NAMES, E2E_FACTOR, verify_bundle
from .common import PRECISIONS, non_negative, seed as seed_check


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    from ..base.errors import ConfigError

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{what} takes a comma list of {', '.join(allowed)}; got {text!r}")
    return values


@click.command("verify")
@click.argument("bundle")
@click.option("--backends", default=",".join(BACKEND_NAMES), show_default=True,
              help="Comma list of backends to compare; unavailable ones are listed with the reason.")
@click.option("--reference", type=click.Choice(["torch", "ort-cpu"]), default=None,
              help="Reference backend (fp32). Default: torch when it is in --backends and usable, else ort-cpu.")
@click.option("--precision", "precisions", default="fp32", show_default=True,
              help=f"Comma list of bundle variants to check: {', '.join(PRECISIONS)}.")
@click.option("--atol", type=float, default=None, callback=non_negative,
              help="Override the absolute tolerance (default per precision: fp32 max abs error 1e-4; fp16 / bf16 "
                   f"mean abs error u + 32 u |ref| with u = 2^-11 / 2^-8; end to end {E2E_FACTOR:g}x).")
@click.option("--rtol", type=float, default=None, callback=non_negative,
              help="Override the relative tolerance (times |ref|, added to --atol; fp32 default 0).")
@click.option("--seed", type=int, default=0, show_default=True, callback=seed_check,
              help="Seed of the inputs and the start noise.")
@click.option("--allow-fallback", is_flag=True,
              help="Compare a GPU backend even when its provider fell back to the CPU (its row then names the "
                   "providers it really ran on).")
@click.option("--source", "sources", multiple=True, metavar="[NETWORK=]SOURCE",
              help="The torch model the torch backend compares with: a diffusers transformer folder, "
                   "pkg.module:factory or a checkpoint folder (NETWORK: backbone, the default, or sidenet); "
                   "repeatable. Default: the checkpoints beside the bundle (a model root's backbone/, sidenet/). "
                   "A source that bundle.json records is never imported, only compared with what you give.")
@click.option("--trust-source", is_flag=True,
              help="Import and run the diffusers folder or factory that bundle.json records, as the torch "
                   "reference (runs code named by the bundle: only for bundles you made or trust).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.pass_context
def verify(ctx, bundle, backends, reference, precisions, atol, rtol, seed, allow_fallback, sources, trust_source,
           as_json) -> None:
    """Parity test BUNDLE across backends: per network and end to end (BA-solver, 7 NFE).

    BUNDLE is a bundle folder, a model root with bundle/ inside, or `default`. Inputs are built
    from the inputs bundle.json declares (any condition, at each dynamic axis's opt and min size).
    Prints max / mean / p99 absolute and relative errors against the reference and the smallest
    atol that would pass. Exit status 0 only when at least one comparison ran and every one
    passed; 1 when any failed, when a file fails its sha256 check, or when nothing could be
    compared, and when a backend or precision given with --backends / --precision was not
    compared (listed). With the defaults, a backend that is not available here is skipped and
    listed with the reason. The torch backend needs torch and the model the bundle was exported
    from: the checkpoints beside the bundle, or --source (a bundle's recorded diffusers folder or
    factory is imported only with --trust-source). Tuned grids, the first-call table, each graph's
    inputs and outputs against bundle.json and the weights' finiteness are checked as well.

    \b
    Examples:
      anchorflow verify default
      anchorflow verify runs/bundle --backends ort-cpu --precision fp32,fp16
      anchorflow verify sd3-bundle --backends torch,ort-cpu --source models/sd3/transformer
    """
    import json

    from tqdm import tqdm

    from ..base.errors import CheckpointError
    from ..runtime.bundles.models import resolve

    from click.core import ParameterSource

    asked = tuple(k for k, opt in (("backends", "backends"), ("precisions", "precisions"))
                  if ctx.get_parameter_source(opt) is not ParameterSource.DEFAULT)
    result = verify_bundle(resolve(bundle), _split(backends, BACKEND_NAMES, "--backends"),
                           _split(precisions, PRECISIONS, "--precision"), reference, atol, rtol, seed,
                           progress=lambda todo: tqdm(todo, desc="verify", disable=None, leave=False),
                           allow_fallback=allow_fallback, sources=parse_sources(sources),
                           trust_source=trust_source, required=asked)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else result.text())
    if not result.passed:
        raise CheckpointError(f"verify failed for {bundle}: {result.verdict()}")


def parse_sources(values: tuple) -> dict:
    """``--source [NETWORK=]SOURCE`` values -> network -> source (backbone when no NETWORK= is given)."""
    from ..base.errors import ConfigError

    out: dict = {}
    for value in values:
        name, sep, rest = value.partition("=")
        network, source = (name, rest) if sep and name in ("backbone", "sidenet") else ("backbone", value)
        if not source.strip():
            raise ConfigError(f"--source {value!r}: give a folder or pkg.module:factory")
        if network in out:
            raise ConfigError(f"--source gives the {network} twice")
        out[network] = source
    return out

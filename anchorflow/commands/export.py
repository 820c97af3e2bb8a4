"""`anchorflow export` (checkpoints -> validated ONNX bundle) and `anchorflow inspect` (print a bundle)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..base.errors import ConfigError
from ..runtime.solving.solvers import max_sidenet_offsets

from .common import positive


@click.command("export")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Bundle folder to write; replaced whole and only after every check passed. "
                   "Default: MODEL/bundle when MODEL is `default` or a model root.")
@click.option("--sidenet", type=click.Path(exists=True, file_okay=False), default=None,
              help="SideNet checkpoint folder (default: MODEL's sidenet/ folder, if any). For a diffusers or "
                   "factory MODEL: the folder `anchorflow train sidenet --backbone MODEL` wrote; refused when "
                   "it was trained for another backbone (weights hash).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18 or newer; the newest this onnx knows is the limit).")
@click.option("--precision", "precisions", multiple=True, default=(),
              help="Precision variants, repeatable or comma-separated: fp32, fp16, bf16. fp32 is always "
                   "exported; fp16/bf16 graphs keep float32 inputs and outputs. Default: fp32,fp16 for our "
                   "checkpoints, fp32 for diffusers and factory sources (which take fp16 too, not bf16).")
@click.option("--max-batch", type=int, default=64, show_default=True, callback=positive,
              help="Samples per solve the bundle serves: backbone batch up to 2x (guidance rows), "
                   f"SideNet up to {2 * max_sidenet_offsets()}x ({max_sidenet_offsets()} BA probe offsets x 2).")
@click.option("--no-validate", is_flag=True,
              help="Skip the onnxruntime-vs-torch parity checks (onnx.checker still runs).")
@click.option("--axis", "axes", multiple=True, metavar="NAME=MIN:OPT:MAX",
              help="Range of a named dynamic axis of a diffusers source (L text length, H/W latent size), "
                   "e.g. --axis L=1:77:333; repeatable.")
def export(model, out, sidenet, opset, precisions, max_batch, no_validate, axes) -> None:
    """Export MODEL's backbone (and SideNet) to an ONNX bundle and check it against torch.

    MODEL is `default` (the bundled digits model, written to its bundle/ folder), a model root
    with backbone/ and sidenet/ inside, a backbone checkpoint folder (then give --out), a
    diffusers transformer folder (SD3Transformer2DModel, FluxTransformer2DModel, what
    save_pretrained writes; needs anchorflow[diffusers]) or `pkg.module:factory`, a function of
    your own returning (torch module, adapter description) (see the README). The last two are
    declared in bundle.json by their inputs (condition names = the diffusers forward arguments),
    axes, time map and guidance mode, and are checked against torch at 3 batch sizes x 2 sets of
    axis sizes.
    Each network is checked with onnx.checker and run in onnxruntime against torch on random and
    real inputs at batch 1, 7 and the maximum (fp32: max abs error <= 1e-4); fp16/bf16 variants
    are judged on mean error relative to the output (32 unit roundoffs of the format). A failed
    check leaves an existing bundle untouched.

    \b
    Examples:
      anchorflow export default
      anchorflow export runs/digits --precision fp16,bf16 --max-batch 16
      anchorflow export runs/dit/backbone --sidenet runs/side --out runs/bundle
      anchorflow export models/sd3/transformer --out sd3-bundle --axis L=1:333:512 --max-batch 4
      anchorflow export models/sd3/transformer --sidenet runs/sd3-side --out sd3-bundle
      anchorflow export my_pkg.models:make_backbone --out my-bundle
    """
    command = "anchorflow " + " ".join(sys.argv[1:])
    from ..runtime.pipelines.format import is_pipeline_folder  # -- pipeline bundles --

    if is_pipeline_folder(model):
        from .generate import export_pipeline_command

        result = export_pipeline_command(model, out, opset, precisions, max_batch, no_validate, _parse_axes(axes), command,
                                         sidenet)
    elif _adapter_source(model):  # -- end pipeline bundles --
        result = _export_adapter(model, out, opset, precisions, max_batch, no_validate, axes, command, sidenet)
    else:
        if axes:
            raise ConfigError("--axis applies to diffusers and factory sources only")
        from ..base._deps import require_extra

        require_extra("export", "anchorflow export")
        from ..export.bundle import export_bundle

        result = export_bundle(model, out, sidenet=sidenet, opset=opset, precisions=precisions or ("fp32", "fp16"),
                               max_batch=max_batch, validate=not no_validate, command=command)
    meta = result.meta
    for note in getattr(result, "notes", ()):
        click.echo(note, err=True)
    click.echo(f"wrote {result.path} in {meta['export']['seconds']:.1f} s")
    for name, entry in meta["networks"].items():
        click.echo(_network_lines(name, entry))


def _adapter_source(model: str) -> bool:
    import json
    from pathlib import Path

    try:
        from ..trainers.adapters.factory import _FACTORY
    except ImportError:  # no torch: a 'pkg.module:factory' source is still told apart, and refused one line later
        factory = ":" in model
    else:
        factory = bool(_FACTORY.match(model))
    cfg = Path(model).expanduser() / "config.json"
    if factory and not Path(model).exists():
        return True
    try:
        return cfg.is_file() and "_class_name" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def _parse_axes(values: tuple) -> dict:
    out = {}
    for value in values:
        name, _, rng = value.partition("=")
        try:
            lo, opt, hi = (int(v) for v in rng.split(":"))
        except ValueError:
            raise ConfigError(f"--axis {value!r}: expected NAME=MIN:OPT:MAX with integers, e.g. L=1:77:333") from None
        if not name or not 1 <= lo <= opt <= hi:
            raise ConfigError(f"--axis {value!r}: need a name and 1 <= MIN <= OPT <= MAX")
        out[name] = (lo, opt, hi)
    return out


def _export_adapter(model, out, opset, precisions, max_batch, no_validate, axes, command, sidenet=None):
    from ..base._deps import require

    for name in ("torch", "onnx", "onnxscript"):
        require(name, extra="diffusers", purpose="exporting diffusers and factory backbones")
    if out is None:
        raise ConfigError(f"give --out: {model} is a diffusers folder or a factory, not a model root")
    from ..base._io import check_output

    check_output(out, "--out", folder=True)  # before loading the model
    from ..export.precision import parse_precisions

    precisions = parse_precisions(precisions)
    if "bf16" in precisions:  # refused before loading the model (export_adapter refuses it too)
        raise ConfigError("diffusers and factory sources export fp32 and fp16 only: onnxruntime CPU has no bf16 kernels "
                          "to check a bf16 graph against torch; drop bf16 from --precision")
    from ..export.adapter_export import export_adapter

    adapter = _load_user_source(model, _parse_axes(axes))
    side = None
    if sidenet is not None:  # refused before any export work when trained for another backbone
        from ..trainers.sidenet import load_sidenet

        side = load_sidenet(sidenet, adapter)
    spec = adapter.spec
    source = {"kind": "factory" if ":" in model and not os.path.exists(model) else "diffusers",
              "path": model if ":" in model and not os.path.exists(model) else os.path.abspath(model),
              "family": spec.family}
    return export_adapter(adapter, out, max_batch=max_batch, opset=opset, validate=not no_validate,
                          source=source, command=command, sidenet=side, sidenet_path=sidenet, precisions=precisions)


def _load_user_source(model: str, axes: dict):
    """The adapter of the source the user named; a factory (or a model's own code) that raises is
    one error line naming it, not a traceback."""
    from ..base.errors import AnchorflowError
    from ..trainers.adapters import load_source

    try:
        return load_source(model, axes)
    except (AnchorflowError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's own code failed: name it and what it raised
        raise ConfigError(f"loading {model} failed: {type(exc).__name__}: {str(exc)[:300]}") from None


@click.command("inspect")
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="Print bundle.json as JSON instead.")
def inspect(bundle, as_json) -> None:
    """Print an exported bundle's metadata: model, networks, I/O, batch ranges, parity, versions.

    BUNDLE is a bundle folder, a model root with bundle/ inside, or `default`. What is printed is
    also checked: each ONNX file against its sha256, its inputs and outputs against the
    declaration, its external data (inside the bundle and recorded), its weights (no NaN / Inf,
    not all zero); the tuned grids and the first-call table. Exit status 1 on any mismatch.
    Nothing named in bundle.json is imported or run.
    """
    import json

    from ..base.errors import CheckpointError
    from ..modelref import resolve
    from ..runtime.bundles.load import find_bundle

    folder = find_bundle(resolve(bundle))
    meta, problems = integrity(folder)
    click.echo(json.dumps(meta, indent=2) if as_json else describe(folder, meta, problems))
    if problems:
        raise CheckpointError(f"{len(problems)} part(s) of {folder} fail their integrity check: "
                              + "; ".join(problems.values()))


def integrity(folder, meta: dict | None = None) -> tuple[dict, dict]:
    """(bundle.json dict, problems): role (``(network, precision)`` or ``"tuned grids"``...) -> why it
    is not what bundle.json records (empty: all good); see :func:`anchorflow.runtime.bundles.audit.audit`."""
    from ..runtime.bundles.audit import audit
    from ..runtime.bundles.format import read_bundle

    fmt = read_bundle(folder)
    problems = {}
    for key, why in audit(fmt).items():
        network, sep, precision = key.partition("/")
        problems[(network, precision) if sep else key] = why
    return fmt.meta, problems


def _model_words(model: dict, meta: dict) -> str:
    """Labels, conditions and data range in words (a model without labels or a data range, e.g.
    latents, says so instead of printing None)."""
    backbone = _obj(_obj(meta.get("networks")).get("backbone"))
    conds = [str(_obj(i).get("name")) for i in backbone.get("inputs") or () if _obj(i).get("role") == "condition"
             and _obj(i).get("name") != "y"]
    classes = model.get("num_classes")
    words = [f"{classes} classes, null label {model.get('null_label')}" if classes else "no class labels"]
    if conds:
        words.append("conditions " + ", ".join(conds))
    rng = model.get("data_range")
    words.append(f"data range {list(rng)}" if isinstance(rng, (list, tuple)) else "latents (no data range)")
    return ", ".join(words)


def describe(folder, meta: dict, problems: dict | None = None) -> str:
    """A readable multi-line summary of a bundle; ``problems`` from :func:`integrity` (computed if None)."""
    problems = integrity(folder)[1] if problems is None else problems
    model, exp, ver = (_obj(meta.get(k)) for k in ("model", "export", "versions"))
    lines = [
        f"bundle    {folder}  ({meta['schema']})",
        f"model     {model.get('name')}: state {tuple(model.get('state_shape', ()))}, {_model_words(model, meta)}",
        f"time      {meta.get('time_convention')}",
        f"contract  time map {_time_map(meta)}; guidance {_guidance(meta)}",
        f"export    {exp.get('exporter')}, opset {exp.get('opset')}, max batch {exp.get('max_batch')}, "
        f"{exp.get('created')}, real inputs: {exp.get('real_inputs') or 'none (random inputs only)'}",
        "versions  " + ", ".join(f"{k} {v}" for k, v in ver.items()),
    ]
    for name, entry in meta["networks"].items():
        if not isinstance(entry, dict):
            continue
        lines.append(_network_lines(name, entry))
        for precision in ["fp32", *_obj(entry.get("precisions"))]:
            why = problems.get((name, precision))
            lines.append(f"    {precision:<5} file {'sha256, io, weights ok' if why is None else 'NOT OK: ' + why}")
    if meta.get("tuned") is not None:
        for part in ("tuned grids", "first-call table"):
            if part == "first-call table" and not _obj(meta.get("tuned")).get("first_call"):
                continue
            why = problems.get(part)
            lines.append(f"{part:<17} {'ok' if why is None else 'NOT OK: ' + why}")
        if not any(problems.get(k) for k in ("tuned grids", "first-call table", "tuned")):  # what tune refused
            from ..base.errors import AnchorflowError
            from ..runtime.bundles.tuned_grids import read_tuning

            try:
                tuning = read_tuning(folder)
            except AnchorflowError:  # reported above as NOT OK
                tuning = None
            if tuning is not None and tuning.first_call is None and tuning.first_call_refused:
                lines.append(f"first-call table  refused by tune: {tuning.first_call_refused}")
    if problems.get("tuned"):
        lines.append(f"tuned     NOT OK: {problems['tuned']}")
    return "\n".join(lines)


def _time_map(meta: dict) -> str:
    t = meta.get("time") or {"map": "identity"}
    return {"scale": f"model time = {t.get('scale')} * t", "flip": "model time = 1 - t"}.get(t.get("map"), "identity")


def _guidance(meta: dict) -> str:
    g = meta.get("guidance") or ({"mode": "rows", "null": {"y": meta["model"]["null_label"]}}
                                 if (meta.get("model") or {}).get("null_label") is not None else {"mode": "none"})
    if g.get("mode") == "embedded":
        return f"embedded (input {g.get('input')!r}, one row per sample)"
    if g.get("mode") == "rows":
        null = ", ".join(f"{k}={v}" for k, v in (g.get("null") or {}).items()) or "given with --null-cond"
        return f"rows (classifier-free guidance on [cond; null] rows; null {null})"
    return "none"


def _declared(entry: dict) -> str:
    """The conditions a network declares and its named axes' ranges."""
    roles = {"x": "state", "t": "time", "v": "velocity", "h": "offset"}
    conds = [e for e in entry["inputs"] if e.get("role", roles.get(e["name"], "condition")) == "condition"]
    text = ", ".join(f"{e['name']} {e['dtype']} ({', '.join(map(str, e['shape']))})"
                     + ("" if e.get("per_row", True) else " shared") for e in conds) or "none"
    axes = ", ".join(f"{a} {r['min']}..{r['max']} (opt {r['opt']})" for a, r in (entry.get("axes") or {}).items())
    return f"    conditions {text}" + (f"; axes {axes}" if axes else "")


def _io(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['name']} [{','.join(map(str, e['shape']))}] {e['dtype']}" for e in entries)


def _parity(v: dict) -> str:
    if not v or "skipped" in v:
        return "not validated"
    try:
        return _parity_line(v)
    except (TypeError, ValueError, KeyError, AttributeError):
        return "validation record unreadable (bundle.json edited?)"


def _parity_line(v: dict) -> str:
    worst, tol = v.get("worst") or {}, v.get("tolerance") or {}
    key = "max_abs" if tol.get("stat") == "max" else "mean_abs"
    allowed = f"{tol.get('atol'):.2g}" + (f" + {tol['rtol']:.2g} |ref|" if tol.get("rtol") else "")
    note = f" [{v['note']}]" if v.get("note") else ""
    return (f"{v['runtime']} vs {v['reference']}: {key} {worst.get(key):.3g} (allowed {allowed}), "
            f"{'PASS' if v.get('passed') else 'FAIL'}{note}")


def _obj(value: Any) -> dict:
    """``value`` when it is a dict, else {} (descriptive fields of bundle.json are not validated)."""
    return value if isinstance(value, dict) else {}


def _kb(value: Any) -> str:
    return f"{value / 1e3:.0f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _network_lines(name: str, entry: dict) -> str:
    b, ck, cl = _obj(entry.get("batch")), _obj(entry.get("checkpoint")), _obj(entry.get("cleanup"))
    lines = [
        f"{name:<9} {entry['file']} {_kb(entry.get('bytes'))} kB, sha256 {entry['sha256'][:16]}",
        f"    io    {_io(entry['inputs'])} -> {_io(entry['outputs'])}",
        _declared(entry),
        f"    batch {b.get('min')}..{b.get('max')} (opt {b.get('opt')}); a call with more rows runs in chunks of "
        f"{b.get('max')}",
        f"    fp32  {_parity(_obj(entry.get('validation')))}",
    ]
    for precision, v in _obj(entry.get("precisions")).items():
        lines.append(f"    {precision:<5} {v['file']} {_kb(v.get('bytes'))} kB: {_parity(_obj(v.get('validation')))}")
    if cl:
        lines.append(f"    clean nodes {cl.get('nodes_before')} -> {cl.get('nodes_after')}, ORT CPU batch 1 "
                     f"{cl.get('latency_ms_before')} -> {cl.get('latency_ms_after')} ms, "
                     f"{'kept' if cl.get('kept') else 'discarded: ' + str(cl.get('reason'))}")
    if ck:
        lines.append(f"    from  {ck.get('path')} (weights sha256 {str(ck.get('weights_sha256'))[:16]}, "
                     f"command: {_obj(ck.get('training')).get('command')})")
    elif entry.get("source"):
        src = _obj(entry["source"])
        lines.append(f"    from  {src.get('kind', 'adapter')} {src.get('path', '')} ({src.get('family')})")
    return "\n".join(lines)

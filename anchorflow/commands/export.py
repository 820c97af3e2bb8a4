"""`anchorflow export` (checkpoints -> validated ONNX bundle) and `anchorflow inspect` (print a bundle)."""

from __future__ import annotations

import sys
from typing import Any

import click

from .common import positive


@click.command("export")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Bundle folder to write; replaced whole and only after every check passed. "
                   "Default: MODEL/bundle when MODEL is `default` or a model root.")
@click.option("--sidenet", type=click.Path(exists=True, file_okay=False), default=None,
              help="SideNet checkpoint folder (default: MODEL's sidenet/ folder, if any).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18 or newer; the newest this onnx knows is the limit).")
@click.option("--precision", "precisions", multiple=True, default=("fp32", "fp16"), show_default=True,
              help="Precision variants, repeatable or comma-separated: fp32, fp16, bf16. fp32 is always "
                   "exported; fp16/bf16 graphs keep float32 inputs and outputs.")
@click.option("--max-batch", type=int, default=64, show_default=True, callback=positive,
              help="Samples per solve the bundle serves: backbone batch up to 2x (guidance rows), "
                   "SideNet up to 6x (3 BA probe offsets x 2).")
@click.option("--no-validate", is_flag=True,
              help="Skip the onnxruntime-vs-torch parity checks (onnx.checker still runs).")
def export(model, out, sidenet, opset, precisions, max_batch, no_validate) -> None:
    """Export MODEL's backbone (and SideNet) to an ONNX bundle and check it against torch.

    MODEL is `default` (the bundled digits model, written to its bundle/ folder), a model root
    with backbone/ and sidenet/ inside, or a backbone checkpoint folder (then give --out).
    Each network is checked with onnx.checker and run in onnxruntime against torch on random and
    real inputs at batch 1, 7 and the maximum (fp32: max abs error <= 1e-4); fp16/bf16 variants
    are judged on mean error relative to the output (32 unit roundoffs of the format). A failed
    check leaves an existing bundle untouched.

    \b
    Examples:
      anchorflow export default
      anchorflow export runs/digits --precision fp16,bf16 --max-batch 16
      anchorflow export runs/dit/backbone --sidenet runs/side --out runs/bundle
    """
    from ..export.bundle import export_bundle

    result = export_bundle(model, out, sidenet=sidenet, opset=opset, precisions=precisions, max_batch=max_batch,
                           validate=not no_validate, command="anchorflow " + " ".join(sys.argv[1:]))
    meta = result.meta
    click.echo(f"wrote {result.path} in {meta['export']['seconds']:.1f} s")
    for name, entry in meta["networks"].items():
        click.echo(_network_lines(name, entry))


@click.command("inspect")
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="Print bundle.json as JSON instead.")
def inspect(bundle, as_json) -> None:
    """Print an exported bundle's metadata: model, networks, I/O, batch ranges, parity, versions.

    BUNDLE is a bundle folder, a model root with bundle/ inside, or `default`. Each ONNX file is
    also checked against the sha256 recorded in bundle.json.
    """
    import json

    from ..modelref import resolve
    from ..runtime.bundle import find_bundle, read_meta

    folder = find_bundle(resolve(bundle))
    meta = read_meta(folder)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    click.echo(describe(folder, meta))


def describe(folder, meta: dict) -> str:
    """A readable multi-line summary of a bundle (hashes checked)."""
    from ..runtime.bundle import network_file

    model, exp, ver = meta.get("model", {}), meta.get("export", {}), meta.get("versions", {})
    lines = [
        f"bundle    {folder}  ({meta['schema']})",
        f"model     {model.get('name')}: state {tuple(model.get('state_shape', ()))}, {model.get('num_classes')} "
        f"classes, null label {model.get('null_label')}, data range {model.get('data_range')}",
        f"time      {meta.get('time_convention')}",
        f"export    {exp.get('exporter')}, opset {exp.get('opset')}, max batch {exp.get('max_batch')}, "
        f"{exp.get('created')}, real inputs: {exp.get('real_inputs')}",
        "versions  " + ", ".join(f"{k} {v}" for k, v in ver.items()),
    ]
    for name, entry in meta["networks"].items():
        lines.append(_network_lines(name, entry))
        for precision in ["fp32", *(entry.get("precisions") or {})]:
            try:
                network_file(folder, meta, name, precision)
                state = "sha256 ok"
            except Exception as exc:  # noqa: BLE001 - show the reason instead of stopping
                state = f"NOT OK: {exc}"
            lines.append(f"    {precision:<5} file {state}")
    return "\n".join(lines)


def _io(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['name']} [{','.join(map(str, e['shape']))}] {e['dtype']}" for e in entries)


def _parity(v: dict) -> str:
    if not v or "skipped" in v:
        return "not validated"
    worst, tol = v.get("worst") or {}, v.get("tolerance") or {}
    key = "max_abs" if tol.get("stat") == "max" else "mean_abs"
    allowed = f"{tol.get('atol'):.2g}" + (f" + {tol['rtol']:.2g} |ref|" if tol.get("rtol") else "")
    note = f" [{v['note']}]" if v.get("note") else ""
    return (f"{v['runtime']} vs {v['reference']}: {key} {worst.get(key):.3g} (allowed {allowed}), "
            f"{'PASS' if v.get('passed') else 'FAIL'}{note}")


def _network_lines(name: str, entry: dict) -> str:
    b, ck, cl = entry.get("batch", {}), entry.get("checkpoint", {}), entry.get("cleanup", {})
    lines = [
        f"{name:<9} {entry['file']} {entry.get('bytes', 0) / 1e3:.0f} kB, sha256 {entry['sha256'][:16]}",
        f"    io    {_io(entry['inputs'])} -> {_io(entry['outputs'])}",
        f"    batch {b.get('min')}..{b.get('max')} (opt {b.get('opt')})",
        f"    fp32  {_parity(entry.get('validation'))}",
    ]
    for precision, v in (entry.get("precisions") or {}).items():
        lines.append(f"    {precision:<5} {v['file']} {v.get('bytes', 0) / 1e3:.0f} kB: {_parity(v.get('validation'))}")
    if cl:
        lines.append(f"    clean nodes {cl.get('nodes_before')} -> {cl.get('nodes_after')}, ORT CPU batch 1 "
                     f"{cl.get('latency_ms_before')} -> {cl.get('latency_ms_after')} ms, "
                     f"{'kept' if cl.get('kept') else 'discarded: ' + str(cl.get('reason'))}")
    lines.append(f"    from  {ck.get('path')} (weights sha256 {str(ck.get('weights_sha256'))[:16]}, "
                 f"command: {(ck.get('training') or {}).get('command')})")
    return "\n".join(lines)

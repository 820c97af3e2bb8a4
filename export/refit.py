"""Fuse LoRAs into an exported bundle's backbone without re-exporting the graph, and undo it.

``refit_bundle(bundle, [(lora, scale), ...], out=None)`` rewrites, in the backbone's ONNX file and in
each of its precision variants, exactly the initializers that hold the weights the LoRAs touch
(found through the ``parameters`` map the export recorded, :mod:`.refit_map`): ``W += scale *
scaling * up @ down`` in float32, cast to the variant's dtype, in the weight's stored layout. Nothing
else in the graph changes (the node list, the other initializers, external-data layout), the
hashes in bundle.json are updated, and bundle.json records what was fused::

    "lora": {"schema": "anchorflow.lora/1",
             "applied": [{"file", "sha256", "scale", "layers", "ranks"}],
             "base": {"file": "lora/base.npz", "sha256", "bytes"},     # the replaced initializers
             "base_bundle": {"file": "lora/bundle.json", "sha256", "bytes"},  # bundle.json before any LoRA
             "change": {...}, "kept": [...], "dropped": [...], "rule": "..."}

``unfuse_bundle(bundle)`` writes the recorded base initializers back and restores the base
bundle.json: the base bundle's files come back byte for byte (sha256 checked before publishing).

What else depends on the weights is decided by a measured rule (:func:`_decide`): the backbone's
output is compared before and after on the export's own parity inputs; the t = 1 first-call table
(a function of the weights) is dropped whenever the t = 1 velocity moved beyond the export's fp32
parity tolerance; tuned grids are kept while the relative RMS change of the velocity stays at or
below ``GRID_KEEP_REL`` (they are warps of the time axis, fitted to the field's shape, not its
values), and dropped above; the SideNet is always kept (BA stays exact in its call count with any
SideNet) and the record says it was trained for the base weights. Time: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..base._deps import require
from ..base._io import atomic_dir, read_json, sha256_file, write_bytes
from ..base.errors import CheckpointError, ConfigError
from ..runtime.bundles.format import BUNDLE_JSON, file_record, read_bundle, write_bundle_json
from .lora import LoraFile, read_lora
from .refit_map import PARAMS_SCHEMA

LORA_SCHEMA = "anchorflow.lora/1"
BASE_DIR, BASE_TENSORS, BASE_JSON = "lora", "lora/base.npz", "lora/bundle.json"
GRID_KEEP_REL = 0.05  # relative RMS change of the velocity up to which tuned grids are kept (see module doc)
FIRST_CALL_ATOL = 1e-4  # the export's fp32 parity tolerance: a t = 1 change beyond it stales the table


@dataclass(frozen=True)
class RefitResult:
    """What a refit (or unfuse) wrote: the bundle folder, its new bundle.json and one-line notes."""

    path: Path
    meta: dict
    notes: tuple[str, ...]


def _scales(loras: Sequence[str], scales: Sequence[float]) -> list[float]:
    if not loras:
        raise ConfigError("give at least one --lora FILE (or --unfuse)")
    if not scales:
        scales = [1.0] * len(loras)
    elif len(scales) == 1 and len(loras) > 1:
        scales = list(scales) * len(loras)
    if len(scales) != len(loras):
        raise ConfigError(f"{len(scales)} --scale values for {len(loras)} --lora files: give one scale, or one per LoRA")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or abs(s) > 1e3:
            raise ConfigError(f"--scale {s!r} is not a finite number in [-1000, 1000]")
    return [float(s) for s in scales]


def _param_map(meta: dict, folder: Path) -> dict[str, list]:
    entry = (meta["networks"]["backbone"].get("parameters") or {})
    if entry.get("schema") != PARAMS_SCHEMA or not isinstance(entry.get("weights"), dict):
        raise CheckpointError(f"{folder}: its bundle.json has no weight map (networks.backbone.parameters), so a LoRA "
                              "cannot be placed; re-export it with this anchorflow ('anchorflow export SOURCE')")
    return entry["weights"]


def _backbone_files(meta: dict) -> list[tuple[str, str]]:
    """(precision, file) of the backbone's fp32 graph and every variant."""
    entry = meta["networks"]["backbone"]
    files = [("fp32", entry["file"])]
    for p, v in (entry.get("precisions") or {}).items():
        if isinstance(v, dict) and v.get("file"):
            files.append((p, v["file"]))
    return files


def _load(path: Path) -> Any:
    onnx = require("onnx", extra="export", purpose="refitting a bundle")
    return onnx.load(str(path), load_external_data=True)


def _external(entry: dict) -> bool:
    return bool(entry.get("external_data"))


def _save(model: Any, folder: Path, file: str, external: bool) -> dict:
    """Write like the exporter does (adapter_export.save): same external-data layout, same file names."""
    onnx = require("onnx")
    path = folder / file
    if (folder / f"{file}.data").exists():
        os.unlink(folder / f"{file}.data")  # a hard link to the source bundle's data: never write through it
    if path.exists():
        os.unlink(path)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{file}.data", size_threshold=1024)
    record = file_record(folder, file)
    if external:
        record["external_data"] = [file_record(folder, f"{file}.data")]
    return record


def overlay_file(file: str) -> str:
    """The external-data file a refit writes the changed weights of ``file`` to (beside ``file``.data)."""
    return f"{file}.lora.data"


def _load_overlay(path: Path, targets: dict[str, list], weights: dict[str, list], file: str) -> Any:
    """``path``'s graph with only the tensors a refit rewrites loaded: those the LoRAs touch and those an
    earlier refit put into the overlay file (rewritten whole). The other weights stay references into
    the base ``.data`` file, which is shared with the base bundle (a hard link), never written."""
    onnx = require("onnx", extra="export", purpose="refitting a bundle")
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    wanted = {init for name in targets for init, _ in weights[name]}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data} if uses_external_data(t) else {}
        if info and (t.name in wanted or info.get("location") == overlay_file(file)):
            t.raw_data = _external_bytes(path.parent, t.name, info)
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def _external_bytes(folder: Path, name: str, info: dict) -> bytes:
    """A tensor's bytes from its external-data file (a plain file name beside the graph, in bounds).

    Read here rather than by onnx's loader, which refuses files with several hard links: the base
    bundle and its refits share their weights file by hard links on purpose."""
    loc = info.get("location", "")
    try:
        offset, length = int(info.get("offset", 0)), int(info["length"])
    except (KeyError, ValueError):
        raise CheckpointError(f"the backbone graph's tensor {name!r} has no valid external-data offset/length; "
                              "re-export the bundle") from None
    path = folder / loc
    if not loc or Path(loc).name != loc or not path.is_file() or offset < 0 or offset + length > path.stat().st_size:
        raise CheckpointError(f"the backbone graph's tensor {name!r} points outside its data files ({loc!r}, "
                              f"offset {offset}, length {length}); re-export the bundle")
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def _save_overlay(model: Any, folder: Path, file: str) -> dict:
    """Write the graph with every in-memory weight moved to the overlay file (see :func:`_load_overlay`)."""
    onnx = require("onnx")
    from onnx.external_data_helper import set_external_data

    for name in (file, overlay_file(file)):
        if (folder / name).exists():
            os.unlink(folder / name)  # hard links to the source bundle's files: never write through them
    offset, chunks = 0, []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.DEFAULT and t.HasField("raw_data") and len(t.raw_data) > 1024:
            offset += -offset % 64  # aligned like onnx's own writer
            chunks.append((offset, t.raw_data))
            set_external_data(t, overlay_file(file), offset=offset, length=len(t.raw_data))
            offset += len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    with open(folder / overlay_file(file), "wb") as fh:
        for off, data in chunks:
            fh.seek(off)
            fh.write(data)
    write_bytes(folder / file, model.SerializeToString())
    record = file_record(folder, file)
    record["external_data"] = [file_record(folder, f"{file}.data"), file_record(folder, overlay_file(file))]
    return record


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """Fill ``dst`` with ``src``'s files, hard-linked where the file system allows (nothing copied twice)."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(p, dst / rel)


def _targets(loras: list[LoraFile], weights: dict[str, list]) -> dict[str, list]:
    """weight name -> [(layer, scale)], refusing layers the backbone does not have."""
    out: dict[str, list] = {}
    for lf, scale in loras:
        for layer in lf.layers:
            name = f"{layer.module}.weight"
            if name not in weights:
                near = [w for w in weights if w.endswith(name.split(".", 1)[-1])][:1]
                raise ConfigError(f"--lora {lf.path.name}: layer {layer.module} is not in this bundle's backbone"
                                  + (f" (nearest: {near[0][:-7]})" if near else "")
                                  + "; the LoRA was trained for another architecture")
            out.setdefault(name, []).append((layer, scale))
    return out


def _fuse(model: Any, targets: dict[str, list], weights: dict[str, list], base: dict[str, np.ndarray],
          precision: str) -> int:
    """Add the LoRA deltas to ``model``'s initializers in place; record the originals in ``base``."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    touched = 0
    for name, layers in targets.items():
        for init_name, layout in weights[name]:
            t = inits.get(init_name)
            if t is None:
                raise CheckpointError(f"the {precision} backbone graph has no initializer {init_name!r} for {name}; "
                                      "re-export the bundle")
            arr = numpy_helper.to_array(t)
            torch_shape = arr.T.shape if layout == "T" else arr.shape
            delta = sum(layer.delta(tuple(torch_shape)) * np.float32(scale) for layer, scale in layers)
            delta = delta.T if layout == "T" else delta
            key = f"{precision}/{init_name}"
            base.setdefault(key, arr.copy())
            new = (arr.astype(np.float32) + delta).astype(arr.dtype)
            if not np.all(np.isfinite(new)):
                raise ConfigError(f"fusing the LoRA into {name} gives non-finite weights in the {precision} graph "
                                  "(scale too large for this precision?)")
            t.raw_data = np.ascontiguousarray(new).tobytes()
            touched += 1
    return touched


def _probe(folder: Path, meta: dict) -> list[np.ndarray]:
    """The fp32 backbone's outputs on fixed inputs drawn from its declaration, at t = 1, 0.7, 0.4, 0.1."""
    from ..runtime.bundles.load import load_bundle

    b = load_bundle(str(folder), backend="ort-cpu")
    rng = np.random.default_rng(0)
    shape = tuple(int(s) for s in meta["model"]["state_shape"])
    decl = b.format.backbone
    out = []
    for t in (1.0, 0.7, 0.4, 0.1):
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        out.append(np.asarray(b.velocity(x, np.full(2, t, np.float32), _probe_cond(decl, rng)), dtype=np.float64))
    return out


def _probe_cond(decl: Any, rng: np.random.Generator) -> Optional[dict]:
    """Two rows of every declared condition: zeros for integer labels, standard normal otherwise."""
    if not decl.conditions:
        return None
    cond = {}
    for c in decl.conditions:
        dims = []
        for d in c.shape[1:]:
            r = decl.axis_range(d) if isinstance(d, str) else None
            dims.append(int(r[1]) if r else int(d) if isinstance(d, int) else 1)
        cond[c.name] = (np.zeros((2, *dims), dtype=c.dtype) if c.dtype.startswith("int")
                        else rng.standard_normal((2, *dims)).astype(c.dtype))
    return cond


def _decide(before: list[np.ndarray], after: list[np.ndarray], meta: dict) -> tuple[dict, list, list]:
    rel = float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before))
                        / max(sum((b ** 2).sum() for b in before), 1e-30)))
    t1 = float(np.abs(after[0] - before[0]).max())
    kept, dropped = ["sidenet"] if "sidenet" in meta["networks"] else [], []
    tuned = meta.get("tuned")
    if tuned:
        if tuned.get("first_call"):
            (dropped if t1 > FIRST_CALL_ATOL else kept).append("first_call")
        (kept if rel <= GRID_KEEP_REL else dropped).append("tuned_grids")
    return {"rel_rms": round(rel, 6), "t1_max_abs": float(f"{t1:.4g}")}, kept, dropped


def _apply_decision(meta: dict, folder: Path, dropped: list) -> None:
    """Take the dropped tuned files out of the bundle (kept under lora/ so that unfusing restores them)."""
    tuned = meta.get("tuned")
    if not tuned:
        return
    keys = ("grids", "first_call") if "tuned_grids" in dropped else ("first_call",) if "first_call" in dropped else ()
    for key in keys:
        rec = tuned.pop(key, None)
        if isinstance(rec, dict) and (folder / rec["file"]).exists():
            os.replace(folder / rec["file"], folder / BASE_DIR / Path(rec["file"]).name)
    if not tuned.get("grids"):
        meta.pop("tuned", None)


def _resolve(bundle: str | os.PathLike) -> str | os.PathLike:
    from ..runtime.bundles.models import resolve

    return resolve(bundle) if str(bundle) == "default" else bundle


def refit_bundle(bundle: str | os.PathLike, loras: Sequence[str | os.PathLike], scales: Sequence[float] = (),
                 out: Optional[str | os.PathLike] = None) -> RefitResult:
    """Fuse ``loras`` (with ``scales``: one, or one per LoRA) into ``bundle``'s backbone; write ``out``
    (default: the bundle itself, replaced whole only once everything is written and checked)."""
    fmt = read_bundle(_resolve(bundle))  # verifies every network's sha256 first
    src = fmt.folder
    scales = _scales([str(p) for p in loras], list(scales))
    files = [read_lora(p) for p in loras]
    meta = json.loads(json.dumps(fmt.meta))
    weights = _param_map(meta, src)
    targets = _targets(list(zip(files, scales)), weights)
    dst = Path(out) if out is not None else src
    before = _probe(src, meta)
    base_meta_bytes = (src / BUNDLE_JSON).read_bytes()
    record = meta.get("lora") or {}
    notes = [f"skipped {len(f.skipped)} non-transformer keys of {f.path.name} (e.g. {f.skipped[0]})"
             for f in files if f.skipped]
    with atomic_dir(dst) as tmp:
        _link_tree(src, tmp)
        base: dict[str, np.ndarray] = {}
        if record.get("base"):  # fused before: keep the first base (the weights before any LoRA)
            with np.load(tmp / record["base"]["file"], allow_pickle=False) as z:
                base.update({k: z[k] for k in z.files})
        entry = meta["networks"]["backbone"]
        touched = 0
        for precision, file in _backbone_files(meta):
            ext = _external(entry if precision == "fp32" else entry["precisions"][precision])
            model = _load_overlay(src / file, targets, weights, file) if ext else _load(src / file)
            fresh: dict[str, np.ndarray] = {}
            touched += _fuse(model, targets, weights, fresh, precision)
            kept_file = (tmp / BASE_DIR / file).exists()
            if not kept_file and (ext or not record.get("base")):
                # the base graph file, kept under lora/ as a hard link to the source bundle's (no bytes
                # added where the file system allows); --unfuse puts it back. An external graph is small
                # (its weights stay in the shared .data file). Bundles refitted before files were kept
                # fall back to the base tensors in lora/base.npz.
                (tmp / BASE_DIR).mkdir(exist_ok=True)
                _link_or_copy(src / file, tmp / BASE_DIR / file)
                kept_file = True
            if not kept_file:
                for k, v in fresh.items():
                    base.setdefault(k, v)
            rec = _save_overlay(model, tmp, file) if ext else _save(model, tmp, file, ext)
            target = entry if precision == "fp32" else entry["precisions"][precision]
            target.update({k: rec[k] for k in ("sha256", "bytes")})
            if ext:
                target["external_data"] = rec["external_data"]
        (tmp / BASE_DIR).mkdir(exist_ok=True)
        for f in (BASE_TENSORS, BASE_JSON):
            if (tmp / f).exists():
                os.unlink(tmp / f)
        buf = io.BytesIO()
        np.savez(buf, **base)
        write_bytes(tmp / BASE_TENSORS, buf.getvalue())
        if record.get("base_bundle"):
            shutil.copy2(src / record["base_bundle"]["file"], tmp / BASE_JSON)
        else:
            write_bytes(tmp / BASE_JSON, base_meta_bytes)
        if os.path.exists(tmp / BUNDLE_JSON):
            os.unlink(tmp / BUNDLE_JSON)
        write_bundle_json(tmp, meta)  # hashes first, so the probe can open the refitted graph
        after = _probe(tmp, meta)
        change, kept, dropped = _decide(before, after, meta)
        _apply_decision(meta, tmp, dropped)
        applied = list(record.get("applied") or [])
        applied += [{"file": f.path.name, "sha256": f.sha256, "scale": s, "layers": len(f.layers),
                     "ranks": sorted({layer.rank for layer in f.layers})} for f, s in zip(files, scales)]
        meta["lora"] = {"schema": LORA_SCHEMA, "applied": applied,
                        "base": file_record(tmp, BASE_TENSORS), "base_bundle": file_record(tmp, BASE_JSON),
                        "change": change, "kept": kept, "dropped": dropped,
                        "rule": f"first_call dropped when the t = 1 velocity moves > {FIRST_CALL_ATOL}; tuned grids "
                                f"kept while the velocity's relative RMS change <= {GRID_KEEP_REL}; SideNet kept "
                                "(trained for the base weights)"}
        os.unlink(tmp / BUNDLE_JSON)
        write_bundle_json(tmp, meta)
    notes.append(f"fused {sum(len(f.layers) for f in files)} LoRA layers ({touched} initializers over "
                 f"{len(_backbone_files(meta))} graph(s)); velocity changed {change['rel_rms']:.3g} (relative RMS)")
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} (stale for the new weights: rerun 'anchorflow tune')")
    if "sidenet" in kept:
        notes.append("kept the SideNet (trained for the base weights); fine-tune it with "
                     "'anchorflow train sidenet --init' if BA quality matters")
    return RefitResult(dst, meta, tuple(notes))


def unfuse_bundle(bundle: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> RefitResult:
    """Undo every LoRA fused into ``bundle``: its base files come back byte for byte."""
    from onnx import numpy_helper

    fmt = read_bundle(_resolve(bundle))
    src, meta = fmt.folder, fmt.meta
    record = meta.get("lora")
    if not record:
        raise ConfigError(f"{src}: no LoRA is fused into this bundle (bundle.json has no 'lora' record)")
    from ..runtime.bundles.format import verify_file

    base_npz = verify_file(src / record["base"]["file"], record["base"]["sha256"])
    base_json = verify_file(src / record["base_bundle"]["file"], record["base_bundle"]["sha256"])
    base_meta = read_json(base_json)
    dst = Path(out) if out is not None else src
    with np.load(base_npz, allow_pickle=False) as z:
        base = {k: z[k] for k in z.files}
    with atomic_dir(dst) as tmp:
        _link_tree(src, tmp)
        os.unlink(tmp / BUNDLE_JSON)
        restored = 0
        for precision, file in _backbone_files(base_meta):
            entry = base_meta["networks"]["backbone"]
            target = entry if precision == "fp32" else entry["precisions"][precision]
            if (src / BASE_DIR / file).exists():  # the base graph kept under lora/ (an external one's
                for name in (file, overlay_file(file)):  # .data file was never written)
                    if (tmp / name).exists():
                        os.unlink(tmp / name)
                _link_or_copy(src / BASE_DIR / file, tmp / file)
                rec = file_record(tmp, file)
                restored += 1
            else:
                model = _load(src / file)
                for t in model.graph.initializer:
                    arr = base.get(f"{precision}/{t.name}")
                    if arr is not None:
                        t.raw_data = numpy_helper.from_array(arr).raw_data
                rec = _save(model, tmp, file, False)
                restored += 1
            if rec["sha256"] != target["sha256"]:
                raise CheckpointError(f"unfusing did not restore {file} exactly (sha256 {rec['sha256'][:12]} != "
                                      f"{target['sha256'][:12]}); the bundle is left as it was")
        for key in ("grids", "first_call"):  # tuned files the refit set aside under lora/
            rec = (base_meta.get("tuned") or {}).get(key)
            kept = tmp / BASE_DIR / Path(rec["file"]).name if isinstance(rec, dict) else None
            if kept is not None and not (tmp / rec["file"]).exists() and kept.exists():
                os.replace(kept, tmp / rec["file"])
        shutil.rmtree(tmp / BASE_DIR, ignore_errors=True)
        shutil.copy2(base_json, tmp / BUNDLE_JSON)
        read_bundle(tmp)
    return RefitResult(dst, base_meta, (f"restored the base weights of {restored} backbone graph(s)",))


def sha_of(path: str | os.PathLike) -> str:
    return sha256_file(path)

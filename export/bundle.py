"""Export a backbone (+ SideNet) checkpoint to a validated ONNX bundle folder.

``export_bundle(model, out, ...)`` writes ``bundle.json`` (schema ``anchorflow.bundle/2``, through
:mod:`anchorflow.runtime.bundles.format`, which validates it),
``backbone.onnx``, ``sidenet.onnx`` and reduced-precision variants (``*.fp16.onnx``...). Per
network: torch reference outputs (NaN/Inf refused), ``torch.onnx.export``, ``onnx.checker``,
onnxslim clean-up kept only if parity holds, onnxruntime-vs-torch parity (fp32 max abs error
<= 1e-4), variants checked against torch fp32, then metadata in bundle.json AND in every ONNX
file's ``metadata_props`` (JSON strings; a file cannot carry its own sha256, which bundle.json
holds). The folder appears whole or not at all: everything is written into a temporary sibling
and renamed over ``out`` only after every check passed, so a failure leaves an old bundle intact.
Time convention: t = 1 noise, t = 0 data (BA-solver, arXiv 2601.21542).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..base._deps import require
from ..base._io import atomic_dir, check_output
from ..base.errors import AnchorflowError, CheckpointError, ConfigError
from ..runtime.bundles.format import SCHEMA, TIME_CONVENTION
from ..runtime.evaluation.parity import RealData
from .onnx_export import BACKBONE, DEFAULT_OPSET, NetSpec, reference_net, sidenet_spec
from .precision import parse_precisions
from .quantize import float_precisions
from .stages import CaseParity, Net, export_net, export_record, finish, versions  # noqa: F401 - versions re-exported
from .validate import batches_for, make_cases, torch_runner

DEFAULT_MAX_BATCH = 64
REAL_POOL = 512  # data samples drawn for the real validation inputs


@dataclass
class NetJob:
    """One network to export: its spec, torch module, checkpoint config and folder."""

    spec: NetSpec
    module: Any
    config: dict
    path: Path


@dataclass(frozen=True)
class BundleExport:
    """What :func:`export_bundle` wrote: the bundle folder and its bundle.json."""

    path: Path
    meta: dict
    notes: tuple[str, ...] = ()  # e.g. whether the tuned grids of an earlier bundle were kept


@dataclass
class Options:
    opset: int = DEFAULT_OPSET
    precisions: tuple[str, ...] = ("fp32", "fp16")
    max_batch: int = DEFAULT_MAX_BATCH
    validate: bool = True


# -- sources ---------------------------------------------------------------------------------
def resolve_sources(model: str | os.PathLike, sidenet: Optional[str | os.PathLike] = None
                    ) -> tuple[Path, Optional[Path], Optional[Path]]:
    """(backbone checkpoint, SideNet checkpoint or None, default output folder or None) for MODEL:
    ``default``, a model root (backbone/, sidenet/ inside; output root/bundle) or a backbone
    checkpoint folder (with ``sidenet``, or a sibling sidenet/ folder)."""
    from ..runtime.bundles.models import locate

    files = locate(model)
    if files.backbone is None:
        raise CheckpointError(f"{model} has no backbone checkpoint to export (only a bundle); give the model root "
                              "or the backbone checkpoint folder")
    side = Path(sidenet) if sidenet is not None else files.sidenet
    default_out = files.root / "bundle" if files.backbone == files.root / "backbone" else None
    return files.backbone, side, default_out


def load_jobs(backbone_dir: Path, sidenet_dir: Optional[Path]) -> list[NetJob]:
    """Load both checkpoints (the SideNet is checked against its backbone's identity)."""
    from ..trainers.checkpoint import load_checkpoint

    backbone, cfg = load_checkpoint(backbone_dir, kind="backbone")
    jobs = [NetJob(BACKBONE, backbone, cfg, backbone_dir)]
    if sidenet_dir is not None:
        from ..trainers.sidenet import load_sidenet

        side = load_sidenet(sidenet_dir, cfg)
        jobs.append(NetJob(sidenet_spec(side), side, side.checkpoint_config, sidenet_dir))
    return jobs


def model_info(backbone: Any, config: dict) -> dict[str, Any]:
    """bundle.json's ``model``: what a sampler needs to know about the backbone."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {
        "name": data.get("name") or config.get("name") or "model",
        "state_shape": [int(s) for s in backbone.state_shape],
        "num_classes": int(backbone.num_classes),
        "null_label": int(backbone.null_label),
        "data_range": list(data.get("data_range", [-1.0, 1.0])),
    }


def real_data(job: NetJob, info: dict) -> tuple[RealData, str]:
    """Real inputs: the data set's test split when it loads, else samples of the model itself
    (16 Euler steps from noise) standing in for data."""
    from ..trainers.torch_wrappers import TorchVelocity

    velocity = TorchVelocity(job.module)
    rng = np.random.default_rng(1)
    try:
        from ..trainers.data import load_dataset

        x0, y0 = load_dataset(info["name"], "test")
        idx = rng.permutation(len(x0))[:REAL_POOL]
        return RealData(x0[idx], y0[idx], velocity), f"{info['name']} test split"
    except AnchorflowError:  # unknown / download-only data set, or no scikit-learn: use model samples
        from ..runtime import solve

        y0 = rng.integers(0, info["num_classes"], REAL_POOL)
        noise = rng.standard_normal((REAL_POOL, *info["state_shape"])).astype(np.float32)
        x0 = solve("euler", velocity, noise, 16, y=y0).x
        return RealData(x0, y0, velocity), "model samples (16 Euler steps) standing in for data"


# -- one network -----------------------------------------------------------------------------
def _checkpoint_record(job: NetJob, out: Path) -> dict[str, Any]:
    cfg = job.config
    training = {k: v for k, v in (cfg.get("training") or {}).items() if k != "loss_log"}
    path = job.path.resolve()
    rel = os.path.relpath(path, out.resolve()) if path.parent == out.resolve().parent else str(path)
    record = {"path": rel, "kind": cfg.get("kind"), "weights_sha256": cfg.get("weights_sha256"),
              "arch": cfg.get("arch"), "data": cfg.get("data"), "param_count": cfg.get("param_count"),
              "training": training}
    if job.spec.name == "sidenet":
        record["backbone"] = cfg.get("backbone")
    return record


def network(job: NetJob, opts: Options, shared: dict, real: Optional[RealData], io: dict) -> Net:
    """The export declaration of one of our nets: traced by :func:`.onnx_export.reference_net`, cleaned
    (onnxslim, kept only if parity holds), judged on random and real inputs at batch 1, a prime batch
    and the maximum, its metadata in every file's ``metadata_props``."""
    spec, info = job.spec, shared["model"]
    shape, classes = tuple(info["state_shape"]), info["num_classes"]
    net = reference_net(job.module, spec, shape, classes, max_batch=opts.max_batch)
    if opts.validate:
        cases = make_cases(spec, shape, classes, batches_for(spec, opts.max_batch), real)
        net.parity = CaseParity(spec.name, spec.output, cases, torch_runner(job.module, spec), ("torch", "torch fp32"))
    net.props = lambda precision: _props(job, precision, shared, io)
    net.clean, net.weight_map = True, spec.name == BACKBONE.name  # where each weight lives, for LoRA refits
    return net


def _props(job: NetJob, precision: str, shared: dict, io: dict) -> dict:
    """The bundle metadata of one file as JSON strings (a file cannot carry its own sha256: bundle.json does)."""
    import json

    return {
        "anchorflow.schema": SCHEMA, "anchorflow.network": job.spec.name, "anchorflow.precision": precision,
        "anchorflow.time_convention": TIME_CONVENTION, "anchorflow.model": json.dumps(shared["model"]),
        "anchorflow.io": json.dumps({k: io[k] for k in ("inputs", "outputs", "batch")}),
        "anchorflow.checkpoint": json.dumps(io["checkpoint"]), "anchorflow.versions": json.dumps(shared["versions"]),
    }


def export_network(job: NetJob, folder: Path, opts: Options, shared: dict, real: Optional[RealData],
                   step: Callable[[str], None]) -> dict[str, Any]:
    """One network (+ variants) through the export pipeline (:func:`.stages.export_net`); its bundle.json entry."""
    spec, shape = job.spec, tuple(shared["model"]["state_shape"])
    io = {**spec.signature(shape), "batch": spec.batch_range(opts.max_batch),
          "checkpoint": _checkpoint_record(job, shared["out"])}
    done = export_net(network(job, opts, shared, real, io), folder, opset=opts.opset,
                      precisions=float_precisions(opts.precisions), step=step)
    entry = {"file": spec.file, **{k: io[k] for k in ("inputs", "outputs", "batch")},
             **({"axes": spec.axes()} if spec.axes() else {}),
             "checkpoint": io["checkpoint"], "cleanup": done.cleanup.as_dict(), "validation": done.validation}
    if done.parameters is not None:
        entry["parameters"] = done.parameters
    entry.update(done.record)
    entry["precisions"] = done.variants
    return entry


# -- the bundle ------------------------------------------------------------------------------
def export_bundle(model: str | os.PathLike, out: Optional[str | os.PathLike] = None, *,
                  sidenet: Optional[str | os.PathLike] = None, opset: int = DEFAULT_OPSET,
                  precisions: Sequence[str] = ("fp32", "fp16"), max_batch: int = DEFAULT_MAX_BATCH,
                  validate: bool = True, progress: bool = True, command: Optional[str] = None) -> BundleExport:
    """Export MODEL (see :func:`resolve_sources`) to the bundle folder ``out``.

    ``max_batch``: samples per solve the bundle must serve (backbone rows up to 2x, SideNet 2x the registry's
    ``max_sidenet_offsets()``).
    ``precisions``: fp32 always, plus fp16 / bf16 variants. Raises CheckpointError when a check
    fails; ``out`` is then left as it was.
    """
    tqdm = require("tqdm").tqdm
    backbone_dir, sidenet_dir, default_out = resolve_sources(model, sidenet)
    if out is None and default_out is None:
        raise ConfigError(f"give --out: {model} is a checkpoint folder, not a model root with backbone/ inside")
    check_output(out if out is not None else default_out, "--out" if out is not None else "the default output folder",
                 folder=True)  # before any work; refuses the installed package's bundled models
    out = Path(out) if out is not None else default_out
    opts = Options(opset, tuple(parse_precisions(precisions)), int(max_batch), validate)
    BACKBONE.batch_range(opts.max_batch)  # refuses max_batch < 1 before any work
    jobs = load_jobs(backbone_dir, sidenet_dir)
    info = model_info(jobs[0].module, jobs[0].config)
    real, real_note = real_data(jobs[0], info) if validate else (None, None)
    shared = {"model": info, "versions": versions(opts.opset), "out": out}
    tuning, note = _previous_tuning(jobs, out, default_out)
    start = time.perf_counter()
    total = len(jobs) * (3 + len(opts.precisions) - 1)
    with tqdm(total=total, desc="export", disable=not progress, leave=False) as bar:
        phases: list[str] = []

        def step(what: str) -> None:  # a phase is counted when the next one starts
            bar.update(1 if phases else 0)
            phases.append(what)
            bar.set_description(what)

        with atomic_dir(out) as tmp:
            networks = {job.spec.name: export_network(job, tmp, opts, shared, real, step) for job in jobs}
            meta = bundle_meta(info, networks, opts, real_note, command, start)
            meta["versions"] = shared["versions"]
            meta = finish(tmp, meta, opts.precisions, step, tuning)
            bar.update(1)
    return BundleExport(out, meta, (note,) if note else ())


def _previous_tuning(jobs: list[NetJob], out: Path, default_out: Optional[Path]):
    """Tuned grids to carry over: those of the bundle being replaced (``out``), else of the model
    root's own bundle, when made from the same checkpoint weights (see ``runtime.bundles.tuned_grids.carried_tuning``)."""
    from ..runtime.bundles.tuned_grids import carried_tuning

    candidates = [out] + ([default_out] if default_out is not None and default_out != out else [])
    return carried_tuning(candidates, {job.spec.name: job.config.get("weights_sha256") for job in jobs})


def bundle_meta(info: dict, networks: dict, opts: Options, real_note: Optional[str], command: Optional[str],
                start: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "model": info,
        "time_convention": TIME_CONVENTION,
        "time": {"map": "identity"},
        "guidance": ({"mode": "rows", "null": {"y": info["null_label"]}} if info.get("null_label") is not None
                     else {"mode": "none"}),
        "networks": networks,
        "precisions": list(opts.precisions),
        "export": export_record(opts.opset, opts.max_batch, opts.validate, command, start, real_inputs=real_note),
    }

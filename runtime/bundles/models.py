"""What a MODEL names on disk, and opening its exported bundle: torch-free.

A MODEL is one of:
- ``default``: the bundled digits model (``anchorflow/bundled/digits``);
- a model root: a folder with ``bundle/`` and/or ``backbone/`` (+ ``sidenet/``, ``classifier/``);
- an exported bundle folder (has ``bundle.json``);
- a backbone checkpoint folder (has ``config.json`` of kind ``backbone``).

:func:`locate` finds the parts; :func:`anchorflow.runtime.bundles.load.open_bundle` opens the bundle for
``solve`` (onnxruntime or TensorRT). Opening torch checkpoints instead is the application's job
(:func:`anchorflow.modelref.open_model`); library code (export, serve, trainers) resolves MODELs here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ...base.errors import CheckpointError
from .format import BUNDLE_JSON

BUNDLED = Path(importlib.import_module("anchorflow").__file__).resolve().parent / "bundled"
DEFAULT_NAME = "digits"


@dataclass(frozen=True)
class ModelFiles:
    """The parts found for a MODEL argument (any may be None)."""

    spec: str
    root: Path
    bundle: Optional[Path] = None
    backbone: Optional[Path] = None
    sidenet: Optional[Path] = None
    classifier: Optional[Path] = None


@dataclass
class OpenModel:
    """A model ready for ``anchorflow.runtime.solve``: callables plus what a caller needs to know."""

    velocity: Callable
    sidenet: Optional[Callable]
    meta: dict[str, Any]
    files: ModelFiles
    providers: list[str] = field(default_factory=list)
    precision: str = "fp32"  # the ONNX variant and backend a bundle was opened with (a plan's engine)
    backend: str = ""

    @property
    def classifier(self) -> Optional[Path]:
        return self.files.classifier


def resolve(spec: str | Path) -> Path:
    """Turn a MODEL argument into an existing folder (``default`` -> the bundled model)."""
    if str(spec) == "default":
        path = BUNDLED / DEFAULT_NAME
        if not path.is_dir():
            raise CheckpointError(f"the bundled default model is missing from {path}; reinstall anchorflow")
        return path
    from ...base._io import recover_dir

    path = Path(spec).expanduser()
    recover_dir(path)  # a replacement interrupted by a crash is undone before anything is read
    if not path.exists():
        raise CheckpointError(f"model {spec!r} not found: give 'default', a checkpoint folder or a bundle folder")
    if not path.is_dir():
        raise CheckpointError(f"model {spec!r} is a file; give its folder (a checkpoint or bundle folder)")
    return path


def _kind(folder: Path) -> Optional[str]:
    from ...base._io import read_json

    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = read_json(cfg)
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg} is not a JSON object")
    kind = data.get("kind")
    return kind if isinstance(kind, str) else None


def _json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (callers only peek)."""
    from ...base._io import read_json

    try:
        return read_json(path)
    except CheckpointError:
        return None


def _sub(root: Path, name: str, marker: str) -> Optional[Path]:
    p = root / name
    return p if (p / marker).is_file() else None


def _recover_parts(path: Path) -> None:
    """Undo interrupted replacements of a model root's parts (an export killed mid-swap), and
    refuse while a live writer is swapping one in: a model root whose bundle is missing for that
    moment must not be sampled from its torch checkpoints instead."""
    from ...base._io import recover_dir

    for part in ("bundle", "backbone", "sidenet"):
        if recover_dir(path / part):
            raise CheckpointError(f"{path / part} is being replaced by a running export or training right now; "
                                  "retry when it has finished")


def locate(spec: str | Path) -> ModelFiles:
    """Find the bundle, checkpoints and evaluation classifier that a MODEL argument names."""
    path = resolve(spec)
    if path.resolve() != (BUNDLED / DEFAULT_NAME).resolve():
        _recover_parts(path)
    if (path / BUNDLE_JSON).is_file():
        root = path.parent if (path.parent / "backbone").is_dir() else path
        bundle, backbone, sidenet = path, _sub(root, "backbone", "config.json"), _sub(root, "sidenet", "config.json")
    elif _kind(path) == "backbone":
        root, bundle, backbone = path, None, path
        sidenet = _sub(path.parent, "sidenet", "config.json") if path.name == "backbone" else None
    elif _kind(path) is not None:
        raise CheckpointError(f"{path} holds a {_kind(path)} checkpoint; a MODEL must be a backbone or a bundle")
    else:
        root = path
        bundle = _sub(path, "bundle", BUNDLE_JSON)
        backbone = _sub(path, "backbone", "config.json")
        sidenet = _sub(path, "sidenet", "config.json")
        if bundle is None and backbone is None:
            raise CheckpointError(
                f"{path} is neither a bundle (no {BUNDLE_JSON}) nor a checkpoint (no config.json) nor a model root "
                "(no bundle/ or backbone/ inside)"
            )
    classifier = _sub(root, "classifier", "classifier.onnx")
    if classifier is None and _dataset_of(bundle, backbone) == DEFAULT_NAME:
        classifier = _sub(BUNDLED / DEFAULT_NAME, "classifier", "classifier.onnx")
    return ModelFiles(str(spec), root, bundle, backbone, sidenet, classifier)


def _dataset_of(bundle: Optional[Path], backbone: Optional[Path]) -> Optional[str]:
    if bundle is not None:
        meta = _json_or_none(bundle / BUNDLE_JSON)
        model = meta.get("model") if isinstance(meta, dict) else None
        return (model.get("name") or model.get("dataset")) if isinstance(model, dict) else None
    if backbone is not None:
        cfg = _json_or_none(backbone / "config.json")
        data = cfg.get("data") if isinstance(cfg, dict) else None
        return data.get("name") if isinstance(data, dict) else data if isinstance(data, str) else None
    return None


def resolve_backbone_checkpoint(spec: str | Path) -> Path:
    """The backbone checkpoint folder a MODEL argument names (for training and export)."""
    files = locate(spec)
    if files.backbone is None:
        raise CheckpointError(f"{spec} has no backbone checkpoint (only an exported bundle); training needs the checkpoint")
    return files.backbone


def check_fresh(files: ModelFiles) -> None:
    """Refuse a bundle exported from an older version of the checkpoint that sits next to it.

    Compares the weights sha256 that bundle.json records per network with the ``config.json`` of
    the checkpoint folder it was exported from, when that folder is the one beside the bundle.
    MODEL naming the model root refuses (CheckpointError); naming the bundle folder itself is
    taken as "this bundle, as it is" and only warns.
    """
    from ...base._io import read_json
    from ...base.errors import warn

    meta = read_json(files.bundle / BUNDLE_JSON)
    nets = meta.get("networks") if isinstance(meta, dict) else None
    for name, folder in (("backbone", files.backbone), ("sidenet", files.sidenet)):
        entry = (nets or {}).get(name)
        record = entry.get("checkpoint") if isinstance(entry, dict) else None
        if folder is None or not isinstance(record, dict) or not isinstance(record.get("path"), str):
            continue
        if (files.bundle / record["path"]).resolve() != folder.resolve():
            continue  # exported from a checkpoint elsewhere: nothing beside it to compare with
        cfg = _json_or_none(folder / "config.json")
        current = cfg.get("weights_sha256") if isinstance(cfg, dict) else None
        recorded = record.get("weights_sha256")
        if recorded and current and recorded != current:
            why = (f"the bundle {files.bundle} is stale: its {name} was exported from weights {recorded[:12]}, but "
                   f"the checkpoint in {folder} now holds {current[:12]}; re-export it with "
                   f"'anchorflow export {files.root}'")
            if Path(files.spec).expanduser().resolve() == files.bundle.resolve():
                warn(why + "; sampling the bundle as it is, as asked")
            else:
                raise CheckpointError(why + ", or pass the bundle folder itself to sample it as it is")


def model_meta(meta: dict) -> dict:
    """The ``model`` entry of a bundle.json dict, with ``name``, ``state_shape`` (tuple) and ``model_id``."""
    model = dict(meta.get("model") or {})
    nets = meta.get("networks") or {}
    model.setdefault("name", "model")
    backbone = nets.get("backbone") or {}
    # Identity of the weights, not of backbone.onnx's bytes (which embed the checkpoint path and
    # the exporter's version): FastFlow's learned bandits survive a re-export of the same weights.
    weights = (backbone.get("checkpoint") or {}).get("weights_sha256")
    model["model_id"] = weights or backbone.get("sha256", model.get("name"))
    model["state_shape"] = tuple(model.get("state_shape", ()))
    return model


def model_identity(spec: str | Path) -> str:
    """The identity (``model_id``) a MODEL's FastFlow bandit states are keyed by, read from its files
    without opening a network: the bundle's (:func:`model_meta`), else the backbone checkpoint's
    ``weights_sha256``. What ``sample MODEL --solver fastflow --bandit-state FILE`` writes into FILE."""
    from ...base._io import read_json

    files = locate(spec)
    if files.bundle is not None:
        meta = read_json(files.bundle / BUNDLE_JSON)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{files.bundle / BUNDLE_JSON} is not a JSON object")
        return str(model_meta(meta)["model_id"])
    cfg = read_json(files.backbone / "config.json")
    data = cfg.get("data") if isinstance(cfg, dict) else None
    name = data.get("name") if isinstance(data, dict) else (data or "model")
    return str(cfg.get("weights_sha256", name) if isinstance(cfg, dict) else name)

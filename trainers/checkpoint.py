"""Checkpoint folders: ``config.json`` + ``model.safetensors`` (no pickles).

``config.json``::

    {"format": "anchorflow.checkpoint/1", "kind": "backbone" | "sidenet" | "classifier",
     "arch": {...constructor arguments...}, "weights_sha256": "...", ...free-form:
     "data", "training" (incl. the exact command), "backbone" (for a SideNet: its backbone's
     identity), "metrics"}

Folders are written atomically: a crash never leaves a half-written checkpoint in place of a
good one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..base._deps import require
from ..base._io import atomic_dir, read_json, recover_dir, sha256_file, write_json
from ..base.errors import AnchorflowError, CheckpointError

FORMAT = "anchorflow.checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

# kind -> builder(arch: dict) -> torch.nn.Module ; filled by the modules that define the nets.
BUILDERS: dict[str, Callable[[dict], Any]] = {}


def register_builder(kind: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        BUILDERS[kind] = fn
        return fn

    return deco


def save_checkpoint(out: str | Path, module: Any, config: dict, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``module``'s state dict and ``config`` to the folder ``out`` (replaced whole, atomically)."""
    torch = require("torch")
    st = require("safetensors.torch", extra="train")
    out = Path(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_dir(out) as tmp:
        st.save_file(state, str(tmp / WEIGHTS))
        cfg = {"format": FORMAT, **config, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        cfg["torch_version"] = torch.__version__
        write_json(tmp / CONFIG, cfg)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def read_config(path: str | Path) -> dict:
    """Read and check a checkpoint folder's config.json (no torch needed)."""
    path = Path(path)
    recover_dir(path)  # undo a replacement that a crash interrupted (see anchorflow.base._io.atomic_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg = read_json(path / CONFIG)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG} is not an anchorflow checkpoint config (format {FORMAT!r} expected)")
    for key in ("kind", "arch"):
        if key not in cfg:
            raise CheckpointError(f"{path / CONFIG} has no {key!r} entry")
    return cfg


def load_checkpoint(path: str | Path, kind: str | None = None, verify_hash: bool = True) -> tuple[Any, dict]:
    """Build the module described by ``config.json`` and load its weights; returns (module, config).

    Refuses (CheckpointError) a missing folder, an unreadable or tampered weights file, and a
    config whose architecture does not match the stored tensors.
    """
    require("torch")
    st = require("safetensors.torch", extra="train")
    path = Path(path)
    cfg = read_config(path)
    if kind is not None and cfg["kind"] != kind:
        raise CheckpointError(f"{path} holds a {cfg['kind']} checkpoint, but a {kind} is needed here")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    if verify_hash and cfg.get("weights_sha256") and sha256_file(weights) != cfg["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in its config.json (modified or corrupt)")
    _import_builders()
    if cfg["kind"] not in BUILDERS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {cfg['kind']!r}")
    try:
        module = BUILDERS[cfg["kind"]](cfg["arch"])
    except (TypeError, ValueError, KeyError, AnchorflowError) as exc:
        raise CheckpointError(f"{path / CONFIG}: bad architecture entry ({exc})") from None
    try:
        state = st.load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: config does not match the weights ({detail[:300]})") from None
    module.eval()
    return module, cfg


def _import_builders() -> None:
    """Import the modules that register builders (backbone, sidenet, classifier)."""
    import importlib

    for name in ("backbone", "sidenet", "classifier"):
        try:
            importlib.import_module(f"anchorflow.trainers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"anchorflow.trainers.{name}":
                raise

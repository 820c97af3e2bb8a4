"""What a SideNet trains on: a backbone from a SOURCE, and a data set or data-free start states.

``anchorflow train sidenet --backbone SOURCE [--data auto|none|NAME|FOLDER] [--cond FILE]
[--null-cond FILE]``:

* ``--data auto`` (default): the backbone checkpoint's own training set when its config names
  one (our checkpoints: as before), else data-free;
* ``--data none``: data-free (:mod:`.datafree`): start states from a many-step solve of the
  backbone for the rows of ``--cond FILE`` (labels: every class when no file is given);
* ``--data digits`` / ``gaussians8``: a bundled set, its labels as the condition ``y``;
* ``--data FOLDER``: every ``*.npy`` in it (sorted, stacked: (N, C, H, W) latents at t = 0),
  with ``--cond FILE`` giving the N rows' conditions when the backbone has any.

The null condition (for the 10 % null rows) is ``--null-cond FILE`` or the backbone's own
(the null label). The SideNet's config records which start states were used (``data.source``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..base.errors import ConfigError
from .cond_rows import NULL_NEEDED, Cond, as_cond_backbone, uses_null_rows
from .datafree import load_cond_file, row_count, start_states
from .distributed import Dist, from_env


@dataclass
class TrainingSet:
    """Start states x (N, *state_shape) at t = 0, their conditions (N rows), the null condition, provenance."""

    x: torch.Tensor
    cond: Cond
    null: Optional[Cond]
    record: dict


@dataclass
class SourceBackbone:
    """A frozen backbone with ``forward(x, t, cond)``, its identity and, for our checkpoints, its data set."""

    module: Any
    identity: dict
    data: Optional[dict]


def load_backbone(source: str | Path, out: str | Path) -> SourceBackbone:
    """Open SOURCE as a frozen backbone: our checkpoint or model folder (identity = its weights file's
    hash, as before), or what ``anchorflow export`` accepts besides (a diffusers transformer folder,
    ``pkg.module:factory``) through the same adapter (identity = sha256 of its weights)."""
    from ..runtime.bundles.models import resolve_backbone_checkpoint
    from .adapters.diffusers import is_diffusers_folder
    from .adapters.factory import is_factory
    from .checkpoint import load_checkpoint
    from .sidenet import backbone_identity

    text = str(source)
    if is_factory(text) or (text != "default" and is_diffusers_folder(Path(text).expanduser())):
        from .adapters import load_source

        adapter = load_source(text).eval().requires_grad_(False)
        where = text if is_factory(text) else os.path.relpath(Path(text).resolve(), Path(out).resolve())
        return SourceBackbone(as_cond_backbone(adapter), backbone_identity(adapter, path=where), None)
    path = resolve_backbone_checkpoint(source)
    module, cfg = load_checkpoint(path, kind="backbone")
    rel = os.path.relpath(Path(path).resolve(), Path(out).resolve())
    data = cfg.get("data")
    return SourceBackbone(as_cond_backbone(module), backbone_identity(module, cfg, path=rel),
                          data if isinstance(data, dict) else ({"name": data} if data else None))


def _check_names(cond: Cond, backbone: Any, what: str) -> None:
    declared = dict(getattr(backbone, "conditions", {}) or {})
    unknown = [n for n in cond if n not in declared]
    if unknown:
        raise ConfigError(f"{what} has condition(s) {', '.join(unknown)} that the backbone does not declare; "
                          f"it declares: {', '.join(declared) or 'none'}")
    missing = [n for n, spec in declared.items() if n not in cond and not spec.get("optional", False)]
    if missing:
        raise ConfigError(f"{what} lacks the condition(s) {', '.join(missing)} the backbone needs")


def _null(backbone: Any, null_file: Optional[str]) -> Optional[Cond]:
    if null_file:
        null = load_cond_file(null_file)
        _check_names(null, backbone, f"--null-cond {null_file}")
        if row_count(null) != 1:
            raise ConfigError(f"--null-cond {null_file} must hold ONE row per condition (the null/empty prompt)")
        _check_labels(null, backbone, f"--null-cond {null_file}", null=True)
        return null
    return backbone.null_cond() if hasattr(backbone, "null_cond") else None


def _check_labels(cond: Cond, backbone: Any, what: str, null: bool = False) -> None:
    """class labels ``y`` are integers in 0..C-1 (0..C for the null row, C = the
    null label); out of range they used to fail deep in the embedding (or wrap to another class)."""
    classes = int(getattr(backbone, "num_classes", 0) or 0)
    y = cond.get("y")
    if y is None or classes <= 0:
        return
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{what}: y must hold integer labels, got {str(y.dtype).replace('torch.', '')}")
    top = classes if null else classes - 1
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > top):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ConfigError(f"{what}: y labels must be in 0..{top}" + (f" ({classes} = the null label)" if null else "")
                          + f", got {bad}")


def _cond_rows(backbone: Any, cond_file: Optional[str]) -> Cond:
    if cond_file:
        cond = load_cond_file(cond_file)
        _check_names(cond, backbone, f"--cond {cond_file}")
        row_count(cond)
        _check_labels(cond, backbone, f"--cond {cond_file}")
        return cond
    if not getattr(backbone, "conditions", None):
        return {}
    if set(backbone.conditions) == {"y"} and int(getattr(backbone, "num_classes", 0)) > 0:
        return {"y": torch.arange(int(backbone.num_classes), dtype=torch.int64)}
    raise ConfigError(f"data-free training needs the conditions to generate for: pass --cond FILE (.npz or "
                      f".safetensors with {', '.join(backbone.conditions)}, rows first)")


def _folder(path: Path) -> torch.Tensor:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise ConfigError(f"--data {path}: no .npy files in that folder (latents (N, C, H, W) at t = 0)")
    return torch.from_numpy(np.concatenate([np.load(f, allow_pickle=False) for f in files]).astype(np.float32))


def training_set(src: SourceBackbone, data: str = "auto", *, cond_file: Optional[str] = None,
                 null_file: Optional[str] = None, n_states: int = 1024, solve_steps: int = 32, seed: int = 0,
                 cache_dir: Optional[str] = None, dist: Optional[Dist] = None, progress: bool = True) -> TrainingSet:
    """The start states for SideNet training; see the module docstring for ``data``."""
    from .data import DATASETS, load_dataset

    bb, dist = src.module, dist or Dist()
    data = (data or "auto").strip()
    if data == "auto":
        data = src.data["name"] if src.data and src.data.get("name") in DATASETS else "none"
    null = _null(bb, null_file)
    if data.lower() in DATASETS:
        if cond_file:
            raise ConfigError(f"--cond is for data-free training or a latent folder; --data {data} brings its labels")
        x, y = (torch.from_numpy(a) for a in load_dataset(data, "train", seed=0))
        meta = src.data if src.data and src.data.get("name") == data.lower() else {"name": data.lower()}
        return TrainingSet(x, {"y": y}, null, {**meta, "source": "dataset"})
    if data != "none":
        path = Path(data)
        if not path.is_dir():
            raise ConfigError(f"--data {data!r} is neither a bundled data set ({', '.join(DATASETS)}), 'none' "
                              "(data-free), 'auto', nor a folder of .npy latents")
        x = _folder(path)
        cond = _cond_rows(bb, cond_file) if cond_file or getattr(bb, "conditions", None) else {}
        if cond and row_count(cond) != x.shape[0]:
            raise ConfigError(f"--cond has {row_count(cond)} rows but {data} holds {x.shape[0]} latents")
        return TrainingSet(x, cond, null, {"source": "folder", "path": str(path), "n": int(x.shape[0])})
    cond = _cond_rows(bb, cond_file)
    x0, rows, info = start_states(bb, tuple(bb.state_shape), cond, n=n_states, steps=solve_steps, seed=seed,
                                  backbone_sha=str(src.identity.get("weights_sha256")), device=dist.device,
                                  cache_dir=Path(cache_dir) if cache_dir else None, dist=dist, progress=progress)
    cond_states = {k: v[rows] for k, v in cond.items()}
    return TrainingSet(x0, cond_states, null, {**info, "cond_file": cond_file, "null_cond_file": null_file})


def train_sidenet_for_source(source: str | Path, out: str | Path, settings: Any, *, data: str = "auto",
                             cond_file: Optional[str] = None, null_file: Optional[str] = None,
                             n_states: int = 1024, solve_steps: int = 32, cache_dir: Optional[str] = None,
                             resume: bool = False, command: Optional[str] = None, progress: bool = True,
                             dist: Optional[Dist] = None, budget_s: Optional[float] = None,
                             budget_default: bool = False) -> dict:
    """``anchorflow train sidenet``: load SOURCE, pick the start states, train; returns the config.

    ``budget_s``: seconds for the whole command (loading and start states included): at most
    ``settings.iters``, fewer if they do not fit (see :func:`~.train_sidenet.train_sidenet`)."""
    import time

    from .train_sidenet import check_init, train_sidenet

    started = time.monotonic()
    dist = dist or from_env()
    src = load_backbone(source, out)
    if getattr(settings, "init", None):
        check_init(src.module, settings)  # a wrong --init fails before the start states are computed
    if cond_file and not null_file and getattr(settings, "label_dropout", 0) > 0:
        view = as_cond_backbone(src.module)  # no null rows to drop to: fail before the start states
        if uses_null_rows(view) and (not hasattr(view, "null_cond") or view.null_cond() is None):
            raise ConfigError(NULL_NEEDED)
    ts = training_set(src, data, cond_file=cond_file, null_file=null_file, n_states=n_states,
                      solve_steps=solve_steps, seed=settings.seed, cache_dir=cache_dir, dist=dist, progress=progress)
    return train_sidenet(src.module, ts.x, ts.cond, out, settings, null_cond=ts.null, identity=src.identity,
                         data=ts.record, resume=resume, command=command, progress=progress, dist=dist,
                         budget_s=budget_s, started=started, budget_default=budget_default)

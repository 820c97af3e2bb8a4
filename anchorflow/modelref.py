"""Opening a MODEL argument for the CLI: its bundle (torch-free) or, without one, its torch checkpoints.

What a MODEL names (``default``, a model root, a bundle or a checkpoint folder) is decided by the
torch-free :mod:`anchorflow.runtime.bundles.models`, which library code uses directly; this module adds the
torch fallback (needs ``anchorflow[train]``) that only the application layer may reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base.errors import CheckpointError
from .runtime.bundles.load import open_bundle
from .runtime.bundles.models import (  # noqa: F401  (the CLI's names for the torch-free resolver)
    BUNDLED, DEFAULT_NAME, ModelFiles, OpenModel, check_fresh, locate, model_meta, resolve,
    resolve_backbone_checkpoint)


def open_model(
    spec: str | Path,
    backend: str = "auto",
    allow_fallback: bool = False,
    precision: str = "fp32",
    need_sidenet: bool = False,
    threads: Optional[int] = None,
) -> OpenModel:
    """Open a MODEL for sampling: the bundle if there is one (torch-free), else the torch checkpoints.

    ``threads``: onnxruntime intra-op threads of a bundle's sessions (None: one per physical core).
    """
    files = locate(spec)
    if files.bundle is not None and backend != "torch":
        model = open_bundle(files, backend, allow_fallback, precision, threads)
    elif files.backbone is not None:
        model = _open_torch(files)
    else:
        raise CheckpointError(f"{spec}: backend 'torch' needs checkpoint folders, but only a bundle was found")
    if need_sidenet and model.sidenet is None:
        raise CheckpointError(f"{spec} has no SideNet; train one with 'anchorflow train sidenet --backbone {spec}'")
    return model


def _open_torch(files: ModelFiles) -> OpenModel:
    from .base._deps import require_extra

    require_extra("train", "sampling from torch checkpoints (--backend torch, or a model without a bundle)",
                  ("torch", "safetensors"))
    from .trainers.checkpoint import load_checkpoint
    from .trainers.torch_wrappers import TorchSideNet, TorchVelocity

    backbone, cfg = load_checkpoint(files.backbone, kind="backbone")
    sidenet = None
    if files.sidenet is not None:
        from .trainers.sidenet import load_sidenet

        sidenet = TorchSideNet(load_sidenet(files.sidenet, cfg))
    data = cfg.get("data")
    name = data.get("name") if isinstance(data, dict) else (data or "model")
    meta = {
        "name": name,
        "state_shape": tuple(backbone.state_shape),
        "num_classes": int(backbone.num_classes),
        "null_label": int(backbone.null_label),
        "data_range": list((data or {}).get("data_range", [-1.0, 1.0])) if isinstance(data, dict) else [-1.0, 1.0],
        "model_id": cfg.get("weights_sha256", name),
    }
    return OpenModel(TorchVelocity(backbone), sidenet, meta, files, ["torch-cpu"])

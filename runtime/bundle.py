"""Open an exported bundle (``bundle.json`` + ONNX files) as the runtime's callables, torch-free.

``load_bundle(path, backend, allow_fallback, precision) -> LoadedBundle`` with ``velocity(x, t, y)``,
``sidenet(x, v, t, h, y)`` (or None), the ``bundle.json`` dict and the providers the sessions
really got. Every ONNX file is checked against its sha256 in bundle.json and the schema version
must be ours, so a tampered or foreign bundle is refused (CheckpointError) instead of sampled.
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .._io import read_json, sha256_file
from ..errors import CheckpointError, ConfigError

SCHEMA = "anchorflow.bundle/1"
BUNDLE_JSON = "bundle.json"
PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
TIME_CONVENTION = (
    "t = 1 is noise, t = 0 is data; x_t = (1 - t) x_data + t noise; v = dx/dt ~ noise - x_data; "
    "sampling integrates from t = 1 down to t = 0. SideNet: v_hat(t - h) = v + delta, h > 0 toward data."
)


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle ready for :func:`anchorflow.runtime.solve`.

    ``providers``: what the backbone's session really runs on (e.g. ``["CPUExecutionProvider"]``);
    ``network_providers``: the same per network.
    """

    velocity: Callable
    sidenet: Optional[Callable]
    meta: dict
    providers: list[str]
    path: Path
    precision: str = "fp32"
    backend: str = "ort-cpu"
    network_providers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def model(self) -> dict:
        return dict(self.meta.get("model") or {})

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.model.get("state_shape", ()))

    @property
    def null_label(self) -> Optional[int]:
        return self.model.get("null_label")


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder for ``path``: the folder itself or a model root's ``bundle/``."""
    path = Path(path).expanduser()
    for folder in (path, path / "bundle"):
        if (folder / BUNDLE_JSON).is_file():
            return folder
    raise CheckpointError(f"{path} is not a bundle (no {BUNDLE_JSON}, nor bundle/{BUNDLE_JSON}); "
                          "create one with 'anchorflow export MODEL --out FOLDER'")


def read_meta(folder: str | os.PathLike) -> dict:
    """bundle.json of a bundle folder; refuses a foreign or future schema."""
    meta = read_json(Path(folder) / BUNDLE_JSON)
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if schema != SCHEMA:
        raise CheckpointError(
            f"{Path(folder) / BUNDLE_JSON} has schema {schema!r}, but this anchorflow reads {SCHEMA!r}; "
            "re-export it with 'anchorflow export' (or use the anchorflow version that wrote it)"
        )
    if not isinstance(meta.get("networks"), dict) or "backbone" not in meta["networks"]:
        raise CheckpointError(f"{Path(folder) / BUNDLE_JSON} lists no backbone network; re-export the bundle")
    return meta


def network_file(folder: Path, meta: dict, network: str, precision: str = "fp32", verify: bool = True) -> Path:
    """Path of ``network``'s ONNX file in ``precision``, checked against bundle.json's sha256."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    entry = meta["networks"].get(network)
    if entry is None:
        raise CheckpointError(f"the bundle in {folder} has no {network}")
    if precision != "fp32":
        have = ["fp32", *sorted(entry.get("precisions") or {})]
        if precision not in have:
            raise ConfigError(f"the bundle has no {precision} variant of the {network} (it has: {', '.join(have)}); "
                              f"re-export with 'anchorflow export MODEL --precision {precision}'")
        entry = entry["precisions"][precision]
    try:
        path, sha = folder / entry["file"], entry["sha256"]
    except (KeyError, TypeError):
        raise CheckpointError(f"bundle.json's {network} {precision} entry has no file/sha256; re-export the bundle") from None
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the bundle; re-export it")
    if verify and sha256_file(path) != sha:
        raise CheckpointError(f"{path} does not match the sha256 recorded in bundle.json (modified or corrupt); "
                              "re-export the bundle")
    return path


def load_bundle(path: str | os.PathLike, backend: str = "auto", allow_fallback: bool = False,
                precision: str = "fp32", threads: Optional[int] = None) -> LoadedBundle:
    """Open a bundle folder (or a model root with ``bundle/``) on ``backend``.

    ``backend``: auto | ort-cpu | ort-cuda | ort-trt (onnxruntime) | trt (cached TensorRT engines
    via :mod:`anchorflow.engines`, imported only then). ``precision``: which ONNX variant to run.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    folder = find_bundle(path)
    meta = read_meta(folder)
    if backend == "trt":
        return _load_trt(folder, meta, precision)
    from .backends import OrtSideNet, OrtVelocity, make_session, resolve_backend

    resolved = resolve_backend(backend)
    null_label = (meta.get("model") or {}).get("null_label")
    nets: dict[str, Any] = {}
    for name, wrapper in (("backbone", OrtVelocity), ("sidenet", OrtSideNet)):
        if meta["networks"].get(name) is not None:
            file = network_file(folder, meta, name, precision)
            nets[name] = wrapper(make_session(file, backend, allow_fallback, threads=threads), null_label)
    per_net = {name: net.providers for name, net in nets.items()}
    return LoadedBundle(nets["backbone"], nets.get("sidenet"), meta, per_net["backbone"], folder,
                        precision, resolved, per_net)


def _load_trt(folder: Path, meta: dict, precision: str) -> LoadedBundle:
    """backend='trt': the engines helper builds the callables (its errors surface as they are)."""
    runner = importlib.import_module("anchorflow.engines.runner")
    velocity, sidenet, description = runner.load_trt_bundle(folder, meta, precision)
    providers = [f"TensorRT ({description})"]
    per_net = {"backbone": providers, **({"sidenet": providers} if sidenet is not None else {})}
    return LoadedBundle(velocity, sidenet, meta, providers, folder, precision, "trt", per_net)

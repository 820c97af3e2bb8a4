"""numpy-in / numpy-out wrappers so ``anchorflow.runtime.solve`` can drive torch modules.

They match the runtime's callables (:mod:`anchorflow.runtime.solving.field`): ``velocity(x, t, cond) -> v``
and ``sidenet(x, v, t, h, cond) -> delta``, float32 numpy arrays, per-sample t (B,) with t = 1
noise and t = 0 data, cond None or a dict with the labels ``y`` int64 (B,). They run on the CPU
under ``torch.no_grad``. :func:`bundle_runs` is the runtime's ``torch`` backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn


def _t(a: Optional[np.ndarray], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _labels(module: nn.Module, cond: Optional[dict], batch: int) -> Optional[torch.Tensor]:
    """Labels ``cond["y"]`` as int64; without them the module's null label on every row."""
    y = None if cond is None else cond.get("y")
    null = getattr(module, "null_label", None)
    if y is None and null is not None:
        return torch.full((batch,), int(null), dtype=torch.int64)
    return _t(y, torch.int64)


class _Wrapper:
    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().to("cpu")


class TorchVelocity(_Wrapper):
    """``velocity(x, t, cond) -> v`` for a torch backbone ``module(x, t, y)``; x (B, ...), t (B,)."""

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray, cond: Optional[dict]) -> np.ndarray:
        xt = _t(x, torch.float32)
        v = self.module(xt, _t(t, torch.float32), _labels(self.module, cond, xt.shape[0]))
        return v.numpy().astype(np.float32, copy=False)


class TorchSideNet(_Wrapper):
    """``sidenet(x, v, t, h, cond) -> delta`` for a torch SideNet ``module(x, v, t, h, *conds)``, fed
    the conditions it declares (``module.cond_inputs``; the labels ``y`` when it declares none).
    A shared-body SideNet (polynomial offset form) takes h (K, B) and returns (K, B, *state)."""

    @property
    def shared_body(self) -> bool:
        return bool(getattr(self.module, "shared_body", False))

    @torch.no_grad()
    def __call__(self, x: np.ndarray, v: np.ndarray, t: np.ndarray, h: np.ndarray,
                 cond: Optional[dict]) -> np.ndarray:
        xt = _t(x, torch.float32)
        names = tuple(getattr(self.module, "cond_inputs", ("y",)))
        conds = [_labels(self.module, cond, xt.shape[0]) if n == "y" else torch.from_numpy(np.ascontiguousarray(cond[n]))
                 for n in names]
        d = self.module(xt, _t(v, torch.float32), _t(t, torch.float32), _t(h, torch.float32), *conds)
        return d.numpy().astype(np.float32, copy=False)


def module_run(module: nn.Module, names: list) -> Callable[[dict], np.ndarray]:
    """``run(feeds) -> output``: the module called on the feeds in declared input order (CPU, fp32)."""
    module = module.eval().to("cpu")

    @torch.no_grad()
    def run(feeds: dict) -> np.ndarray:
        out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
        return out.float().numpy()

    return run


def bundle_runs(bundle: Any, precision: str = "fp32", sources: Optional[dict] = None,
                trust_source: bool = False) -> tuple[dict, list[str]]:
    """The runtime's ``torch`` backend: per network ``run(feeds)`` of the torch model it was exported from.

    A bundle is data: nothing named inside bundle.json is imported, run or even opened here. Where
    each network's torch model comes from:

    - ``sources[name]`` (``verify --source``): a checkpoint folder, a diffusers transformer folder
      or ``pkg.module:factory`` given by the user;
    - else, for our checkpoints, the model-root layout: ``backbone/`` / ``sidenet/`` beside the
      bundle folder (what ``locate`` finds for a MODEL root), never the path bundle.json records;
    - a diffusers / factory source recorded in bundle.json is loaded only with ``trust_source``
      (``--trust-source``, the ``trust_remote_code`` convention); without it the backend is
      unavailable, saying how to give the source.

    Recorded facts are only compared: a checkpoint's weights sha256 must equal the recorded one; a
    given diffusers / factory source that differs from the recorded one is noted with a warning.
    """
    from ..base.errors import CheckpointError, ConfigError

    if precision != "fp32":
        raise ConfigError("the torch backend runs the checkpoints in fp32 only")
    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(bundle.networks))
    if unknown:
        raise ConfigError(f"--source names {', '.join(unknown)}, but the bundle has {', '.join(bundle.networks)}")
    runs = {}
    for name, decl in bundle.networks.items():
        entry = bundle.meta["networks"][name]
        record = entry.get("checkpoint") if isinstance(entry.get("checkpoint"), dict) else None
        recorded = entry.get("source") if isinstance(entry.get("source"), dict) else {}
        given = sources.get(name)
        if given is None and record is None and recorded.get("path"):
            if not trust_source:
                raise ConfigError(
                    f"the {name} of this bundle comes from the {recorded.get('kind', 'source')} "
                    f"{str(recorded.get('path'))[:200]!r} named in bundle.json; opening a bundle never imports or runs "
                    f"code it names: give the source yourself with --source FOLDER|pkg.module:factory (or, if you "
                    f"trust whoever made this bundle, pass --trust-source)")
            given = str(recorded["path"])
        if given is not None and not _is_checkpoint(given):
            _note_source(name, str(given), recorded)
            runs[name] = _source_run(str(given), decl)
            continue
        folder = Path(given) if given is not None else bundle.folder.parent / name
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"the torch backend needs the {name} checkpoint: none at {folder} (the model-root layout beside "
                f"the bundle); give it with --source {'' if name == 'backbone' else name + '='}CHECKPOINT_FOLDER")
        module, cfg = _load_checked(folder, name, record)
        runs[name] = module_run(module, [i.name for i in decl.inputs])
    return runs, ["torch-cpu"]


def _is_checkpoint(source: str) -> bool:
    return (Path(source).expanduser() / "config.json").is_file() and not _is_diffusers(source)


def _is_diffusers(source: str) -> bool:
    from .adapters.diffusers import is_diffusers_folder

    return is_diffusers_folder(Path(source).expanduser())


def _load_checked(folder: Path, name: str, record: Optional[dict]) -> tuple:
    from ..base.errors import CheckpointError
    from .checkpoint import load_checkpoint

    module, cfg = load_checkpoint(folder, kind=name)
    want = (record or {}).get("weights_sha256")
    if want is None:
        raise CheckpointError(f"bundle.json records no {name} checkpoint to compare {folder} with; the torch backend "
                              "compares only checkpoints whose weights sha256 the bundle records")
    if cfg.get("weights_sha256") != want:
        raise CheckpointError(f"the {name} checkpoint at {folder} is not the one this bundle was exported from "
                              f"(weights sha256 {str(cfg.get('weights_sha256'))[:12]}, bundle.json records {str(want)[:12]})")
    return module, cfg


def _note_source(name: str, given: str, recorded: dict) -> None:
    from ..base.errors import warn

    path = recorded.get("path")
    if path is None:
        return
    same = given == path or (":" not in given and Path(given).expanduser().resolve() == Path(str(path)).resolve())
    if not same:
        warn(f"the {name} source given ({given}) differs from the one bundle.json records ({str(path)[:200]}); "
             "comparing the bundle with the source given")


def _source_run(path: str, decl: Any) -> Callable[[dict], np.ndarray]:
    """``run(feeds)`` of the adapter of a source the USER named (a diffusers folder or
    ``pkg.module:factory``), in our time like the graph."""
    from ..base.errors import AnchorflowError, CheckpointError, ConfigError
    from .adapters import load_source
    from .adapters.factory import is_factory

    if not is_factory(path) and not Path(path).expanduser().is_dir():
        raise CheckpointError(f"the source {path} is not there (a diffusers folder, a checkpoint folder or "
                              "pkg.module:factory)")
    try:
        adapter = load_source(path).eval()
    except AnchorflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory or folder: its failure is one line
        raise ConfigError(f"the source {path} failed to load ({type(exc).__name__}: {str(exc)[:200]})") from None
    roles = {i.role: i.name for i in decl.inputs}
    names = [i.name for i in decl.conditions]
    return lambda feeds: adapter.call_numpy(feeds[roles["state"]], feeds[roles["time"]], {n: feeds[n] for n in names})

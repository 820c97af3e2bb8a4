"""Optional heavy dependencies: one rule for every command.

A command that needs optional packages calls :func:`require_extra` before any work; the error
names the ONE pip extra that supplies everything the command needs (``anchorflow[train]`` for
training and for sampling from checkpoints, ``anchorflow[export]`` for export, which includes
torch) and lists every missing module at once. :func:`require` imports one module lazily with
the same wording.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional, Sequence

from .errors import MissingDependencyError

# pip extra -> the import names it supplies (pyproject.toml [project.optional-dependencies])
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "safetensors", "sklearn"),
    "export": ("torch", "safetensors", "onnx", "onnxscript", "onnxslim"),
    "trt": ("tensorrt", "cuda"),
    "plot": ("matplotlib",),
}
# module name -> (pip extra, what it is for), for a lone require()
_EXTRAS = {
    "torch": ("train", "training and export"),
    "safetensors": ("train", "reading and writing checkpoints"),
    "sklearn": ("train", "the bundled digits data set"),
    "onnx": ("export", "ONNX export and graph checks"),
    "onnxscript": ("export", "ONNX export"),
    "onnxconverter_common": ("export", "fp16 ONNX conversion"),
    "onnxslim": ("export", "ONNX graph clean-up"),
    "polygraphy": ("export", "parity comparison"),
    "tensorrt": ("trt", "TensorRT engines"),
    "cuda": ("trt", "CUDA buffers for TensorRT engines"),
    "matplotlib": ("plot", "plots"),
    "diffusers": ("diffusers", "the diffusers integration"),
    "transformers": ("diffusers", "the diffusers integration"),
    "tokenizers": ("pipeline", "tokenising prompts of a pipeline bundle"),
}


def _hint(extra: Optional[str], top: str) -> str:
    return f"pip install 'anchorflow[{extra}]'" if extra else f"pip install {top}"


def missing(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be found (nothing is imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require_extra(extra: str, purpose: str, modules: Optional[Sequence[str]] = None) -> None:
    """Refuse, before any work, to run ``purpose`` without the modules it needs.

    ``modules``: the import names needed (default: all of the extra's); the message names the
    extra ``extra`` that supplies them all, e.g. ``pip install 'anchorflow[export]'``.
    """
    lack = missing(modules if modules is not None else EXTRA_MODULES[extra])
    if lack:
        raise MissingDependencyError(
            f"{purpose} needs {', '.join(lack)}, which {'is' if len(lack) == 1 else 'are'} not installed; "
            f"install everything it needs with: {_hint(extra, lack[0])}"
        )


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming ``pip install 'anchorflow[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        default_extra, default_purpose = _EXTRAS.get(top, (None, None))
        extra = extra or default_extra
        purpose = purpose or default_purpose or "this feature"
        raise MissingDependencyError(
            f"{top} is needed for {purpose} but could not be imported ({exc}); install it with: {_hint(extra, top)}"
        ) from None


def available(module: str) -> bool:
    """True when ``module`` can be imported (without raising)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True

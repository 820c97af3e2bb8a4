"""Lazy imports of optional heavy dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (pip extra, what it is for)
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
}


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming ``pip install 'anchorflow[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised through tests with a fake module name
        top = module.split(".")[0]
        default_extra, default_purpose = _EXTRAS.get(top, (None, None))
        extra = extra or default_extra
        purpose = purpose or default_purpose or "this feature"
        hint = f"pip install 'anchorflow[{extra}]'" if extra else f"pip install {top}"
        raise MissingDependencyError(
            f"{top} is needed for {purpose} but could not be imported ({exc}); install it with: {hint}"
        ) from None


def available(module: str) -> bool:
    """True when ``module`` can be imported (without raising)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True

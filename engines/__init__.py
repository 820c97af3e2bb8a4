"""TensorRT engines for anchorflow bundles: build, cache, and run from numpy without torch.

``anchorflow build BUNDLE`` (:func:`build_engines`) writes engines into
``<bundle>/engines/trt/``; ``load_bundle(path, backend="trt")`` runs them through
:func:`load_trt_bundle`. tensorrt and cuda-python (``pip install 'anchorflow[trt]'``) are
imported only inside the functions that need them, so importing this package is cheap and
works without them. See docs/tensorrt.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BuildOptions": ".build",
    "build_engines": ".build",
    "load_trt_bundle": ".runner",
    "TrtVelocity": ".runner",
    "TrtSideNet": ".runner",
    "derive_profiles": ".profiles",
    "EngineEnv": ".cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)

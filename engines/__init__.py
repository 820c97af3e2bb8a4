"""TensorRT engines for anchorflow bundles: build, cache, and run from numpy without torch.

``anchorflow build BUNDLE`` (:func:`build_engines`) writes engines into
``<bundle>/engines/trt/``; ``anchorflow.runtime.load_bundle(path, backend="trt")`` runs them
(:func:`anchorflow.engines.runner.bundle_runs`). tensorrt and cuda-python (``pip install 'anchorflow[trt]'``) are
imported only inside the functions that need them, so importing this package is cheap and
works without them. See docs/tensorrt.md.
"""

from __future__ import annotations

from ..base._lazy import lazy_attributes

_LAZY = {
    "BuildOptions": ".build",
    "build_engines": ".build",
    "TrtEngines": ".runner",
    "derive_profiles": ".profiles",
    "EngineEnv": ".cache",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)

"""torch -> validated ONNX bundles (extra ``[export]``): export, parity, fp16/bf16 variants, clean-up.

Nothing heavy is imported here. The parity statistics, tolerances, cases and reports the export
checks use are the torch-free :mod:`anchorflow.runtime.evaluation.parity` (``anchorflow verify`` uses them too).
"""

from __future__ import annotations

from ..base._lazy import lazy_attributes

_LAZY = {
    "export_net": ".stages",
    "export_bundle": ".bundle",
    "export_onnx": ".onnx_export",
    "BACKBONE": ".onnx_export",
    "SIDENET": ".onnx_export",
    "convert": ".precision",
    "clean": ".cleanup",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)

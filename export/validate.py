"""Export-time parity: the torch side of the checks in :mod:`anchorflow.runtime.evaluation.parity`.

Statistics, tolerances, cases and reports are the torch-free parity library's (the same numbers
``anchorflow verify`` prints); the ONNX side (``onnx.checker``, onnxruntime and onnx.reference
runners) is the export pipeline's (:mod:`.stages`). This module adds a runner over a torch module
and the cases of one of our checkpoints' networks (:class:`~.onnx_export.NetSpec`). Inputs cover batch
1, a prime batch and the maximum batch, each with random inputs and with real ones (noised data
``x_t = (1 - t) x_data + t noise``, t = 1 noise, t = 0 data). Nothing here imports torch at import
time.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..runtime.evaluation.parity.cases import Case, Domain, RealData, batches, make_cases as _make_cases
from .onnx_export import NetSpec


def batches_for(spec: NetSpec, max_batch: int) -> list[int]:
    """Batch 1, a prime batch and the network's maximum batch (deduplicated, in order)."""
    return batches(spec.batch_range(max_batch)["max"])


def make_cases(spec: NetSpec, state_shape: tuple[int, ...], num_classes: int, sizes: Sequence[int],
               real: Optional[RealData] = None, seed: int = 0) -> list[Case]:
    """Random cases for every batch size, plus real ones when ``real`` is given (labels 0..C, C null)."""
    return _make_cases(spec.signature(state_shape)["inputs"], sizes, Domain.for_labels(num_classes), real, seed)


# -- the torch side ----------------------------------------------------------------------------
def torch_runner(module: Any, spec: NetSpec) -> Callable[[dict], np.ndarray]:
    """``run(feeds) -> output`` for a torch module called as ``module(*inputs in spec order)``."""
    from ..base._deps import require

    torch = require("torch")
    module = module.eval()

    def run(feeds: dict) -> np.ndarray:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.inputs))
        return out.numpy()

    return run

"""anchorflow: few-step sampling for flow-matching generators.

Sub-packages (installed from the repository's top-level folders):

- ``anchorflow.runtime``  numpy + onnxruntime solvers (BA-solver, FastFlow, classic ODE solvers); never imports torch.
- ``anchorflow.trainers`` torch: reference backbone, SideNet and their trainers.
- ``anchorflow.export``   torch -> ONNX bundles with metadata and parity validation.
- ``anchorflow.engines``  TensorRT engines built from bundles (tensorrt imported lazily).

Time convention everywhere: t = 1 is noise, t = 0 is data.
"""

__version__ = "0.1.0"

from .base.errors import AnchorflowError  # noqa: E402

__all__ = ["AnchorflowError", "__version__"]

"""TensorRT version switches: everything that differs between TensorRT 10.x and 11.x lives here.

Every function takes the imported ``tensorrt`` module as its first argument (``trt``), so the
rest of :mod:`anchorflow.engines` never branches on versions and tests can exercise the
switches with a module-like object carrying only ``__version__`` and the attributes read.

What differs (NVIDIA TensorRT migration guide, 10.x -> 11.x):

* 10.x: networks are weakly typed unless created with
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; ``EXPLICIT_BATCH`` is deprecated and ignored.
* 11.x: strongly typed is the only mode and the default of ``create_network``; the precision
  builder flags (``BuilderFlag.FP16``/``BF16``/``INT8``/...) are removed.

anchorflow builds strongly typed networks on both: an engine's precision comes from the ONNX
graph (the bundle's fp16/bf16 variants), never from builder flags, so 10.x (JetPack on Jetson)
and 11.x servers build the same numerics.
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np

from ..base.errors import BackendError

MIN_MAJOR = 10
# Smallest compute capability that runs each precision's kernels in TensorRT 10/11.
_PRECISION_MIN_CC = {"fp32": (0, 0), "fp16": (5, 3), "bf16": (8, 0),
                     "int8": (6, 1), "fp8": (8, 9)}  # quant: int8 Q/DQ from sm_61, fp8 (E4M3) Ada/Hopper sm_89+


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-numeric suffixes (``"11.1.0rc1"``) are dropped."""
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    if not parts:
        raise BackendError(f"cannot read the TensorRT version {version!r}; reinstall tensorrt")
    return tuple(parts)


def major(trt: ModuleType) -> int:
    """The TensorRT major version; refuses anything older than 10 (no name-based I/O API)."""
    value = version_tuple(getattr(trt, "__version__", "0"))[0]
    if value < MIN_MAJOR:
        raise BackendError(
            f"TensorRT {trt.__version__} is too old: anchorflow needs TensorRT >= {MIN_MAJOR} "
            "(pip install 'anchorflow[trt]' installs a current one)"
        )
    return value


def network_flags(trt: ModuleType) -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT.

    10.x: ``1 << STRONGLY_TYPED``. 11.x: 0, since strong typing is the default and only mode.
    ``EXPLICIT_BATCH`` is never set (ignored since 10.0, removed in 11).
    """
    if major(trt) >= 11:
        return 0
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        raise BackendError(
            f"TensorRT {trt.__version__} has no STRONGLY_TYPED networks; upgrade to TensorRT >= 10.0"
        )
    return 1 << int(flag)


def config_kwargs(trt: ModuleType, *, workspace_bytes: Optional[int], opt_level: int, tf32: bool,
                  refittable: bool = False, strip: bool = False) -> dict:
    """Keyword arguments of Polygraphy's ``CreateConfig`` for anchorflow's builder options (10.x and 11.x alike).

    Sets no fp16/bf16/int8 flag: strongly typed networks take precision from the graph. ``tf32``
    False clears ``BuilderFlag.TF32``, which TensorRT sets by default even in strongly typed
    networks: fp32 MatMul/Gemm would otherwise run with a 10-bit mantissa (relative error ~5e-4)
    and miss ``anchorflow verify``'s 1e-4 fp32 tolerance.
    """
    kwargs: dict = {"builder_optimization_level": int(opt_level), "tf32": bool(tf32)}
    if refittable or strip:  # BuilderFlag.REFIT / STRIP_PLAN, both in TensorRT 10.x and 11.x
        for flag in ("REFIT",) + (("STRIP_PLAN",) if strip else ()):
            if not hasattr(trt.BuilderFlag, flag):
                raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}; refittable engines need "
                                   "TensorRT >= 10.0")
        kwargs["refittable"] = True
        if strip:
            kwargs["strip_plan"] = True
    if workspace_bytes is not None:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
    return kwargs


def check_precision(precision: str, compute_capability: tuple[int, int]) -> None:
    """Refuse a precision the GPU has no kernels for (bf16 needs compute capability >= 8.0)."""
    if precision not in _PRECISION_MIN_CC:
        raise BackendError(f"unknown precision {precision!r}; choose one of {sorted(_PRECISION_MIN_CC)}")
    need = _PRECISION_MIN_CC[precision]
    if tuple(compute_capability) < need:
        have = f"sm_{compute_capability[0]}{compute_capability[1]}"
        raise BackendError(
            f"{precision} engines need a GPU with compute capability >= {need[0]}.{need[1]}, this one is {have}; "
            "build with --precision fp16 or fp32 instead"
        )


# -- progress monitor (IProgressMonitor, TensorRT >= 10.0) ------------------------------------
def progress_monitor(trt: ModuleType, display: Any) -> Any:
    """An ``IProgressMonitor`` forwarding to ``display`` (phase_start/step_complete/phase_finish).

    Returns None when this TensorRT has no IProgressMonitor; the caller then shows elapsed time
    only. Callbacks never raise into TensorRT (its callbacks are noexcept): an exception cancels
    the build through the next ``step_complete``.
    """
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            _guard(display, display.phase_start, phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return bool(_guard(display, display.step_complete, phase_name, step, default=False))

        def phase_finish(self, phase_name: str) -> None:
            _guard(display, display.phase_finish, phase_name)

    return _Monitor()


def _guard(display: Any, fn: Any, *args: Any, default: Any = None) -> Any:
    try:
        return fn(*args)
    except BaseException:  # noqa: BLE001 - nothing may cross into TensorRT's C++ callbacks
        display.cancel()
        return default


# -- logger, runtime and builder ---------------------------------------------------------------
def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A ``trt.ILogger`` that keeps error messages (``.errors``) for the exception text.

    Errors are not printed: they reach the user once, inside the BackendError that reports the
    failure (the CLI's one ``error:`` line). Warnings go to stderr; info/verbose only with ``verbose``.
    """

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            try:
                level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
                if level <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))
                elif verbose or level == int(trt.ILogger.Severity.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)
            except BaseException:  # noqa: BLE001 - nothing may cross into TensorRT's C++ (noexcept) callback
                pass

    return _Logger()


_CUDA_ERRORS = (re.compile(r"cudaError \d+: [^)]*"), re.compile(r"CUDA initiali[sz]ation failure with error: \d+"))


def cuda_failure(messages: list[str]) -> Optional[str]:
    """The telling part of a CUDA initialisation error among TensorRT's logged ``messages``, else None."""
    text = " ".join(" ".join(messages).split())
    for pattern in _CUDA_ERRORS:
        match = pattern.search(text)
        if match:
            return match.group().strip()
    return None


def _create(trt: ModuleType, factory: str, logger: Any) -> Any:
    """``trt.<factory>(logger)``, refused when it failed: a None/TypeError (nullptr factory) or an error logged on the way.

    TensorRT returns a usable-looking Runtime/Builder after "CUDA initialization failure"; using
    it (``deserialize_cuda_engine``) segfaults, so any error logged during creation is fatal here.
    """
    before = len(logger.errors)
    try:
        obj = getattr(trt, factory)(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        logger.errors.append(str(exc))
        obj = None
    new = logger.errors[before:]
    if obj is not None and not new:
        return obj
    if obj is not None:
        _pin(obj, logger)
    cuda = cuda_failure(new)
    version = getattr(trt, "__version__", "?")
    if cuda is not None:
        raise BackendError(f"TensorRT {version} could not initialise CUDA ({cuda}); the NVIDIA driver is missing or older "
                           "than the CUDA this TensorRT was built for: check nvidia-smi and install the matching build "
                           "(pip install 'anchorflow[trt-cu12]' for CUDA 12 drivers, 'anchorflow[trt-cu13]' for CUDA 13)")
    detail = "; ".join(" ".join(m.split()) for m in new[-2:]) or "no details logged"
    raise BackendError(f"TensorRT {version} could not create its {factory} ({detail}); check the install with "
                       "`python -c 'import tensorrt'` and nvidia-smi")


def _pin(*objects: Any) -> None:
    """Never free ``objects``: the destructor of a Runtime/Builder whose CUDA initialisation failed segfaults.

    (Reproduced with tensorrt-lean-cu12 11.4 without a driver: ``del trt.Runtime(logger)`` crashes
    the interpreter.) One extra reference per object keeps both garbage collection and interpreter
    shutdown away from it; the cost is one leaked object per failed attempt.
    """
    for obj in objects:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def create_runtime(trt: ModuleType, logger: Any) -> Any:
    """A ``trt.Runtime`` that is known to have initialised CUDA (BackendError otherwise, never a segfault later)."""
    return _create(trt, "Runtime", logger)


def create_builder(trt: ModuleType, logger: Any) -> Any:
    """A ``trt.Builder`` that is known to have initialised CUDA (BackendError otherwise)."""
    return _create(trt, "Builder", logger)


def init_plugins(trt: ModuleType, logger: Any) -> None:
    """Register TensorRT's standard plugins (ONNX graphs may import ops as plugins); absent in lean runtimes."""
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is not None:
        init(logger, "")


# -- ONNX parser errors -----------------------------------------------------------------------
@dataclass(frozen=True)
class ParserIssue:
    """One ``OnnxParser`` error: node index (-1: graph level), node name and op type if known."""

    code: str
    desc: str
    node: int = -1
    node_name: str = ""
    op: str = ""


def _call(obj: Any, name: str, default: Any) -> Any:
    member = getattr(obj, name, None)
    if member is None:
        return default
    try:
        return member() if callable(member) else member
    except Exception:  # noqa: BLE001 - older bindings lack some accessors
        return default


def parser_issues(parser: Any) -> list[ParserIssue]:
    """Read every error of a ``trt.OnnxParser`` (node_name/node_operator exist from 10.x on)."""
    issues = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        code = _call(err, "code", "?")
        issues.append(ParserIssue(
            code=getattr(code, "name", str(code)).split(".")[-1],
            desc=str(_call(err, "desc", str(err))),
            node=int(_call(err, "node", -1)),
            node_name=str(_call(err, "node_name", "") or ""),
            op=str(_call(err, "node_operator", "") or ""),
        ))
    return issues


def format_parser_errors(onnx_path: str | Path, issues: list[ParserIssue]) -> str:
    """One readable message for a failed parse: file, then per error node index, op, name, text."""
    name = Path(onnx_path).name
    if not issues:
        return f"TensorRT could not parse {name} and reported no details; check the file with `anchorflow verify`"
    lines = [f"TensorRT could not parse {name} ({len(issues)} error{'s' if len(issues) > 1 else ''}):"]
    for issue in issues:
        where = "graph" if issue.node < 0 else f"node {issue.node}"
        if issue.op:
            where += f" {issue.op}"
        if issue.node_name:
            where += f" {issue.node_name!r}"
        lines.append(f"  {where}: {issue.desc} [{issue.code}]")
    lines.append("re-export the bundle (anchorflow export) or use the onnxruntime backend (--backend ort-cuda)")
    return "\n".join(lines)


# -- engine I/O -------------------------------------------------------------------------------
_NP_BY_NAME = {
    "FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
    "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_,
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a ``trt.DataType`` (by member name; BF16/FP8/INT4/FP4 I/O has no numpy type)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in _NP_BY_NAME:
        raise BackendError(
            f"engine I/O type {name} has no numpy equivalent; bundles keep float32 inputs and outputs "
            "(bf16 inside the graph), re-export the bundle with `anchorflow export`"
        )
    return np.dtype(_NP_BY_NAME[name])


def io_tensors(trt: ModuleType, engine: Any) -> tuple[list[tuple[str, np.dtype]], list[tuple[str, np.dtype]]]:
    """(inputs, outputs) of an ``ICudaEngine`` as (name, numpy dtype), via the name-based 10.x+ API."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = (name, numpy_dtype(engine.get_tensor_dtype(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs

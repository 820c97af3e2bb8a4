"""int8 / fp8 variants of a bundle's backbone: post-training Q/DQ quantisation calibrated on the
sampler's own trajectories, a measured keep-list, and a quality guard.

Toolchain: onnxruntime's quantiser (``onnxruntime.quantization.quantize_static``, QDQ format), not
NVIDIA ModelOpt. ModelOpt 0.47's ONNX path does run on CPU here, but only from a ``--no-deps``
install: its ``[onnx]`` extra pins ``onnx~=1.21`` and, on Linux x86, ``onnxruntime-gpu~=1.24`` and
``cupy-cuda12x``, which conflict with constraints.txt (onnx 1.23.2, onnxruntime 1.32 CPU), and it
converts every unquantised tensor to fp16 by default. onnxruntime is already a base dependency, so
the quantiser adds nothing to install and the graph it writes is what ORT and TensorRT then run.

The graph: ``QuantizeLinear -> DequantizeLinear`` pairs (opset >= 19 for fp8) in front of the
quantised nodes' inputs, weights per output channel, everything symmetric (zero point 0, signed
int8 / ``FLOAT8E4M3FN``): the form TensorRT's strongly typed networks take (precision lives in the
graph, no builder flag, no calibrator). Float32 inputs and outputs, like the fp16 variants.

Calibration data (:func:`record_calibration`): the exact feeds the fp32 ORT backbone gets while
the bundle's solvers (BA when there is a SideNet, AB2, Euler) integrate along the bundle's tuned
grids (uniform where it has none) at several budgets, with the tuning's guidance scale and its
labels cycled over every class, plus the null rows when guided: a recording ``run`` wrapped by the
runtime's own :class:`~anchorflow.runtime.bundles.networks.BundleVelocity`, so the rows, times and
conditions are the sampler's, not random tensors.

Node classes (:func:`node_classes`, structural, any exporter's graph): ``embedding`` (weight ops
that do not depend on the state x: time / condition embeddings and the adaLN modulation they
feed), ``input_projection`` (first weight op on x's path), ``final_projection`` (weight op with no
weight op after it), ``attention`` (activation x activation MatMuls), ``body`` (other weight ops),
``norm`` and ``softmax``. The rule (:func:`choose`): quantise one class at a time and measure the
end-to-end PSNR (default configuration, against the fp32 reference solve) lost against fp32; a
class losing more than :data:`KEEP_DB` stays fp32 whole; the nodes of the others are measured one
at a time, then quantised in increasing order of cost while the set loses at most
:data:`BUDGET_DB`. Measured on the digits model (BA@7, 46.8 dB fp32): norms alone cost 7.7 dB,
the input projection 3.8, all body weight ops 2.9 (MinMax ranges: 3.8, Entropy: 4.6, hence
Percentile 99.999), but within the body the MLP layers cost 0.3-1.0 dB each and the attention
projections ~0. Everything is recorded in bundle.json (``networks.backbone.precisions.int8.quantization``).

Guard (:func:`guard`): a variant whose end-to-end PSNR at the bundle's default configuration (what
``anchorflow sample`` runs: BA at 7 calls, cfg 1, the tuned grid) falls more than
:data:`GUARD_DB` below fp32's, on a held-out batch, is refused: one line, nothing written. The
SideNet stays fp32 (its precision entry points at the fp32 file and says so); a SideNet is a few
percent of a call, and quantising it was measured to cost quality (benchmarks/quant_bench.py).
Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..base._deps import require
from ..base.errors import CheckpointError, ConfigError

QUANTISED = ("int8", "fp8")
CLASSES = ("embedding", "input_projection", "body", "attention", "final_projection", "norm", "softmax")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization")
KEEP_DB = 5.0  # a class that alone costs more than this end to end stays fp32 without per-node measurement
BUDGET_DB = 0.7  # the quantised nodes together may cost at most this at BA@10 on the rule's batch (1.0 there
# was 1.23 dB on a held-out batch, digits: the 0.3 dB margin is that spread)
GUARD_DB = 1.5  # export refuses a variant more than this below fp32 there (held-out batch: budget + margin)
DEFAULT = ("ba", 7)  # `anchorflow sample`'s defaults (solver, calls); Euler when there is no SideNet
RULE_NFE = 10  # the rule judges at the largest calibrated budget: the most sensitive of the bundle's solves
CAL_SOLVERS = ("ba", "ab2", "euler")
CAL_NFES = (5, 7, 10)
CAL_SAMPLES = 32  # 16 -> 48 gained 0.17 dB (body class at BA@10, digits); 32 is the middle ground in memory
SMOOTH_ALPHA = 0.7  # SmoothQuant migration strength (digits body class at BA@10: none 7.3 dB, 0.5 5.3, 0.7 4.6, 0.85 5.5)
EVAL_SAMPLES = 32
METHOD = "Percentile"  # int8 activation ranges (fp8: Distribution, the only one ORT takes for float types)
PERCENTILE = 99.999
OUTPUT_FP32 = (*WEIGHT_OPS, *NORM_OPS, "Softmax")  # quantised inputs only (TensorRT's placement): outputs stay fp32
E4M3_MAX = 448.0  # largest finite FLOAT8E4M3FN value: fp8 activation scale = amax / 448
REFERENCE_STEPS = 64  # RK4 steps of the fp32 reference solve (the tuner's default)


# -- graph structure ----------------------------------------------------------------------------------
def _initialised(graph: Any) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def node_classes(model: Any, state_inputs: Sequence[str] = ("x",)) -> dict[str, list[str]]:
    """Class name -> node names (see the module docstring); nodes need unique names."""
    graph = model.graph
    const = _initialised(graph)
    xdep = set(state_inputs)
    weight_after: dict[str, bool] = {}  # tensor -> some x-dependent weight op lies upstream
    out: dict[str, list[str]] = {c: [] for c in CLASSES}
    weight_nodes = []
    for node in graph.node:  # topologically sorted (onnx.checker requires it)
        dep = any(i in xdep for i in node.input if i)
        if dep:
            xdep.update(node.output)
        weighted = node.op_type in WEIGHT_OPS and any(i in const for i in node.input[1:] if i)
        upstream = any(weight_after.get(i, False) for i in node.input if i)
        if node.op_type in NORM_OPS:
            out["norm"].append(node.name)
        elif node.op_type == "Softmax":
            out["softmax"].append(node.name)
        elif weighted and not dep:
            out["embedding"].append(node.name)
        elif weighted:
            (out["body"] if upstream else out["input_projection"]).append(node.name)
            weight_nodes.append(node)
        elif node.op_type == "MatMul" and dep and not any(i in const for i in node.input):
            out["attention"].append(node.name)
        for o in node.output:
            weight_after[o] = dep and (upstream or weighted)
    # final projection: a body weight op from which no other x-dependent weight op is reachable
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    weighty = {n.name for n in weight_nodes}
    for node in weight_nodes:
        if node.name in out["input_projection"]:
            continue
        todo, seen, later = list(node.output), set(), False
        while todo and not later:
            for c in consumers.get(todo.pop(), ()):
                if c.name in weighty or c.name in out["attention"]:
                    later = True
                    break
                if c.name not in seen:
                    seen.add(c.name)
                    todo.extend(c.output)
        if not later:
            out["body"].remove(node.name)
            out["final_projection"].append(node.name)
    return out


def named(model: Any) -> Any:
    """A copy of ``model`` whose nodes all have unique names (the keep-list goes by name)."""
    from .precision import _named

    return _named(model)


# -- calibration on trajectories ----------------------------------------------------------------------
@dataclass
class Recorder:
    """Wraps a network's ``run(feeds)``: every call's feeds are kept (copies) when ``on``."""

    run: Callable[[dict], np.ndarray]
    calls: list = field(default_factory=list)
    on: bool = True

    def __call__(self, feeds: dict) -> np.ndarray:
        if self.on:
            self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.run(feeds)

    def times(self) -> set[float]:
        return {float(t) for c in self.calls for t in np.unique(c["t"])}


@dataclass
class Nets:
    """A bundle's fp32 networks on onnxruntime CPU, the backbone's run recordable."""

    fmt: Any
    velocity: Any
    sidenet: Any
    recorder: Recorder
    sessions: dict


def _session(path_or_bytes: Any, threads: Optional[int] = None) -> Any:
    ort = require("onnxruntime")
    from ..runtime.bundles.backends import session_options

    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])


def open_nets(folder: Path, backbone: Any = None, sidenet: Any = None, threads: Optional[int] = None) -> Nets:
    """The bundle's networks (fp32 files, or the given ONNX bytes / paths instead) as runtime callables."""
    from ..runtime.bundles.backends import ort_run
    from ..runtime.bundles.format import read_bundle
    from ..runtime.bundles.networks import WRAPPERS

    fmt = read_bundle(folder)
    srcs = {"backbone": backbone, "sidenet": sidenet}
    sessions, nets, recorder = {}, {}, None
    for name, decl in fmt.networks.items():
        src = srcs.get(name)
        sessions[name] = _session(fmt.network_file(name) if src is None else src, threads)
        run = ort_run(sessions[name], decl)
        if name == "backbone":
            run = recorder = Recorder(run, on=False)
        nets[name] = WRAPPERS[name](decl, run, fmt.guidance.null, ["CPUExecutionProvider"])
    return Nets(fmt, nets["backbone"], nets.get("sidenet"), recorder, sessions)


@dataclass(frozen=True)
class Config:
    """One solve: solver, calls, grid (explicit times or "uniform"), guidance scale."""

    solver: str
    nfe: int
    grid: Any
    cfg: float

    def label(self) -> str:
        g = "tuned" if not isinstance(self.grid, str) else self.grid
        return f"{self.solver}@{self.nfe} ({g} grid, cfg {self.cfg:g})"


def _tuning(fmt: Any) -> Any:
    from ..runtime.bundles.tuned_grids import read_tuning

    return read_tuning(fmt)


def config(fmt: Any, solver: str, nfe: int, cfg: Optional[float] = None) -> Config:
    """The bundle's grid for (solver, nfe): its tuned grid, else uniform; cfg from the tuning (else 1)."""
    tuning = _tuning(fmt)
    tuned = None if tuning is None else tuning.grid_for(solver, nfe)
    if cfg is None:
        cfg = float((tuning.settings if tuning is not None else {}).get("cfg", 1.0) or 1.0)
    return Config(solver, int(nfe), "uniform" if tuned is None else np.asarray(tuned.times), float(cfg))


def rule_config(fmt: Any) -> Config:
    """Where the rule measures: BA (Euler without SideNet) at :data:`RULE_NFE` calls, cfg 1, tuned grid."""
    solver = DEFAULT[0] if "sidenet" in fmt.networks else "euler"
    return config(fmt, solver, RULE_NFE, cfg=1.0)


def default_config(fmt: Any) -> Config:
    """What ``anchorflow sample`` runs with no options: BA (Euler without SideNet), 7 calls, cfg 1, tuned grid."""
    solver, nfe = DEFAULT if "sidenet" in fmt.networks else ("euler", DEFAULT[1])
    return config(fmt, solver, nfe, cfg=1.0)


def calibration_configs(fmt: Any) -> list[Config]:
    """The solves calibration records: the bundle's solvers x budgets on their tuned grids."""
    solvers = [s for s in CAL_SOLVERS if s != "ba" or "sidenet" in fmt.networks]
    return [config(fmt, s, n) for s in solvers for n in CAL_NFES]


def problem(fmt: Any, samples: int, seed: int) -> tuple[np.ndarray, dict]:
    """Start noise (samples, *state) and the solve's condition kwargs (labels cycled over the classes)."""
    rng = np.random.default_rng(seed)
    shape = tuple(fmt.state_shape)
    noise = rng.standard_normal((samples, *shape)).astype(np.float32)
    classes = fmt.model.get("num_classes")
    kwargs: dict = {}
    if fmt.backbone.input("state") is not None and any(c.name == "y" for c in fmt.backbone.conditions) and classes:
        kwargs["y"] = np.arange(samples, dtype=np.int64) % int(classes)
        if fmt.model.get("null_label") is not None:
            kwargs["null_label"] = int(fmt.model["null_label"])
    elif fmt.backbone.conditions:
        kwargs["cond"], kwargs["null_cond"] = _random_conditions(fmt, samples, rng)
    return noise, kwargs


def _random_conditions(fmt: Any, samples: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Conditions of a text-conditioned backbone: one fixed random embedding set per sample (the
    bundle carries no prompts; the same ones for every precision), the guidance's null values."""
    cond, null = {}, dict(fmt.guidance.null)
    for c in fmt.backbone.conditions:
        shape = [samples if a == "batch" else (fmt.backbone.axes[a][1] if isinstance(a, str) else int(a))
                 for a in c.shape]
        cond[c.name] = (rng.standard_normal(shape) if c.dtype.startswith("float")
                        else rng.integers(0, 2, shape)).astype(c.dtype if c.dtype != "float16" else "float32")
    return cond, {k: v for k, v in null.items() if k in cond} or None


def run_config(nets: Nets, cfg: Config, noise: np.ndarray, kwargs: dict, sidenet: Any = "same") -> np.ndarray:
    from ..runtime import solve

    side = nets.sidenet if sidenet == "same" else sidenet
    extra = {"sidenet": side} if cfg.solver == "ba" else {}
    return solve(cfg.solver, nets.velocity, noise, cfg.nfe, grid=cfg.grid, cfg_scale=cfg.cfg, **kwargs, **extra).x


def record_calibration(nets: Nets, configs: Sequence[Config], samples: int = CAL_SAMPLES, seed: int = 11) -> list[dict]:
    """The backbone feeds of the fp32 solves ``configs`` (one list entry per backbone call)."""
    noise, kwargs = problem(nets.fmt, samples, seed)
    nets.recorder.calls.clear()
    nets.recorder.on = True
    try:
        for c in configs:
            run_config(nets, c, noise, kwargs)
    finally:
        nets.recorder.on = False
    return list(nets.recorder.calls)


def random_calibration(fmt: Any, like: Sequence[dict], seed: int = 12) -> list[dict]:
    """Random feeds with the same row counts as ``like``: x ~ N(0, 1), t ~ U(0, 1), random labels
    (the null label included) / Gaussian embeddings; the ablation of trajectory calibration."""
    rng = np.random.default_rng(seed)
    out = []
    classes = int(fmt.model.get("num_classes") or 0)
    for feeds in like:
        new = {}
        for k, v in feeds.items():
            if k == "t":
                new[k] = rng.random(v.shape).astype(v.dtype)
            elif np.issubdtype(v.dtype, np.integer):
                new[k] = rng.integers(0, classes + 1 if classes else 2, v.shape).astype(v.dtype)
            else:
                new[k] = rng.standard_normal(v.shape).astype(v.dtype)
        out.append(new)
    return out


# -- quantising --------------------------------------------------------------------------------------
def rebatch(rows: Sequence[dict]) -> list[dict]:
    """The same calibration rows as feeds of one batch size (ORT's histogram collectors stack each
    tensor over all feeds, so mixed batch sizes -- BA's SideNet calls over several offsets -- fail):
    concatenated and cut into chunks of the batch sizes' gcd (their smallest when that is < 8, the
    tail then dropped). A no-op when every row already has one batch size."""
    import math

    sizes = {len(next(iter(r.values()))) for r in rows}
    if len(sizes) <= 1:
        return list(rows)
    size = math.gcd(*sizes)
    size = size if size >= 8 else min(sizes)
    whole = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    total = len(next(iter(whole.values())))
    return [{k: v[i:i + size] for k, v in whole.items()} for i in range(0, total - size + 1, size)]


# -- SmoothQuant-style scaling -------------------------------------------------------------------------
def channel_amax(model: Any, tensors: Sequence[str], rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of each of ``tensors`` over the calibration ``rows``."""
    onnx = require("onnx")
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in have])
    sess = _session(probe.SerializeToString())
    names = {i.name for i in sess.get_inputs()}
    out: dict[str, Any] = {t: None for t in tensors}
    for r in rows:
        for t, v in zip(tensors, sess.run(list(tensors), {k: v for k, v in r.items() if k in names})):
            a = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            out[t] = a if out[t] is None else np.maximum(out[t], a)
    return out


def smooth_groups(model: Any) -> dict[str, list[str]]:
    """Activation tensor -> the names of the 2-D-weight MatMuls reading it (q / k / v share one)."""
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for n in model.graph.node:
        if (n.op_type == "MatMul" and n.input[1] in inits and n.input[0] not in inits
                and len(inits[n.input[1]].dims) == 2):
            groups.setdefault(n.input[0], []).append(n.name)
    return groups


def smooth(model: Any, rows: Sequence[dict], alpha: float = SMOOTH_ALPHA, nodes: Optional[Iterable[str]] = None
           ) -> tuple[Any, dict]:
    """SmoothQuant (Xiao et al. 2023) on the graph: for each activation X read by weight MatMuls
    ``X @ W``, per input channel k, ``s_k = amax(X_k)^alpha / amax(W_k,:)^(1-alpha)`` (amax of X over
    the calibration rows, of W over every MatMul reading X), and ``X @ W = (X / s) @ (s W)``: one
    ``Mul(X, 1/s)`` is inserted and the weights are rescaled, so the function is unchanged (float
    rounding only) but the activation's outlier channels move into the per-channel-quantised
    weights. ``nodes``: smooth only the groups with a member among them (None: all). The inserted
    Mul is an elementwise op TensorRT fuses; it stays in fp32. Returns (model, record)."""
    onnx = require("onnx")
    nh = onnx.numpy_helper
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    want = None if nodes is None else set(nodes)
    groups = {x: m for x, m in smooth_groups(model).items() if want is None or set(m) & want}
    if not groups:
        return model, {"alpha": alpha, "activations": 0, "matmuls": 0}
    amax = channel_amax(model, list(groups), rows)
    by_name = {n.name: n for n in g.node}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    inserts = []
    for x, names in groups.items():
        ws = [nh.to_array(inits[by_name[m].input[1]]).astype(np.float32) for m in names]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        s = np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        inv, xs = f"{x}__smooth_inv", f"{x}__smoothed"
        g.initializer.append(nh.from_array((1.0 / s).astype(np.float32), inv))
        inserts.append((producer.get(x, -1), onnx.helper.make_node("Mul", [x, inv], [xs], name=f"{x}__smooth")))
        for m, w in zip(names, ws):
            node = by_name[m]
            new = f"{node.input[1]}__smoothed_{m}"
            g.initializer.append(nh.from_array((w * s[:, None]).astype(np.float32), new))
            node.input[0], node.input[1] = xs, new
    nodes_out = list(g.node)
    for at, mul in sorted(inserts, key=lambda p: -p[0]):  # right after X's producer: still topological
        nodes_out.insert(at + 1, mul)
    del g.node[:]
    g.node.extend(nodes_out)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used or t.name in {i.name for i in g.input}]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, {"alpha": alpha, "activations": len(groups), "matmuls": sum(len(m) for m in groups.values())}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds (restartable)."""

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows, self.i = list(rows), 0

    def get_next(self) -> Optional[dict]:
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return self.rows[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.rows)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's stdout progress and root-logger warnings for one call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class Quantizer:
    """Q/DQ variants of one fp32 graph; activation ranges are calibrated once (ORT's calibration
    cache) and reused for every choice of quantised classes."""

    def __init__(self, model: Any, precision: str, rows: Sequence[dict], state_inputs: Sequence[str] = ("x",),
                 method: Optional[str] = None, symmetric: bool = True, fp8_scales: str = "amax",
                 smooth_alpha: Optional[float] = SMOOTH_ALPHA, smooth_nodes: Optional[Iterable[str]] = None) -> None:
        if precision not in QUANTISED:
            raise ConfigError(f"unknown quantised precision {precision!r}; choose from {', '.join(QUANTISED)}")
        onnx = require("onnx")
        self.onnx, self.precision, self.symmetric = onnx, precision, symmetric
        self.method = method or ("Distribution" if precision == "fp8" else METHOD)
        self.rows = rebatch(rows)
        self.model = self._opset(named(model), 19 if precision == "fp8" else 13)
        self.smoothing: dict = {"alpha": None, "activations": 0, "matmuls": 0}
        if smooth_alpha:
            self.model, self.smoothing = smooth(self.model, self.rows, smooth_alpha, smooth_nodes)
        self.classes = node_classes(self.model, state_inputs)
        self.fp8_scales = fp8_scales
        self._tmp = tempfile.TemporaryDirectory(prefix="anchorflow-quant-")
        self.cache = Path(self._tmp.name) / "ranges.json"
        self.source = Path(self._tmp.name) / "fp32.onnx"
        onnx.save_model(self.model, str(self.source))

    def _opset(self, model: Any, least: int) -> Any:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < least:
                model = self.onnx.version_converter.convert_version(model, least)
        return model

    def quantize(self, classes: Iterable[str] = (), nodes: Iterable[str] = ()) -> Any:
        """The Q/DQ model (ModelProto) with the nodes of ``classes`` and ``nodes`` quantised, the rest fp32."""
        require("onnxruntime")
        import onnxruntime.quantization as q

        classes = list(classes)
        nodes = [n for c in classes for n in self.classes[c]] + list(nodes)
        if not nodes:
            raise ConfigError(f"nothing to quantise: the classes {classes} have no nodes in this graph")
        ops = sorted({n.op_type for n in self.model.graph.node})
        fp8 = self.precision == "fp8"
        if fp8:  # ORT's quantiser pins Softmax outputs to a [0, 1] range without the avg/std its fp8 scales need
            op_of = {n.name: n.op_type for n in self.model.graph.node}
            nodes = [n for n in nodes if op_of.get(n) != "Softmax"]
            if not nodes:
                raise ConfigError(f"nothing to quantise to fp8: only Softmax nodes in {classes}")
        kind = q.QuantType.QFLOAT8E4M3FN if fp8 else q.QuantType.QInt8
        act = kind if fp8 or self.symmetric else q.QuantType.QUInt8
        out = Path(self._tmp.name) / "q.onnx"
        with _quiet():  # ORT's quantiser prints progress and pre-processing advice on every call
            q.quantize_static(
                str(self.source), str(out), _Reader(self.rows), quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=[o for o in ops if o in (*WEIGHT_OPS, *NORM_OPS, "Softmax")],
                nodes_to_quantize=nodes, per_channel=True, activation_type=act, weight_type=kind,
                calibrate_method=getattr(q.CalibrationMethod, self.method), calibration_cache_path=str(self.cache),
                extra_options={"ActivationSymmetric": self.symmetric, "WeightSymmetric": True,
                               "CalibPercentile": PERCENTILE, "OpTypesToExcludeOutputQuantization": list(OUTPUT_FP32)})
        model = self.onnx.load(str(out))
        return self._amax_scales(model, nodes) if fp8 and self.fp8_scales == "amax" else model

    def _amax_scales(self, model: Any, nodes: list[str]) -> Any:
        """fp8 activation scales as amax / 448 (E4M3's largest value; TensorRT / ModelOpt's rule) from
        the same trajectory calibration, in place of ORT's Gaussian-fit scales (std-matched to the
        fp8 grid, which clips DiT activations' tails: 18 dB lost at BA@7 on the digits model against
        ~1.1 dB with amax). Ranges: ORT's int8 calibration at :data:`PERCENTILE` (a cached pass)."""
        import onnxruntime.quantization as q
        from onnxruntime.quantization.calibrate import load_tensors_data

        ranges_path = Path(self._tmp.name) / "ranges_amax.json"
        if not ranges_path.exists():
            ops = sorted({n.op_type for n in self.model.graph.node})
            with _quiet():
                q.quantize_static(
                    str(self.source), str(Path(self._tmp.name) / "amax.onnx"), _Reader(self.rows),
                    quant_format=q.QuantFormat.QDQ, nodes_to_quantize=nodes, per_channel=True,
                    op_types_to_quantize=[o for o in ops if o in (*WEIGHT_OPS, *NORM_OPS, "Softmax")],
                    activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.Percentile, calibration_cache_path=str(ranges_path),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": PERCENTILE})
        ranges = load_tensors_data(ranges_path)
        numpy_helper = self.onnx.numpy_helper
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] not in ranges.data:
                continue
            lo, hi = (float(np.asarray(v)) for v in ranges.data[n.input[0]].range_value)
            scale = inits[n.input[1]]
            amax = max(abs(lo), abs(hi), 1e-12)
            scale.CopyFrom(numpy_helper.from_array(np.asarray(amax / E4M3_MAX, np.float32).reshape(
                numpy_helper.to_array(scale).shape), scale.name))
        # weights: per output channel amax / 448 from the fp32 weights ORT quantised (``W`` -> ``W_quantized``)
        fp32 = {t.name: t for t in self.model.graph.initializer}
        for n in model.graph.node:
            src = n.input[0][: -len("_quantized")] if n.input[0].endswith("_quantized") else None
            if n.op_type != "DequantizeLinear" or n.input[0] not in inits or src not in fp32:
                continue
            w = numpy_helper.to_array(fp32[src]).astype(np.float32)
            old = numpy_helper.to_array(inits[n.input[1]])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(w.ndim, 1)
            if old.size == 1:
                amax = np.asarray(np.abs(w).max(), np.float32)
            else:
                amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
            scale = (np.maximum(amax, 1e-12) / E4M3_MAX).astype(np.float32).reshape(old.shape)
            shape = [1] * w.ndim
            if scale.ndim:
                shape[axis] = -1
            quant = np.clip(w / scale.reshape(shape), -E4M3_MAX, E4M3_MAX)
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(scale, n.input[1]))
            new = self.onnx.helper.make_tensor(n.input[0], self.onnx.TensorProto.FLOAT8E4M3FN, list(w.shape),
                                               quant.ravel().tolist())  # onnx rounds to E4M3 (saturating)
            inits[n.input[0]].CopyFrom(new)
        return model

    def close(self) -> None:
        self._tmp.cleanup()


def weight_share(model: Any, nodes: Iterable[str]) -> float:
    """Fraction of the weight-op parameters (MatMul/Gemm/Conv initializers) in ``nodes``."""
    onnx = require("onnx")
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    nodes = set(nodes)
    total = part = 0
    for n in model.graph.node:
        if n.op_type in WEIGHT_OPS:
            w = sum(sizes.get(i, 0) for i in n.input[1:2])
            total += w
            part += w if n.name in nodes else 0
    del onnx
    return round(part / total, 4) if total else 0.0


def qdq_summary(model: Any) -> dict:
    """Counts of Q/DQ nodes and the quantised element type(s) in a graph."""
    onnx = require("onnx")
    consts = {t.name: t for t in model.graph.initializer}
    kinds = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in consts:
            kinds.add(onnx.TensorProto.DataType.Name(consts[n.input[2]].data_type))
    ops = [n.op_type for n in model.graph.node]
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "types": sorted(kinds)}


# -- quality ------------------------------------------------------------------------------------------
@dataclass
class Quality:
    """End-to-end PSNR (dB) at one configuration against the fp32 reference solve."""

    fp32: float
    variant: float

    @property
    def drop(self) -> float:
        return self.fp32 - self.variant

    def as_dict(self) -> dict:
        return {"fp32_psnr": round(self.fp32, 3), "psnr": round(self.variant, 3), "drop_db": round(self.drop, 3)}


class Judge:
    """PSNR of solves at ``cfg`` on one fixed batch against the fp32 RK4 reference."""

    def __init__(self, nets: Nets, cfg: Config, samples: int, seed: int, reference_steps: int = REFERENCE_STEPS) -> None:
        from ..runtime import solve

        self.nets, self.cfg = nets, cfg
        self.noise, self.kwargs = problem(nets.fmt, samples, seed)
        self.ref = solve("rk4", nets.velocity, self.noise, 4 * reference_steps, cfg_scale=cfg.cfg, **self.kwargs).x
        rng = nets.fmt.model.get("data_range")
        self.span = float(rng[1] - rng[0]) if rng else float(self.ref.max() - self.ref.min())
        self.fp32 = self.psnr(run_config(nets, cfg, self.noise, self.kwargs))

    def psnr(self, x: np.ndarray) -> float:
        from ..runtime.evaluation.metrics import psnr

        return psnr(x, self.ref, self.span)

    def quality(self, backbone: Any, sidenet: Any = None) -> Quality:
        """``backbone``/``sidenet``: ONNX bytes (None: fp32) of the variant to judge."""
        x = run_config(self.variant(backbone, sidenet), self.cfg, self.noise, self.kwargs)
        if not np.isfinite(x).all():
            return Quality(self.fp32, float("-inf"))
        return Quality(self.fp32, self.psnr(x))

    def variant(self, backbone: Any = None, sidenet: Any = None) -> Nets:
        """The fp32 networks with ``backbone`` / ``sidenet`` (ONNX bytes) swapped in."""
        from ..runtime.bundles.backends import ort_run
        from ..runtime.bundles.networks import WRAPPERS

        fmt, nets = self.nets.fmt, self.nets
        out = Nets(fmt, nets.velocity, nets.sidenet, nets.recorder, dict(nets.sessions))
        for name, src in (("backbone", backbone), ("sidenet", sidenet)):
            if src is not None:
                out.sessions[name] = _session(src)
                wrapped = WRAPPERS[name](fmt.networks[name], ort_run(out.sessions[name], fmt.networks[name]),
                                         fmt.guidance.null, ["CPUExecutionProvider"])
                setattr(out, "velocity" if name == "backbone" else "sidenet", wrapped)
        return out


def choose(quantizer: Quantizer, judge: Judge, budget_db: float = BUDGET_DB, keep_db: float = KEEP_DB
           ) -> tuple[list[str], dict]:
    """The measured rule -> (quantised node names, the measurements for bundle.json).

    1. each class alone: a class costing more than ``keep_db`` end to end stays fp32 whole (its
       nodes are not worth measuring one by one);
    2. each node of the other classes alone (its end-to-end cost);
    3. the nodes in increasing cost: the longest prefix whose joint cost is <= ``budget_db``
       (bisection on the prefix length; joint cost grows with the prefix)."""
    present = [c for c in CLASSES if quantizer.classes[c]]
    cost = lambda nodes: judge.quality(quantizer.quantize(nodes=nodes).SerializeToString()).drop  # noqa: E731
    alone = {c: cost(quantizer.classes[c]) for c in present}
    open_classes = [c for c in present if alone[c] <= keep_db]
    whole = [c for c in present if c not in open_classes]
    per_node = {n: cost([n]) for c in open_classes for n in quantizer.classes[c]}
    order = sorted((n for n in per_node if per_node[n] <= budget_db), key=lambda n: per_node[n])
    lo, hi, joint = 0, len(order), {}
    while lo < hi:  # largest k with cost(order[:k]) <= budget
        k = (lo + hi + 1) // 2
        joint[k] = cost(order[:k])
        lo, hi = (k, hi) if joint[k] <= budget_db else (lo, k - 1)
    chosen = order[:lo]
    of = {n: c for c in present for n in quantizer.classes[c]}
    record = {"rule": f"a class alone costing > {keep_db} dB stays fp32; of the rest, nodes are quantised in increasing "
                      f"order of their own end-to-end cost while the set costs <= {budget_db} dB",
              "configuration": judge.cfg.label(), "samples": len(judge.noise),
              "class_alone_drop_db": {c: round(v, 3) for c, v in alone.items()},
              "kept_whole": whole,
              "node_alone_drop_db": {n: [of[n], round(v, 3)] for n, v in per_node.items()},
              "prefix_drop_db": {str(k): round(v, 3) for k, v in sorted(joint.items())}}
    return chosen, record


# -- the bundle ---------------------------------------------------------------------------------------
def quantized_precisions(precisions: Iterable[str]) -> list[str]:
    return [p for p in precisions if p in QUANTISED]


def float_precisions(precisions: Iterable[str]) -> list[str]:
    return [p for p in precisions if p not in QUANTISED]


def add_quantized(folder: str | Path, precisions: Sequence[str], *, guard_db: float = GUARD_DB,
                  step: Callable[[str], None] = lambda s: None) -> dict:
    """Add the int8 / fp8 variants in ``precisions`` to the (being written) bundle ``folder``;
    returns the new bundle.json (written). Raises CheckpointError (the guard) when a variant falls
    more than ``guard_db`` below fp32 at the default configuration; the caller's atomic folder then
    leaves nothing behind."""
    from ..base._io import read_json, write_bytes
    from ..runtime.bundles.format import BUNDLE_JSON, file_record, write_bundle_json
    from .precision import variant_file

    folder = Path(folder)
    todo = quantized_precisions(precisions)
    if not todo:
        return read_json(folder / BUNDLE_JSON)
    onnx = require("onnx")
    meta = read_json(folder / BUNDLE_JSON)
    nets = open_nets(folder)
    fmt = nets.fmt
    if fmt.backbone.external_data:
        raise ConfigError("int8 / fp8 export needs the backbone in one ONNX file (< 2 GB); drop int8/fp8 from --precision")
    step("quantise: record calibration trajectories")
    start = time.perf_counter()
    configs = calibration_configs(fmt)
    rows = record_calibration(nets, configs)
    times = sorted(nets.recorder.times())
    base = onnx.load(str(fmt.network_file("backbone")))
    state = [i.name for i in fmt.backbone.inputs if i.role == "state"]
    judge = Judge(nets, rule_config(fmt), EVAL_SAMPLES, seed=21)
    guard_judge = Judge(nets, default_config(fmt), EVAL_SAMPLES, seed=22)  # held out from the rule
    for precision in todo:
        step(f"quantise: {precision} sensitivity per class")
        quantizer = Quantizer(base, precision, rows, state)
        try:
            chosen, record = choose(quantizer, judge)
            if not chosen:
                raise CheckpointError(f"export refused: no node of the backbone can be quantised to {precision} within "
                                      f"{BUDGET_DB} dB at {judge.cfg.label()}; drop {precision} from --precision; "
                                      "nothing was written")
        finally:
            quantizer.close()
        # the written graph smooths only the activations a quantised MatMul reads (no idle Mul ops):
        # the same scales as in the rule's graph for those (a group is smoothed whole or not at all)
        final = Quantizer(base, precision, rows, state, smooth_nodes=chosen)
        try:
            model = final.quantize(nodes=chosen)
        finally:
            final.close()
        data = model.SerializeToString()
        q = guard(guard_judge, data, precision, guard_db)
        parity_record = parity(nets, data, precision)
        file = variant_file(fmt.backbone.file, precision)
        write_bytes(folder / file, data)
        entry = meta["networks"]["backbone"]
        kept = [c for c in CLASSES if quantizer.classes[c] and not set(quantizer.classes[c]) & set(chosen)]
        classes = {c: [n for n in quantizer.classes[c] if n in chosen] for c in CLASSES if quantizer.classes[c]}
        entry.setdefault("precisions", {})[precision] = {
            **file_record(folder, file),
            "quantization": {
                "tool": f"onnxruntime.quantization.quantize_static {require('onnxruntime').__version__} (QDQ)",
                "weights": f"{precision} per channel, symmetric", "activations": f"{precision} per tensor, symmetric",
                "smoothing": {**final.smoothing, "rule": "SmoothQuant: X @ W = (X / s) @ (s W), s_k = amax(X_k)^alpha / "
                              "amax(W_k)^(1 - alpha), amax(X) over the calibration rows; one fp32 Mul per smoothed activation"},
                "calibration": {"method": quantizer.method, "percentile": PERCENTILE if quantizer.method == "Percentile" else None,
                                "source": "solver trajectories (fp32 ORT backbone, recorded feeds)",
                                "solves": [c.label() for c in configs], "samples": CAL_SAMPLES, "calls": len(rows),
                                "rows": int(sum(len(r["t"]) for r in rows)), "times": len(times)},
                "quantized_nodes": {c: v for c, v in classes.items() if v}, "kept_fp32_classes": kept,
                "kept_fp32_nodes": {c: [n for n in quantizer.classes[c] if n not in chosen]
                                    for c in CLASSES if quantizer.classes[c]},
                "weights_quantized": weight_share(quantizer.model, chosen),
                "sensitivity": record, "qdq": qdq_summary(model),
            },
            "validation": {**parity_record,
                           "guard": {**q.as_dict(), "bound_db": guard_db, "configuration": guard_judge.cfg.label(),
                                     "samples": EVAL_SAMPLES, "passed": True}},
        }
        if "sidenet" in meta["networks"]:
            side = meta["networks"]["sidenet"]
            side.setdefault("precisions", {})[precision] = {
                "file": side["file"], "sha256": side["sha256"], "bytes": side["bytes"],
                "computes": "fp32", "note": f"the SideNet stays fp32 next to the {precision} backbone"}
    meta["precisions"] = list(dict.fromkeys([*meta.get("precisions", ["fp32"]), *todo]))
    meta.setdefault("export", {})["quantize_seconds"] = round(time.perf_counter() - start, 2)
    write_bundle_json(folder, meta)
    return read_json(folder / BUNDLE_JSON)


def parity(nets: Nets, backbone: bytes, precision: str, samples: int = 8, seed: int = 99) -> dict:
    """Per-call parity of the variant against the fp32 ORT backbone (the parity library's
    ``TOLERANCES[precision]``) on held-out trajectory calls (BA / Euler at 10, other noise) and on
    random feeds; the record ``export`` / ``verify`` print. CheckpointError when a case fails."""
    from dataclasses import asdict

    from ..runtime.evaluation.parity.stats import TOLERANCES, compare

    tol = TOLERANCES[precision]
    solver = "ba" if "sidenet" in nets.fmt.networks else "euler"
    held = record_calibration(nets, [config(nets.fmt, solver, 10)], samples=samples, seed=seed)
    cases = [(f"{solver}@10 call {i} (t={float(held[i]['t'][0]):.3f})", held[i]) for i in (0, len(held) // 2, len(held) - 1)]
    cases += [("random", random_calibration(nets.fmt, held[:1], seed=seed)[0])]
    sess, ref = _session(backbone), nets.sessions["backbone"]
    want = nets.fmt.backbone.outputs[0].name
    rows, worst = [], None
    for name, feeds in cases:
        st = compare(sess.run([want], feeds)[0], ref.run([want], feeds)[0], tol)
        rows.append({"case": name, **st.as_dict()})
        worst = st if worst is None or st.mean_abs > worst.mean_abs or not st.passed else worst
    record = {"runtime": "ort-cpu", "reference": "ort-cpu fp32", "passed": all(r["passed"] for r in rows),
              "tolerance": asdict(tol), "note": f"{precision} Q/DQ; quality: the guard below", "worst": worst.as_dict(),
              "cases": rows}
    if not record["passed"]:
        bad = next(r for r in rows if not r["passed"])
        raise CheckpointError(f"export refused: the {precision} backbone fails parity against fp32 on {bad['case']} "
                              f"(mean abs {bad['mean_abs']}, allowed {tol.describe()}); nothing was written")
    return record


def guard(judge: Judge, backbone: bytes, precision: str, bound_db: float = GUARD_DB) -> Quality:
    """The variant's quality at the default configuration; CheckpointError when it falls more than
    ``bound_db`` below fp32 (or is not finite)."""
    q = judge.quality(backbone)
    if not np.isfinite(q.variant) or q.drop > bound_db:
        raise CheckpointError(
            f"export refused: the {precision} backbone reaches {q.variant:.2f} dB at {judge.cfg.label()} against "
            f"fp32's {q.fp32:.2f} dB ({q.drop:.2f} dB worse; the bound is {bound_db:g} dB); drop {precision} from "
            "--precision; nothing was written")
    return q

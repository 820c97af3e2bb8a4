"""The one export pipeline (anchorflow.export.stages): every stage on tiny torch modules, each checked
against an independent truth (torch itself, the file's own sha256, a closed form). t = 1 noise, t = 0 data."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from anchorflow.base.errors import CheckpointError  # noqa: E402
from anchorflow.export import stages  # noqa: E402
from anchorflow.runtime.evaluation.parity import TOLERANCES, Case  # noqa: E402


class Mix(torch.nn.Module):
    """v = W x + b * t, over a state (batch, L, 4) with a named length axis L."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.lin(x) + t.reshape(-1, 1, 1)


class Ratio(torch.nn.Module):
    """relu(x) / (relu(x) + 1e-15): 1 where x > 0, else 0; NaN (0 / 0) if the epsilon were dropped."""

    def forward(self, x, t):
        r = torch.relu(x)
        return r / (r + 1e-15) + 0.0 * t.reshape(-1, 1, 1)


class Doubles(torch.nn.Module):
    def forward(self, x, t):
        return (x.double() * 2.0).float() + t.reshape(-1, 1, 1)


INPUTS = [{"name": "x", "shape": ["batch", "L", 4], "dtype": "float32"}, {"name": "t", "shape": ["batch"], "dtype": "float32"}]


def _feeds(b: int, length: int, seed: int) -> dict:
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((b, length, 4)).astype(np.float32), "t": r.random(b).astype(np.float32)}


def _torch_run(module):
    def run(f):
        with torch.no_grad():
            return module(torch.from_numpy(f["x"]), torch.from_numpy(f["t"])).numpy()
    return run


def _net(module, *, parity_offset: float = 0.0, guarded: bool = True, validate: bool = True) -> stages.Net:
    dims = {"batch": torch.export.Dim("batch", min=1, max=8), "L": torch.export.Dim("L", min=2, max=6)}
    cases = [Case("random", b, _feeds(b, n, b)) for b, n in ((1, 2), (3, 5), (8, 6))]
    run = _torch_run(module)
    net = stages.Net("toy", module, INPUTS, ("v",), dims, _feeds(3, 4, 0), "toy.onnx", guarded=guarded)
    if validate:
        net.parity = stages.CaseParity("toy", "v", cases, lambda f: run(f) + parity_offset)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    module = Mix().eval()
    return folder, module, stages.export_net(_net(module), folder, opset=18, precisions=("fp32", "fp16"))


def test_export_net_writes_hashed_files_whose_outputs_equal_torch(exported):
    folder, module, done = exported
    for record in (done.record, done.variants["fp16"]):
        data = (folder / record["file"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
    assert done.variants["fp16"]["file"] == "toy.fp16.onnx" and done.validation["passed"]
    assert done.variants["fp16"]["validation"]["passed"]
    import onnxruntime as ort

    feeds = _feeds(5, 3, 42)  # a batch and a length the trace never saw
    want = _torch_run(module)(feeds)
    got = ort.InferenceSession(str(folder / "toy.onnx"), providers=["CPUExecutionProvider"]).run(["v"], feeds)[0]
    assert np.abs(got - want).max() <= TOLERANCES["fp32"].atol
    low = ort.InferenceSession(str(folder / "toy.fp16.onnx"), providers=["CPUExecutionProvider"]).run(["v"], feeds)[0]
    assert low.dtype == np.float32 and np.abs(low - want).mean() <= 1e-2  # fp16: 2^-11 relative per weight


def test_a_parity_failure_refuses_the_export_and_names_the_precision(tmp_path):
    with pytest.raises(CheckpointError, match=r"^export refused: .*nothing was written$"):
        stages.export_net(_net(Mix().eval(), parity_offset=1e-2), tmp_path, opset=18)


def test_float64_in_the_graph_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="computes in float64"):
        stages.export_net(_net(Doubles(), validate=False), tmp_path, opset=18)


def test_a_guarded_net_keeps_a_tiny_epsilon_and_the_exporters_optimizer_drops_it(tmp_path):
    """Closed form: the step function of x. The guarded trace keeps it; onnxscript's optimizer (the
    unguarded order) deletes the 1e-15 and yields NaN, which the parity stage refuses."""
    (tmp_path / "a").mkdir()
    done = stages.export_net(_net(Ratio()), tmp_path / "a", opset=18)
    import onnxruntime as ort

    feeds = _feeds(2, 4, 1)
    got = ort.InferenceSession(str(tmp_path / "a" / done.record["file"]),
                               providers=["CPUExecutionProvider"]).run(["v"], feeds)[0]
    assert np.array_equal(got, (feeds["x"] > 0).astype(np.float32))
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="export refused"):
        stages.export_net(_net(Ratio(), guarded=False), tmp_path / "b", opset=18)


def test_relative_parity_judges_every_output_and_refuses_a_shape_mismatch():
    cases = [_feeds(2, 3, 0)]
    ref = [np.ones((2, 3)), np.zeros((2, 1))]
    good = stages.RelativeParity("part", ["a", "b"], cases, lambda f: ref, 1e-4)
    record = good.check(lambda f: [ref[0] + 5e-5, ref[1]], "fp32")
    assert record["passed"] and record["max_rel_err"] == pytest.approx(5e-5) and len(record["cases"]) == 2
    with pytest.raises(CheckpointError, match="output a differs from torch"):
        good.check(lambda f: [ref[0] + 2e-4, ref[1]], "fp32")
    with pytest.raises(CheckpointError, match="output b has shape"):
        good.check(lambda f: [ref[0], np.zeros((2, 2))], "fp32")

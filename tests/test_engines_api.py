"""One TensorRT callable API: ``load_bundle(path, backend="trt")``, on CPU.

The engines are stood in for by onnxruntime sessions of the same graphs (the GPU module,
tests/test_engines_gpu.py, runs the real ones): what is checked here is the wiring, i.e. the trt
backend's runs get the runtime's one condition rule (null rows from bundle.json, not a silent
label 0), labels are range-checked before an engine sees them, and a sample through it equals
the ort-cpu sample of the same plan.
"""

from __future__ import annotations

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError


class _OrtEngine:
    """A stand-in for engines.runner.TrtEngine: same inputs / outputs / run(feeds) -> dict."""

    def __init__(self, path, label):
        import onnxruntime as ort

        self.label = label
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
        self.inputs = [(i.name, types[i.type]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, types[o.type]) for o in self.session.get_outputs()]
        self.fed: list[dict] = []

    def run(self, feeds):
        assert set(feeds) == {n for n, _ in self.inputs}  # exactly the engine's inputs
        self.fed.append(feeds)
        names = [n for n, _ in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))

    def close(self):
        pass


@pytest.fixture(scope="module")
def trt_digits():
    from anchorflow.engines import runner
    from anchorflow.runtime.bundles import load as rb
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.bundles.models import resolve

    folder = resolve("default") / "bundle"
    engines = {}

    def fake_load(path, meta=None, precision="fp32"):
        model = meta["model"]
        nets = {n: _OrtEngine(folder / f"{n}.onnx", f"{n} {precision}") for n in ("backbone", "sidenet")}
        engines.update(nets)
        runs = {n: runner.TrtNetwork(e, int(model["num_classes"]) + 1) for n, e in nets.items()}
        return runner.TrtEngines(runs, None, "stand-in engines")

    mp = pytest.MonkeyPatch()
    mp.setattr(runner.TrtEngines, "load", staticmethod(fake_load))
    mp.setattr(rb, "require_extra", lambda *a, **k: None)  # tensorrt itself is not needed by the stand-in
    try:
        yield load_bundle("default", backend="trt"), load_bundle("default", backend="ort-cpu"), engines
    finally:
        mp.undo()


def test_trt_backend_samples_equal_ort_cpu(trt_digits):
    trt, ort, _ = trt_digits
    assert trt.backend == "trt" and trt.providers == ["TensorRT (stand-in engines)"]
    kw = dict(solver="ba", nfe=7, cfg_scale=1.5, n=6, labels=[1, 4, 9])
    np.testing.assert_array_equal(trt.sample(**kw).x, ort.sample(**kw).x)  # the same graphs, the same rule


def test_missing_labels_get_the_bundles_null_label_not_zero(trt_digits):
    trt, _, engines = trt_digits
    x = np.zeros((2, 1, 8, 8), np.float32)
    trt.velocity(x, np.ones(2, np.float32), None)  # an unconditional call: the null rows
    assert engines["backbone"].fed[-1]["y"].tolist() == [10, 10]


def test_labels_outside_the_table_are_refused_before_the_engine(trt_digits):
    from anchorflow.engines.runner import check_labels

    with pytest.raises(ConfigError, match="label 11 is outside this model's labels 0..10"):
        check_labels(np.array([0, 11]), 11)
    with pytest.raises(ConfigError, match="label -1"):
        check_labels(np.array([-1]), 11)
    trt, _, engines = trt_digits
    n = len(engines["backbone"].fed)
    with pytest.raises(ConfigError):
        trt.velocity(np.zeros((2, 1, 8, 8), np.float32), np.ones(2, np.float32), {"y": np.array([0, 11])})
    assert len(engines["backbone"].fed) == n  # refused before any engine ran

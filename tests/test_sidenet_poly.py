"""Shared-body (polynomial-offset) SideNets: the body runs once per anchor row, whatever the offsets.

``offset="poly<d>"``: ``delta(h) = h f_1 + ... + h^d f_d`` with f_j from a body that never sees h,
so the BA-solver's four probe offsets per interval (arXiv 2601.21542, merged probes) cost one body
row instead of four. Truths: finite differences (a degree-d polynomial has a vanishing (d+1)-th
difference), the per-row evaluation of the same module (K offsets on tiled rows), onnxruntime vs
torch through the exported bundle, and counted rows. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from anchorflow.base.errors import ConfigError

torch = pytest.importorskip("torch")

from anchorflow.trainers.sidenet import SideNet  # noqa: E402
from test_export import tiny_root  # noqa: E402,F401  (session fixture: the tiny test backbone)

ARCH = {"state_shape": [1, 8, 8], "num_classes": 10, "null_label": 10, "width": 8, "cond_dim": 16, "freq_dim": 16}


def _poly(degree: int = 3, seed: int = 0) -> SideNet:
    torch.manual_seed(seed)
    side = SideNet({**ARCH, "offset": f"poly{degree}"}).eval()
    with torch.no_grad():  # the zero-initialised head gets weights, else delta = 0 and every check is trivial
        for p in side.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return side


def _inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g),
            torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g))


@pytest.mark.parametrize("degree", [2, 3])
def test_delta_is_a_polynomial_of_the_declared_degree_in_h(degree):
    side = _poly(degree)
    x, v, t, y = _inputs(5)
    step = 0.05
    with torch.no_grad():
        d = [side(x, v, t, torch.full((5,), k * step), y).double() for k in range(degree + 2)]
    assert torch.equal(d[0], torch.zeros_like(d[0]))  # h = 0: exactly the anchor velocity
    diff = d
    for _ in range(degree + 1):  # the (d+1)-th forward difference of a degree-d polynomial is 0
        diff = [b - a for a, b in zip(diff, diff[1:])]
    scale = max(float(x.abs().max()) for x in d)
    assert float(diff[0].abs().max()) < 1e-5 * scale  # float32 rounding of d+2 terms of size `scale`
    # ... and not trivially: the d-th difference is not 0
    nth = d
    for _ in range(degree):
        nth = [b - a for a, b in zip(nth, nth[1:])]
    assert float(nth[0].abs().max()) > 1e-3 * scale


def test_k_offsets_per_row_equal_the_per_row_evaluation():
    side = _poly()
    x, v, t, y = _inputs(6)
    hs = torch.tensor([-0.07, 0.05, 0.13, 0.18])
    with torch.no_grad():
        shared = side(x, v, t, hs[:, None].expand(4, 6), y)  # h (K, B) -> (K, B, *state)
        tiled = side(x.repeat(4, 1, 1, 1), v.repeat(4, 1, 1, 1), t.repeat(4), hs.repeat_interleave(6), y.repeat(4))
    assert shared.shape == (4, 6, 1, 8, 8)
    assert torch.allclose(shared.reshape(24, 1, 8, 8), tiled, atol=1e-6, rtol=0)


def test_unknown_offset_form_is_refused():
    with pytest.raises(ConfigError, match="offset form"):
        SideNet({**ARCH, "offset": "poly9"})


# -- export and runtime ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poly_bundle(tiny_root, tmp_path_factory) -> Path:
    """The tiny test backbone with a poly3 SideNet, exported (and parity-checked) into a bundle."""
    pytest.importorskip("onnxscript")
    from anchorflow.export.bundle import export_bundle
    from anchorflow.trainers.checkpoint import read_config, save_checkpoint
    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.sidenet import backbone_identity, sidenet_arch

    root = tmp_path_factory.mktemp("poly-model")
    shutil.copytree(tiny_root / "backbone", root / "backbone")
    backbone, _ = load_checkpoint(root / "backbone", kind="backbone")
    arch = {**sidenet_arch(backbone, width=8), "cond_dim": 16, "freq_dim": 16, "offset": "poly3"}
    torch.manual_seed(3)
    side = SideNet(arch)
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = read_config(root / "backbone")
    save_checkpoint(root / "sidenet", side, {"kind": "sidenet", "arch": arch, "data": cfg.get("data"),
                                             "backbone": backbone_identity(backbone, cfg),
                                             "training": {"command": "tests/test_sidenet_poly.py"}})
    export_bundle(root, precisions=[], max_batch=4, progress=False, command="test")
    return root


def _counted(net):
    """Wrap a bundle network's ``run`` to record the (x rows, h shape) of every call."""
    calls, run = [], net.run

    def counting(feeds):
        calls.append((feeds["x"].shape[0], feeds["h"].shape))
        return run(feeds)

    net.run = counting
    return calls


def test_bundle_declares_offsets_axis_and_matches_torch_in_a_ba_solve(poly_bundle):
    import json

    from anchorflow.runtime import load_bundle, solve
    from anchorflow.trainers.checkpoint import load_checkpoint
    from anchorflow.trainers.torch_wrappers import TorchSideNet, TorchVelocity

    entry = json.loads((poly_bundle / "bundle" / "bundle.json").read_text())["networks"]["sidenet"]
    h = next(i for i in entry["inputs"] if i["name"] == "h")
    assert h["shape"] == ["offsets", "batch"] and entry["outputs"][0]["shape"] == ["offsets", "batch", 1, 8, 8]
    assert entry["axes"]["offsets"] == {"min": 1, "opt": 4, "max": 4}
    bundle = load_bundle(poly_bundle / "bundle", threads=1)
    assert bundle.sidenet.shared_body
    calls = _counted(bundle.sidenet)
    rng = np.random.default_rng(0)
    b, nfe = 3, 5
    noise = rng.standard_normal((b, 1, 8, 8)).astype(np.float32)
    kw = {"y": np.arange(b), "null_label": 10, "cfg_scale": 1.5, "cfg_interval": (0.0, 0.7)}
    out = solve("ba", bundle.velocity, noise, nfe, sidenet=bundle.sidenet, **kw)
    assert out.nfe == nfe and len(calls) == nfe  # merged probes: one SideNet call per interval
    for rows, hshape in calls:  # one body row per anchor row: B or 2B (guided), never K x that
        assert rows in (b, 2 * b) and hshape[1] == rows and hshape[0] in (3, 4)
    # the same module in torch, evaluated per row on tiled inputs (the film SideNets' layout)
    side, _ = load_checkpoint(poly_bundle / "sidenet", kind="sidenet")
    tiled = TorchSideNet(side)
    tiled_call = tiled.__call__

    class PerRow:  # hide shared_body: the field tiles rows as for a film SideNet
        def __call__(self, x, v, t, hh, cond):
            return tiled_call(x, v, t, hh, cond)

    backbone, _ = load_checkpoint(poly_bundle / "backbone", kind="backbone")
    ref = solve("ba", TorchVelocity(backbone), noise, nfe, sidenet=PerRow(), **kw)
    # each network call agrees to <= 1e-4 (fp32 parity); 5 steps of size <= 1 keep it below 1e-3
    assert np.abs(out.x - ref.x).max() < 1e-3


def test_shared_body_calls_with_more_rows_than_exported_run_in_chunks(poly_bundle):
    from anchorflow.runtime import load_bundle

    bundle = load_bundle(poly_bundle / "bundle", threads=1)
    top = bundle.sidenet.decl.batch[2]
    n = top + 3
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    v = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    t = rng.random(n).astype(np.float32)
    h = (rng.random((4, n)) * t - 0.05).astype(np.float32)
    y = rng.integers(0, 11, n)
    calls = _counted(bundle.sidenet)
    chunked = bundle.sidenet(x, v, t, h, {"y": y})
    assert [c[0] for c in calls] == [top, 3]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(poly_bundle / "bundle" / "sidenet.onnx"), providers=["CPUExecutionProvider"])
    whole = sess.run(None, {"x": x, "v": v, "t": t, "h": h, "y": y.astype(np.int64)})[0]
    assert chunked.shape == (4, n, 1, 8, 8)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)


def test_tensorrt_profile_covers_the_offsets_axis(poly_bundle):
    import json

    from anchorflow.engines.profiles import bundle_rows, network_specs, profile_for

    meta = json.loads((poly_bundle / "bundle" / "bundle.json").read_text())
    rows = bundle_rows(meta)["sidenet"]
    profile = profile_for(network_specs(meta)["sidenet"], rows)
    lo, _, hi = profile.shapes["h"]
    assert lo == (1, rows[0]) and hi == (4, rows[2])  # 1..4 offsets (BA's merged probe) on every row count
    assert profile.shapes["x"][2] == (rows[2], 1, 8, 8)  # x keeps the anchor rows: no K x tiling


@pytest.mark.slow
def test_diffusers_backbone_poly_sidenet_trains_exports_and_runs_on_anchor_rows(tmp_path, monkeypatch):
    """`train sidenet --offset poly3` on a tiny SD3 transformer (data-free) -> `export --sidenet`:
    h declared (offsets, batch), onnxruntime == torch per call, and a guided BA solve feeds the
    SideNet the anchor rows only."""
    pytest.importorskip("diffusers")
    import json

    from test_train_sidenet_adapters import _conds, _run_cli, _tiny

    from anchorflow.runtime import load_bundle, solve
    from anchorflow.trainers.adapters import load_source
    from anchorflow.trainers.sidenet import load_sidenet
    from anchorflow.trainers.torch_wrappers import TorchSideNet

    _tiny("sd3", tmp_path / "sd3")
    cond = _conds(tmp_path / "cond.npz", 3, 0)
    null = _conds(tmp_path / "null.npz", 1, 1)
    _run_cli(["train", "sidenet", "--backbone", str(tmp_path / "sd3"), "--out", str(tmp_path / "side"), "--data", "none",
              "--cond", str(tmp_path / "cond.npz"), "--null-cond", str(tmp_path / "null.npz"), "--iters", "2",
              "--batch", "4", "--chain", "2", "--width", "8", "--lr", "1e-2", "--start-states", "4",
              "--solve-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--offset", "poly3"], monkeypatch)
    adapter = load_source(str(tmp_path / "sd3"))
    side = load_sidenet(tmp_path / "side", adapter)
    assert side.shared_body and side.checkpoint_config["arch"]["offset"] == "poly3"
    with torch.no_grad():  # 2 iterations barely move the zero-initialised head: give it weights
        torch.nn.init.normal_(side.conv_out.weight, std=0.1)
    bundle = tmp_path / "bundle"
    from anchorflow.export.adapter_export import export_adapter

    export_adapter(adapter, bundle, max_batch=2, sidenet=side)
    entry = json.loads((bundle / "bundle.json").read_text())["networks"]["sidenet"]
    h = next(i for i in entry["inputs"] if i["name"] == "h")
    assert h["shape"] == ["offsets", "batch"] and entry["validation"]["passed"]
    m = load_bundle(bundle, backend="ort-cpu")
    assert m.sidenet.shared_body
    r, n = np.random.default_rng(3), 2
    shape = (n, *adapter.spec.state_shape())
    x, v = r.standard_normal(shape).astype(np.float32), r.standard_normal(shape).astype(np.float32)
    t = np.array([0.9, 0.4], np.float32)
    hh = np.array([[0.2, -0.1], [0.05, 0.3], [-0.2, 0.1]], np.float32)
    rows = {k: val[[0, 2]] for k, val in cond.items()}
    np.testing.assert_allclose(m.sidenet(x, v, t, hh, rows), TorchSideNet(side)(x, v, t, hh, rows), atol=1e-4, rtol=0)
    calls = _counted(m.sidenet)
    noise = r.standard_normal(shape).astype(np.float32)
    guided = dict(cond=rows, null_cond=null, cfg_scale=2.0)
    got = solve("ba", m.velocity, noise, 4, sidenet=m.sidenet, **guided)
    assert len(calls) == 4 and all(rows_ in (n, 2 * n) and hs[1] == rows_ for rows_, hs in calls)
    ref = solve("ba", adapter.call_numpy, noise, 4, sidenet=TorchSideNet(side), **guided)
    np.testing.assert_allclose(got.x, ref.x, atol=1e-3, rtol=0)  # <= 1e-4 per call over 4 steps

"""SideNet (trainers/sidenet.py) and the torch reference samplers (trainers/reference_sampler.py).

Truths used: exact zeros by construction (zero-init output, delta = h * f), per-sample
independence (batched == separate calls), torch vs onnxruntime, closed-form fields whose
integral is known (polynomial velocities: 4-point Gauss-Lobatto is exact up to degree 5).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anchorflow.base.errors import CheckpointError, ConfigError  # noqa: E402
from anchorflow.trainers.backbone import DiT, build_backbone  # noqa: E402
from anchorflow.trainers.checkpoint import read_config, save_checkpoint  # noqa: E402
from anchorflow.trainers.reference_sampler import (  # noqa: E402
    GAUSS_LOBATTO_A, ba_sample_torch, euler_sample_torch, quadrature_weights)
from anchorflow.trainers.sidenet import (  # noqa: E402
    DEFAULTS, SideNet, backbone_identity, count_params, load_sidenet, sidenet_arch)

torch.set_num_threads(1)
# float32 math on O(1) values: two evaluations of the same function in different batch layouts
# differ by a few ulps (~1e-7); 1e-5 leaves room for BLAS blocking differences, not for bugs.
TOL_LAYOUT = 1e-5
# closed-form checks run in float64: a few hundred roundings of O(10) values stay far below 1e-10
TOL_EXACT = 1e-10

TINY = {"width": 8, "cond_dim": 16, "freq_dim": 16, "groups": 4, "heads": 2, "blocks": 2}
# the full-resolution body (paper) and the patchified one (space-to-depth stem, one ResBlock)
BODIES = {"full": {}, "patch2": {"patch": 2, "blocks": 1}}


def make_sidenet(state_shape=(1, 4, 4), classes=3, seed=0, trained_like=True, body="full") -> SideNet:
    """A small SideNet; ``trained_like`` gives the zero-initialised output layer random weights."""
    torch.manual_seed(seed)
    net = SideNet({**TINY, **BODIES[body], "state_shape": list(state_shape), "num_classes": classes,
                   "null_label": classes})
    if trained_like:
        torch.nn.init.normal_(net.conv_out.weight, std=0.3)
        torch.nn.init.normal_(net.conv_out.bias, std=0.3)
    return net.eval()


def inputs(b, state_shape=(1, 4, 4), classes=3, seed=1, h_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *state_shape, generator=g)
    v = torch.randn(b, *state_shape, generator=g)
    t = torch.rand(b, generator=g)
    h = (torch.rand(b, generator=g) * 2 - 1) * h_scale
    y = torch.randint(0, classes + 1, (b,), generator=g)
    return x, v, t, h, y


@pytest.mark.parametrize("state_shape,body", [((1, 4, 4), "full"), ((3, 2, 6), "full"), ((2,), "full"),
                                              ((1, 4, 4), "patch2"), ((3, 2, 6), "patch2")])
def test_untrained_sidenet_is_exactly_zero(state_shape, body):
    net = make_sidenet(state_shape, trained_like=False, body=body)
    x, v, t, h, y = inputs(6, state_shape)
    with torch.no_grad():
        delta = net(100 * x, 100 * v, t, h, y)
    assert delta.shape == x.shape
    assert torch.count_nonzero(delta) == 0


@pytest.mark.parametrize("body", BODIES)
def test_zero_offset_gives_exactly_zero_for_any_weights(body):
    net = make_sidenet(body=body)
    x, v, t, _, y = inputs(5)
    with torch.no_grad():
        assert torch.count_nonzero(net(x, v, t, torch.zeros(5), y)) == 0
        assert torch.count_nonzero(net(x, v, t, torch.full((5,), 0.1), y)) > 0  # the net is not trivially zero


@pytest.mark.parametrize("body", BODIES)
def test_batched_per_sample_offsets_equal_separate_calls(body):
    net = make_sidenet(body=body)
    x, v, t, h, y = inputs(7)
    with torch.no_grad():
        batched = net(x, v, t, h, y)
        single = torch.cat([net(x[i:i + 1], v[i:i + 1], t[i:i + 1], h[i:i + 1], y[i:i + 1]) for i in range(7)])
    assert torch.allclose(batched, single, atol=TOL_LAYOUT, rtol=0)


def test_sign_of_offset_matters():
    """h and -h are different requests (toward data / toward noise), not mirror images."""
    net = make_sidenet()
    x, v, t, h, y = inputs(4, h_scale=0.2)
    with torch.no_grad():
        assert not torch.allclose(net(x, v, t, h.abs(), y), -net(x, v, t, -h.abs(), y))


def test_size_is_one_to_two_percent_of_the_digits_backbone():
    backbone = DiT()  # the bundled digits backbone's architecture (~1.2 M parameters)
    arch = sidenet_arch(backbone)
    ratio = count_params(SideNet(arch)) / count_params(backbone)
    assert 0.01 <= ratio <= 0.02, ratio
    assert sidenet_arch(backbone, width=8)["width"] == 8


def test_bad_architecture_is_refused():
    with pytest.raises(ConfigError, match="state of shape"):
        SideNet({**DEFAULTS, "state_shape": [2, 3], "num_classes": 2, "null_label": 2})
    with pytest.raises(ConfigError, match="divisible by groups"):
        SideNet({**DEFAULTS, "width": 10, "state_shape": [1, 4, 4], "num_classes": 2, "null_label": 2})
    with pytest.raises(ConfigError, match="ratio"):
        sidenet_arch(DiT((1, 4, 4), num_classes=2, hidden=16, depth=1, heads=2), ratio=2.0)
    for patch in (3, 0, 2.0):  # 3 does not divide 4 x 4
        with pytest.raises(ConfigError, match="patch"):
            SideNet({**DEFAULTS, "patch": patch, "state_shape": [1, 4, 4], "num_classes": 2, "null_label": 2})


def test_patch_body_runs_on_the_coarse_grid_and_unpatchifies_exactly():
    """patch 2 on 8 x 8: the body (attention included) runs on 4 x 4 positions, and depth-to-space
    puts output channel k of patch (i, j) at pixel (2i + k // 2, 2j + k % 2): with zero weights and a
    unit bias on channel k, delta (h = 1) is exactly 1 on those pixels and 0 elsewhere."""
    net = make_sidenet((1, 8, 8), classes=10, body="patch2", trained_like=False)
    assert net.attn.hw == (4, 4) and net.conv_in.in_channels == 8 and net.conv_out.out_channels == 4
    x, v, t, _, y = inputs(2, (1, 8, 8), 10)
    for k in range(4):
        with torch.no_grad():
            net.conv_out.bias.zero_()
            net.conv_out.bias[k] = 1.0
            delta = net(x, v, t, torch.ones(2), y)
        lit = torch.zeros(8, 8)
        lit[k // 2::2, k % 2::2] = 1.0
        assert torch.equal(delta, lit.expand_as(delta))


def test_default_arch_without_patch_key_loads_old_checkpoints(tmp_path):
    """Checkpoints written before the ``patch`` option have no such key: they build the same
    full-resolution net and load bit-exactly."""
    from anchorflow.trainers.checkpoint import load_checkpoint

    net = make_sidenet((1, 8, 8), classes=10)
    old_arch = {k: v for k, v in net.arch.items() if k != "patch"}
    save_checkpoint(tmp_path / "old", net, {"kind": "sidenet", "arch": old_arch})
    loaded, _ = load_checkpoint(tmp_path / "old", kind="sidenet")
    assert loaded.patch == 1
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("body", BODIES)
def test_onnx_export_with_dynamic_batch_matches_torch(tmp_path, body):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = make_sidenet((1, 8, 8), classes=10, body=body)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(net, inputs(3, (1, 8, 8), 10), str(tmp_path / "s.onnx"),
                      input_names=["x", "v", "t", "h", "y"], output_names=["delta"],
                      dynamic_shapes=[{0: batch}] * 5, dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 11):
        x, v, t, h, y = inputs(b, (1, 8, 8), 10, seed=b)
        got = sess.run(None, {"x": x.numpy(), "v": v.numpy(), "t": t.numpy(), "h": h.numpy(), "y": y.numpy()})[0]
        with torch.no_grad():
            want = net(x, v, t, h, y).numpy()
        np.testing.assert_allclose(got, want, atol=TOL_LAYOUT, rtol=0)


# -- the backbone a SideNet belongs to ---------------------------------------------------------
def _backbone_ckpt(path, shape=(1, 4, 4), classes=3, seed=0):
    torch.manual_seed(seed)
    arch = {"type": "dit", "state_shape": list(shape), "num_classes": classes, "hidden": 16, "depth": 1,
            "heads": 2, "patch": 2}
    save_checkpoint(path, build_backbone(arch), {"kind": "backbone", "arch": arch})
    return read_config(path)


def test_load_sidenet_refuses_a_foreign_backbone(tmp_path):
    own = _backbone_ckpt(tmp_path / "own")
    net = make_sidenet()
    identity = {**backbone_identity(build_backbone(own["arch"]), own), "path": "../own"}
    save_checkpoint(tmp_path / "side", net, {"kind": "sidenet", "arch": net.arch, "backbone": identity})
    loaded = load_sidenet(tmp_path / "side", own)
    assert loaded.checkpoint_config["backbone"]["weights_sha256"] == own["weights_sha256"]
    cases = {"weights_sha256": _backbone_ckpt(tmp_path / "reseeded", seed=1),
             "num_classes": _backbone_ckpt(tmp_path / "classes", classes=4),
             "state_shape": _backbone_ckpt(tmp_path / "shape", shape=(2, 4, 4))}
    for key, cfg in cases.items():
        with pytest.raises(CheckpointError, match=key):
            load_sidenet(tmp_path / "side", cfg)
    with pytest.raises(CheckpointError, match="holds a backbone"):
        load_sidenet(tmp_path / "own", own)


def test_in_memory_identity_hash_equals_the_checkpoint_file_hash(tmp_path):
    cfg = _backbone_ckpt(tmp_path / "b")
    torch.manual_seed(0)  # the same seed as _backbone_ckpt: the same weights
    module = build_backbone(cfg["arch"])
    assert backbone_identity(module)["weights_sha256"] == cfg["weights_sha256"]


# -- reference samplers on closed-form fields --------------------------------------------------
class PolyField(torch.nn.Module):
    """v(x, t, y) = g_y(t) * P, independent of x, g_y a degree-5 polynomial per label (null = last row).

    The exact sample is ``noise - P * integral_0^1 g_y(t) dt``; an oracle SideNet returns
    ``(g_y(t - h) - g_y(t)) * P``. A guided field v_u + s (v_c - v_u) is again such a polynomial.
    """

    state_shape, num_classes, null_label = (1, 2, 2), 2, 2

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.coefs = torch.randn(3, 6, generator=g, dtype=torch.float64)
        self.pattern = torch.randn(1, *self.state_shape, generator=g, dtype=torch.float64)

    def g(self, t, y):
        powers = t.double()[:, None] ** torch.arange(6, dtype=torch.float64)
        return (self.coefs[y] * powers).sum(1)

    def forward(self, x, t, y):
        return (self.g(t, y)[:, None, None, None] * self.pattern).to(x.dtype)

    def oracle(self, x, v, t, h, y):
        return ((self.g(t - h, y) - self.g(t, y))[:, None, None, None] * self.pattern).to(x.dtype)

    def integral(self, y, scale=1.0):
        mean = self.coefs / torch.arange(1, 7, dtype=torch.float64)  # integral of t^k over [0, 1]
        total = mean[self.null_label].sum() + scale * (mean[y].sum(1) - mean[self.null_label].sum())
        return total[:, None, None, None] * self.pattern


@pytest.mark.parametrize("nfe", [1, 2, 5])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_ba_with_oracle_sidenet_integrates_quintics_exactly(nfe, cfg_scale):
    field = PolyField()
    noise = torch.randn(4, *field.state_shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    x = ba_sample_torch(field, field.oracle, noise, y, nfe, cfg_scale=cfg_scale)
    torch.testing.assert_close(x, noise - field.integral(y, cfg_scale), atol=TOL_EXACT, rtol=0)


@pytest.mark.parametrize("a", [GAUSS_LOBATTO_A, 1 / 3, 0.25])
def test_quadrature_weights(a):
    w_out, w_in = quadrature_weights(a)
    nodes, weights = np.array([0, a, 1 - a, 1]), np.array([w_out, w_in, w_in, w_out])
    for k in range(4):  # every symmetric 4-node rule of this family is exact for cubics
        assert abs(weights @ nodes ** k - 1 / (k + 1)) < 1e-12
    if a == GAUSS_LOBATTO_A:
        np.testing.assert_allclose(weights, [1 / 12, 5 / 12, 5 / 12, 1 / 12], atol=1e-15)


def test_euler_reference_closed_form_and_call_count():
    calls = []

    class Linear(PolyField):
        def forward(self, x, t, y):
            calls.append(1)
            return (t[:, None, None, None] * torch.ones_like(x)).to(x.dtype)

    field, n = Linear(), 4
    noise = torch.zeros(2, *field.state_shape, dtype=torch.float64)
    x = euler_sample_torch(field, noise, torch.tensor([0, 1]), n)
    # sum_i h * t_i with t_i = 1 - i/N, i < N: (N + 1) / (2 N)
    torch.testing.assert_close(x, torch.full_like(x, -(n + 1) / (2 * n)), atol=1e-12, rtol=0)
    assert len(calls) == n


def test_ba_reference_makes_exactly_nfe_backbone_calls():
    calls = []
    field = PolyField()
    counted = lambda x, t, y: calls.append(1) or field(x, t, y)  # noqa: E731
    counted.null_label = field.null_label
    ba_sample_torch(counted, field.oracle, torch.zeros(1, *field.state_shape), None, 6, cfg_scale=1.5)
    assert len(calls) == 6


def test_reference_euler_matches_numpy_runtime_with_guidance():
    """The torch reference applies guidance on the same rows and interval as the runtime's GuidedField."""
    from anchorflow.runtime import solve

    torch.manual_seed(0)
    backbone = DiT((1, 4, 4), num_classes=3, hidden=16, depth=1, heads=2).eval()
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.2)

    def velocity(x, t, cond):
        with torch.no_grad():
            return backbone(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond["y"])).numpy()

    noise = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2])
    opts = {"cfg_scale": 2.0, "cfg_interval": (0.3, 0.8)}
    got = solve("euler", velocity, noise, 5, y=y, null_label=3, **opts).x
    want = euler_sample_torch(backbone, torch.from_numpy(noise), torch.from_numpy(y), 5, **opts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [{}, {"cfg_scale": 1.5, "cfg_interval": (0.0, 0.7)}])
@pytest.mark.parametrize("nfe", [2, 5])
def test_numpy_runtime_ba_matches_torch_reference(guidance, nfe):
    """Same weights, same noise: the torch-free runtime's BA-solver equals the torch reference.

    1e-4: float32 through ~20 network calls on O(1) values, summed in a different order."""
    from anchorflow.runtime import solve
    from anchorflow.trainers.torch_wrappers import TorchSideNet, TorchVelocity

    torch.manual_seed(0)
    backbone = DiT((1, 4, 4), num_classes=3, hidden=16, depth=1, heads=2).eval()
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    side = make_sidenet((1, 4, 4), classes=3)
    noise = np.random.default_rng(1).standard_normal((4, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    got = solve("ba", TorchVelocity(backbone), noise, nfe, y=y, sidenet=TorchSideNet(side), null_label=3,
                probes="paper", **guidance)  # the torch oracle implements the paper's probes
    want = ba_sample_torch(backbone, side, torch.from_numpy(noise), torch.from_numpy(y), nfe, **guidance).numpy()
    assert got.nfe == nfe
    np.testing.assert_allclose(got.x, want, atol=1e-4, rtol=0)


# -- body resolution by default ------------------------------------------------------------------
@pytest.mark.parametrize("shape, patch, want", [
    ((4, 32, 32), 2, 2),   # DiT-S/2-like latent: body at the backbone's patch grid
    ((4, 16, 16), 4, 4),
    ((1, 8, 8), 2, 1),     # small latents (the digits) keep the full-resolution body
    ((4, 18, 18), 4, 1),   # a patch that does not divide the latent is not used
])
def test_sidenet_body_defaults_to_the_backbone_patch_for_large_latents(shape, patch, want):
    backbone = DiT(state_shape=shape, num_classes=3, hidden=16, depth=1, heads=2, patch=patch) \
        if shape[1] % patch == 0 else type("B", (), {"state_shape": shape, "patch": patch, "num_classes": 3,
                                                      "null_label": 3})()
    arch = sidenet_arch(backbone, width=8, **{k: v for k, v in TINY.items() if k != "width"})
    assert arch["patch"] == want
    assert sidenet_arch(backbone, width=8, patch=1)["patch"] == 1  # an explicit choice wins


def test_the_bundled_digits_sidenet_loads_bit_exactly_with_its_recorded_arch():
    from safetensors.torch import load_file

    from anchorflow.modelref import BUNDLED
    from anchorflow.trainers.checkpoint import load_checkpoint

    folder = BUNDLED / "digits" / "sidenet"
    net, cfg = load_checkpoint(folder, kind="sidenet")
    assert net.patch == cfg["arch"].get("patch", 1) == 1
    stored = load_file(str(folder / "model.safetensors"))
    assert stored.keys() == net.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())

"""Backbone adapters (trainers/adapters): each equals its model called in its own convention.

Truths: the diffusers transformer called as its pipeline calls it (SD3/Sana timestep = 1000 sigma,
FLUX timestep = sigma with the pipeline's own packing and position ids, float64 rotary embedding),
and our DiT called directly. Time convention: t = 1 noise (= sigma), t = 0 data.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_diffusers import FAMILIES, build, save  # noqa: E402

from anchorflow.trainers.adapters import load_source  # noqa: E402
from anchorflow.trainers.adapters.base import AdapterSpec, Condition  # noqa: E402

# fp32, same weights: SD3 same ops (its crop as a gather picks the same values): 0. FLUX runs its rotary
# embedding in float32 where diffusers uses float64, Sana its cross-attention without SDPA (another
# summation order): errors ~1e-7 relative on O(1) outputs (measured <= 4e-7) -> 1e-5 is a 25x margin.
TOL = {"sd3": 0.0, "sana": 1e-5, "flux-dev": 1e-5, "flux-schnell": 1e-5}


def _reference(family: str, model, x, t, cond):
    """The transformer as its diffusers pipeline calls it."""
    from diffusers import FluxPipeline

    with torch.no_grad():
        if family.startswith("flux"):
            b, c, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, c, h, w)
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            txt = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
            out = model(hidden_states=packed, timestep=t, img_ids=ids, txt_ids=txt, return_dict=False, **cond)[0]
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
        return model(hidden_states=x, timestep=1000.0 * t, return_dict=False, **cond)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_adapter_equals_the_pipeline_convention(family, tmp_path):
    adapter = load_source(str(save(family, tmp_path / family)))
    spec = adapter.spec
    ex = spec.example(3, np.random.default_rng(0), L=5)
    x, t = torch.from_numpy(ex.pop("x")), torch.from_numpy(ex.pop("t"))
    cond = {k: torch.from_numpy(v) for k, v in ex.items()}
    with torch.no_grad():
        got = adapter(x, t, cond)
    want = _reference(family, build(family), x, t, cond)
    assert got.shape == x.shape and float((got - want).abs().max()) <= TOL[family]
    names = [c.name for c in spec.conditions]
    assert names[:1] == ["encoder_hidden_states"] and ("guidance" in names) == (family == "flux-dev")
    assert spec.guidance["mode"] == {"flux-dev": "embedded", "flux-schnell": "none"}.get(family, "rows")
    assert spec.time == ({"map": "identity"} if family.startswith("flux") else {"map": "scale", "scale": 1000.0})


def test_native_adapter_is_the_dit_with_the_null_label():
    from anchorflow.trainers.adapters.native import NativeAdapter
    from anchorflow.trainers.backbone import DiT

    torch.manual_seed(0)
    dit = DiT((1, 4, 4), num_classes=3, hidden=16, depth=1, heads=2).eval()
    a = NativeAdapter(dit)
    x, t, y = torch.randn(2, 1, 4, 4), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(a(x, t, {"y": y}), dit(x, t, y))
        assert torch.equal(a(x, t, None), dit(x, t, torch.full((2,), 3)))
    assert a.spec.to_bundle()["guidance"] == {"mode": "rows", "null": {"y": 3}}
    assert a.spec.to_bundle()["model"]["num_classes"] == 3


class Toy(torch.nn.Module):
    """A user's own velocity model: v = x * w + mean_L(text) in the model's time (t' = 1 - t)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, tau, text):
        return x * self.w * tau[:, None, None, None] + text.mean(1)[:, :, None, None]


def make_backbone():
    spec = {"name": "toy", "state": (2, "H", "W"), "axes": {"H": (2, 4, 8), "W": (2, 4, 8), "L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 2)}],
            "time": {"map": "flip"}, "guidance": {"mode": "rows"}}
    return Toy(), spec


def test_factory_in_a_test_file_applies_the_time_map():
    adapter = load_source("test_adapters:make_backbone")
    x, t, text = torch.randn(2, 2, 4, 4), torch.tensor([0.25, 1.0]), torch.randn(2, 3, 2)
    with torch.no_grad():
        v = adapter(x, t, {"text": text})
        want = -Toy()(x, 1.0 - t, text)  # flip: model time 1 - t and dx/dt = -dx/dt'
    assert torch.allclose(v, want) and adapter.spec.state_shape() == (2, 4, 4)


def test_spec_refuses_an_axis_without_range():
    from anchorflow.base.errors import ConfigError

    with pytest.raises(ConfigError, match=r"axes \['L'\] have no \(min, opt, max\) range"):
        AdapterSpec(name="x", state=(1, 2, 2), conditions=(Condition("e", "float32", ("batch", "L")),))

"""run_ba with a real SideNet: trained by ``anchorflow train sidenet`` for a tiny SD3 or FLUX
transformer and exported with it by ``anchorflow export`` into one bundle.

Truth: the torch-free runtime's ``solve("ba")`` on that bundle (onnxruntime backbone and SideNet),
started from the pipeline's own latents and prompts. run_ba runs the same SideNet graph but the
pipeline's torch transformer, so the two differ by the export's measured ONNX parity only; a
counting hook on the transformer gives the exact number of calls. Time: t = sigma, 1 noise -> 0 data.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from _tiny_pipelines import B, CallCount as _Count, build, inputs  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from diffusers.hooks import HookRegistry  # noqa: E402

from anchorflow.cli import cli  # noqa: E402
from anchorflow.integrations.diffusers import capture_pipeline, run_ba  # noqa: E402
from anchorflow.integrations.diffusers.capture import pack  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402
from anchorflow.runtime.bundles.load import load_bundle  # noqa: E402

N = 5


def _cli(args: list[str]) -> None:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, f"{args[:2]}: {res.output[-2000:]}"


SIZE = {"sd3": 64, "flux": 128}  # pixels: the adapters' default latents, 8x8 (SD3) and 16x16 (FLUX)


def _inputs(kind: str, cfg: float, steps: int) -> dict:
    return {**inputs(kind, cfg, steps), "height": SIZE[kind], "width": SIZE[kind]}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny(request, tmp_path_factory):
    """(kind, pipeline, bundle folder): a tiny SD3 or FLUX (schnell-like) transformer, a data-free
    SideNet trained for it by the CLI (8 iterations), both exported by one ``anchorflow export FOLDER --sidenet CKPT``."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"ba_bundle_{kind}")
    pipe = build(kind, root / "transformer")
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)  # training prompts: not the ones the tests sample with
    np.savez(root / "cond.npz", encoder_hidden_states=torch.randn(4, 5, 16, generator=g).numpy(),
             pooled_projections=torch.randn(4, 8, generator=g).numpy())
    np.savez(root / "null.npz", encoder_hidden_states=torch.randn(1, 5, 16, generator=g).numpy(),
             pooled_projections=torch.randn(1, 8, generator=g).numpy())
    null = ["--null-cond", str(root / "null.npz")] if kind == "sd3" else []  # FLUX: no guidance rows
    _cli(["train", "sidenet", "--backbone", str(root / "transformer"), "--out", str(root / "side"), "--data", "none",
          "--cond", str(root / "cond.npz"), *null, "--iters", "8", "--batch", "4", "--chain", "2", "--width", "8",
          "--lr", "1e-2", "--start-states", "4", "--solve-steps", "2", "--ckpt-every", "8",
          "--cache-dir", str(root / "cache")])
    _cli(["export", str(root / "transformer"), "--sidenet", str(root / "side"), "--out", str(root / "bundle"),
          "--max-batch", str(B), "--axis", "L=1:5:8"])
    return kind, pipe, root / "bundle"


def _tolerance(bundle, cfg: float) -> float:
    """The per-call ONNX-vs-torch error P of the backbone (bundle.json, measured at export) becomes
    g P per unit of time in the guided velocity, g = |1 - s| + s (both rows off by <= P); the SideNet
    is the same ONNX graph on both sides and only sees that velocity error (its weights are tiny).
    Integrated over t in [1, 0] by a Lipschitz ~1 field it grows by at most e^1 < 4: 4 g P."""
    meta = json.loads((bundle / "bundle.json").read_text())
    parity = meta["networks"]["backbone"]["validation"]["worst"]["max_abs"]
    return 4.0 * (abs(1.0 - cfg) + cfg) * parity


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_run_ba_equals_solve_on_the_exported_bundle_with_exactly_n_calls(tiny, cfg):
    kind, pipe, folder = tiny
    bundle = load_bundle(folder, backend="ort-cpu")
    assert bundle.sidenet is not None
    count = _Count()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(count, "count")
    kw = _inputs(kind, cfg, N)
    del kw["num_inference_steps"]
    try:
        out = run_ba(pipe, bundle.sidenet, N, **kw)
    finally:
        registry.remove_hook("count", recurse=False)
    field = capture_pipeline(pipe, **_inputs(kind, cfg, N))  # the pipeline's latents, prompts and sigmas
    assert count.calls == field.calls_per_step * N  # FLUX true CFG: its cond and uncond call per step
    assert out.anchorflow.nfe == N and out.anchorflow.sidenet_calls == N

    noise = field.latent_noise()  # FLUX: (B, 4, 16, 16), the bundle's layout
    assert noise.shape[1:] == tuple(bundle.state_shape)
    ref = solve("ba", bundle.velocity, noise, N, sidenet=bundle.sidenet, **field.solve_kwargs())
    assert ref.nfe == N
    tol = _tolerance(folder, cfg)
    # measured (cfg 1 / 2): SD3 7.2e-7 / 8.3e-7 against tol 4.3e-6 / 1.3e-5 (P = 1.07e-6); FLUX 7.2e-7 / 7.2e-7
    # against 3.8e-6 / 1.1e-5 (P = 9.5e-7; the pipeline's float64 rotary embedding vs the bundle's float32 one included)
    np.testing.assert_allclose(out.anchorflow.x, ref.x, rtol=0, atol=tol)
    # output_type="latent": the pipeline hands back its own latents as they are (FLUX: packed tokens)
    np.testing.assert_array_equal(out.images.float().numpy(), pack(out.anchorflow.x) if field.packed else out.anchorflow.x)

    # The trained SideNet matters far above that tolerance: BA without it is AB2 (measured 0.056-0.062).
    ab2 = solve("ab2", bundle.velocity, noise, N, **field.solve_kwargs()).x
    assert np.abs(ab2 - ref.x).max() > 100 * tol
    assert math.isfinite(float(np.abs(out.anchorflow.x).max()))

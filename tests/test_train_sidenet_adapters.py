"""SideNets for third-party backbones: tiny random-init diffusers SD3 and FLUX (schnell) transformers
through the adapter (trainers/adapters), data-free and with conditions from a file; exported to
ONNX with their conditions declared (`anchorflow export FOLDER --sidenet CKPT`, one bundle) and
sampled with BA through the CLI and the runtime."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from anchorflow.base.errors import CheckpointError  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402
from anchorflow.trainers.adapters import load_source  # noqa: E402
from anchorflow.trainers.sidenet import load_sidenet  # noqa: E402
from anchorflow.trainers.torch_wrappers import TorchSideNet  # noqa: E402

torch.set_num_threads(1)
TEXT_DIM, POOLED = 16, 8


def _tiny(kind: str, folder, seed: int = 0) -> None:
    torch.manual_seed(seed)
    if kind == "sd3":
        net = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
            pooled_projection_dim=POOLED, pos_embed_max_size=8)
    else:
        net = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED, guidance_embeds=False,
            axes_dims_rope=(2, 2, 4))
    net.save_pretrained(str(folder))


def _conds(path, rows: int, seed: int) -> dict:
    r = np.random.default_rng(seed)
    c = {"encoder_hidden_states": r.standard_normal((rows, 4, TEXT_DIM)).astype(np.float32),
         "pooled_projections": r.standard_normal((rows, POOLED)).astype(np.float32)}
    np.savez(path, **c)
    return c


def _run_cli(args, monkeypatch) -> None:
    from anchorflow.cli import main

    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code


class Counting:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.fn(x, t, cond)


def _cli_error(args, monkeypatch, capsys) -> str:
    from anchorflow.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_folder_train_export_sample_one_bundle_with_exactly_n_calls(kind, tmp_path, monkeypatch, capsys):
    """diffusers folder -> `train sidenet` (data-free, --cond FILE) -> `export FOLDER --sidenet CKPT`
    -> `sample BUNDLE --solver ba`: N backbone calls, ONNX == torch, other backbones refused."""
    import json

    from anchorflow.runtime.bundles.load import load_bundle

    _tiny(kind, tmp_path / kind)
    cond = _conds(tmp_path / "cond.npz", 3, 0)
    null = _conds(tmp_path / "null.npz", 1, 1)
    args = ["train", "sidenet", "--backbone", str(tmp_path / kind), "--out", str(tmp_path / "side"), "--data", "none",
            "--cond", str(tmp_path / "cond.npz"), "--iters", "2", "--batch", "4", "--chain", "2", "--width", "8",
            "--lr", "1e-2", "--start-states", "4", "--solve-steps", "2", "--cache-dir", str(tmp_path / "cache")]
    if kind == "sd3":  # CFG on [cond; empty prompt] rows; FLUX-schnell has no guidance rows
        args += ["--null-cond", str(tmp_path / "null.npz")]
    _run_cli(args, monkeypatch)
    adapter = load_source(str(tmp_path / kind))
    side = load_sidenet(tmp_path / "side", adapter)  # refused if the identity did not match
    cfg = side.checkpoint_config
    assert cfg["data"]["source"] == "data-free" and cfg["data"]["cond_rows"] == 3
    assert cfg["arch"]["cond"]["inputs"] == ["pooled_projections"]
    assert cfg["training"]["null_rows"] == (0.1 if kind == "sd3" else 0.0)
    assert cfg["arch"]["patch"] == (1 if kind == "sd3" else 2)  # FLUX: 16 x 16 latent, 2 x 2 packing

    bundle = tmp_path / "bundle"
    _run_cli(["export", str(tmp_path / kind), "--sidenet", str(tmp_path / "side"), "--out", str(bundle),
              "--max-batch", "2"], monkeypatch)
    m = load_bundle(bundle, backend="ort-cpu")  # torch-free runtime
    entry = json.loads((bundle / "bundle.json").read_text())["networks"]["sidenet"]
    assert [d["name"] for d in entry["inputs"]] == ["x", "v", "t", "h", "pooled_projections"]
    assert entry["validation"]["passed"] and entry["checkpoint"]["backbone"] == cfg["backbone"]

    # the bundle's SideNet (onnxruntime) against the torch checkpoint on fresh inputs: fp32 parity,
    # the export's own bound (1e-4 max abs; both compute the same fp32 graph, ~1e-6 measured)
    r, n = np.random.default_rng(3), 2
    shape = (n, *adapter.spec.state_shape())
    x, v = r.standard_normal(shape).astype(np.float32), r.standard_normal(shape).astype(np.float32)
    t = np.array([0.9, 0.4], np.float32)
    h = np.array([0.2, -0.1], np.float32)
    rows = {k: val[[0, 2]] for k, val in cond.items()}
    np.testing.assert_allclose(m.sidenet(x, v, t, h, rows), TorchSideNet(side)(x, v, t, h, rows), atol=1e-4, rtol=0)

    nfe = 4
    noise = r.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    np.savez(tmp_path / "rows.npz", **rows)
    sample = ["sample", str(bundle), "--solver", "ba", "--nfe", str(nfe), "--noise", str(tmp_path / "noise.npy"),
              "--cond", str(tmp_path / "rows.npz"), "--npy", str(tmp_path / "s.npy")]  # latents: no --out
    guided = dict(cond=rows, null_cond=null, cfg_scale=2.0) if kind == "sd3" else dict(cond=rows)
    if kind == "sd3":
        sample += ["--null-cond", str(tmp_path / "null.npz"), "--cfg", "2"]
    capsys.readouterr()
    _run_cli(sample, monkeypatch)
    assert f"ba: {nfe} backbone calls, {nfe} SideNet calls" in capsys.readouterr().out
    got = np.load(tmp_path / "s.npy")
    vel = Counting(m.velocity)  # the bundle's backbone, counted outside the solver
    res = solve("ba", vel, noise, nfe, sidenet=m.sidenet, **guided)
    assert vel.calls == res.nfe == nfe and res.sidenet_calls == nfe  # merged probes: one SideNet call per step
    np.testing.assert_allclose(got, res.x, atol=1e-6, rtol=0)  # the CLI is this solve (same bundle, noise)
    ref = solve("ba", adapter.call_numpy, noise, nfe, sidenet=TorchSideNet(side), **guided)
    # ONNX backbone + SideNet vs torch inside the same solve: fp32 parity (<= 1e-4 per call, checked
    # at export) times a few O(1) quadrature weights per step over 4 steps -> well under 1e-3
    np.testing.assert_allclose(got, ref.x, atol=1e-3, rtol=0)

    _tiny(kind, tmp_path / "other", seed=1)  # same architecture, other weights
    line = _cli_error(["export", str(tmp_path / "other"), "--sidenet", str(tmp_path / "side"), "--out",
                       str(tmp_path / "b2")], monkeypatch, capsys)
    assert "trained for another backbone" in line and "weights_sha256" in line
    assert not (tmp_path / "b2").exists()


def test_sidenet_on_a_latent_folder_with_file_conditions_leaves_the_backbone_bit_identical(tmp_path):
    from anchorflow.trainers.cond_rows import as_cond_backbone
    from anchorflow.trainers.sidenet_run import SourceBackbone, training_set
    from anchorflow.trainers.sidenet import backbone_identity
    from anchorflow.trainers.train_sidenet import SideNetTrainSettings, train_sidenet

    _tiny("sd3", tmp_path / "sd3")
    adapter = load_source(str(tmp_path / "sd3"))
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    (tmp_path / "latents").mkdir()
    np.save(tmp_path / "latents" / "a.npy", np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32))
    _conds(tmp_path / "cond.npz", 5, 0)
    _conds(tmp_path / "null.npz", 1, 1)
    src = SourceBackbone(as_cond_backbone(adapter), backbone_identity(adapter), None)
    ts = training_set(src, str(tmp_path / "latents"), cond_file=str(tmp_path / "cond.npz"),
                      null_file=str(tmp_path / "null.npz"))
    assert ts.record["source"] == "folder" and ts.x.shape == (5, 4, 8, 8)
    s = SideNetTrainSettings(iters=2, chain=2, batch=4, lr=1e-2, width=8, ckpt_every=2,
                             sidenet_cond="encoder_hidden_states")
    cfg = train_sidenet(adapter, ts.x, ts.cond, tmp_path / "side", s, null_cond=ts.null, identity=src.identity,
                        data=ts.record, progress=False)
    after = adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in adapter.parameters())
    assert cfg["arch"]["cond"]["kind"] == "mean" and cfg["data"]["source"] == "folder"
    other = tmp_path / "other"
    _tiny("flux", other)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_sidenet(tmp_path / "side", load_source(str(other)))

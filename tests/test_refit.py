"""`anchorflow refit`: LoRAs fused into exported bundles without re-export, against diffusers / PEFT in torch.

Bundles come from the real exporter (tiny random-init diffusers SD3 and FLUX-dev folders, and a factory
module defined here); LoRAs are made by PEFT with random A and B (``init_lora_weights=False``) and
saved the way diffusers' ``save_lora_weights`` (with its adapter metadata) or PEFT's state dict does.
The yardstick is torch with the same LoRA loaded by diffusers (``load_lora_adapter`` + ``fuse_lora``)
or run unmerged by PEFT. Time: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from anchorflow.cli import cli  # noqa: E402
from anchorflow.runtime.bundles.load import load_bundle  # noqa: E402
from tiny_diffusers import save  # noqa: E402

# The export's fp32 parity bound (ORT vs torch, max abs) is 1e-4; the refitted graph is the same graph
# with other weights, so it must meet the same bound against torch with the LoRA fused.
PARITY = 1e-4
# fp16 variant against the fp32 refit: the export's fp16 rule is mean abs <= u + 32 u mean|ref|, u = 2^-11.
U16 = 2.0 ** -11
TARGETS = {"sd3": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
           "flux-dev": ["to_q", "to_k", "to_v", "proj_mlp", "proj_out"]}


def _export(args: list[str]) -> None:
    res = CliRunner().invoke(cli, ["export", *args, "--max-batch", "2"])
    assert res.exit_code == 0, res.output


def _diffusers_lora(family: str, folder: Path, out: Path, r: int, alpha: float, seed: int) -> Path:
    """A random LoRA for the transformer in ``folder``, saved as diffusers saves it (with metadata)."""
    from diffusers import FluxPipeline, SD3Transformer2DModel, FluxTransformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    pipe = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    torch.manual_seed(seed)
    tr = cls.from_pretrained(str(folder))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[family], init_lora_weights=False)
    tr.add_adapter(cfg)
    pipe.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(tr),
                           transformer_lora_adapter_metadata=cfg.to_dict())
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refit")
    out = {}
    for family, precision in (("sd3", "fp32,fp16"), ("flux-dev", "fp32")):
        src = save(family, root / f"{family}-src")
        _export([str(src), "--out", str(root / family), "--precision", precision])
        loras = [_diffusers_lora(family, src, root / f"{family}-lora{i}", r, a, i)
                 for i, (r, a) in enumerate(((4, 8.0), (2, 2.0)))]
        out[family] = {"src": src, "bundle": root / family, "loras": loras, "root": root}
    return out


def _inputs(family: str, rng) -> tuple:
    if family == "sd3":
        x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
        cond = {"encoder_hidden_states": rng.standard_normal((3, 5, 16)).astype(np.float32),
                "pooled_projections": rng.standard_normal((3, 8)).astype(np.float32)}
    else:
        x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)  # FLUX packs 2x2 inside the graph
        cond = {"encoder_hidden_states": rng.standard_normal((3, 5, 16)).astype(np.float32),
                "pooled_projections": rng.standard_normal((3, 8)).astype(np.float32),
                "guidance": np.full((3,), 3.5, np.float32)}
    return x, np.array([0.9, 0.5, 0.2], np.float32), cond


def _torch_velocity(src: Path, loras: list[tuple[Path, float]], x, t, cond) -> np.ndarray:
    """The adapter's forward on the transformer with ``loras`` loaded by diffusers at their scales."""
    from anchorflow.trainers.adapters import load_source

    adapter = load_source(str(src))
    names = [f"a{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        adapter.transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer",
                                              adapter_name=name)
    adapter.transformer.set_adapters(names, weights=[s for _, s in loras])
    if len(loras) == 1:
        adapter.transformer.fuse_lora(lora_scale=1.0)  # diffusers' own fuse, at the weight set above
    with torch.no_grad():
        return adapter(torch.from_numpy(x), torch.from_numpy(t), {k: torch.from_numpy(v) for k, v in cond.items()}).numpy()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_refit_equals_the_lora_fused_by_diffusers(families, family, tmp_path):
    f = families[family]
    out = tmp_path / "refit"
    res = CliRunner().invoke(cli, ["refit", str(f["bundle"]), "--lora", str(f["loras"][0]), "--scale", "0.8",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    x, t, cond = _inputs(family, np.random.default_rng(1))
    got = load_bundle(out, backend="ort-cpu").velocity(x, t, cond)
    want = _torch_velocity(f["src"], [(f["loras"][0], 0.8)], x, t, cond)
    base = load_bundle(f["bundle"], backend="ort-cpu").velocity(x, t, cond)
    assert np.abs(got - want).max() <= PARITY
    assert np.abs(base - want).max() > 100 * PARITY  # the LoRA changes the output: the test can fail
    rec = json.loads((out / "bundle.json").read_text())["lora"]
    assert rec["applied"][0]["scale"] == 0.8 and rec["applied"][0]["ranks"] == [4]
    from safetensors.numpy import load_file

    assert rec["applied"][0]["layers"] == sum(k.endswith("lora_A.weight") for k in load_file(str(f["loras"][0])))


def test_two_loras_with_their_scales_in_one_call(families, tmp_path):
    f = families["sd3"]
    out = tmp_path / "two"
    res = CliRunner().invoke(cli, ["refit", str(f["bundle"]), "--lora", str(f["loras"][0]), "--lora",
                                   str(f["loras"][1]), "--scale", "1.0", "--scale", "-0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    x, t, cond = _inputs("sd3", np.random.default_rng(2))
    want = _torch_velocity(f["src"], [(f["loras"][0], 1.0), (f["loras"][1], -0.5)], x, t, cond)
    assert np.abs(load_bundle(out, backend="ort-cpu").velocity(x, t, cond) - want).max() <= PARITY


def test_the_fp16_variant_is_refitted_too(families, tmp_path):
    f = families["sd3"]
    out = tmp_path / "half"
    assert CliRunner().invoke(cli, ["refit", str(f["bundle"]), "--lora", str(f["loras"][0]), "--out",
                                    str(out)]).exit_code == 0
    x, t, cond = _inputs("sd3", np.random.default_rng(3))
    full = load_bundle(out, backend="ort-cpu").velocity(x, t, cond)
    half = load_bundle(out, backend="ort-cpu", precision="fp16").velocity(x, t, cond)
    base16 = load_bundle(f["bundle"], backend="ort-cpu", precision="fp16").velocity(x, t, cond)
    bound = U16 + 32 * U16 * np.abs(full).mean()
    assert np.abs(half - full).mean() <= bound < np.abs(base16 - full).mean()


def test_refit_then_unfuse_gives_the_base_bundle_back_byte_for_byte(families, tmp_path):
    f = families["sd3"]
    fused, back = tmp_path / "fused", tmp_path / "back"
    assert CliRunner().invoke(cli, ["refit", str(f["bundle"]), "--lora", str(f["loras"][0]), "--out",
                                    str(fused)]).exit_code == 0
    assert CliRunner().invoke(cli, ["refit", str(fused), "--lora", str(f["loras"][1]), "--scale", "2"]).exit_code == 0
    assert _files(fused) != _files(f["bundle"])
    res = CliRunner().invoke(cli, ["refit", str(fused), "--unfuse", "--out", str(back)])
    assert res.exit_code == 0, res.output
    assert _files(back) == _files(f["bundle"])  # every file, bundle.json included, sha256 for sha256


def test_inline_refit_keeps_the_base_graph_as_a_hard_link(families, tmp_path):
    """An inline graph: the refit writes the new graph and keeps the base graph under lora/ as a hard
    link to the base bundle's file (no second copy of the base weights); a second refit keeps the FIRST
    base; unfuse restores it (sha256 for sha256)."""
    f = families["sd3"]
    out, back = tmp_path / "r", tmp_path / "b"
    before = _files(f["bundle"])
    assert CliRunner().invoke(cli, ["refit", str(f["bundle"]), "--lora", str(f["loras"][0]), "--out",
                                    str(out)]).exit_code == 0
    assert CliRunner().invoke(cli, ["refit", str(out), "--lora", str(f["loras"][1])]).exit_code == 0
    assert os.path.samefile(f["bundle"] / "backbone.onnx", out / "lora" / "backbone.onnx")
    assert not os.path.samefile(f["bundle"] / "backbone.onnx", out / "backbone.onnx")
    with np.load(out / "lora" / "base.npz") as z:
        assert not z.files  # no base tensors duplicated: the base graph file holds them
    assert _files(f["bundle"]) == before
    assert CliRunner().invoke(cli, ["refit", str(out), "--unfuse", "--out", str(back)]).exit_code == 0
    assert _files(back) == before


def test_external_data_refit_shares_the_base_weights_file(families, tmp_path):
    """A bundle whose weights are ONNX external data: the refit writes a new (small) graph and only the
    changed tensors (``backbone.onnx.lora.data``); the base ``.data`` file is shared, never rewritten."""
    from anchorflow.export.adapter_export import export_adapter
    from anchorflow.trainers.adapters import load_source

    f = families["sd3"]
    base, out, back = tmp_path / "ext", tmp_path / "ext-refit", tmp_path / "ext-back"
    export_adapter(load_source(str(f["src"])), base, max_batch=2, external_data=True)
    before = _files(base)
    two = ["--lora", str(f["loras"][0]), "--lora", str(f["loras"][1]), "--scale", "1", "--scale", "-0.5"]
    assert CliRunner().invoke(cli, ["refit", str(base), *two[:2], "--out", str(out)]).exit_code == 0
    assert CliRunner().invoke(cli, ["refit", str(out), *two[2:4], "--scale", "-0.5"]).exit_code == 0  # a 2nd refit
    assert os.path.samefile(base / "backbone.onnx.data", out / "backbone.onnx.data")  # one copy on disk
    assert _files(base) == before  # the base bundle is untouched
    overlay = (out / "backbone.onnx.lora.data").stat().st_size
    assert 0 < overlay < (base / "backbone.onnx.data").stat().st_size  # only the changed tensors
    x, t, cond = _inputs("sd3", np.random.default_rng(5))
    want = _torch_velocity(f["src"], [(f["loras"][0], 1.0), (f["loras"][1], -0.5)], x, t, cond)
    assert np.abs(load_bundle(out, backend="ort-cpu").velocity(x, t, cond) - want).max() <= PARITY
    entry = json.loads((out / "bundle.json").read_text())["networks"]["backbone"]
    assert [r["file"] for r in entry["external_data"]] == ["backbone.onnx.data", "backbone.onnx.lora.data"]
    assert CliRunner().invoke(cli, ["refit", str(out), "--unfuse", "--out", str(back)]).exit_code == 0
    assert _files(back) == before


def test_refit_in_place_keeps_the_old_bundle_until_done(families, tmp_path):
    import shutil

    f = families["sd3"]
    b = tmp_path / "inplace"
    shutil.copytree(f["bundle"], b)
    before = _files(b)
    assert CliRunner().invoke(cli, ["refit", str(b), "--lora", str(f["loras"][0])]).exit_code == 0
    assert _files(b) != before and (b / "lora" / "base.npz").is_file()
    assert CliRunner().invoke(cli, ["refit", str(b), "--unfuse"]).exit_code == 0
    assert _files(b) == before


# -- a factory model with PEFT adapters ---------------------------------------------------------------------
class Mixer(torch.nn.Module):
    """A user's model: a 3x3 conv on the state plus a linear map of the mean text token (model time = t)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.text = torch.nn.Linear(4, 2)
        self.gate = torch.nn.Linear(4, 2)

    def forward(self, x, tau, text):
        m = text.mean(1)
        return self.mix(x) * tau[:, None, None, None] + (self.text(m) * torch.sigmoid(self.gate(m)))[:, :, None, None]


def make_backbone():
    spec = {"name": "mixer", "state": (2, 4, 4), "axes": {"L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 4)}],
            "time": {"map": "identity"}, "guidance": {"mode": "rows"}}
    return Mixer(), spec


def test_factory_model_with_peft_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    bundle = tmp_path / "mixer"
    _export(["test_refit:make_backbone", "--out", str(bundle)])
    torch.manual_seed(5)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["mix", "text"],
                                               init_lora_weights=False), Mixer())
    sd = get_peft_model_state_dict(model)
    sd.update({"mix.alpha": torch.tensor(6.0), "text.alpha": torch.tensor(6.0)})  # alpha carried as tensors
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "mixer_lora.safetensors"))
    res = CliRunner().invoke(cli, ["refit", str(bundle), "--lora", str(tmp_path / "mixer_lora.safetensors"),
                                   "--out", str(tmp_path / "fused")])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((3, 2, 4, 4)).astype(np.float32), np.array([1.0, 0.6, 0.1], np.float32)
    text = rng.standard_normal((3, 3, 4)).astype(np.float32)
    with torch.no_grad():  # PEFT's unmerged forward: base(x) + alpha / r * B(A(x))
        want = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).numpy()
        plain = Mixer()(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).numpy()
    got = load_bundle(tmp_path / "fused", backend="ort-cpu").velocity(x, t, {"text": text})
    assert np.abs(got - want).max() <= PARITY < np.abs(plain - want).max() / 100


# -- the rule for what depends on the weights ----------------------------------------------------------------
@pytest.mark.parametrize("rel,keep_grids", [(0.04, True), (0.06, False)])
def test_tuned_grids_are_kept_only_below_the_stated_change(rel, keep_grids):
    from anchorflow.export.refit import GRID_KEEP_REL, _decide

    assert GRID_KEEP_REL == 0.05
    before = [np.ones((2, 3)) for _ in range(4)]
    after = [b * (1 + rel) for b in before]
    after[0] = before[0].copy()  # t = 1 unchanged: the first-call table stays
    meta = {"networks": {"backbone": {}, "sidenet": {}}, "tuned": {"grids": {}, "first_call": {"file": "x"}}}
    change, kept, dropped = _decide(before, after, meta)
    assert ("tuned_grids" in kept) == keep_grids and ("tuned_grids" in dropped) != keep_grids
    assert "first_call" in kept and "sidenet" in kept
    after[0] = before[0] + 2e-4  # beyond the export's fp32 parity at t = 1: the table is stale
    assert "first_call" in _decide(before, after, meta)[2]


# -- bad input: one line, exit 1, nothing on disk changed -----------------------------------------------------
def _bad(args: list[str], folder: Path, capsys) -> str:
    """``anchorflow ARGS`` as the script runs it: exit 1, one ``error:`` line, no traceback, ``folder`` unchanged."""
    from anchorflow.cli import main

    before = _files(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert _files(folder) == before
    return lines[0]


def test_bad_inputs_are_refused_in_one_line(families, tmp_path, capsys):
    sd3, flux = families["sd3"], families["flux-dev"]
    b = sd3["bundle"]
    msg = _bad(["refit", str(b), "--lora", str(flux["loras"][0]), "--out", str(tmp_path / "x")], b, capsys)
    assert "another architecture" in msg  # FLUX's proj_mlp is not in SD3
    pkl = tmp_path / "lora.bin"
    pkl.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": [1.0]}))
    assert "not a safetensors file" in _bad(["refit", str(b), "--lora", str(pkl)], b, capsys)
    for scale in ("nan", "inf", "1e9"):
        assert "--scale" in _bad(["refit", str(b), "--lora", str(sd3["loras"][0]), "--scale", scale], b, capsys)
    assert "no LoRA is fused" in _bad(["refit", str(b), "--unfuse"], b, capsys)
    assert "--scale values" in _bad(["refit", str(b), "--lora", str(sd3["loras"][0]), "--scale", "1", "--scale", "2",
                                     "--scale", "3"], b, capsys)


def test_a_rank_mismatch_and_a_size_mismatch_are_refused(families, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    f = families["sd3"]
    sd = load_file(str(f["loras"][0]))
    key = next(k for k in sd if k.endswith("to_q.lora_B.weight"))
    bad = dict(sd)
    bad[key] = np.zeros((bad[key].shape[0], 3), np.float32)  # rank 3 against lora_A's 4
    save_file(bad, str(tmp_path / "rank.safetensors"))
    assert "rank" in _bad(["refit", str(f["bundle"]), "--lora", str(tmp_path / "rank.safetensors")], f["bundle"],
                          capsys)
    big = dict(sd)
    big[key] = np.zeros((2 * sd[key].shape[0], sd[key].shape[1]), np.float32)  # for a model twice as wide
    save_file(big, str(tmp_path / "size.safetensors"))
    msg = _bad(["refit", str(f["bundle"]), "--lora", str(tmp_path / "size.safetensors")], f["bundle"], capsys)
    assert "another model size" in msg


def test_a_bundle_without_a_weight_map_is_refused(tmp_path, capsys):
    from anchorflow.modelref import BUNDLED, DEFAULT_NAME

    bundled = BUNDLED / DEFAULT_NAME / "bundle"
    meta = json.loads((bundled / "bundle.json").read_text())
    if "parameters" in meta["networks"]["backbone"]:
        pytest.skip("the bundled bundle was re-exported with a weight map")
    lora = tmp_path / "l.safetensors"
    from safetensors.numpy import save_file

    save_file({"blocks.0.attn.qkv.lora_A.weight": np.zeros((2, 4), np.float32),
               "blocks.0.attn.qkv.lora_B.weight": np.zeros((4, 2), np.float32)}, str(lora))
    msg = _bad(["refit", "default", "--lora", str(lora), "--out", str(tmp_path / "o")], bundled, capsys)
    assert "re-export" in msg and not (tmp_path / "o").exists()


# -- a SideNet fine-tuned from the base one (`train sidenet --init`) -------------------------------------------
def _train(src: Path, out: Path, extra: list[str], root: Path) -> None:
    cond = root / "prompts.npz"
    if not cond.exists():
        rng = np.random.default_rng(0)
        np.savez(cond, encoder_hidden_states=rng.standard_normal((4, 3, 16)).astype(np.float32),
                 pooled_projections=rng.standard_normal((4, 8)).astype(np.float32))
        np.savez(root / "null.npz", encoder_hidden_states=np.zeros((1, 3, 16), np.float32),
                 pooled_projections=np.zeros((1, 8), np.float32))
    args = ["train", "sidenet", "--backbone", str(src), "--out", str(out), "--data", "none", "--iters", "1",
            "--cond", str(cond), "--null-cond", str(root / "null.npz"),
            "--batch", "4", "--chain", "2", "--start-states", "8", "--solve-steps", "2", "--threads", "1",
            "--cache-dir", str(root / "cache"), "--ckpt-every", "1", *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output


def test_train_sidenet_init_starts_from_the_given_checkpoint(families, tmp_path, capsys):
    from safetensors.numpy import load_file

    f = families["sd3"]
    _train(f["src"], tmp_path / "base", ["--blocks", "1"], tmp_path)  # not the default: --init keeps its arch
    _train(f["src"], tmp_path / "tuned", ["--init", str(tmp_path / "base"), "--lr", "1e-12", "--seed", "7"], tmp_path)
    _train(f["src"], tmp_path / "fresh", ["--lr", "1e-12", "--seed", "7", "--blocks", "1"], tmp_path)
    base, tuned, fresh = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("base", "tuned", "fresh"))
    assert max(float(np.abs(tuned[k] - base[k]).max()) for k in base) <= 1e-6  # one step of lr 1e-12 from base (seed 7 as fresh: only --init makes it base)
    assert max(float(np.abs(fresh[k] - base[k]).max()) for k in base) > 1e-3  # else the test could not fail
    cfg = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert cfg["training"]["settings"]["init"] == str(tmp_path / "base") and cfg["arch"]["blocks"] == 1
    before = _files(tmp_path)
    from anchorflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "sidenet", "--backbone", str(f["src"]), "--out", str(tmp_path / "wide"), "--data", "none",
              "--iters", "1", "--width", "64", "--init", str(tmp_path / "base"), "--cond", str(tmp_path / "prompts.npz"),
              "--null-cond", str(tmp_path / "null.npz"), "--cache-dir", str(tmp_path / "cache")])
    assert exc.value.code == 1 and "architecture differs" in capsys.readouterr().err
    assert _files(tmp_path) == before

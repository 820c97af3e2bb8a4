"""Shared pieces of the pipeline-bundle tests: the CLI in-process, one-line errors, call counters,
the torch/diffusers import blocker and FLUX's 2x2 latent packing (diffusers' layout)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

BLOCKED = ("torch", "diffusers", "transformers", "tensorrt")
BLOCKER = r"""
import importlib.abc, sys
BLOCKED = %r
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"{name} is blocked by the torch-free test", name=name)
        return None
sys.meta_path.insert(0, Block())
""" % (BLOCKED,)


def run_cli(args, monkeypatch) -> None:
    from anchorflow.cli import main

    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, exc.code


def cli_error(args, monkeypatch, capsys) -> str:
    """Run the CLI expecting exit 1 with exactly one ``error:`` line on stderr; that line."""
    from anchorflow.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["anchorflow", *args])
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("generating ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def torch_free(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with torch, diffusers and transformers blocked."""
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=timeout)


class Counting:
    """Wraps a callable and counts its calls (``.calls``)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def count_parts(pipe) -> dict:
    """Replace every part of a loaded Pipeline by a counting wrapper; name -> Counting."""
    import dataclasses

    counters = {}
    for name, (tok, run, masked) in list(pipe.text.encoders.items()):
        counters[name] = Counting(run)
        pipe.text.encoders[name] = (tok, counters[name], masked)
    counters["vae_decoder"] = Counting(pipe._decode)
    pipe._decode = counters["vae_decoder"]
    counters["transformer"] = Counting(pipe.bundle.velocity)
    side = pipe.bundle.sidenet
    counters["sidenet"] = Counting(side) if side is not None else None
    pipe.bundle = dataclasses.replace(pipe.bundle, velocity=counters["transformer"], sidenet=counters["sidenet"])
    return counters


def pack(x: np.ndarray) -> np.ndarray:
    """Our FLUX latents (B, C, H, W) -> diffusers' packed (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def measured_parity(meta: dict) -> float:
    """The worst fp32 error the export measured over every part: the transformer's max abs error and
    the text encoders' / VAE's max error relative to max(1, output scale)."""
    p = meta["pipeline"]
    errs = [float(meta["networks"]["backbone"]["validation"]["worst"]["max_abs"])]
    errs += [e["validation"]["max_rel_err"] for e in p["text_encoders"].values()]
    errs += [p["vae"][k]["validation"]["max_rel_err"] for k in ("decoder", "encoder")]
    return max(errs)


def generate_torch_free(bundle, tmp_path, prompts, lat: np.ndarray, *args: str) -> tuple[np.ndarray, str]:
    """`anchorflow generate BUNDLE --prompts FILE --latents L.npy --npy P.npy ARGS` in a fresh interpreter
    with torch, diffusers and transformers blocked; (the --npy pixels, stdout). Fails when any of them
    was imported or even attempted."""
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    np.save(tmp_path / "lat.npy", lat)
    argv = ["generate", str(bundle), "--prompts", str(tmp_path / "prompts.txt"), "--latents", str(tmp_path / "lat.npy"),
            "--out", str(tmp_path / "x.png"), "--npy", str(tmp_path / "x.npy"), *args]
    proc = torch_free(f"""
from anchorflow.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    assert not exc.code, exc.code
print("ATTEMPTS", attempts, [m for m in BLOCKED if m in sys.modules])
""")
    assert proc.returncode == 0, proc.stderr
    assert "ATTEMPTS [] []" in proc.stdout, proc.stdout
    return np.load(tmp_path / "x.npy"), proc.stdout


# -- the exported SD3 pipeline bundle, shared by test_pipeline.py and test_pipeline_serve.py --
# A session fixture imported into two modules runs once per module; this memo makes it once per process
# (~55 s of export and SideNet training on 2 loaded cores).
_MADE: dict = {}


def sd3_pipeline_folder(tmp_path_factory):
    """A tiny random-init StableDiffusion3Pipeline saved with save_pretrained (``_tiny_full_pipelines.sd3``)."""
    if "folder" not in _MADE:
        from _tiny_full_pipelines import sd3

        _MADE["folder"] = sd3(tmp_path_factory.mktemp("sd3pipe") / "pipe")
    return _MADE["folder"]


def sd3_pipeline_bundle(tmp_path_factory):
    """`anchorflow train sidenet` on the pipeline's transformer (2 iterations, data-free), then
    `anchorflow export PIPELINE_FOLDER --sidenet CKPT --out B --max-batch 4`; the bundle folder B."""
    if "bundle" not in _MADE:
        folder = sd3_pipeline_folder(tmp_path_factory)
        mp = pytest.MonkeyPatch()
        root = tmp_path_factory.mktemp("sd3bundle")
        r = np.random.default_rng(0)
        np.savez(root / "cond.npz", encoder_hidden_states=r.standard_normal((3, 6, 32)).astype(np.float32),
                 pooled_projections=r.standard_normal((3, 16)).astype(np.float32))
        np.savez(root / "null.npz", encoder_hidden_states=r.standard_normal((1, 6, 32)).astype(np.float32),
                 pooled_projections=r.standard_normal((1, 16)).astype(np.float32))
        run_cli(["train", "sidenet", "--backbone", str(folder / "transformer"), "--out", str(root / "side"),
                 "--data", "none", "--cond", str(root / "cond.npz"), "--null-cond", str(root / "null.npz"), "--iters",
                 "2", "--batch", "4", "--chain", "2", "--width", "8", "--lr", "1e-2", "--start-states", "4",
                 "--solve-steps", "2", "--cache-dir", str(root / "cache")], mp)
        run_cli(["export", str(folder), "--sidenet", str(root / "side"), "--out", str(root / "b"), "--max-batch", "4"],
                mp)
        mp.undo()
        _MADE["bundle"] = root / "b"
    return _MADE["bundle"]

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

"""Export one pipeline part (a text encoder, the VAE decoder or encoder) to ONNX and check it against torch.

Each part is a small torch module with named tensor outputs (:class:`Part`), traced by
``torch.onnx.export(dynamo=True)`` with a dynamic ``batch`` axis (and dynamic latent / image H, W
for the VAE), refused when it computes in float64, and run in onnxruntime CPU against torch on
the cases given (max abs error relative to the output's scale <= :data:`TOL`). The measured error
is recorded in bundle.json next to the file. The stages are the one export pipeline's
(:mod:`.stages`); this module declares each part's graph (:func:`part_net`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .stages import Net, RelativeParity, export_net

TOL = 1e-4  # fp32: max |onnx - torch| / max(1, max |torch|) per output


@dataclass
class Part:
    """``module(*inputs) -> tuple of outputs``; inputs/outputs declared with shapes over named axes."""

    name: str
    module: Any
    inputs: list  # [{"name", "dtype", "shape": ["batch", 77]}]
    outputs: list  # [{"name", "dtype", "shape"}]
    dims: dict  # axis name -> torch.export.Dim (or m * Dim)
    example: dict  # input name -> np.ndarray (traced)
    cases: list  # [dict input name -> np.ndarray] checked against torch
    axes: dict = field(default_factory=dict)  # axis name -> {"min", "opt", "max"} (batch included)
    info: dict = field(default_factory=dict)  # extra bundle.json fields (class, config facts)


def _torch_outputs(part: Part, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = part.module(*(torch.from_numpy(feeds[i["name"]]) for i in part.inputs))
    return [o.detach().cpu().float().numpy() for o in out]


def part_net(part: Part, validate: bool = True) -> Net:
    """The export declaration of a part: its declared inputs and outputs over named axes, every
    output judged relative to its scale (:class:`.stages.RelativeParity`, :data:`TOL`)."""
    outputs = [o["name"] for o in part.outputs]
    parity = RelativeParity(part.name, outputs, part.cases, lambda f: _torch_outputs(part, f), TOL) if validate else None
    return Net(part.name, part.module, part.inputs, outputs, part.dims, part.example, f"{part.name}.onnx",
               what=f"the pipeline's {part.name}", parity=parity)


def export_part(part: Part, folder: Path, opset: int, validate: bool = True) -> dict:
    """Write ``folder/<part.name>.onnx`` through the export pipeline (:func:`.stages.export_net`); its
    bundle.json entry (file record, declarations, validation, seconds)."""
    start = time.perf_counter()
    done = export_net(part_net(part, validate), folder, opset=opset)
    entry = {**done.record, "inputs": part.inputs, "outputs": part.outputs, "axes": part.axes, **part.info}
    return {**entry, "validation": done.validation, "seconds": round(time.perf_counter() - start, 2)}


# -- text encoders ---------------------------------------------------------------------------------
class TextOutputs(torch.nn.Module):
    """A transformers text encoder with the outputs a pipeline's recipe reads, by name:
    ``pooled`` (CLIP with projection: text_embeds; CLIP: pooler_output), ``hidden`` (the
    penultimate layer for SD3's CLIPs, the last for T5 / Gemma)."""

    def __init__(self, model: Any, outputs: Sequence[str], layer: int, masked: bool) -> None:
        super().__init__()
        self.model, self.names, self.layer, self.masked = model.eval(), tuple(outputs), layer, masked

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> tuple:
        kw = {"attention_mask": attention_mask} if self.masked else {}
        out = self.model(input_ids, output_hidden_states=self.layer != -1, **kw)
        res = []
        for n in self.names:
            if n == "pooled":
                res.append(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
            else:
                res.append(out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer])
        return tuple(r.float() for r in res)


def text_part(name: str, model: Any, kind: str, length: int, max_rows: int, vocab: int,
              outputs: Sequence[str], layer: int, masked: bool) -> Part:
    """A text encoder over ``input_ids`` (batch, length) int64 (+ ``attention_mask`` when ``masked``)."""
    rng = np.random.default_rng(0)
    top = max(int(max_rows), 3)
    dims = {"batch": torch.export.Dim(f"{name}_batch", min=1, max=top)}
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", length]}]
    if masked:
        inputs.append({"name": "attention_mask", "dtype": "int64", "shape": ["batch", length]})

    def feeds(b: int, fill: int) -> dict:
        ids = rng.integers(0, vocab, size=(b, length)).astype(np.int64)
        out = {"input_ids": ids}
        if masked:
            mask = np.zeros((b, length), np.int64)
            for r in range(b):
                mask[r, : max(1, (fill + 3 * r) % length)] = 1
            out["attention_mask"] = mask
        return out

    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
    proj = int(getattr(model.config, "projection_dim", 0) or hidden)
    outs = [{"name": n, "dtype": "float32",
             "shape": ["batch", proj if "Projection" in type(model).__name__ else hidden] if n == "pooled"
             else ["batch", length, hidden]} for n in outputs]
    return Part(name, TextOutputs(model, outputs, layer, masked), inputs, outs, dims, feeds(3, length // 2),
                [feeds(1, length // 3), feeds(3, length // 2), feeds(min(top, 5), length - 1)],
                axes={"batch": {"min": 1, "opt": min(top, 2), "max": top}},
                info={"class": type(model).__name__, "kind": kind, "layer": layer})


# -- the VAE ---------------------------------------------------------------------------------------
class Decode(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae.eval()

    def forward(self, latents: torch.Tensor) -> tuple:
        return (self.vae.decode(latents, return_dict=False)[0].float(),)


class EncodeMean(torch.nn.Module):
    """The encoder's deterministic latent: the posterior mean (AutoencoderKL) or ``latent`` (DC-AE)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae.eval()

    def forward(self, image: torch.Tensor) -> tuple:
        out = self.vae.encode(image, return_dict=False)[0]
        return ((out if isinstance(out, torch.Tensor) else out.mean).float(),)


def vae_parts(vae: Any, factor: int, channels: int, latent: tuple, max_rows: int, static: bool) -> list[Part]:
    """Decoder (latents (batch, C, h, w) -> image (batch, 3, f h, f w)) and encoder (the inverse), with
    h, w dynamic over ``latent`` = (min, opt, max) unless ``static`` (then h = w = opt)."""
    rng = np.random.default_rng(1)
    lo, opt, hi = latent
    top = max(int(max_rows), 2)
    batch = torch.export.Dim("vae_batch", min=1, max=top)
    axes = {"batch": {"min": 1, "opt": 1, "max": top}}
    if static:
        h_dims: dict = {}
        lat_shape, img_shape = ["batch", channels, opt, opt], ["batch", 3, opt * factor, opt * factor]
        sizes = [opt]
    else:
        hd, wd = torch.export.Dim("h", min=max(2, lo), max=hi), torch.export.Dim("w", min=max(2, lo), max=hi)
        h_dims = {"h": hd, "w": wd, "H": factor * hd, "W": factor * wd}
        lat_shape, img_shape = ["batch", channels, "h", "w"], ["batch", 3, "H", "W"]
        axes.update({"h": {"min": max(2, lo), "opt": opt, "max": hi}, "w": {"min": max(2, lo), "opt": opt, "max": hi}})
        sizes = sorted({max(2, lo), opt, min(hi, opt + max(2, lo))})
    lat = lambda b, h, w: rng.standard_normal((b, channels, h, w)).astype(np.float32)  # noqa: E731
    img = lambda b, h, w: rng.uniform(-1, 1, (b, 3, h * factor, w * factor)).astype(np.float32)  # noqa: E731
    ex_h = opt if static else max(opt, 3)
    ex_w = opt if static else max(opt, 3) + (0 if opt + 1 > hi else 1)
    dec_cases = [{"latents": lat(b, s, sizes[-1 - i % len(sizes)])} for i, (b, s) in enumerate(
        [(1, sizes[0]), (2, sizes[-1])])]
    enc_cases = [{"image": img(b, s, sizes[-1 - i % len(sizes)])} for i, (b, s) in enumerate(
        [(1, sizes[0]), (2, sizes[-1])])]
    info = {"class": type(vae).__name__}
    return [
        Part("vae_decoder", Decode(vae), [{"name": "latents", "dtype": "float32", "shape": lat_shape}],
             [{"name": "image", "dtype": "float32", "shape": img_shape}], {"batch": batch, **h_dims},
             {"latents": lat(2, ex_h, ex_w)}, dec_cases, axes, info),
        Part("vae_encoder", EncodeMean(vae), [{"name": "image", "dtype": "float32", "shape": img_shape}],
             [{"name": "latent", "dtype": "float32", "shape": lat_shape}],
             {"batch": batch, **{"H": h_dims["H"], "W": h_dims["W"]}} if h_dims else {"batch": batch},
             {"image": img(2, ex_h, ex_w)}, enc_cases, axes, info),
    ]


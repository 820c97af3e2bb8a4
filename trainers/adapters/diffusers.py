"""diffusers transformers as :class:`~.base.BackboneAdapter` s: SD3, FLUX (dev and schnell), Sana.

Each reads its facts from the model's ``config.json`` (diffusers' ConfigMixin is the single source
of shape facts) and calls ``transformer(hidden_states=..., timestep=..., **conditions,
return_dict=False)[0]`` with the diffusers forward argument names as condition names:

- ``SD3Transformer2DModel``: ``encoder_hidden_states`` (B, L, joint_attention_dim),
  ``pooled_projections`` (B, pooled_projection_dim); timestep = 1000 t; guidance ``rows``; its
  position-table crop is re-expressed as a gather so the exported graph keeps H and W dynamic.
- ``FluxTransformer2DModel``: the same two, plus ``guidance`` (B,) float32 when
  ``guidance_embeds`` (FLUX-dev: guidance ``embedded``; schnell: ``none``); timestep = t (FLUX
  scales inside). x (B, C, H, W) with C = in_channels / 4 is packed 2x2 into (B, HW/4, 4C) and
  ``img_ids`` / ``txt_ids`` are built from the shapes inside forward, so the graph takes x as is;
  the rotary embedding runs in float32 (diffusers computes it in float64, which TensorRT cannot
  import; the angle error is ~1e-7 relative).
- ``SanaTransformer2DModel``: ``encoder_hidden_states`` (B, L, caption_channels),
  ``encoder_attention_mask`` (B, L) int64 (1 = token); timestep = 1000 * timestep_scale * t; batch,
  text length and latent H, W dynamic (multiples of the patch; the Mix-FFN's ``unflatten(1, (h, w))``
  takes the post-patch sizes of x, which torch.export keeps symbolic); a model with a sin-cos position
  table (``interpolation_scale`` set: Sana 2K/4K) recomputes it in float32 inside the graph for every
  H x W (:func:`_dynamic_sincos`; diffusers only recomputes it off ``sample_size``, a python branch that
  would pin the export to one size); the masked cross-attention runs diffusers'
  plain ``AttnProcessor`` (the ONNX exporter's SDPA decomposition breaks a dynamic batch there);
  the linear self-attention runs :class:`SanaLinearAttention` (no ``+ 1e-15`` epsilon: see there).

Velocity: diffusers' flow-matching schedulers step ``x += (sigma_next - sigma) * model_output``
with sigma our t, so the model output is already dx/dt in our convention (t = 1 noise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ...base._deps import require
from ...base.errors import CheckpointError
from .base import AdapterSpec, BackboneAdapter, Condition

TEXT = (1, 16, 512)  # default text-length range (min, opt, max); override with axes={"L": (...)}
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana"}


def _latent_range(opt: int, step: int, top: int) -> tuple[int, int, int]:
    return (step, opt, max(opt, top))


class DiffusersAdapter(BackboneAdapter):
    """Common part: the transformer, its config, ``model_time`` by the declared map."""

    def __init__(self, transformer: Any, spec: AdapterSpec) -> None:
        super().__init__()
        self.transformer = transformer.eval()
        self.spec = spec

    def _call(self, hidden: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.transformer(hidden_states=hidden, timestep=self.model_time(t), **cond, return_dict=False)[0]


class SD3Adapter(DiffusersAdapter):
    @classmethod
    def build(cls, transformer: Any, name: str, axes: Optional[dict] = None) -> "SD3Adapter":
        c = transformer.config
        p, size = int(c.patch_size), int(c.sample_size)
        top = int(c.pos_embed_max_size or size // p) * p
        conds = (Condition("encoder_hidden_states", "float32", ("batch", "L", int(c.joint_attention_dim))),
                 Condition("pooled_projections", "float32", ("batch", int(c.pooled_projection_dim))))
        spec = AdapterSpec(name=name, state=(int(c.in_channels), "H", "W"), conditions=conds,
                           axes={"H": _latent_range(size, 2 * p, top), "W": _latent_range(size, 2 * p, top), "L": TEXT,
                                 **(axes or {})},
                           time={"map": "scale", "scale": 1000.0}, guidance={"mode": "rows"}, family="sd3",
                           multiples={"H": p, "W": p})
        if transformer.pos_embed.pos_embed_max_size:
            _gathered_crop(transformer.pos_embed)
        return cls(transformer, spec)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        return self._call(x, t, dict(cond or {}))


def _gathered_crop(pe: Any) -> None:
    """SD3's centre crop of its position table as index_select on arange rows/cols: the same values,
    but the ONNX exporter keeps it dynamic (its slice with shape-derived bounds comes out static)."""

    def cropped(height: Any, width: Any) -> torch.Tensor:
        m, p = pe.pos_embed_max_size, pe.patch_size
        hp, wp = height // p, width // p
        grid = pe.pos_embed.reshape(m, m, -1)
        rows, cols = torch.arange(hp) + (m - hp) // 2, torch.arange(wp) + (m - wp) // 2
        return grid.index_select(0, rows).index_select(1, cols).reshape(1, -1, grid.shape[-1])

    pe.cropped_pos_embed = cropped


class SanaAdapter(DiffusersAdapter):
    # the linear self-attention stays float32 in an fp16 graph, as diffusers runs it (query.float()...):
    # its sums over all tokens overflow fp16's 65504 at real sizes
    float32_scopes = (r"adapter\.transformer\.transformer_blocks\.\d+\.attn1",)

    @classmethod
    def build(cls, transformer: Any, name: str, axes: Optional[dict] = None) -> "SanaAdapter":
        c = transformer.config
        p, size = int(c.patch_size), int(c.sample_size)
        conds = [Condition("encoder_hidden_states", "float32", ("batch", "L", int(c.caption_channels))),
                 Condition("encoder_attention_mask", "int64", ("batch", "L"), low=1, high=2)]
        guidance: dict = {"mode": "rows"}
        if c.guidance_embeds:
            conds.append(Condition("guidance", "float32", ("batch",), low=1.0, high=5.0))
            guidance = {"mode": "embedded", "input": "guidance"}
        # latent H, W dynamic from 2 patches to 4x sample_size (no position table bounds them), multiples of p
        spec = AdapterSpec(name=name, state=(int(c.in_channels), "H", "W"), conditions=tuple(conds),
                           axes={"H": _latent_range(size, 2 * p, 4 * size), "W": _latent_range(size, 2 * p, 4 * size),
                                 "L": TEXT, **(axes or {})},
                           time={"map": "scale", "scale": 1000.0 * float(c.timestep_scale)}, guidance=guidance,
                           family="sana", multiples={"H": p, "W": p})
        if transformer.patch_embed.pos_embed is not None:
            _dynamic_sincos(transformer.patch_embed)
        from diffusers.models.attention_processor import AttnProcessor

        for block in transformer.transformer_blocks:  # masked cross-attention without SDPA: the ONNX
            block.attn2.set_processor(AttnProcessor())  # exporter's SDPA decomposition breaks a dynamic batch
            block.attn1.set_processor(SanaLinearAttention())
        return cls(transformer, spec)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        v = self._call(x, t, dict(cond or {}))
        return v[:, : x.shape[1]] if v.shape[1] == 2 * x.shape[1] else v  # learned-sigma heads: the mean half


def _dynamic_sincos(pe: Any) -> None:
    """Sana's sin-cos position table (``PatchEmbed`` with ``interpolation_scale``) computed inside the
    graph at x's post-patch h x w, as diffusers' ``get_2d_sincos_pos_embed(dim, (h, w), base_size,
    interpolation_scale)`` computes it, but in float32 (diffusers: float64 frequencies, which TensorRT
    cannot import; angles <= base_size / interpolation_scale, so the error is ~6e-8 x that, absolute).
    diffusers uses its stored table when h x w is ``sample_size`` and recomputes otherwise: a python
    branch on the size that torch.export would pin to the traced one."""
    dim = int(pe.pos_embed.shape[-1])
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # built here, stored float32
    omega = omega.float()

    def axis(n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # (n,) positions -> (n, dim / 2) sin | cos
        size = like.new_ones(n).sum()  # n as a float32 tensor (a shape-derived count, no float64 cast)
        pos = torch.arange(n, dtype=torch.float32) / (size / pe.base_size) / pe.interpolation_scale
        out = pos[:, None] * omega.to(like.device)[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    def forward(latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2] // pe.patch_size, latent.shape[-1] // pe.patch_size
        out = pe.proj(latent).flatten(2).transpose(1, 2)
        if pe.layer_norm:
            out = pe.norm(out)
        # token i * w + j (row i, column j) = [emb(column j) | emb(row i)]: diffusers' meshgrid(grid_w, grid_h,
        # indexing="xy") puts the column coordinate first
        eh, ew = axis(h, out), axis(w, out)
        table = torch.cat([ew[None].expand(h, w, -1), eh[:, None].expand(h, w, -1)], dim=-1).reshape(1, h * w, -1)
        return (out + table).to(out.dtype)

    pe.forward = forward


class SanaLinearAttention:
    """Sana's ReLU linear attention (diffusers' ``SanaLinearAttnProcessor2_0``) with its denominator
    ``d + 1e-15`` written as ``where(d > 0, d, 1)``: the same float32 values (d >= 0 is a sum of ReLU
    products, d = 0 only where every product and so the numerator is 0, and ``d + 1e-15 == d`` for
    every d above ~1e-8), with no epsilon the ONNX export could drop or fp16 could round to 0.

    Why: the onnxscript optimizer that ``torch.onnx.export(dynamo=True)`` runs removes ``x + c`` as
    a no-op when ``math.isclose(c, 0, abs_tol=1e-8)`` (onnxscript 0.7 ``rewriter/rules/common/_no_op.py``
    ``add_0``, pattern constants' ``abs_tol=1e-8`` in ``_pattern_ir.py``), so the graph divides
    0 / 0 = NaN wherever a query's ReLU is all zero (a token whose head_dim projections are all
    negative: 2**-head_dim per token and head at random init, 1 in 256 for head_dim 8; trained
    weights can make it common). Per head: out_i = sum_j v_j (k_j . q_i) / sum_j (k_j . q_i) on
    ReLU'd q, k; shapes (B, N, heads * head_dim) in and out.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        heads = lambda a: a.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()  # noqa: E731 (B, h, d, N)
        q, k, v = torch.relu(heads(q)), torch.relu(heads(k)).transpose(2, 3), heads(v)
        v = torch.nn.functional.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # a row of ones: the denominator
        out = torch.matmul(torch.matmul(v, k), q)  # (B, h, d + 1, N)
        den = out[:, :, -1:]
        out = out[:, :, :-1] / torch.where(den > 0, den, torch.ones_like(den))
        out = attn.to_out[1](attn.to_out[0](out.flatten(1, 2).transpose(1, 2).to(dtype)))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


class FluxAdapter(DiffusersAdapter):
    @classmethod
    def build(cls, transformer: Any, name: str, axes: Optional[dict] = None) -> "FluxAdapter":
        c = transformer.config
        channels = int(c.in_channels) // 4
        conds = [Condition("encoder_hidden_states", "float32", ("batch", "L", int(c.joint_attention_dim))),
                 Condition("pooled_projections", "float32", ("batch", int(c.pooled_projection_dim)))]
        guidance: dict = {"mode": "none"}
        if c.guidance_embeds:
            conds.append(Condition("guidance", "float32", ("batch",), low=1.0, high=5.0))
            guidance = {"mode": "embedded", "input": "guidance"}
        spec = AdapterSpec(name=name, state=(channels, "H", "W"), conditions=tuple(conds),
                           axes={"H": (2, 16, 256), "W": (2, 16, 256), "L": TEXT, **(axes or {})},
                           time={"map": "identity"}, guidance=guidance, family="flux", multiples={"H": 2, "W": 2})
        _float32_rope(transformer)
        return cls(transformer, spec)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        cond = dict(cond or {})
        b, c, h, w = x.shape
        packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        text = cond["encoder_hidden_states"]
        rows = torch.arange(h // 2, dtype=torch.float32).reshape(-1, 1).expand(h // 2, w // 2)
        cols = torch.arange(w // 2, dtype=torch.float32).reshape(1, -1).expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        txt_ids = torch.zeros(text.shape[1], 3, dtype=torch.float32)
        out = self._call(packed, t, {**cond, "img_ids": img_ids, "txt_ids": txt_ids})
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _float32_rope(transformer: Any) -> None:
    """Make FLUX's rotary position embedding compute in float32 (no float64 in the graph)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos_embed = transformer.pos_embed

    def forward(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = ids.float()
        parts = [get_1d_rotary_pos_embed(pos_embed.axes_dim[i], pos[:, i], theta=pos_embed.theta,
                                         repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float32)
                 for i in range(ids.shape[-1])]
        return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)

    pos_embed.forward = forward


ADAPTERS = {"SD3Transformer2DModel": SD3Adapter, "FluxTransformer2DModel": FluxAdapter,
            "SanaTransformer2DModel": SanaAdapter}


def is_diffusers_folder(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "_class_name" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def load_diffusers(path: str | Path, axes: Optional[dict] = None) -> DiffusersAdapter:
    """The adapter of a diffusers transformer folder (what ``save_pretrained`` writes), float32 on CPU."""
    path = Path(path)
    cls_name = json.loads((path / "config.json").read_text())["_class_name"]
    if cls_name not in ADAPTERS:
        raise CheckpointError(f"{path} holds a diffusers {cls_name}; anchorflow exports "
                              f"{', '.join(ADAPTERS)} (or wrap it in a factory: anchorflow export pkg.module:factory)")
    diffusers = require("diffusers", extra="diffusers", purpose="exporting diffusers transformers")
    transformer = getattr(diffusers, cls_name).from_pretrained(str(path), torch_dtype=torch.float32)
    return ADAPTERS[cls_name].build(transformer.to("cpu"), path.name or FAMILIES[cls_name], axes)

"""SideNet: a small net that predicts how the backbone's velocity changes over a time offset.

BA-solver (Bi-Anchor Interpolation Solver, arXiv 2601.21542), section "SideNet":
``delta = S(x, v, t, h, y)`` and ``v_hat(t - h) = v + delta``, where x (B, C, H, W) is the state
at time t, v (B, C, H, W) the backbone's raw (unguided) velocity at (x, t), t and h (B,) per-sample
time and signed offset, y (B,) int64 labels (``null_label`` = C_classes for the unguided field).
Time convention: t = 1 noise, t = 0 data; h > 0 looks toward data, h < 0 toward noise.

The last layer is zero-initialised and its output multiplied by h inside the net, so
``delta = 0`` exactly at h = 0 and an untrained SideNet reproduces "reuse the anchor velocity".
Vector states (D,) are handled as (D, 1, 1) images.
"""

from __future__ import annotations

import math
import hashlib
from pathlib import Path
from typing import Any, Optional

from ..base._deps import require
from ..base.errors import CheckpointError, ConfigError
from .checkpoint import load_checkpoint, read_config, register_builder
from .sidenet_cond import CondEmbed, spec_from_arch

torch = require("torch")
nn = torch.nn
F = torch.nn.functional

# Arch defaults (the digits SideNet); ``sidenet_arch`` fills in the backbone's facts and a width.
DEFAULTS = {"width": 16, "cond_dim": 32, "blocks": 2, "groups": 4, "heads": 2, "freq_dim": 32, "patch": 1,
            "offset": "film"}
OFFSET_FORMS = ("film", "poly2", "poly3", "poly4")
RATIO = 0.015  # SideNet size / backbone size; the paper: 1-2 % (6M next to a 675M SiT-XL/2)
TIME_SCALE = 1000.0  # t and h in [-1, 1] are scaled before the sinusoidal embedding (as in DiT)


def sinusoidal(t: "torch.Tensor", freqs: "torch.Tensor") -> "torch.Tensor":
    """(B,) -> (B, 2 * len(freqs)): ``[cos(s t f), sin(s t f)]``; sin keeps the sign of a signed h."""
    args = (TIME_SCALE * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ScalarEmbed(nn.Module):
    """A scalar per sample (t or h) -> sinusoidal features -> 2-layer MLP, (B,) -> (B, dim)."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, s: "torch.Tensor") -> "torch.Tensor":
        return self.mlp(sinusoidal(s, self.freqs))


class ResBlock(nn.Module):
    """norm -> conv -> FiLM ``a * (1 + scale) + shift`` -> SiLU -> conv -> residual, at full resolution."""

    def __init__(self, width: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, a: "torch.Tensor", cond: "torch.Tensor") -> "torch.Tensor":
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        z = self.conv1(self.norm(a))
        z = F.silu(z * (1 + scale) + shift)
        return a + self.conv2(z)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (explicit softmax: plain ONNX ops)."""

    def __init__(self, width: int, groups: int, heads: int, hw: tuple[int, int]) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"SideNet width {width} must be divisible by heads {heads}")
        self.heads, self.head_dim, self.hw = heads, width // heads, hw
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, a: "torch.Tensor") -> "torch.Tensor":
        d = self.head_dim
        qkv = self.qkv(self.norm(a)).flatten(2).unflatten(1, (3, self.heads, d))  # (B, 3, heads, d, N)
        q, k, v = qkv.unbind(1)
        att = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(d), dim=-1)  # (B, heads, N, N)
        out = (v @ att.transpose(-1, -2)).flatten(1, 2).unflatten(2, self.hw)  # (B, width, H, W)
        return a + self.proj(out)


class SideNet(nn.Module):
    """``delta = h * f(x, v, t, h, y)``; see the module docstring for shapes and conventions.

    Args:
        arch: dict with ``state_shape`` ((C, H, W) or (D,)), ``num_classes``, ``null_label`` and
            the widths ``width``, ``cond_dim``, ``blocks`` (ResBlocks, attention in the middle),
            ``groups`` (GroupNorm), ``heads``, ``freq_dim`` and ``patch`` (see :data:`DEFAULTS`).
            ``patch`` p > 1 runs the body on an (H/p, W/p) grid: space-to-depth stem (p x p pixels ->
            p^2 channels, like the backbone's patchify) and depth-to-space head -- a deviation from
            the paper's full-resolution body, for cost. Measured on the digits backbone (ORT CPU,
            1 thread, batch 16): patch 2 with one ResBlock costs ~12 % of a backbone call per BA
            interval (full-resolution default: ~45 %) but loses ~2 dB PSNR at 5 and 10 NFE
            (benchmarks/sidenet_training.py), so the bundled SideNet keeps patch 1.
            ``offset``: how h enters. ``"film"`` (the paper): h is embedded next to t and y and
            drives every block's FiLM; ``delta = h f(x, v, t, h, y)``. ``"poly<d>"`` (d = 2..4,
            beyond the paper): the body sees only (x, v, t, y) and outputs d fields,
            ``delta = h f_1 + h^2 f_2 + ... + h^d f_d`` -- a Taylor form of v(t - h) along the
            trajectory (BA's 4-node rule integrates cubics exactly, so d = 3 is all it can use) --
            so K offsets from one anchor cost ONE body row: BA's merged probe (4 offsets per
            interval) runs on B rows instead of 4B. Measured on the digits: see the README.
    """

    def __init__(self, arch: dict) -> None:
        super().__init__()
        arch = {**DEFAULTS, **arch}
        self.arch = arch
        self.state_shape = tuple(int(s) for s in arch["state_shape"])
        self.num_classes = int(arch.get("num_classes") or 0)
        self.null_label = None if arch.get("null_label") is None else int(arch["null_label"])
        self.cond_spec = spec_from_arch(arch)
        self.cond_inputs = tuple(self.cond_spec["inputs"])  # ONNX inputs after x, v, t, h
        self.image_shape = _image_shape(self.state_shape)
        c, hgt, wid = self.image_shape
        width, cond, groups = int(arch["width"]), int(arch["cond_dim"]), int(arch["groups"])
        if width % groups:
            raise ConfigError(f"SideNet width {width} must be divisible by groups {groups}")
        self.patch = p = _patch(arch, hgt, wid)
        self.offset_form = form = str(arch.get("offset", "film"))
        if form not in OFFSET_FORMS:
            raise ConfigError(f"SideNet offset form must be one of {', '.join(OFFSET_FORMS)}, got {form!r}")
        self.degree = 1 if form == "film" else int(form[4:])  # poly<d>: delta = sum_j h^j f_j, j = 1..d
        self.t_embed = ScalarEmbed(int(arch["freq_dim"]), cond)
        if form == "film":
            self.h_embed = ScalarEmbed(int(arch["freq_dim"]), cond)
        if self.cond_spec["kind"] == "label":
            self.y_embed = nn.Embedding(int(self.cond_spec["num_classes"]) + 1, cond)
        elif self.cond_spec["kind"] != "none":
            self.c_embed = CondEmbed(self.cond_spec, cond)
        self.conv_in = nn.Conv2d(2 * c * p * p, width, 3, padding=1)
        n = int(arch["blocks"])
        self.blocks = nn.ModuleList(ResBlock(width, cond, groups) for _ in range(n))
        self.mid = n // 2
        self.attn = SelfAttention(width, groups, int(arch["heads"]), (hgt // p, wid // p))
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, self.degree * c * p * p, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: "torch.Tensor", v: "torch.Tensor", t: "torch.Tensor", h: "torch.Tensor",
                y: Optional["torch.Tensor"] = None, y2: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        """x, v (B, *state_shape); t, h (B,) float; y, y2 the :attr:`cond_inputs` in order (label kind:
        y (B,) int64 labels; pooled: y (B, P); mean: y (B, L, D) and the mask y2 (B, L) if declared;
        none: nothing) -> delta (B, *state_shape), 0 where h = 0. Named arguments, so exporters can
        key dynamic shapes by name.

        Polynomial forms (``offset="poly<d>"``) also take K offsets per row: h (K, B) -> delta
        (K, B, *state), or h of K*B values (block k: rows k*B .. (k+1)*B - 1) -> (K*B, *state); the
        body runs once on the B rows whatever K is (the exported graph's interface: h (offsets, batch))."""
        conds = tuple(c for c in (y, y2) if c is not None)
        c = self.t_embed(t)
        if self.offset_form == "film":
            c = c + self.h_embed(h)
        kind = self.cond_spec["kind"]
        if kind == "label":
            c = c + self.y_embed(conds[0])
        elif kind != "none":
            c = c + self.c_embed(*conds[:len(self.cond_inputs)])
        cond = F.silu(c)
        shape = (-1, *self.image_shape)
        a = torch.cat([x.reshape(shape), v.reshape(shape)], dim=1)
        a = self.conv_in(F.pixel_unshuffle(a, self.patch) if self.patch > 1 else a)
        for i, block in enumerate(self.blocks):
            if i == self.mid:
                a = self.attn(a)
            a = block(a, cond)
        if self.mid == len(self.blocks):
            a = self.attn(a)
        f = self.conv_out(F.silu(self.norm_out(a)))
        f = F.pixel_shuffle(f, self.patch) if self.patch > 1 else f
        if self.offset_form == "film":
            return (h.to(f.dtype).reshape(-1, 1, 1, 1) * f).reshape(x.shape)
        return self._polynomial(f, h, x)

    def _polynomial(self, f: "torch.Tensor", h: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
        """``delta_k = sum_{j=1..d} h_k^j f_j`` for the K offsets of every row (Horner's rule)."""
        n = x.shape[0]
        c = self.image_shape[0]
        f = f.reshape(n, self.degree, c, *f.shape[2:])  # (B, d, C, H, W)
        hk = h.to(f.dtype).reshape(-1, n, 1, 1, 1)  # (K, B, 1, 1, 1)
        out = f[:, self.degree - 1]
        out = out.unsqueeze(0) * hk
        for j in range(self.degree - 2, -1, -1):
            out = (out + f[:, j]) * hk
        if h.dim() == 2:  # (K, B) offsets: (K, B, *state), as the exported graph returns it
            return out.reshape(h.shape[0], n, *x.shape[1:])
        return out.reshape(-1, *x.shape[1:])

    @property
    def shared_body(self) -> bool:
        """True when K offsets per row cost one body row (polynomial forms): h may be (K, B)."""
        return self.offset_form != "film"


def _image_shape(state_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(state_shape) == 3:
        return state_shape  # type: ignore[return-value]
    if len(state_shape) == 1:
        return (state_shape[0], 1, 1)
    raise ConfigError(f"SideNet needs a backbone state of shape (C, H, W) or (D,), got {state_shape}")


def _patch(arch: dict, hgt: int, wid: int) -> int:
    p = arch.get("patch", 1)
    if not isinstance(p, int) or isinstance(p, bool) or p < 1 or hgt % p or wid % p:
        raise ConfigError(f"SideNet patch must be a positive integer dividing the state's height and width "
                          f"({hgt} x {wid}), got {p!r}; use 1 (full resolution) or e.g. 2")
    return p


LARGE_LATENT = 16  # height and width from which the SideNet body runs at the backbone's patch resolution


def backbone_patch(backbone: Any) -> int:
    """The backbone's patch size: ``patch_size`` (adapters, diffusers configs) or ``patch`` (our DiT), else 1."""
    for owner in (backbone, getattr(backbone, "config", None)):
        for name in ("patch_size", "patch"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return 1


def default_patch(backbone: Any) -> int:
    """SideNet body resolution for ``backbone``: its patch size when the latent is at least
    :data:`LARGE_LATENT` pixels on each side (and the patch divides it), else 1 (full resolution).

    Measured at DiT-S/2 scale (4 x 32 x 32, ORT CPU, benchmarks/sidenet_cost.py): a 1.5 % SideNet
    with a full-resolution body costs ~28 % of a backbone call per BA interval, at patch 2 ~6 %.
    Small latents (the 8 x 8 digits) keep the paper's full-resolution body, which is cheap there
    and better (a patch-2 body lost ~2 dB on the digits).
    """
    shape = tuple(int(s) for s in getattr(backbone, "state_shape", ()))
    p = backbone_patch(backbone)
    if len(shape) != 3 or min(shape[1:]) < LARGE_LATENT or shape[1] % p or shape[2] % p:
        return 1
    return p


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def sidenet_arch(
    backbone: Any,
    *,
    width: Optional[int] = None,
    ratio: float = RATIO,
    backbone_params: Optional[int] = None,
    **overrides: Any,
) -> dict:
    """Arch dict for a SideNet next to ``backbone`` (a module with the backbone adapter attributes).

    With ``width`` None the width is chosen by :func:`size_for` so the SideNet has about
    ``ratio`` times the backbone's parameters (``backbone_params``, counted when None).
    ``patch`` defaults to :func:`default_patch` (the backbone's own patch size for large latents).
    """
    null = getattr(backbone, "null_label", None)
    arch = {**DEFAULTS, "patch": default_patch(backbone), **overrides, "state_shape": list(backbone.state_shape),
            "num_classes": int(getattr(backbone, "num_classes", 0) or 0), "null_label": None if null is None else int(null)}
    if arch.get("cond") is None and arch["num_classes"] == 0:
        arch["cond"] = {"kind": "none", "inputs": []}
    if width is None:
        n = backbone_params if backbone_params is not None else count_params(backbone)
        arch = size_for(n, ratio, arch)
    else:
        arch["width"] = int(width)
    return arch


def size_for(backbone_params: int, ratio: float, arch: dict) -> dict:
    """Return ``arch`` with the ``width`` (multiple of ``groups``, cond_dim = 2 * width) whose size
    is closest to ``ratio * backbone_params``."""
    if not 0 < ratio < 1:
        raise ConfigError(f"SideNet size ratio must lie in (0, 1), got {ratio}")
    target = ratio * backbone_params
    groups, heads = int(arch["groups"]), int(arch["heads"])
    step = groups * heads // math.gcd(groups, heads)
    best, best_err = None, math.inf
    for width in range(step, 257, step):
        cand = {**arch, "width": width, "cond_dim": 2 * width}
        err = abs(count_params(SideNet(cand)) - target)
        if err < best_err:
            best, best_err = cand, err
    return best  # type: ignore[return-value]


@register_builder("sidenet")
def build(arch: dict) -> SideNet:
    """Checkpoint builder: ``arch`` as stored in a SideNet checkpoint's config.json."""
    return SideNet(arch)


# -- the backbone a SideNet belongs to ---------------------------------------------------------
IDENTITY_KEYS = ("state_shape", "num_classes", "null_label", "weights_sha256")


def backbone_identity(backbone: Any, config: Optional[dict] = None, path: Optional[str | Path] = None) -> dict:
    """What a SideNet checkpoint records about its backbone (checked by :func:`load_sidenet`).

    ``weights_sha256`` is the checkpoint's own hash when ``config`` is given, else the sha256
    of the module's weights serialised as safetensors (an in-memory backbone).
    """
    if config is not None and config.get("weights_sha256"):
        sha = config["weights_sha256"]
    else:
        st = require("safetensors.torch", extra="train")
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        sha = hashlib.sha256(st.save(state)).hexdigest()
    shape = getattr(backbone, "state_shape", None)
    if shape is None and hasattr(getattr(backbone, "spec", None), "state_shape"):  # a backbone adapter
        shape = backbone.spec.state_shape()
    null = getattr(backbone, "null_label", None)
    return {"state_shape": [int(s) for s in shape], "num_classes": int(getattr(backbone, "num_classes", 0) or 0),
            "null_label": None if null is None else int(null), "weights_sha256": sha,
            "path": None if path is None else str(path)}


def _facts(backbone: Any) -> dict:
    """Identity facts of a backbone given as a module, a checkpoint config dict, or a folder."""
    if isinstance(backbone, (str, Path)):
        return _facts(read_config(backbone))
    if not isinstance(backbone, dict):
        return backbone_identity(backbone)
    if "arch" not in backbone:  # already an identity dict
        return backbone
    arch, data = backbone.get("arch") or {}, backbone.get("data") or {}
    data = data if isinstance(data, dict) else {}
    shape = arch.get("state_shape", data.get("state_shape"))
    classes = arch.get("num_classes", data.get("num_classes"))
    return {"state_shape": None if shape is None else [int(s) for s in shape], "num_classes": classes,
            "null_label": arch.get("null_label", classes), "weights_sha256": backbone.get("weights_sha256")}


def check_backbone(sidenet_config: dict, backbone: Any, where: str = "SideNet") -> None:
    """Refuse (CheckpointError) a SideNet trained for another backbone; names what differs."""
    want = sidenet_config.get("backbone") or {}
    have = _facts(backbone)
    for key in IDENTITY_KEYS:
        if want.get(key) is None or have.get(key) is None:
            continue
        if want[key] != have[key]:
            raise CheckpointError(
                f"{where} was trained for another backbone: {key} is {want[key]!r} there but {have[key]!r} "
                "for this backbone; train a SideNet for it with 'anchorflow train sidenet --backbone MODEL'"
            )


def load_sidenet(path: str | Path, backbone: Any) -> "SideNet":
    """Load a SideNet checkpoint and check it belongs to ``backbone``.

    ``backbone``: the backbone checkpoint's config dict (or its folder, or the module itself).
    Returns the module in eval mode with its config as ``.checkpoint_config``.
    """
    module, cfg = load_checkpoint(path, kind="sidenet")
    check_backbone(cfg, backbone, where=f"the SideNet in {path}")
    module.checkpoint_config = cfg
    return module

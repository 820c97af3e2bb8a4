"""Reference velocity backbones ``v = f(x, t, y)`` for flow matching.

* :class:`DiT`: a class-conditional SiT/DiT-style transformer (Peebles & Xie, "Scalable Diffusion
  Models with Transformers", 2023; Ma et al., "SiT", 2024): patch embedding, fixed 2-D sin-cos
  positions, blocks with adaLN-Zero conditioning, final adaLN layer and a linear unpatchify.
* :class:`MLPBackbone`: a small conditional MLP for 2-D toys.

Both take x (B, *state_shape) float32, t (B,) float32 with t = 1 noise and t = 0 data, and y (B,)
int64 labels in 0..num_classes, where ``num_classes`` itself is the null label (classifier-free
guidance, Ho & Salimans 2022). They contain no data-dependent Python control flow, so they export
to ONNX with a dynamic batch axis.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..base.errors import ConfigError
from .checkpoint import register_builder


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (B,) in [0, 1] (scaled by 1000 as in DiT) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedder(nn.Module):
    """t (B,) -> (B, hidden): sinusoidal features followed by a 2-layer SiLU MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding, (grid*grid, dim), as in MAE / DiT."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], axis=1).astype(np.float32)


def split_mods(mods: torch.Tensor, n: int) -> list[torch.Tensor]:
    """(B, n*D) -> n tensors (B, D); plain indexing (``chunk`` exports a Split that opset 17 rejects)."""
    mods = mods.reshape(mods.shape[0], n, -1)
    return [mods[:, i] for i in range(n)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised elsewhere; shift/scale (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with plain matmuls (exports to any ONNX opset)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(-1, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning c (B, D) gives shift/scale/gate x2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = split_mods(self.ada(c), 6)
        x = x + g1[:, None, :] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None, :] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN + linear projection of each token to a patch (p*p*C values)."""

    def __init__(self, dim: int, patch: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = split_mods(self.ada(c), 2)
        return self.linear(modulate(self.norm(x), shift, scale))


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"backbone {key} must be positive, got {value}")


class DiT(nn.Module):
    """Class-conditional DiT velocity net for images (C, H, W); ``forward(x, t, y) -> v`` same shape as x.

    Default size for 8x8 digits: hidden 128, depth 4, heads 4, patch 2 (16 tokens), ~1.2 M parameters.
    """

    def __init__(self, state_shape=(1, 8, 8), num_classes: int = 10, hidden: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, patch: int = 2) -> None:
        super().__init__()
        c, h, w = (int(s) for s in state_shape)
        _check_positive(hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch,
                        num_classes=num_classes)
        if h != w or h % patch or hidden % heads or hidden % 4:
            raise ConfigError(f"DiT needs square images divisible by patch {patch} and hidden divisible by "
                              f"4 and by heads; got state {state_shape}, hidden {hidden}, heads {heads}")
        self.state_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.patch, self.grid = patch, h // patch
        self.x_embed = nn.Conv2d(c, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(hidden, self.grid))[None])
        self.t_embed = TimeEmbedder(hidden)
        self.y_embed = nn.Embedding(self.num_classes + 1, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden, patch, c)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, adaLN-Zero (zero gates and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for ada in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1] (1 = noise), y (B,) int64 (null = num_classes) -> v (B, C, H, W)."""
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        cond = self.t_embed(t) + self.y_embed(y)
        for block in self.blocks:
            tokens = block(tokens, cond)
        out = self.final(tokens, cond)
        c, p, g = self.state_shape[0], self.patch, self.grid
        out = out.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(-1, c, g * p, g * p)


class MLPBackbone(nn.Module):
    """Conditional MLP velocity net for flat states (D,): ``forward(x, t, y) -> v`` (B, D).

    x, a time embedding and a label embedding (num_classes + 1 rows, the last = null) are summed
    in a hidden layer followed by ``depth`` SiLU layers; the output layer starts at zero.
    """

    def __init__(self, state_shape=(2,), num_classes: int = 8, hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        _check_positive(hidden=hidden, depth=depth, num_classes=num_classes)
        if len(tuple(state_shape)) != 1:
            raise ConfigError(f"MLPBackbone needs a flat state shape like (2,), got {tuple(state_shape)}")
        dim = int(state_shape[0])
        self.state_shape = (dim,)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.x_in = nn.Linear(dim, hidden)
        self.t_embed = TimeEmbedder(hidden, freq_dim=64)
        self.y_embed = nn.Embedding(self.num_classes + 1, hidden)
        layers = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU())
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, D), t (B,) in [0, 1] (1 = noise), y (B,) int64 (null = num_classes) -> v (B, D)."""
        return self.out(self.body(self.x_in(x) + self.t_embed(t) + self.y_embed(y)))


ARCHS = {"dit": DiT, "mlp": MLPBackbone}


def default_arch(state_shape: tuple[int, ...], num_classes: int) -> dict:
    """The default architecture for a data set: DiT for images, MLP for flat states."""
    kind = "dit" if len(state_shape) == 3 else "mlp"
    return {"type": kind, "state_shape": list(state_shape), "num_classes": int(num_classes)}


@register_builder("backbone")
def build_backbone(arch: dict) -> nn.Module:
    """Build a backbone from its config ``arch`` dict: ``{"type": "dit"|"mlp", **constructor args}``."""
    arch = dict(arch)
    kind = arch.pop("type", None)
    if kind not in ARCHS:
        raise ConfigError(f"unknown backbone type {kind!r}; known: {', '.join(ARCHS)}")
    if "state_shape" in arch:
        arch["state_shape"] = tuple(arch["state_shape"])
    return ARCHS[kind](**arch)


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

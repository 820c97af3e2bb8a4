"""Tiny random-init diffusers transformers (SD3, FLUX-dev, FLUX-schnell, Sana) for the adapter and export
tests: one layer, 2 heads of 8, 4 latent channels, 16-d text; ~12-24 k parameters each."""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("sd3", "flux-dev", "flux-schnell", "sana")


def build(family: str, seed: int = 0):
    import torch
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    if family.startswith("flux"):
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, guidance_embeds=family == "flux-dev",
                                      axes_dims_rope=(2, 2, 4)).eval()
    if family == "sana":
        return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                      cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1).eval()
    raise ValueError(family)


def save(family: str, folder: Path, seed: int = 0) -> Path:
    """``save_pretrained`` of the tiny model into ``folder`` (config.json + safetensors)."""
    build(family, seed).save_pretrained(str(folder))
    return folder

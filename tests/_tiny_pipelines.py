"""Tiny random-init diffusers pipelines for the integration tests (offline, no text encoders, no VAE).

Each builder saves its transformer with ``save_pretrained`` and loads it back, as a user's model
would be loaded, then assembles the pipeline with ``vae=None`` and no text encoders; prompts are
given as embeddings and the output is ``output_type="latent"``. Time: sigma = t (1 noise, 0 data).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from diffusers.hooks import ModelHook

torch.set_num_threads(1)  # tiny models: threads only contend (30x slower on this shared 2-core machine)
B = 2  # prompts per call


class CallCount(ModelHook):
    """A diffusers hook that counts the transformer's forward calls (``.calls``)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def sd3_pipe(path) -> StableDiffusion3Pipeline:
    """SD3 architecture: 4 latent channels, 8x8 latents (64x64 "pixels"), shift 3."""
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                          pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).save_pretrained(path)
    tr = SD3Transformer2DModel.from_pretrained(path)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def flux_pipe(path) -> FluxPipeline:
    """FLUX architecture: 16 packed channels, 2x2 latent tokens, FLUX's dynamic (resolution) shift."""
    torch.manual_seed(0)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                           axes_dims_rope=(2, 2, 4)).save_pretrained(path)
    tr = FluxTransformer2DModel.from_pretrained(path)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=tr, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)


def sana_pipe(path) -> SanaPipeline:
    """Sana architecture with its default flow DPM-Solver scheduler (flow_shift 3), 8x8 latents."""
    torch.manual_seed(0)
    SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                           attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                           cross_attention_dim=8, caption_channels=16, sample_size=16).save_pretrained(path)
    tr = SanaTransformer2DModel.from_pretrained(path)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr, scheduler=sched)


def inputs(kind: str, cfg: float, steps: int, seed: int = 0) -> dict:
    """Pipeline arguments: random prompt embeddings (and negatives when guided), latent output."""
    g = torch.Generator().manual_seed(100 + seed)
    pe, pp = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=steps, output_type="latent",
              generator=torch.Generator().manual_seed(seed))
    if cfg != 1.0:
        kw.update(negative_prompt_embeds=torch.randn(B, 5, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(B, 8, generator=g))
    if kind == "sana":
        mask = torch.ones(B, 5)
        kw = dict(prompt_embeds=pe, prompt_attention_mask=mask, num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator().manual_seed(seed), height=64, width=64, guidance_scale=cfg,
                  use_resolution_binning=False, negative_prompt=None)
        if cfg != 1.0:
            kw.update(negative_prompt_embeds=torch.randn(B, 5, 16, generator=g), negative_prompt_attention_mask=mask)
    elif kind == "sd3":
        kw.update(height=64, width=64, guidance_scale=cfg)
    else:
        kw.update(height=32, width=32, guidance_scale=1.0, true_cfg_scale=cfg)
    return kw


def build(kind: str, path):
    return {"sd3": sd3_pipe, "flux": flux_pipe, "sana": sana_pipe}[kind](path)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, tmp_path_factory):
    """A tiny SD3 or FLUX pipeline (module-scoped), with its family in ``pipe.kind``."""
    p = build(request.param, tmp_path_factory.mktemp(request.param))
    p.set_progress_bar_config(disable=True)
    p.kind = request.param
    return p

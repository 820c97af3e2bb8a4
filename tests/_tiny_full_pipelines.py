"""Tiny random-init WHOLE diffusers pipelines (text encoders, tokenizers, VAE, transformer, scheduler),
built offline and saved with ``save_pretrained`` into a folder with ``model_index.json``.

Tokenizers are built locally (a 40-character BPE vocabulary for CLIP, a Unigram vocabulary for T5,
BPE for Gemma) with transformers' own tokenizer classes, so ``from_pretrained`` loads them as a
user's pipeline would. Sizes: a few 10 k parameters per part; 8x8 to 32x32 latents.
"""

from __future__ import annotations

import string
from pathlib import Path

CHARS = list(string.ascii_lowercase) + list("0123456789.,!")
FAMILIES = ("sd3", "flux-dev", "flux-schnell", "sana")


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length), len(vocab)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in CHARS]
    vocab += [(c, -2.0) for c in CHARS] + [("\u2581", -3.0), ("\u2581cat", -0.5), ("\u2581dog", -0.5)]
    return T5Tokenizer(vocab=vocab, extra_ids=0), len(vocab)


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    for c in CHARS + [":", "'", "-", "?", "<", ">", "\n"]:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("\u2581" + c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[]), len(vocab)


def _clip(cls_name: str, vocab: int, hidden: int, proj: int, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=proj, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                      pad_token_id=vocab - 1, hidden_act="gelu")
    return getattr(transformers, cls_name)(cfg).eval()


def _t5(vocab: int, d_model: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                   is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, scaling: float, shift, seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling, shift_factor=shift).eval()


def sd3(folder: Path):
    """SD3: CLIP-L-like (hidden 16, proj 8), CLIP-G-like (hidden 8, proj 8), T5 (d 32, 256 tokens),
    AutoencoderKL (4 latent channels, factor 2), SD3 transformer (patch 2, 8x8 latents)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, v = _clip_tokenizer()
    tok2, _ = _clip_tokenizer()
    tok3, v3 = _t5_tokenizer()
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, 1.5305, 0.0609, 1),
        text_encoder=_clip("CLIPTextModelWithProjection", v, 16, 8, 2), tokenizer=tok,
        text_encoder_2=_clip("CLIPTextModelWithProjection", v, 8, 8, 3), tokenizer_2=tok2,
        text_encoder_3=_t5(v3, 32, 4), tokenizer_3=tok3)
    pipe.save_pretrained(str(folder))
    return folder


def flux(folder: Path, dev: bool = True):
    """FLUX: CLIPTextModel (hidden 16 = pooled), T5 (d 32), AutoencoderKL (4 channels, factor 2),
    FLUX transformer (16 packed channels = 4 latent channels x 2x2), guidance embedded for dev."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, v = _clip_tokenizer()
    tok2, v2 = _t5_tokenizer()
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=16, guidance_embeds=dev, axes_dims_rope=(2, 2, 4)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=_vae(4, 0.3611, 0.1159, 1),
                        text_encoder=_clip("CLIPTextModel", v, 16, 16, 2), tokenizer=tok,
                        text_encoder_2=_t5(v2, 32, 4), tokenizer_2=tok2)
    pipe.save_pretrained(str(folder))
    return folder


def build(family: str, folder: Path) -> Path:
    folder = Path(folder)
    if family == "sd3":
        return sd3(folder)
    if family.startswith("flux"):
        return flux(folder, dev=family == "flux-dev")
    if family == "sana":
        return sana(folder)
    raise ValueError(family)


def _gemma(vocab: int, hidden: int, seed: int):
    import torch
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                       sliding_window=4096, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return Gemma2Model(cfg).eval()


def _dcae(seed: int):
    import torch
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                         encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                         encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                         upsample_block_type="interpolate", downsample_block_type="Conv",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def sana(folder: Path):
    """Sana: Gemma2 (hidden 16), DC-AE (4 latent channels, factor 2), Sana transformer (sample_size 16: 16x16 latents
    = 32x32 pixels at opt; exported H, W dynamic 2..64 latents), FlowMatchEulerDiscreteScheduler(shift=3) (the Euler
    counterpart of Sana's flow DPM-Solver)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tok, v = _gemma_tokenizer()
    torch.manual_seed(0)
    tr = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=16, sample_size=16, patch_size=1).eval()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=_gemma(v, 16, 2), vae=_dcae(1), transformer=tr,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(str(folder))
    return folder

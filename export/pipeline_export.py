"""A whole diffusers pipeline folder (``model_index.json``) -> a pipeline bundle (a superset of a
transformer bundle), every part checked against torch.

``export_pipeline(folder, out, ...)``:

1. reads ``model_index.json`` and refuses an unknown pipeline class or a missing component before
   any torch work (:func:`anchorflow.runtime.pipelines.format.check_pipeline_folder`);
2. exports the transformer as a transformer bundle does (:func:`.adapter_export.adapter_meta`, with
   an optional SideNet) into the new bundle;
3. exports each text encoder the pipeline uses (:mod:`.pipeline_parts`: dynamic batch, the outputs
   the pipeline's recipe reads) and the VAE decoder and encoder (dynamic latent H, W where the
   transformer has them), each checked in onnxruntime against torch;
4. stores each tokenizer as ``<tokenizer>/tokenizer.json`` (padding and truncation cleared; the
   runtime sets them exactly as the pipeline calls its tokenizer) and checks the torch-free
   tokenisation against the pipeline's tokenizer on probe prompts;
5. checks the whole torch-free prompt recipe (:mod:`anchorflow.runtime.pipelines.text`) against the
   pipeline's own ``encode_prompt`` on probe prompts (empty, short, longer than the maximum);
6. writes bundle.json with a ``pipeline`` section (:mod:`anchorflow.runtime.pipelines.format`).

Every graph goes through the one export pipeline (:mod:`.stages`). The bundle folder appears whole
or not at all (``anchorflow.base._io.atomic_dir``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..base._deps import require
from ..base._io import atomic_dir
from ..base.errors import CheckpointError, ConfigError
from ..runtime.bundles.format import file_record, read_bundle, write_bundle_json
from ..runtime.pipelines.format import FAMILY_OF, PIPELINE_FORMAT, check_pipeline_folder, parse_pipeline
from .onnx_export import DEFAULT_OPSET
from .pipeline_parts import export_part, text_part, vae_parts
from .stages import relative_max

PROBES = ("", "a red cat", "a dog and a cat on a red car, photo, 4k")
EMBED_TOL = 1e-4  # recipe parity: max |ours - encode_prompt| / max(1, max |encode_prompt|)

# per family: (encoder, tokenizer, kind, outputs, layer, max length source)
TEXT = {
    "sd3": (("text_encoder", "tokenizer", "clip", ("pooled", "hidden"), -2),
            ("text_encoder_2", "tokenizer_2", "clip", ("pooled", "hidden"), -2),
            ("text_encoder_3", "tokenizer_3", "t5", ("hidden",), -1)),
    "flux": (("text_encoder", "tokenizer", "clip", ("pooled",), -1),
             ("text_encoder_2", "tokenizer_2", "t5", ("hidden",), -1)),
    "sana": (("text_encoder", "tokenizer", "gemma", ("hidden",), -1),),
}
DEFAULTS = {  # the pipeline's own __call__ defaults
    "sd3": {"guidance_scale": 7.0, "num_inference_steps": 28, "max_sequence_length": 256},
    "flux-dev": {"guidance_scale": 3.5, "num_inference_steps": 28, "max_sequence_length": 512},
    "flux-schnell": {"guidance_scale": 1.0, "num_inference_steps": 4, "max_sequence_length": 512},
    "sana": {"guidance_scale": 4.5, "num_inference_steps": 20, "max_sequence_length": 300},
}


def _sana_instruction(pipe: Any) -> tuple[str, int]:
    """SanaPipeline's default complex human instruction (joined as its encode step joins it) and its
    token count with special tokens (``len(tokenizer.encode(chi))``)."""
    import inspect

    chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    text = "\n".join(chi) if chi else ""
    return text, (len(pipe.tokenizer.encode(text)) if text else 0)


def _max_length(family: str, kind: str, tokenizer: Any, text_len: int, chi_tokens: int = 0) -> int:
    if kind == "gemma":  # Sana: the instruction's tokens + max_sequence_length - 2 (its select_index keeps 300)
        return (chi_tokens + int(DEFAULTS[family]["max_sequence_length"]) - 2) if chi_tokens else \
            int(DEFAULTS[family]["max_sequence_length"])
    if kind == "clip":
        return int(tokenizer.model_max_length)
    return min(int(DEFAULTS[family]["max_sequence_length"]), text_len)


def _tokenizer_entry(tmp: Path, name: str, tokenizer: Any, max_length: int, mask: bool) -> dict:
    """Save the backend tokenizer (padding/truncation cleared) as ``name/tokenizer.json``."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"the pipeline's {name} ({type(tokenizer).__name__}) has no tokenizers backend "
                              "(tokenizer.json); save the pipeline with a fast tokenizer")
    tokenizers = require("tokenizers", extra="pipeline", purpose="pipeline bundles")
    tok = tokenizers.Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.no_truncation()
    (tmp / name).mkdir(exist_ok=True)
    tok.save(str(tmp / name / "tokenizer.json"))
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"the pipeline's {name} has no pad token; diffusers pads to max_length with it")
    return {**file_record(tmp, f"{name}/tokenizer.json"), "class": type(tokenizer).__name__,
            "max_length": int(max_length), "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token),
            "padding_side": str(getattr(tokenizer, "padding_side", "right")), "attention_mask": bool(mask)}


def _check_tokenizer(bundle_dir: Path, name: str, entry: dict, tokenizer: Any) -> dict:
    """Our torch-free tokenisation equals the pipeline tokenizer's call (padding=max_length, truncation)."""
    from ..runtime.pipelines.text import TextTokenizer

    ours = TextTokenizer(bundle_dir / entry["file"], entry)
    probes = [*PROBES, " ".join(["a red dog"] * (entry["max_length"] // 2 + 4))]
    ids, _, _ = ours(probes)
    ref = tokenizer(probes, padding="max_length", max_length=entry["max_length"], truncation=True,
                    add_special_tokens=True).input_ids
    if not np.array_equal(ids, np.asarray(ref, np.int64)):
        raise CheckpointError(f"export refused: the torch-free {name} tokenises differently from the pipeline's "
                              f"{type(tokenizer).__name__}; nothing was written")
    return {"probes": len(probes), "equal": True}


def _encode_reference(pipe: Any, family: str, prompts: list, negative: Optional[list], max_seq: int) -> dict:
    """The pipeline's own encode_prompt, as our recipe's output names."""
    with torch.no_grad():
        if family == "sd3":
            pe, ne, pp, npool = pipe.encode_prompt(prompts, prompts, prompts, negative_prompt=negative,
                                                   do_classifier_free_guidance=negative is not None,
                                                   max_sequence_length=max_seq, device="cpu")
            out = {"encoder_hidden_states": pe, "pooled_projections": pp}
            if negative is not None:
                out.update({"null:encoder_hidden_states": ne, "null:pooled_projections": npool})
        elif family == "sana":
            import inspect

            chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
            pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=negative is not None,
                                                negative_prompt=negative, device="cpu", max_sequence_length=max_seq,
                                                complex_human_instruction=chi)  # as __call__ passes it
            out = {"encoder_hidden_states": pe, "encoder_attention_mask": pm}
            if negative is not None:
                out.update({"null:encoder_hidden_states": ne, "null:encoder_attention_mask": nm})
        else:
            pe, pp, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=max_seq)
            out = {"encoder_hidden_states": pe, "pooled_projections": pp}
    return {k: v.float().numpy() for k, v in out.items()}


def _check_recipe(bundle_dir: Path, pipe: Any, family: str, max_seq: int) -> dict:
    """The torch-free prompt recipe over the exported encoders equals ``pipe.encode_prompt``."""
    from ..runtime.pipelines.pipeline import load_text

    text = load_text(bundle_dir)
    prompts, negative = list(PROBES[1:]), ["", "blurry"]
    guided = family in ("sd3", "sana")
    ours = text.encode(prompts, negative if guided else None)
    ref = _encode_reference(pipe, family, prompts, negative if guided else None, max_seq)
    worst = 0.0
    for key, r in ref.items():
        name, null = (key.split(":", 1)[1], True) if key.startswith("null:") else (key, False)
        got = (ours.null if null else ours.cond)[name]
        if got.shape != r.shape:
            raise CheckpointError(f"export refused: the recipe's {key} has shape {got.shape}, encode_prompt gives "
                                  f"{r.shape}; nothing was written")
        err = relative_max(got, r)
        worst = max(worst, err)
        if not err <= EMBED_TOL:
            raise CheckpointError(f"export refused: the torch-free prompt recipe's {key} differs from the pipeline's "
                                  f"encode_prompt by {err:.2e} (allowed {EMBED_TOL:.0e}); nothing was written")
    return {"against": f"{type(pipe).__name__}.encode_prompt", "prompts": len(prompts), "tolerance": EMBED_TOL,
            "max_rel_err": worst, "passed": True}


def export_pipeline(folder: str | os.PathLike, out: str | os.PathLike, *, max_batch: int = 8,
                    opset: int = DEFAULT_OPSET, validate: bool = True, axes: Optional[dict] = None,
                    command: Optional[str] = None, sidenet: Optional[str] = None,
                    precisions: Sequence[str] = ("fp32",)) -> Any:
    """Export the pipeline in ``folder`` to the bundle ``out`` (see the module docstring)."""
    from .adapter_export import adapter_meta
    from .bundle import BundleExport
    from .stages import finish
    from ..trainers.adapters.diffusers import ADAPTERS

    folder = Path(folder)
    index = check_pipeline_folder(folder)
    cls_name = index["_class_name"]
    family = FAMILY_OF[cls_name]
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be a positive integer, got {max_batch}")
    diffusers = require("diffusers", extra="diffusers", purpose="exporting diffusers pipelines")
    require("tokenizers", extra="pipeline", purpose="pipeline bundles")
    start = time.perf_counter()
    try:
        pipe = getattr(diffusers, cls_name).from_pretrained(str(folder))
    except Exception as exc:  # diffusers/transformers raise many types while loading
        raise CheckpointError(f"cannot load the {cls_name} in {folder}: {str(exc).splitlines()[0][:300]}") from exc
    tr_cls = type(pipe.transformer).__name__
    if tr_cls not in ADAPTERS:
        raise CheckpointError(f"{folder}/transformer holds a {tr_cls}; a {cls_name} bundle needs {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[tr_cls].build(pipe.transformer.to("cpu"), folder.name or family, axes)
    spec = adapter.spec
    variant = family
    if family == "flux":
        variant = "flux-dev" if pipe.transformer.config.guidance_embeds else "flux-schnell"
    side = None
    if sidenet is not None:
        from ..trainers.sidenet import load_sidenet

        side = load_sidenet(sidenet, adapter)
    text_len = int(spec.axes.get("L", (1, 16, 512))[2])
    vae = pipe.vae
    vc = dict(vae.config)
    factor = 2 ** (len(vc.get("block_out_channels") or vc["encoder_block_out_channels"]) - 1)
    chi, chi_tokens = _sana_instruction(pipe) if family == "sana" else ("", 0)
    channels = int(spec.state[0])
    if int(vae.config.latent_channels) != channels:
        raise CheckpointError(f"the VAE has {vae.config.latent_channels} latent channels but the transformer takes "
                              f"{channels}; the pipeline folder is inconsistent")
    parts_log: dict = {}
    out = Path(out)
    with atomic_dir(out) as tmp:
        t0 = time.perf_counter()
        meta = adapter_meta(adapter, tmp, max_batch=max_batch, opset=opset, validate=validate, external_data=None,
                            source={"kind": "diffusers-pipeline", "path": os.path.abspath(folder), "family": spec.family},
                            command=command, sidenet=side, sidenet_path=sidenet, precisions=precisions, start=t0)
        meta = finish(tmp, meta, precisions)  # the transformer bundle (+ int8 / fp8), then the parts beside it
        parts_log["transformer"] = round(time.perf_counter() - t0, 2)
        rows = 2 * int(max_batch)  # prompts and negative prompts in one call
        texts = {}
        for enc_name, tok_name, kind, outputs, layer in TEXT[family]:
            model, tokenizer = getattr(pipe, enc_name), getattr(pipe, tok_name)
            if model is None or tokenizer is None:
                raise CheckpointError(f"{folder} has no {enc_name if model is None else tok_name}; a {cls_name} "
                                      "bundle needs every text encoder and tokenizer")
            length = _max_length(variant, kind, tokenizer, text_len, chi_tokens)
            masked = kind == "gemma"
            if masked:
                tokenizer.padding_side = "right"  # as SanaPipeline sets it before every call
            part = text_part(enc_name, model.float(), kind, length, rows, int(model.config.vocab_size), outputs, layer,
                             masked)
            entry = export_part(part, tmp, opset, validate)
            entry["tokenizer"] = _tokenizer_entry(tmp, tok_name, tokenizer, length, masked)
            entry["tokenizer"]["validation"] = _check_tokenizer(tmp, tok_name, entry["tokenizer"], tokenizer)
            texts[enc_name] = entry
            parts_log[enc_name] = entry["seconds"]
        hr = spec.axes.get("H")
        lat = (int(hr[0]), int(hr[1]), int(hr[2])) if hr else (int(spec.state[1]),) * 3
        vae_entries = {}
        for part in vae_parts(vae.float(), factor, channels, lat, int(max_batch), hr is None):
            vae_entries[part.name.split("_")[1]] = export_part(part, tmp, opset, validate)
            parts_log[part.name] = vae_entries[part.name.split("_")[1]]["seconds"]
        mult = int(spec.multiples.get("H", 1)) * factor
        sched = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        d = DEFAULTS[variant]
        section = {
            "format": PIPELINE_FORMAT, "class": cls_name, "family": family, "variant": variant,
            "text_encoders": texts,
            "recipe": {"family": family,
                       "max_sequence_length": int(DEFAULTS[variant]["max_sequence_length"]) if family == "sana"
                       else int(texts[TEXT[family][-1][0]]["tokenizer"]["max_length"]),
                       "joint_attention_dim": int(getattr(pipe.transformer.config, "joint_attention_dim", 0) or 0),
                       "negative_prompt": "", **({"complex_human_instruction": chi, "instruction_tokens": chi_tokens,
                                                  "preprocess": "lower-strip"} if family == "sana" else {})},
            "vae": {**vae_entries, "scaling_factor": float(vae.config.scaling_factor),
                    "shift_factor": float(vc.get("shift_factor") or 0.0), "spatial_factor": int(factor),
                    "latent_channels": channels},
            "scheduler": {"class": type(pipe.scheduler).__name__, "config": json.loads(json.dumps(sched, default=str))},
            "image": {"min": lat[0] * factor, "opt": lat[1] * factor, "max": lat[2] * factor, "multiple": mult},
            "defaults": {"guidance_scale": d["guidance_scale"], "num_inference_steps": d["num_inference_steps"]},
            "export_seconds": parts_log,
        }
        meta["pipeline"] = section
        meta["export"]["command"] = command
        meta["export"]["seconds"] = round(time.perf_counter() - start, 2)
        parse_pipeline(meta, tmp)  # the section as the runtime will read it
        write_bundle_json(tmp, meta)
        if validate:
            t0 = time.perf_counter()
            meta["pipeline"]["recipe"]["validation"] = _check_recipe(tmp, pipe, family, section["recipe"]["max_sequence_length"])
            parts_log["recipe_check"] = round(time.perf_counter() - t0, 2)
            meta["export"]["seconds"] = round(time.perf_counter() - start, 2)
            write_bundle_json(tmp, meta)
    read_bundle(out)
    return BundleExport(out, meta)

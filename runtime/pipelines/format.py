"""The ``pipeline`` section of bundle.json (a pipeline bundle = a transformer bundle + this), torch-free.

A transformer-only bundle has no ``pipeline`` key and is read exactly as before by
:mod:`.bundle_format`; a pipeline bundle adds::

    "pipeline": {
      "format": "anchorflow.pipeline/1", "class": "StableDiffusion3Pipeline", "family": "sd3",
      "variant": "sd3" | "flux-dev" | "flux-schnell" | "sana",
      "text_encoders": {NAME: {"file", "sha256", "bytes", "inputs", "outputs", "class", "kind": "clip"|"t5"|"gemma",
                               "layer", "validation",
                               "tokenizer": {"file": "tokenizer/tokenizer.json", "sha256", "bytes",
                                             "max_length", "pad_id", "pad_token", "padding_side",
                                             "attention_mask"}}},
      "recipe": {"family", "max_sequence_length", "joint_attention_dim", "negative_prompt", "validation"?,
                 Sana: "complex_human_instruction", "instruction_tokens", "preprocess": "lower-strip"},
      "vae": {"decoder": FILE, "encoder": FILE, "scaling_factor", "shift_factor", "spatial_factor",
              "latent_channels"},
      "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": {...}},
      "image": {"min", "opt", "max", "multiple"},          # pixel H and W
      "defaults": {"guidance_scale", "num_inference_steps"}}

Files are hash-checked and kept inside the bundle like the networks (``bundle_format.inside`` /
``verify_file``). Nothing named in the section is imported or run as code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...base.errors import CheckpointError, ConfigError
from ..bundles.format import inside, verify_file

PIPELINE_FORMAT = "anchorflow.pipeline/1"
FAMILY_OF = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "SanaPipeline": "sana"}
VARIANTS = ("sd3", "flux-dev", "flux-schnell", "sana")
KINDS = ("clip", "t5", "gemma")
# components each pipeline class needs (model_index.json entries that must name a saved folder)
COMPONENTS = {
    "StableDiffusion3Pipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                                 "tokenizer_2", "text_encoder_3", "tokenizer_3"),
    "FluxPipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "SanaPipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
}


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a ``model_index.json`` (what a diffusers pipeline's save_pretrained writes)."""
    return (Path(path).expanduser() / "model_index.json").is_file()


def check_pipeline_folder(folder: str | os.PathLike) -> dict:
    """``model_index.json`` of a pipeline folder, refusing an unknown class or a missing component (torch-free)."""
    folder = Path(folder).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / 'model_index.json'}: {exc}") from None
    cls_name = index.get("_class_name") if isinstance(index, dict) else None
    if cls_name not in COMPONENTS:
        raise CheckpointError(f"{folder} holds a {cls_name!r} pipeline; anchorflow exports "
                              f"{', '.join(COMPONENTS)} pipelines (or export its transformer folder alone)")
    missing = [c for c in COMPONENTS[cls_name]
               if not (isinstance(index.get(c), list) and index[c][0] is not None and (folder / c).is_dir())]
    if missing:
        raise CheckpointError(f"{folder} lacks the {cls_name} component(s) {', '.join(missing)} (model_index.json "
                              "entry or folder); save the whole pipeline with save_pretrained")
    return index


@dataclass(frozen=True)
class PipelineDecl:
    """The validated ``pipeline`` section."""

    folder: Path
    section: dict

    @property
    def family(self) -> str:
        return self.section["family"]

    @property
    def variant(self) -> str:
        return self.section["variant"]

    @property
    def text_encoders(self) -> dict:
        return self.section["text_encoders"]

    @property
    def vae(self) -> dict:
        return self.section["vae"]

    @property
    def image(self) -> dict:
        return self.section["image"]

    @property
    def defaults(self) -> dict:
        return self.section["defaults"]

    @property
    def scheduler(self) -> dict:
        return self.section["scheduler"]

    def file(self, entry: dict, what: str, verify: bool = True) -> Path:
        """The hash-checked path of a part's file, inside the bundle."""
        return verify_file(inside(self.folder, entry["file"], what), entry["sha256"], verify)

    def check_size(self, height: int, width: int) -> None:
        """Refuse a pixel H/W outside the exported range or not a multiple of the patch x VAE factor."""
        im = self.image
        for name, v in (("height", height), ("width", width)):
            if not im["min"] <= v <= im["max"] or v % im["multiple"]:
                raise ConfigError(f"--{name} {v} is not one this bundle takes: {im['min']}..{im['max']} pixels, a "
                                  f"multiple of {im['multiple']} (patch size x VAE factor; re-export with --axis "
                                  "H=MIN:OPT:MAX for other latent sizes)")


def _need(cond: bool, where: Any, key: str, expected: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: pipeline.{key} must be {expected}; re-export the bundle (or undo the edit)")


def _file_entry(where: Any, e: Any, key: str) -> None:
    _need(isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str), where, key,
          "a file record {file, sha256}")


def parse_pipeline(meta: dict, folder: str | os.PathLike, where: Any = "bundle.json") -> PipelineDecl | None:
    """The ``pipeline`` section of a bundle.json dict, validated; None for a transformer-only bundle."""
    s = meta.get("pipeline")
    if s is None:
        return None
    _need(isinstance(s, dict), where, "", "an object")
    _need(s.get("format") == PIPELINE_FORMAT, where, "format", repr(PIPELINE_FORMAT))
    _need(s.get("class") in FAMILY_OF and s.get("family") == FAMILY_OF[s.get("class")], where, "class/family",
          "a known pipeline class and its family")
    _need(s.get("variant") in VARIANTS, where, "variant", " | ".join(VARIANTS))
    texts = s.get("text_encoders")
    _need(isinstance(texts, dict) and texts, where, "text_encoders", "a non-empty object")
    for name, e in texts.items():
        _file_entry(where, e, f"text_encoders.{name}")
        _need(e.get("kind") in KINDS, where, f"text_encoders.{name}.kind", " | ".join(KINDS))
        tok = e.get("tokenizer")
        _file_entry(where, tok, f"text_encoders.{name}.tokenizer")
        for k in ("max_length", "pad_id"):
            _need(isinstance(tok.get(k), int) and not isinstance(tok.get(k), bool) and tok[k] >= (1 if k == "max_length"
                                                                                                  else 0),
                  where, f"text_encoders.{name}.tokenizer.{k}", "a non-negative integer")
        _need(tok.get("padding_side") in ("left", "right"), where, f"text_encoders.{name}.tokenizer.padding_side",
              "left | right")
    vae = s.get("vae")
    _need(isinstance(vae, dict), where, "vae", "an object")
    _file_entry(where, vae.get("decoder"), "vae.decoder")
    for k in ("scaling_factor", "shift_factor"):
        _need(isinstance(vae.get(k), (int, float)) and not isinstance(vae.get(k), bool), where, f"vae.{k}", "a number")
    _need(vae["scaling_factor"] != 0, where, "vae.scaling_factor", "non-zero")
    im = s.get("image")
    _need(isinstance(im, dict) and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("min", "opt", "max", "multiple"))
          and im["min"] <= im["opt"] <= im["max"], where, "image", "{min <= opt <= max, multiple} positive integers")
    sched = s.get("scheduler")
    _need(isinstance(sched, dict) and isinstance(sched.get("config"), dict), where, "scheduler", "{class, config}")
    _need(isinstance(s.get("defaults"), dict), where, "defaults", "an object")
    return PipelineDecl(Path(folder), s)

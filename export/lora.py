"""LoRA files as diffusers and PEFT write them, read torch-free (safetensors + numpy).

Supported layouts (the ones diffusers' ``load_lora_weights`` reads for SD3 / FLUX / Sana
transformers once converted to its own naming, and PEFT's ``get_peft_model_state_dict``)::

    [transformer.|base_model.model.]MODULE.lora_A[.ADAPTER].weight   (r, in[, kh, kw])   "down"
    [transformer.|base_model.model.]MODULE.lora_B[.ADAPTER].weight   (out, r[, 1, 1])    "up"
    ... also lora.down / lora.up and lora_down / lora_up, and an optional MODULE.alpha scalar

The scaling of each layer is PEFT's: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), with
``lora_alpha`` from the file's ``MODULE.alpha`` tensor, else from the ``lora_adapter_metadata`` that
diffusers writes into the safetensors header (``transformer.lora_alpha``, ``alpha_pattern``), else
``r`` (scaling 1, what diffusers assumes when a file carries no alpha). The fused weight is
``W + scale * scaling * (up @ down)``, as PEFT's ``merge`` computes it. DoRA and text-encoder
layers are refused (the bundle's backbone is the transformer alone).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base._deps import require
from ..base.errors import ConfigError

PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.")
_KEY = re.compile(r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)"
                  r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")
_DOWN, _UP = ("lora_A", "lora.down", "lora_down"), ("lora_B", "lora.up", "lora_up")
FOREIGN = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "lora_unet_", "lora_te", "lora_transformer_")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``delta = scaling * up @ down`` for the weight ``module + ".weight"``."""

    module: str
    down: np.ndarray
    up: np.ndarray
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """The weight change, float32, in the torch layout ``shape`` (out, in[, kh, kw])."""
        out, r = self.up.shape[0], self.up.shape[1]
        if self.down.shape[0] != r:
            raise ConfigError(f"LoRA layer {self.module}: lora_A has rank {self.down.shape[0]} but lora_B rank {r}")
        d = self.up.reshape(out, r).astype(np.float32) @ self.down.reshape(r, -1).astype(np.float32)
        if int(np.prod(shape)) != d.size or shape[0] != out:
            raise ConfigError(f"LoRA layer {self.module} makes a {out}x{d.shape[1]} change for a weight of shape "
                              f"{tuple(shape)}: the LoRA was trained for another model size or architecture")
        return (np.float32(self.scaling) * d).reshape(shape)


@dataclass(frozen=True)
class LoraFile:
    """The layers of one LoRA file, its sha256 and what was read from its header."""

    path: Path
    sha256: str
    layers: tuple[LoraLayer, ...]
    skipped: tuple[str, ...]  # foreign keys not fused (e.g. text-encoder layers), said to the user


def _metadata(meta: Optional[dict]) -> dict[str, Any]:
    raw = (meta or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for k, v in (data.items() if isinstance(data, dict) else ()):
        out[k.split(".", 1)[1] if k.startswith("transformer.") else k] = v
    return out


def _pattern(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` look-up: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def read_lora(path: str | Path) -> LoraFile:
    """Read ``path`` (a .safetensors LoRA) into layers with their scaling; one-line ConfigError otherwise."""
    from ..base._io import sha256_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--lora {path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if size <= 1 or size > min(path.stat().st_size - 8, 100 << 20):
        raise ConfigError(f"--lora {path}: not a safetensors file (its 8-byte header length is {size}); "
                          "LoRAs must be .safetensors (a pickled .bin/.pt file is never loaded)")
    st = require("safetensors", extra="export", purpose="reading LoRA files")
    try:
        from safetensors.numpy import load_file

        with st.safe_open(str(path), framework="np") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ConfigError(f"--lora {path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    cfg = _metadata(meta)
    if cfg.get("use_dora"):
        raise ConfigError(f"--lora {path}: a DoRA adapter (use_dora) cannot be fused as a low-rank sum; fuse it in "
                          "torch and re-export")
    parts: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    skipped = []
    for key, arr in tensors.items():
        if key.startswith(FOREIGN):
            skipped.append(key)
            continue
        k = _strip(key)
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(np.asarray(arr, dtype=np.float64).reshape(-1)[0])
            continue
        m = _KEY.match(k)
        if not m:
            raise ConfigError(f"--lora {path}: key {key!r} is not a LoRA layer (expected MODULE.lora_A.weight / "
                              "MODULE.lora_B.weight, diffusers' or PEFT's naming)")
        role = "down" if m["part"] in _DOWN else "up"
        parts.setdefault(m["mod"], {})[role] = np.asarray(arr)
    if not parts:
        raise ConfigError(f"--lora {path}: holds no transformer LoRA layers"
                          + (f" (only {skipped[0]} ... for another part of the pipeline)" if skipped else ""))
    layers = []
    for mod in sorted(parts):
        p = parts[mod]
        if set(p) != {"down", "up"}:
            raise ConfigError(f"--lora {path}: layer {mod} has only its {'/'.join(p)} matrix")
        for role, a in p.items():
            if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
                raise ConfigError(f"--lora {path}: layer {mod} {role} is not finite floating-point data")
        r = int(p["down"].shape[0])
        alpha = alphas.get(mod, _pattern(cfg.get("alpha_pattern") or {}, mod, cfg.get("lora_alpha", r)))
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"--lora {path}: layer {mod} has a non-numeric alpha {alpha!r}")
        scaling = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        layers.append(LoraLayer(mod, p["down"], p["up"], scaling))
    return LoraFile(path, sha256_file(path), tuple(layers), tuple(skipped))

"""The sigmas a diffusers pipeline's scheduler uses, in numpy (torch-free), as our time grid.

diffusers' sigma is our t (1 noise, 0 data). ``FlowMatchEulerDiscreteScheduler.set_timesteps``
(diffusers 0.3x-0.4x), replayed step by step in the same dtypes so the float32 sigmas are the same
numbers: without explicit sigmas (SD3) ``linspace(t(sigma_max), t(sigma_min), N) / T``, where
sigma_min is the shifted smallest training sigma computed in float32; with them (FLUX:
``linspace(1, 1/N, N)`` as float32) as given; then the static shift ``s x / (1 + (s-1) x)`` or the
dynamic one ``exp(mu) / (exp(mu) + (1/x - 1))`` (FLUX: ``mu`` from the packed image token count,
``calculate_shift``), ``shift_terminal`` stretching, and a final 0. Karras / exponential / beta
sigma conversions and inverted sigmas are refused (not flow-matching grids from 1 to 0).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...base.errors import ConfigError


def calculate_shift(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return seq_len * m + b


def flow_match_sigmas(config: dict, steps: int, sigmas: Optional[np.ndarray] = None,
                      mu: Optional[float] = None) -> np.ndarray:
    """``steps + 1`` sigmas (float32 values, returned as float64) from 1 down to 0."""
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if config.get(flag):
            raise ConfigError(f"the bundle's scheduler sets {flag}; generate runs flow-matching grids from 1 to 0 "
                              "without it (pass an explicit --grid)")
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    dynamic = bool(config.get("use_dynamic_shifting"))
    if sigmas is None:
        train = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / np.float32(T)
        if not dynamic:
            train = (np.float32(shift) * train / (1 + (np.float32(shift) - 1) * train)).astype(np.float32)
        s_max, s_min = float(train[0]), float(train[-1])
        s = np.linspace(s_max * T, s_min * T, steps) / T
    else:
        s = np.asarray(sigmas).astype(np.float32)
    if dynamic:
        if mu is None:
            raise ConfigError("internal error: a dynamic-shift scheduler needs mu")
        if config.get("time_shift_type", "exponential") == "linear":
            s = mu / (mu + (1 / s - 1))
        else:
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = shift * s / (1 + (shift - 1) * s)
    if config.get("shift_terminal"):
        one = 1 - s
        s = 1 - one / (one[-1] / (1 - float(config["shift_terminal"])))
    out = np.concatenate([np.asarray(s, dtype=np.float32), np.zeros(1, np.float32)]).astype(np.float64)
    return out


def pipeline_sigmas(family: str, scheduler: dict, steps: int, latent_hw: tuple[int, int]) -> np.ndarray:
    """The grid the diffusers pipeline of ``family`` would run for ``steps`` steps at this latent size."""
    cls, config = scheduler.get("class"), dict(scheduler.get("config") or {})
    if cls == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas"):
        return dpm_flow_sigmas(config, steps)
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError(f"the bundle's scheduler is {cls}; generate replays FlowMatchEulerDiscreteScheduler "
                          "sigmas only (pass an explicit --grid)")
    sig, mu = None, None
    if family == "flux" and not config.get("use_flow_sigmas"):
        sig = np.linspace(1.0, 1 / steps, steps)
    if config.get("use_dynamic_shifting"):
        h, w = latent_hw
        seq = (h // 2) * (w // 2) if family == "flux" else (h // 2) * (w // 2)
        mu = calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    g = flow_match_sigmas(config, steps, sig, mu)
    g[0] = 1.0 if abs(g[0] - 1.0) < 1e-6 else g[0]
    return g


def dpm_flow_sigmas(config: dict, steps: int) -> np.ndarray:
    """Sana's default ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` sigmas, ``1 - linspace(1, 1/T,
    N + 1)`` shifted by ``flow_shift`` and flipped, the last dropped, then 0 appended; its first
    sigma (1 - 1/T shifted, 0.99967 for shift 3) is set to exactly 1 (our grids start at the noise)."""
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("flow_shift") or 1.0)
    s = 1.0 - np.linspace(1, 1 / T, steps + 1)
    s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
    out = np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)]).astype(np.float64)
    out[0] = 1.0
    return out

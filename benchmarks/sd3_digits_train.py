"""Train a small SD3 transformer (diffusers ``SD3Transformer2DModel``) on the digits by flow matching.

A real third-party architecture trained on real data, standing in for "your SD3": the digits
(scikit-learn, 8x8, one channel, [-1, 1]) are its latents as they are (patch 2 -> a 4 x 4 token
grid, so no padding or upsampling is needed; ``pos_embed_max_size`` 4). There is no text
encoder: each class gets a fixed random "prompt embedding", a sequence of ``L`` vectors
(``encoder_hidden_states`` (L, joint_attention_dim)) and a pooled vector (``pooled_projections``),
standing in for a text encoder's output; the empty prompt (the CFG null condition) is one more
fixed random pair. 10 % of the training rows get the empty prompt (classifier-free guidance).

Flow matching in anchorflow's convention, which is also SD3's: ``x_t = (1 - t) x + t eps``,
t = 1 noise, t = 0 data, target ``eps - x``, and the model is called with ``timestep = 1000 t``.
t ~ U(0, 1), AdamW with warm-up and cosine decay, EMA weights (trainers/flow.py's helpers).

    python benchmarks/sd3_digits_train.py [--steps 3500] [--batch 128] [--threads 1]
        [--out benchmarks/results/sd3_digits/model]

Writes OUT/transformer/ (``save_pretrained``: config.json + safetensors, the EMA weights),
OUT/prompts.npz (one row per class 0..9: ``encoder_hidden_states``, ``pooled_projections``, ``y``),
OUT/null_prompt.npz (the empty prompt, one row) and OUT/train_config.json (command, settings,
loss log, wall time).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sd3_digits" / "model"
# Our config: 4 joint blocks of width 96 (3 heads of 32), about the bundled DiT's size (1.29 M parameters).
CONFIG = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=32,
              num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=96, pooled_projection_dim=32,
              pos_embed_max_size=4)
TEXT_LEN = 4
NUM_CLASSES = 10


def make_prompts(seed: int = 1234) -> tuple[dict, dict]:
    """Per-class prompt embeddings (10 rows) and the empty prompt (1 row), fixed by ``seed``.

    Unit-variance Gaussian vectors, like a normalised text encoder's output.
    """
    rng = np.random.default_rng(seed)
    d, p = CONFIG["joint_attention_dim"], CONFIG["pooled_projection_dim"]
    ehs = rng.standard_normal((NUM_CLASSES + 1, TEXT_LEN, d)).astype(np.float32)
    pooled = rng.standard_normal((NUM_CLASSES + 1, p)).astype(np.float32)
    prompts = {"encoder_hidden_states": ehs[:NUM_CLASSES], "pooled_projections": pooled[:NUM_CLASSES],
               "y": np.arange(NUM_CLASSES, dtype=np.int64)}
    null = {"encoder_hidden_states": ehs[NUM_CLASSES:], "pooled_projections": pooled[NUM_CLASSES:]}
    return prompts, null


def save_npz(path: Path, arrays: dict) -> None:
    import io

    from anchorflow.base import _io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _io.write_bytes(path, buf.getvalue())


def _save_transformer(module, out: Path, _io) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        module.save_pretrained(tmp)
        with _io.atomic_dir(out / "transformer") as final:
            for f in Path(tmp).iterdir():
                (final / f.name).write_bytes(f.read_bytes())


def train(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    from tqdm.auto import tqdm

    from anchorflow.base import _io
    from anchorflow.trainers.data import load_dataset
    from anchorflow.trainers.flow import EMA, lr_at

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = SD3Transformer2DModel(**CONFIG)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    x_all, y_all = (torch.from_numpy(a) for a in load_dataset("digits", "train", seed=0))
    prompts, null = make_prompts()
    ehs = torch.from_numpy(np.concatenate([prompts["encoder_hidden_states"], null["encoder_hidden_states"]]))
    pooled = torch.from_numpy(np.concatenate([prompts["pooled_projections"], null["pooled_projections"]]))
    log, window, start = [], [], time.perf_counter()
    for step in tqdm(range(args.steps), desc="train SD3 digits", dynamic_ncols=True, mininterval=10):
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(args.batch, generator=gen) < args.dropout, torch.full_like(y, NUM_CLASSES), y)
        t = torch.rand(args.batch, generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x + tb * eps
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.steps, args.warmup)
        v = model(x_t, ehs[y], pooled[y], 1000.0 * t, return_dict=False)[0]
        loss = torch.mean((v - (eps - x)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        window.append(float(loss))
        if (step + 1) % 250 == 0:
            log.append([step + 1, sum(window) / len(window)])
            window = []
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            _save_transformer(ema.module, Path(args.out), _io)  # the EMA weights so far (atomic)
    wall = time.perf_counter() - start
    out = Path(args.out)
    save_npz(out / "prompts.npz", prompts)
    save_npz(out / "null_prompt.npz", null)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"command": shlex.join(["python", *sys.argv]), "config": CONFIG, "text_len": TEXT_LEN,
            "settings": vars(args), "param_count": n_params, "wall_s": round(wall, 1), "loss_log": log,
            "objective": "flow matching x_t=(1-t)x+t*eps (t=1 noise), target eps-x, timestep=1000t, "
                         "t~U(0,1), 10% empty-prompt rows, EMA weights"}
    _io.write_json(out / "train_config.json", info)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    info = train(args)
    print(f"wrote {args.out}: {info['param_count']:,} parameters, {info['wall_s']:.0f} s, "
          f"final loss {info['loss_log'][-1][1] if info['loss_log'] else float('nan'):.4f}")


if __name__ == "__main__":
    main()

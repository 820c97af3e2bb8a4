"""Bring-your-own-backbone export per model family at two sizes: export time, ONNX size, parity, ORT latency.

For SD3, FLUX-dev, FLUX-schnell and Sana (random-init diffusers transformers, built here and written
with save_pretrained), ``anchorflow export FOLDER --precision fp16`` is timed end to end (torch.export,
ONNX translation, fp32 and fp16 graphs, parity of both against torch fp32 at 3 batches x 2 axis
sizes), then onnxruntime CPU latency per backbone call
is measured (median of ``--repeats`` calls after 3 warm-ups, batch 2 rows, text length 16, one
thread). Results: ``benchmarks/results/backbones.json`` / ``.md``. Timings are noisy on a shared
machine: the load average is recorded next to them.

    python benchmarks/backbones.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # family -> size -> diffusers config overrides (heads x head_dim, layers, latent channels)
    "tiny": dict(layers=1, heads=2, head_dim=8, text=16, channels=4, latent=8),
    "small": dict(layers=2, heads=4, head_dim=16, text=64, channels=16, latent=16),
}
FAMILIES = ("sd3", "flux-dev", "flux-schnell", "sana")


def build(family: str, size: str):
    import torch
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    c = SIZES[size]
    torch.manual_seed(0)
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=c["latent"], patch_size=2, in_channels=c["channels"],
                                     num_layers=c["layers"], attention_head_dim=c["head_dim"],
                                     num_attention_heads=c["heads"], joint_attention_dim=c["text"],
                                     caption_projection_dim=c["heads"] * c["head_dim"], pooled_projection_dim=c["text"],
                                     out_channels=c["channels"], pos_embed_max_size=2 * c["latent"])
    if family.startswith("flux"):
        d = c["head_dim"]
        return FluxTransformer2DModel(patch_size=1, in_channels=4 * c["channels"], num_layers=c["layers"],
                                      num_single_layers=c["layers"], attention_head_dim=d, num_attention_heads=c["heads"],
                                      joint_attention_dim=c["text"], pooled_projection_dim=c["text"],
                                      guidance_embeds=family == "flux-dev", axes_dims_rope=(d // 4, d // 4, d // 2))
    return SanaTransformer2DModel(in_channels=c["channels"], out_channels=c["channels"], num_attention_heads=c["heads"],
                                  attention_head_dim=c["head_dim"], num_layers=c["layers"],
                                  num_cross_attention_heads=c["heads"], cross_attention_head_dim=c["head_dim"],
                                  cross_attention_dim=c["heads"] * c["head_dim"], caption_channels=c["text"],
                                  sample_size=c["latent"], patch_size=1)


def latency_ms(bundle: Path, repeats: int) -> float:
    from anchorflow.runtime.bundles.load import load_bundle

    b = load_bundle(bundle, backend="ort-cpu", threads=1)
    rng = np.random.default_rng(0)
    decl = b.format.backbone
    sizes = {a: (16 if a == "L" else r[1]) for a, r in decl.axes.items()}
    dim = lambda d: 2 if d == "batch" else sizes.get(d, d) if isinstance(d, str) else d  # noqa: E731
    feeds = {i.name: rng.standard_normal([dim(d) for d in i.shape]).astype(np.float32) for i in decl.conditions}
    x = rng.standard_normal([dim(d) for d in decl.input("state").shape]).astype(np.float32)
    if "encoder_attention_mask" in feeds:
        feeds["encoder_attention_mask"] = np.ones(feeds["encoder_attention_mask"].shape, np.int64)
    t = np.full(2, 0.5, np.float32)
    for _ in range(3):
        b.velocity(x, t, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        b.velocity(x, t, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def run_one(family: str, size: str, folder: Path, repeats: int) -> dict:
    from click.testing import CliRunner

    from anchorflow.cli import cli

    model = build(family, size)
    params = sum(p.numel() for p in model.parameters())
    src, bundle = folder / f"{family}-{size}", folder / f"{family}-{size}-bundle"
    model.save_pretrained(str(src))
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["export", str(src), "--out", str(bundle), "--max-batch", "2", "--precision", "fp16"])
    seconds = time.perf_counter() - start
    row = {"family": family, "size": size, "params": params, "export_s": round(seconds, 1)}
    if res.exit_code != 0:
        return {**row, "status": "refused", "reason": str(res.exception)[:300]}
    meta = json.loads((bundle / "bundle.json").read_text())
    bb = meta["networks"]["backbone"]
    onnx_bytes = bb["bytes"] + sum(e["bytes"] for e in bb.get("external_data") or [])
    return {**row, "status": "ok", "onnx_mb": round(onnx_bytes / 1e6, 3),
            "parity_max_abs": bb["validation"]["worst"]["max_abs"], "parity_cases": len(bb["validation"]["cases"]),
            "fp16_parity_mean_abs": bb["precisions"]["fp16"]["validation"]["worst"]["mean_abs"],
            "ort_cpu_ms_per_call": round(latency_ms(bundle, repeats), 3)}


def write(rows: list[dict], command: str, load: tuple) -> None:
    out = ROOT / "benchmarks" / "results"
    record = {"command": command, "load_average": load, "rows": rows,
              "notes": "random-init diffusers transformers; export = the whole `anchorflow export --precision fp16` "
                       "command (fp32 + fp16 graphs, both checked); parity: fp32 max abs, fp16 mean abs, vs torch "
                       "fp32; latency: the fp32 graph, onnxruntime CPU, 1 thread, 2 rows, text length 16, median"}
    (out / "backbones.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Backbone export per family\n\n`{command}` (load average {load[0]:.1f} on 2 cores at the end; "
             f"per row {', '.join(str(r['load_1min']) for r in rows)})\n",
             "| family | size | params | export s | ONNX MB (fp32) | fp32 parity max abs | fp16 parity mean abs "
             "| ORT CPU ms/call (fp32) | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['size']} | {r['params']:,} | {r['export_s']} | {r.get('onnx_mb', '')} | "
                     f"{r.get('parity_max_abs', '')} | {r.get('fp16_parity_mean_abs', '')} | "
                     f"{r.get('ort_cpu_ms_per_call', '')} | "
                     f"{r['status']}{': ' + r['reason'] if r.get('reason') else ''} |")
    (out / "backbones.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sizes", default=",".join(SIZES))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            for family in a.families.split(","):
                rows.append({**run_one(family, size, Path(tmp), a.repeats), "load_1min": round(os.getloadavg()[0], 1)})
                print(json.dumps(rows[-1]), flush=True)
                write(rows, "python benchmarks/backbones.py " + " ".join(sys.argv[1:]), os.getloadavg())


if __name__ == "__main__":
    main()

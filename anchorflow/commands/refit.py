"""`anchorflow refit`: fuse LoRAs into a bundle's backbone weights (no re-export), or undo it."""

from __future__ import annotations

import click


@click.command("refit")
@click.argument("bundle")
@click.option("--lora", "loras", multiple=True, type=click.Path(dir_okay=False),
              help="A LoRA .safetensors file (diffusers' or PEFT's naming). Repeat for several.")
@click.option("--scale", "scales", multiple=True, type=float,
              help="LoRA strength: one for all, or one per --lora in order [default: 1].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write the refitted bundle here [default: replace BUNDLE in place, atomically].")
@click.option("--unfuse", is_flag=True,
              help="Undo every fused LoRA: the base bundle's files come back byte for byte.")
def refit(bundle, loras, scales, out, unfuse) -> None:
    """Fuse LoRA adapters into BUNDLE's backbone without re-exporting the graph.

    Only the initializers holding the adapted weights change (in the fp32 graph and every precision
    variant); hashes are updated and bundle.json records each LoRA (file sha256, scale, layers) and
    the base weights, so `--unfuse` restores the base bundle exactly. The backbone's output is
    compared before and after: the cached first-call table is dropped when the t = 1 velocity moved,
    tuned grids are dropped when the velocity changed by more than 5 % (rerun `anchorflow tune`);
    the SideNet is kept and marked as trained for the base weights.

    \b
    Examples:
      anchorflow refit sd3-bundle --lora style.safetensors --scale 0.8 --out sd3-style
      anchorflow refit sd3-bundle --lora a.safetensors --lora b.safetensors --scale 1 --scale 0.5
      anchorflow refit sd3-style --unfuse --out sd3-base
    """
    from ..base._deps import require_extra
    from ..base.errors import ConfigError

    require_extra("export", "fusing LoRAs into a bundle", modules=["onnx", "safetensors"])
    from ..export.refit import refit_bundle, unfuse_bundle

    if str(bundle) == "default" and out is None:
        raise ConfigError("the bundled model is read-only; give --out for the refitted copy")
    if unfuse:
        if loras or scales:
            raise ConfigError("--unfuse takes no --lora or --scale (it removes every fused LoRA)")
        result = unfuse_bundle(bundle, out)
    else:
        result = refit_bundle(bundle, loras, scales, out)
    for note in result.notes:
        click.echo(note, err=True)
    click.echo(f"wrote {result.path}")

"""The ``anchorflow`` command line.

Thin and lazy: each command lives in ``anchorflow.commands.<module>`` and imports its heavy
libraries inside the function, so ``anchorflow --help`` is instant and works without torch.
Every user error prints one ``error:`` line; the exit status follows :func:`exit_status`
(2 for a command line that cannot be parsed, 1 for everything else the user can fix).
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .commands.lazygroup import LazyGroup
from .base.errors import AnchorflowError

# command name -> (module, attribute, one-line help shown by `anchorflow --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("demo", "demo", "Run the bundled model end to end and write a results folder."),
    "sample": ("sample", "sample", "Generate samples with any solver (torch-free on a bundle)."),
    "train": ("train", "train", "Train a backbone, a SideNet or the evaluation classifier (needs [train])."),
    "export": ("export", "export", "Export backbone and SideNet to a validated ONNX bundle (needs [export])."),
    "inspect": ("export", "inspect", "Print a bundle's metadata."),
    "verify": ("verify", "verify", "Parity test one bundle across backends (torch, ORT CPU/CUDA/TRT, TensorRT)."),
    "build": ("build", "build", "Build cached TensorRT engines for a bundle (needs [trt] and a GPU)."),
    "bench": ("bench", "bench", "Benchmark solvers: quality against a reference, NFE, timing; writes a report."),
    "serve": ("serve", "serve", "Serve a bundle over HTTP on Ray Serve, batching concurrent requests (needs [serve])."),
    "tune": ("tune", "tune", "Tune each solver's time grid per budget (and the cached first call) into a bundle."),
    "bandit": ("bandit", "bandit", "Inspect FastFlow bandit state files."),
    "solvers": ("info", "solvers", "List the solvers the runtime knows."),
    "invert": ("invert", "invert", "Invert an image to its noise (t = 0 -> 1) in N backbone calls."),
    "edit": ("invert", "edit", "Edit an image: invert under one condition, regenerate under another."),
    "refit": ("refit", "refit", "Fuse LoRAs into a bundle's backbone weights without re-export (--unfuse undoes it)."),
    "generate": ("generate", "generate", "Prompt -> image on a pipeline bundle, torch-free (needs [pipeline])."),
}


class RootGroup(LazyGroup):
    """The ``anchorflow`` group: its sub-commands are the :data:`COMMANDS` table."""

    commands_table = COMMANDS


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="anchorflow")
def cli() -> None:
    """anchorflow: few-step sampling for flow-matching generators.

    Train a small SideNet next to a frozen backbone, export both to ONNX, build TensorRT
    engines, and sample in a few network calls with the BA-solver or FastFlow, on a GPU
    server or a torch-free edge box. MODEL arguments accept `default` (the bundled digits
    model), a checkpoint folder or an exported bundle folder.

    Time convention: t = 1 is noise, t = 0 is data; NFE counts backbone calls.
    """


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def exit_status(exc: BaseException) -> int:
    """The exit rule of the whole CLI (docs/architecture.md, "Exit status").

    2: the command line cannot be parsed (unknown command or option, missing argument, a value
    that is not of the option's type or choice). 1: everything else the user can fix, from a
    value out of range to a missing file, a failed check or a full disk. 130: interrupted.
    """
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        return 130
    if (isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter)
            and isinstance(getattr(exc.param, "type", None), click.Path)):
        return 1  # a file-system check (exists, file or folder), not a malformed command line
    if isinstance(exc, click.UsageError):
        return 2
    return 1


def _message(exc: BaseException) -> str:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # a group without its command: help on stdout
        click.echo(exc.ctx.get_help())
        return f"missing command; choose one of the commands above (see '{exc.ctx.command_path} --help')"
    if isinstance(exc, click.UsageError):
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _one_line(exc.format_message()) + where
    if isinstance(exc, click.ClickException):
        return _one_line(exc.format_message())
    if isinstance(exc, AnchorflowError):
        return _one_line(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; ask for fewer samples (--n) or a smaller model"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return _one_line(f"{where}{exc.strerror or exc}")
    return _one_line(exc)


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open, so its error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; every user error ends in ONE ``error:`` line and :func:`exit_status`."""
    try:
        cli.main(args=argv, prog_name="anchorflow", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (click.ClickException, AnchorflowError, OSError, MemoryError) as exc:
        _close_progress_bars()
        click.echo(f"error: {_message(exc)}", err=True)
        sys.exit(exit_status(exc))


if __name__ == "__main__":  # pragma: no cover
    main()

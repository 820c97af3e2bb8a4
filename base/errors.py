"""The one user-facing exception family, and the one way to print a warning.

The CLI prints ``str(error)`` on one line and exits with status 1; any other exception is a bug.
Validate user input with ``if ...: raise SomeError(...)``, never ``assert``. Exit status 2 is
only for a command line that cannot be parsed (click's usage errors); see docs/architecture.md.
"""

import sys


class AnchorflowError(Exception):
    """Base class of every error a user can cause; the message says what was wrong and what to do."""


class ConfigError(AnchorflowError):
    """Bad arguments or options (non-positive counts, unknown names, impossible requests)."""


class CheckpointError(AnchorflowError):
    """A checkpoint or bundle is missing, unreadable, tampered with, or does not match its config."""


class MissingDependencyError(AnchorflowError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


class BackendError(AnchorflowError):
    """An execution backend (onnxruntime provider, TensorRT engine) could not be used as asked."""


class StateFileError(AnchorflowError):
    """A persisted state file (e.g. FastFlow bandit state) is corrupt, foreign or mismatched."""


class OutputError(AnchorflowError, OSError):
    """An output location cannot be written (missing, read-only or full disk, a file where a folder is).

    Also an OSError, so code that handles write failures as OSError keeps doing so.
    """


class NonFiniteError(AnchorflowError):
    """A network or a training loss produced NaN or Inf; nothing computed from it is written."""


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (never a Python warning with its file and line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)

"""``python -m anchorflow ...``: the same command line as the ``anchorflow`` script.

This is also the entry point for multi-process training, which torchrun starts as a module:
``torchrun --standalone --nproc_per_node=K -m anchorflow train sidenet ...``.
"""

from anchorflow.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses in the tests
    main()

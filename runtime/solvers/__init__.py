"""Built-in solvers; importing this package registers each of them in ``SOLVERS``."""

import importlib

# Each module registers its solvers with @register. A module that does not exist yet is skipped
# only while the package is being built up; every listed module must exist in a release.
for _name in ("classic", "multistep", "ba", "fastflow"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # TODO(integration): make strict once all modules exist
        if _exc.name != f"{__name__}.{_name}":
            raise

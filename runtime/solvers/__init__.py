"""Built-in solvers; importing this package registers each of them in ``SOLVERS``."""

import importlib

# Each module registers its solvers with @register.
for _name in ("classic", "multistep", "unipc", "ba", "fastflow"):
    importlib.import_module(f"{__name__}.{_name}")

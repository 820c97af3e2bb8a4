"""SideNets trained with offsets from the tuned grids against the bundled one, on the digits.

benchmarks/sidenet_offsets.py keyed by the SideNet's folder name (both SideNets here have the
FiLM offset form, so keying by form would collide). ``sidenet`` (the bundled SideNet,
arXiv 2601.21542): offsets |h| from the truncated exponential of rate 50. ``sidenet_gridh``
(``--offset-grids anchorflow/bundled/digits/bundle``): half of the offsets are BA's probe offsets
(a L, (1-a) L, L toward data, a L toward noise) on the interval of length L that holds t in one of
the bundle's tuned BA grids. Both by the same recipe otherwise (250 iterations, batch 128, chain
8, rate 50, lr 3e-3, seed 0; commands in each checkpoint's config.json). The committed run scored
the bundled SideNet of that time (250 iterations); the bundled one now has 1000.

What is scored and how: see benchmarks/sidenet_offsets.py (BA at 3 / 5 / 10 calls, uniform and tuned
grids, guidance 1.0 and 1.5, 64 samples, RK4-256 reference).

    python benchmarks/sidenet_gridh_eval.py [--n 64] [SIDENET_DIR ...]

Writes benchmarks/results/digits/sidenet_gridh_eval.json and .md. Time convention: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sidenet_offsets  # noqa: E402

ROOT = sidenet_offsets.ROOT
OUT = ROOT / "benchmarks" / "results" / "digits" / "sidenet_gridh_eval"
DEFAULT = (sidenet_offsets.DIGITS / "sidenet", ROOT / "benchmarks/results/digits/sidenet_gridh")


def main(argv=None) -> dict:
    return sidenet_offsets.main(argv, script="benchmarks/sidenet_gridh_eval.py", out=OUT, key="folder",
                                default=DEFAULT, description=__doc__)


if __name__ == "__main__":
    main()

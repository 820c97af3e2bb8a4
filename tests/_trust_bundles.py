"""Fixtures for the trust tests: bundles made by the real exporter (a factory module, the digits copy)
and a factory that would leave a marker file behind if anything ever imported or ran it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

FACTORY = '''
import torch

class Toy(torch.nn.Module):
    """v = x * w * tau + mean_L(text), model time tau = 1 - t (flip)."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.linspace(0.1, 0.4, 4).reshape(1, 4, 1, 1))

    def forward(self, x, tau, text):
        return x * self.w * tau[:, None, None, None] + text.mean(1)[:, :2, None, None] + self.b[:, :2]

def make():
    spec = {"name": "toy", "state": (2, 4, 4), "axes": {"L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 3)}],
            "time": {"map": "flip"}, "guidance": {"mode": "rows"}}
    return Toy(), spec
'''

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

def make():
    Path({marker!r}).write_text("ran")
    raise SystemExit("evil factory ran")
'''


def write_factory(folder: Path) -> str:
    """A benign factory file; returns its ``path.py:make`` source."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_factory.py").write_text(FACTORY)
    return f"{folder / 'toy_factory.py'}:make"


def write_evil(folder: Path, marker: Path) -> dict[str, str]:
    """The evil factory as a file (``/x/evil.py:make``) and as a module (``evil_mod:make``, with
    ``folder`` on sys.path); importing or calling either writes ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(EVIL.format(marker=str(marker)))
    (folder / "evil.py").write_text(code)
    (folder / "evil_mod.py").write_text(code)
    return {"file": f"{folder / 'evil.py'}:make", "module": "evil_mod:make"}


def point_source_at(bundle: Path, source: str) -> None:
    """Rewrite bundle.json's recorded backbone source (bundle.json has no hash of its own)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["networks"]["backbone"]["source"]["path"] = source
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))

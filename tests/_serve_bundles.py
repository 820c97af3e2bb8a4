"""Bundles made by the real exporter for the serve tests: a tiny diffusers SD3 folder and the factory
``test_adapters:make_backbone``, each exported once per test session through the CLI (~15 s together).

Import the fixture into a test module (``from _serve_bundles import exported_bundles``); pytest caches a
session-scoped fixture once for every module that uses it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def exported_bundles(tmp_path_factory) -> dict:
    """{"sd3": bundle folder, "factory": bundle folder}, both with ``data_range`` null (latents)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from anchorflow.cli import cli
    from tiny_diffusers import save

    root = tmp_path_factory.mktemp("serve_exported")
    src = save("sd3", root / "sd3-transformer")
    out = {"sd3": root / "sd3-bundle", "factory": root / "factory-bundle"}
    for args in ([str(src), "--out", str(out["sd3"]), "--max-batch", "8", "--axis", "L=1:6:12"],
                 ["test_adapters:make_backbone", "--out", str(out["factory"]), "--max-batch", "8"]):
        res = CliRunner().invoke(cli, ["export", *args])
        assert res.exit_code == 0, res.output
    return out

"""The TensorRT extras in pyproject.toml pick one CUDA major each.

``pip install 'anchorflow[trt]'`` used to say ``tensorrt>=10`` and ``cuda-python>=12``, which pip
resolves to the newest CUDA 13 builds: on CUDA 12 drivers and on Jetson that fails at the first
CUDA call. Each requirement is evaluated here with ``packaging`` (pip's own requirement logic)
against the versions and platforms it must accept or refuse.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
X86 = {"sys_platform": "linux", "platform_machine": "x86_64", "platform_release": "6.8.0-45-generic"}
JETSON = {"sys_platform": "linux", "platform_machine": "aarch64", "platform_release": "5.15.148-tegra"}
SBSA = {"sys_platform": "linux", "platform_machine": "aarch64", "platform_release": "6.8.0-1015-nvidia-64k"}


def _extras() -> dict[str, list[Requirement]]:
    data = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in data.items()}


def _expand(name: str, extras: dict) -> list[Requirement]:
    """The requirements of extra ``name`` with ``anchorflow[...]`` self-references followed."""
    out = []
    for req in extras[name]:
        if req.name == "anchorflow":
            for inner in req.extras:
                out += _expand(inner, extras)
        else:
            out.append(req)
    return out


def _active(reqs: list[Requirement], env: dict) -> dict[str, Requirement]:
    return {r.name: r for r in reqs if r.marker is None or r.marker.evaluate(env)}


@pytest.mark.parametrize("extra, cuda", [("trt-cu12", 12), ("trt-cu13", 13)])
def test_trt_extra_holds_one_cuda_major(extra: str, cuda: int) -> None:
    reqs = _active(_expand(extra, _extras()), X86)
    flavoured = [n for n in reqs if re.search(r"cu\d+", n)]
    assert flavoured == [f"tensorrt-cu{cuda}"], reqs  # no unflavoured `tensorrt` (resolves to the newest CUDA)
    trt = reqs[f"tensorrt-cu{cuda}"].specifier
    assert "10.16.1.11" in trt and "11.4.0.106" in trt and "12.0.0" not in trt and "8.6.1" not in trt
    cuda_python = reqs["cuda-python"].specifier
    assert f"{cuda}.9.0" in cuda_python or f"{cuda}.4.4" in cuda_python
    assert f"{cuda + 1}.0.0" not in cuda_python and f"{cuda - 1}.9.10" not in cuda_python
    assert "polygraphy" in reqs


@pytest.mark.parametrize("extra", ["trt-cu12", "trt-cu13", "trt-test"])
def test_no_tensorrt_wheel_on_jetson(extra: str) -> None:
    """JetPack ships its own TensorRT (10.x) for the Tegra kernel; a pip wheel would shadow it."""
    extras = _extras()
    assert not [n for n in _active(_expand(extra, extras), JETSON) if n.startswith("tensorrt")]
    assert [n for n in _active(_expand(extra, extras), SBSA) if n.startswith("tensorrt")]  # Grace/ARM servers do get it


def test_plain_trt_is_the_cuda12_flavour_and_dev_installs_the_lean_runtime() -> None:
    extras = _extras()
    assert _active(_expand("trt", extras), X86) == _active(_expand("trt-cu12", extras), X86)
    dev = _active(_expand("dev", extras), X86)
    assert "tensorrt-lean-cu12" in dev and "tensorrt-cu12" not in dev  # CI gets real bindings without a GPU build
    assert "10.15.1.29" in dev["tensorrt-lean-cu12"].specifier

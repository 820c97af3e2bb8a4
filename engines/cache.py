"""The engine cache inside a bundle: ``<bundle>/engines/trt/<key>.engine`` plus ``manifest.json``.

A serialized TensorRT engine runs only on the TensorRT version and the GPU model it was built
for. Its cache key therefore hashes everything that makes it valid or different: the ONNX
file's sha256, the precision, the optimisation profile (row range and every input's shapes,
resolution included), every builder option (optimisation level, workspace limit, TF32), the
TensorRT version and the GPU (compute capability and name). ``manifest.json`` records every engine with those fields, its build time, size and
sha256. An engine whose key fields do not match the running TensorRT/GPU, or whose ONNX has
changed since, is refused with the command that rebuilds it; it is never handed to TensorRT.

Layout::

    <bundle>/engines/trt/manifest.json              {"schema": "anchorflow.trt-manifest/1", "engines": {key: entry}}
    <bundle>/engines/trt/<network>-<precision>-<digest16>.engine
    <bundle>/engines/trt/timing-trt<version>-sm<XY>.cache   (TensorRT tactic timing cache)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from ..base._io import read_json, sha256_file, write_bytes, write_json
from ..base.errors import BackendError, CheckpointError

MANIFEST = "manifest.json"
SCHEMA = "anchorflow.trt-manifest/1"
KEY_VERSION = 2  # bump when the key's fields change meaning (2: builder options joined the key)


@dataclass(frozen=True)
class EngineEnv:
    """Where an engine is valid: TensorRT version and GPU (name, compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} ({self.sm})"

    def to_json(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": list(self.compute_capability)}

    @classmethod
    def from_json(cls, data: dict) -> "EngineEnv":
        return cls(str(data["tensorrt_version"]), str(data["gpu_name"]), tuple(int(v) for v in data["compute_capability"]))


def current_env(trt: Any) -> EngineEnv:
    """The running TensorRT and the current CUDA device (needs cuda-python)."""
    from .cuda import device_info

    name, cc = device_info()
    return EngineEnv(str(trt.__version__), name, cc)


@dataclass(frozen=True)
class EngineKey:
    """The identity of one engine; ``name`` is its file stem and manifest key."""

    network: str
    precision: str
    onnx_sha256: str
    profile: dict  # Profile.to_json()
    env: EngineEnv
    builder: dict = field(default_factory=dict)  # BuildOptions.builder_fields(): opt_level, workspace_mb, tf32

    def fields(self) -> dict:
        return {"key_version": KEY_VERSION, "network": self.network, "precision": self.precision,
                "onnx_sha256": self.onnx_sha256, "profile": self.profile, "builder": dict(self.builder),
                **self.env.to_json()}

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.network}-{self.precision}-{self.digest[:16]}"


def onnx_file(bundle: str | Path, spec: Any, precision: str) -> tuple[Path, str]:
    """(path, identity) of ``spec``'s ONNX graph in ``precision``, its file and external weights hash-checked.

    The identity is the file's sha256, or, with external data (networks over 2 GB), the sha256 of
    every file's sha256 in order: an engine is keyed on the weights too, not only on the graph.
    """
    from ..runtime.bundles.format import inside, verify_file

    entry = spec.entry(precision)
    shas = [entry["sha256"]]
    for extra in entry.get("external_data") or ():
        verify_file(inside(Path(bundle), extra["file"], f"the {spec.name} {precision} weights"), extra["sha256"])
        shas.append(extra["sha256"])
    path = verify_file(inside(Path(bundle), entry["file"], f"the {spec.name} {precision} file"), entry["sha256"])
    identity = shas[0] if len(shas) == 1 else hashlib.sha256(":".join(shas).encode()).hexdigest()
    return path, identity


def onnx_identity(spec: Any, precision: str) -> str:
    """The identity :func:`onnx_file` gives, from bundle.json alone (no file read)."""
    entry = spec.entry(precision)
    shas = [entry["sha256"], *(e["sha256"] for e in entry.get("external_data") or ())]
    return shas[0] if len(shas) == 1 else hashlib.sha256(":".join(shas).encode()).hexdigest()


def engine_dir(bundle: str | Path) -> Path:
    return Path(bundle) / "engines" / "trt"


def timing_cache_path(bundle: str | Path, env: EngineEnv) -> Path:
    """Default timing cache, one per TensorRT version and GPU architecture (caches are not portable)."""
    return engine_dir(bundle) / f"timing-trt{env.tensorrt_version}-{env.sm.replace('_', '')}.cache"


_LOCKS: dict[str, FileLock] = {}


def lock(bundle: str | Path) -> FileLock:
    """Inter-process lock serialising builds and manifest updates of one bundle.

    One FileLock object per path, so a process re-entering the lock (build -> record) does not deadlock.
    """
    folder = engine_dir(bundle)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write engines into {folder} ({exc.strerror}); copy the bundle to a writable folder") from None
    path = str((folder / ".lock").resolve())
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(path)
    return _LOCKS[path]


# -- manifest ----------------------------------------------------------------------------------
def read_manifest(bundle: str | Path) -> dict:
    """The manifest (an empty one when none exists); a foreign or corrupt manifest is refused."""
    path = engine_dir(bundle) / MANIFEST
    if not path.exists():
        return {"schema": SCHEMA, "engines": {}}
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("engines"), dict):
        raise CheckpointError(f"{path} is not an anchorflow TensorRT manifest ({SCHEMA}); delete {path.parent} and rebuild")
    return data


def record_engine(bundle: str | Path, key: EngineKey, data: bytes, build_seconds: float, onnx_file: str = "") -> Path:
    """Write ``data`` as ``<key>.engine`` and its manifest entry, both atomically; returns the engine path."""
    folder = engine_dir(bundle)
    path = folder / f"{key.name}.engine"
    with lock(bundle):
        write_bytes(path, data)
        manifest = read_manifest(bundle)
        manifest["engines"][key.name] = {
            **key.fields(), "file": path.name, "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "build_seconds": round(float(build_seconds), 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "onnx_file": onnx_file,
        }
        write_json(folder / MANIFEST, manifest)
    return path


def cached(bundle: str | Path, key: EngineKey) -> Optional[Path]:
    """The engine file for exactly ``key`` if the manifest lists it and the file is intact, else None."""
    entry = read_manifest(bundle)["engines"].get(key.name)
    if entry is None:
        return None
    path = engine_dir(bundle) / entry["file"]
    return path if path.is_file() and sha256_file(path) == entry["sha256"] else None


# -- selection and refusal -----------------------------------------------------------------------
def mismatches(entry: dict, env: EngineEnv, onnx_sha256: str) -> list[str]:
    """Why a manifest entry cannot run here (empty when it can)."""
    try:
        built = EngineEnv.from_json(entry)
    except (KeyError, TypeError, ValueError):
        return ["its manifest entry is incomplete"]
    reasons = []
    if built.tensorrt_version != env.tensorrt_version:
        reasons.append(f"built with TensorRT {built.tensorrt_version}, this is TensorRT {env.tensorrt_version}")
    if built.compute_capability != env.compute_capability or built.gpu_name != env.gpu_name:
        reasons.append(f"built for {built.gpu_name} ({built.sm}), this GPU is {env.gpu_name} ({env.sm})")
    if entry.get("onnx_sha256") != onnx_sha256:
        reasons.append("built from a different ONNX file than the bundle holds now (re-exported?)")
    if entry.get("key_version") != KEY_VERSION:
        reasons.append(f"written by another anchorflow engine format (key version {entry.get('key_version')})")
    return reasons


def rebuild_hint(bundle: str | Path, precision: str) -> str:
    return f"anchorflow build {bundle} --precision {precision} --force"


def select_engine(bundle: str | Path, network: str, precision: str, onnx_sha256: str, env: EngineEnv) -> tuple[Path, dict]:
    """The newest valid engine for (network, precision) on ``env``; BackendError saying how to rebuild otherwise."""
    entries = [e for e in read_manifest(bundle)["engines"].values()
               if e.get("network") == network and e.get("precision") == precision]
    valid = [e for e in entries if not mismatches(e, env, onnx_sha256)]
    if valid:
        entry = max(valid, key=lambda e: e.get("built_at", ""))
        return engine_dir(bundle) / entry["file"], entry
    if not entries:
        raise BackendError(
            f"no TensorRT {precision} engine for the {network} in {bundle}; build it with "
            f"`anchorflow build {bundle} --precision {precision}`"
        )
    newest = max(entries, key=lambda e: e.get("built_at", ""))
    reasons = "; ".join(mismatches(newest, env, onnx_sha256))
    raise BackendError(
        f"refusing the cached {network} {precision} engine ({newest['file']}): {reasons}. "
        f"Engines are tied to one TensorRT version and GPU: rebuild with `{rebuild_hint(bundle, precision)}`"
    )


def read_engine(bundle: str | Path, entry: dict) -> bytes:
    """The engine bytes, checked against the manifest's sha256 (a changed file is refused)."""
    path = engine_dir(bundle) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the manifest but missing; rebuild with `{rebuild_hint(bundle, entry['precision'])}`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its manifest sha256 (modified or truncated); rebuild with "
                              f"`{rebuild_hint(bundle, entry['precision'])}`")
    return data


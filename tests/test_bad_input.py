"""The bad-input matrix: every command, the inputs a new user or a fault injector types.

Each case runs ``anchorflow ARGV`` in-process (``anchorflow.cli.main``, as the script does) from an
empty working folder and asserts: the exit status (2 only for a command line that cannot be
parsed, else 1), exactly one ``error:`` line on stderr containing the expected words, no
traceback, and that no file on disk changed (the fixture models, the working folder and the
installed package's bundled models: paths, sizes and modification times). Inputs that need
missing torch are in tests/test_robust.py (a fresh interpreter each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anchorflow.cli import main

from _bundles import ROOT, copy_root, flip_byte, poison_onnx, train_further

BAR = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm progress bar line, e.g. "bench:   0%|    | 0/24"
HAS_TORCH = __import__("importlib").util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Broken and healthy models, a plain file, an empty folder; made once for the matrix."""
    base = tmp_path_factory.mktemp("world")
    w = {"root": copy_root(base / "root")}
    w["tampered"] = copy_root(base / "tampered", ("bundle",))
    flip_byte(w["tampered"] / "bundle" / "backbone.onnx")
    w["tampered16"] = copy_root(base / "tampered16", ("bundle",))
    flip_byte(w["tampered16"] / "bundle" / "backbone.fp16.onnx")
    w["nan"] = copy_root(base / "nan", ("bundle",))
    poison_onnx(w["nan"] / "bundle", "backbone")
    w["inf"] = copy_root(base / "inf", ("bundle",))
    poison_onnx(w["inf"] / "bundle", "sidenet", float("inf"))
    w["stale"] = copy_root(base / "stale", ("bundle", "backbone", "sidenet"))
    train_further(w["stale"] / "backbone")
    w["badjson"] = base / "badjson"
    w["badjson"].mkdir()
    (w["badjson"] / "bundle.json").write_text("{not json")
    w["foreign"] = base / "foreign"
    w["foreign"].mkdir()
    (w["foreign"] / "bundle.json").write_text(json.dumps({"schema": "someone.else/9", "networks": {}}))
    w["noonnx"] = copy_root(base / "noonnx", ("bundle",))
    (w["noonnx"] / "bundle" / "sidenet.onnx").unlink()
    w["file"] = base / "a-file"
    w["file"].write_text("a plain file\n")
    w["empty"] = base / "empty"
    w["empty"].mkdir()
    w["notjson"] = base / "state.json"
    w["notjson"].write_text("garbage")
    w["state"] = base / "bandit.json"
    proc = subprocess.run([sys.executable, "-m", "anchorflow.cli", "sample", "default", "--solver", "fastflow",
                           "--nfe", "10", "--n", "2", "--bandit-state", str(w["state"]), "--out",
                           str(base / "ff.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (base / "ff.png").unlink()
    w["cwd"] = base / "cwd"
    w["cwd"].mkdir()
    _trust_world(w, base)
    return w


def _trust_world(w: dict, base: Path) -> None:
    """Issue 31's classes: code named in a bundle, paths out of it, what inspect must check, damaged
    files of every kind, special files as outputs (each a copy of the digits bundle, hashes updated)."""
    import numpy as np

    import _trust_bundles as tb

    def bundle(name, *breaks):
        w[name] = copy_root(base / name, ("bundle",)) / "bundle"
        for fn in breaks:
            fn(w[name])

    marker = base / "MARKER"  # would appear under the watched folder: the disk check catches a run
    evil = tb.write_evil(base / "evilsrc", marker)
    bundle("evil", lambda b: tb.name_source(b, evil["file"]))
    bundle("extrel", lambda b: tb.external_data_at(b, "../outside.bin"))
    bundle("extabs", lambda b: tb.external_data_at(b, str(base / "abs-outside.bin")))
    bundle("symlink", lambda b: tb.symlink_out(b, base / "outside.onnx"))
    bundle("swapped", tb.swap_graphs)
    bundle("renamed", tb.rename_declared_input)
    bundle("zeroed", tb.zero_weights)
    bundle("nangrid", lambda b: tb.edit_tuned(b, lambda d: tb.first_grid(d)["times"].__setitem__(1, float("nan"))))
    bundle("upgrid", lambda b: tb.edit_tuned(b, lambda d: tb.first_grid(d)["times"].reverse()))
    bundle("typegrid", lambda b: tb.edit_tuned(b, lambda d: tb.first_grid(d).__setitem__("times", "0.5")))
    bundle("retyped", lambda b: tb.redeclare_input(b, "y", dtype="float32"))
    bundle("reshaped", lambda b: tb.redeclare_input(b, "x", shape=["batch", 1, 16, 16], state_shape=[1, 16, 16]))
    bundle("tamperedtuned", lambda b: tb.tamper(b / "tuned.json"))
    bundle("tamperedfc", lambda b: tb.tamper(b / "first_call.npy"))
    bundle("other", tb.other_weights)
    bundle("fileup", lambda b: tb.name_file_outside(b, Path("../outside-sidenet.onnx")))
    bundle("fileabs", lambda b: tb.name_file_outside(b, base / "abs-sidenet.onnx"))
    bundle("gridsup", lambda b: tb.name_file_outside(b, Path("../outside-tuned.json"), "grids"))
    bundle("picklefc", lambda b: tb.replace_first_call(b, np.array([{"a": 1}], dtype=object)))
    bundle("garbagefc", lambda b: tb.replace_first_call(b, bytes(range(256)) * 4))
    bundle("shapefc", lambda b: tb.replace_first_call(b, np.zeros((3, 2), np.float32)))
    for name, text in (("deepjson", "[" * 50000 + "]" * 50000), ("hugeint", '{"schema": ' + "9" * 5000 + "}"),
                       ("garbagejson", "\x00\xff{{{ not json")):
        w[name] = base / name
        w[name].mkdir()
        (w[name] / "bundle.json").write_text(text, encoding="latin-1")
    bundle("latin1", lambda b: (b / "bundle.json").write_bytes(
        (b / "bundle.json").read_text().replace('"digits"', '"digits \u00e9t\u00e9"').encode("latin-1")))

    def big_batch(b):
        meta = json.loads((b / "bundle.json").read_text())
        meta["networks"]["backbone"]["batch"]["max"] = 2**70
        (b / "bundle.json").write_text(json.dumps(meta))
    bundle("bigint", big_batch)
    files = base / "files"
    files.mkdir()
    np.savez(files / "noise.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    for name, y in (("neg", [-5, 3]), ("big", [3, 2**62]), ("float", [1.0, 2.5]), ("null", [10, 3])):
        np.savez(files / f"{name}.npz", y=np.array(y))
    np.savez(files / "null11.npz", y=np.array([11]))
    (files / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json" * 4)
    (files / "huge.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    facs = base / "factories"
    facs.mkdir()
    (facs / "bad.py").write_text(BAD_FACTORIES)
    w["files"], w["facs"] = files, facs
    good = json.loads(w["state"].read_text())  # the fastflow state made above, broken three ways
    for name, edit in (("hugecount", lambda d: d["N"][0].__setitem__(0, 10**200)),
                       ("hugeeta", lambda d: d["budget"].__setitem__("eta", 1e308))):
        d = json.loads(json.dumps(good))
        edit(d)
        w[name] = base / f"{name}.json"
        w[name].write_text(json.dumps(d))
    w["deepstate"] = base / "deepstate.json"
    w["deepstate"].write_text('{"schema": "anchorflow.fastflow-bandit", "version": 2, "key": ' + "[" * 5000 + "]" * 5000
                              + "}")
    for name in ("hugecount", "hugeeta", "deepstate"):  # the bandit's own (empty) lock file, as the good state has
        (base / f"{name}.json.lock").touch()
    w["deepstate"] = base / "deepstate.json"


BAD_FACTORIES = '''
import torch

class Wrong(torch.nn.Module):
    def forward(self, x, tau):
        return x[:, :1]  # a velocity of the wrong shape

def raises():
    raise ValueError("the factory failed")

def wrong_state():
    return Wrong(), {"name": "toy", "state": (2, 4, 4)}
'''


S = ["sample", "{root}", "--solver", "euler", "--nfe", "2", "--n", "2"]  # a good sample command to break
B = ["bench", "{root}", "--solvers", "euler", "--nfe", "2", "--n", "4", "--reference", "rk4:8"]
V = ["verify", "{root}", "--backends", "ort-cpu"]
TS = ["train", "sidenet", "--backbone", "%s/backbone" % ROOT, "--out", "{cwd}/sn", "--data", "none", "--iters", "1"]
FF = ["sample", "{root}", "--solver", "fastflow", "--nfe", "10", "--n", "2", "--out", "ff.png"]
TORCH = pytest.mark.skipif(not HAS_TORCH, reason="needs torch (the [train] extra)")

# (argv, exit status, words in the error line[, marks])
CASES = [
    # -- the command line itself (exit 2) --------------------------------------------------------
    (["nosuchcommand"], 2, "No such command"),
    (["sample"], 2, "Missing argument"),
    (["sample", "default", "--nope"], 2, "No such option"),
    (["sample", "default", "--n", "many"], 2, "not a valid integer"),
    (["sample", "default", "--cfg", "strong"], 2, "not a valid float"),
    (["sample", "default", "--backend", "gpu"], 2, "not one of"),
    (["sample", "default", "--precision", "int8"], 1, "no int8 variant of the backbone"),
    (["sample", "default", "--seed"], 2, "requires an argument"),
    (["bench"], 2, "Missing argument"),
    (["bench", "default", "--no-such-option"], 2, "No such option"),
    (["bench", "default", "--n", "1.5"], 2, "not a valid integer"),
    (["verify"], 2, "Missing argument"),
    (["verify", "default", "--reference", "gpu"], 2, "not one of"),
    (["verify", "default", "--atol", "tiny"], 2, "not a valid float"),
    (["inspect"], 2, "Missing argument"),
    (["inspect", "default", "--yaml"], 2, "No such option"),
    (["export"], 2, "Missing argument"),
    (["export", "default", "--opset", "x"], 2, "not a valid integer"),
    (["build"], 2, "Missing argument"),
    (["demo", "--nfe", "six"], 2, "not a valid integer"),
    (["demo", "extra-arg"], 2, "unexpected extra argument"),
    (["train"], 2, "missing command"),
    (["train", "nothing"], 2, "No such command"),
    (["train", "backbone"], 2, "Missing option '--out'"),
    (["train", "sidenet", "--iters", "x", "--out", "o"], 2, "not a valid integer"),
    (["train", "classifier", "--epochs", "many", "--out", "o"], 2, "not a valid integer"),
    (["bandit"], 2, "missing command"),
    (["bandit", "show"], 2, "Missing argument"),
    (["solvers", "--all"], 2, "No such option"),
    # -- values out of range (exit 1, before any work) -------------------------------------------
    (S + ["--n", "0"], 1, "--n must be a positive integer"),
    (S + ["--n", "-3"], 1, "--n must be a positive integer"),
    (S + ["--n", "10000000000"], 1, "above the cap"),
    (S + ["--nfe", "0"], 1, "--nfe must be a positive integer"),
    (S + ["--nfe", "99999"], 1, "above the cap"),
    (S + ["--seed", "-1"], 1, "--seed must be in 0.."),
    (S + ["--seed", str(2**40)], 1, "--seed must be in 0.."),
    (S + ["--cfg", "0"], 1, "--cfg must be finite and > 0"),
    (S + ["--cfg", "-2"], 1, "--cfg must be finite and > 0"),
    (S + ["--cfg", "nan"], 1, "--cfg must be finite and > 0"),
    (S + ["--cfg", "inf"], 1, "--cfg must be finite and > 0"),
    (S + ["--cfg-interval", "0,0.5,1"], 1, "exactly two numbers"),
    (S + ["--cfg-interval", "0.7,0.2"], 1, "0 <= lo < hi <= 1"),
    (S + ["--cfg-interval", "a,b"], 1, "comma-separated list of numbers"),
    (S + ["--grid", "shift:inf"], 1, "finite"),
    (S + ["--grid", "shift:-1"], 1, "must be > 0 and finite"),
    (S + ["--grid", "cosine"], 1, "unknown grid"),
    (S + ["--solver", "nope"], 1, "unknown solver"),
    (S + ["--solver", "heun", "--nfe", "4"], 1, "nfe must be one of 3, 5, 7"),
    (S + ["--labels", "42"], 1, "--labels must be integers in 0..9"),
    (S + ["--labels", "one,two"], 1, "--labels must be integers"),
    (S + ["--bandit-state", "b.json"], 1, "only apply to --solver fastflow"),
    (S + ["--mu-factor", "3"], 1, "only apply to --solver fastflow"),
    (S + ["--precision", "bf16"], 1, "no bf16 variant"),
    (B + ["--n", "0"], 1, "--n must be a positive integer"),
    (B + ["--nfe", "0,4"], 1, "positive integers"),
    (B + ["--nfe", "4,5000"], 1, "above the cap"),
    (B + ["--nfe", "four"], 1, "comma-separated list of integers"),
    (B + ["--cfg", "1.0,0"], 1, "--cfg must be finite and > 0"),
    (B + ["--cfg", ""], 1, "--cfg is empty"),
    (B + ["--cfg-interval", "0,1,1"], 1, "exactly two numbers"),
    (B + ["--seed", "-5"], 1, "--seed must be in 0.."),
    (B + ["--reference", "rk4:7"], 1, "bad reference"),
    (B + ["--reference", "rk4:1000000"], 1, "at most rk4:"),
    (B + ["--reference", "magic"], 1, "bad reference"),
    (B + ["--solvers", "euler,nope"], 1, "unknown solver"),
    (V + ["--atol", "-1"], 1, "--atol must be >= 0"),
    (V + ["--rtol", "-0.5"], 1, "--rtol must be >= 0"),
    (V + ["--seed", "-1"], 1, "--seed must be in 0.."),
    (V + ["--backends", "gpu"], 1, "--backends takes a comma list"),
    (V + ["--precision", "fp8"], 1, "nothing was compared"),
    (["demo", "--n", "0"], 1, "--n must be a positive integer"),
    (["demo", "--nfe", "100000"], 1, "above the cap"),
    (["demo", "--cfg", "0"], 1, "--cfg must be finite and > 0"),
    (["demo", "--seed", "-1"], 1, "--seed must be in 0.."),
    (["export", "{root}", "--out", "{cwd}/b", "--max-batch", "0"], 1, "--max-batch must be a positive integer", TORCH),
    (["export", "{root}", "--out", "{cwd}/b", "--precision", "fp8"], 1, "fp8", TORCH, pytest.mark.slow,
     pytest.mark.timeout(400)),  # quantises first: ~60 s of CPU, 2 min on a loaded machine
    (["train", "backbone", "--out", "o", "--steps", "0"], 1, "--steps must be a positive integer"),
    (["train", "backbone", "--out", "o", "--batch", "-1"], 1, "--batch must be a positive integer"),
    (["train", "backbone", "--out", "o", "--seed", "-1"], 1, "--seed must be in 0.."),
    (["train", "backbone", "--out", "o", "--data", "imagenet"], 1, "needs a download", TORCH),
    (["train", "sidenet", "--out", "o", "--iters", "0"], 1, "--iters must be a positive integer"),
    (["train", "sidenet", "--out", "o", "--lr", "0"], 1, "--lr must be positive"),
    (["train", "sidenet", "--out", "o", "--rate", "50,-5"], 1, "--rate must be positive", TORCH),
    (["train", "classifier", "--out", "o", "--epochs", "0"], 1, "--epochs must be a positive integer"),
    # -- missing, foreign, tampered, broken models (exit 1) ---------------------------------------
    (["sample", "/no/such/model"], 1, "not found"),
    (["sample", "{file}"], 1, "is a file"),
    (["sample", "{empty}"], 1, "neither a bundle"),
    (["sample", "{badjson}"], 1, "not readable JSON"),
    (["sample", "{foreign}"], 1, "schema"),
    (["sample", "{tampered}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "sha256"),
    (["sample", "{noonnx}", "--nfe", "4", "--n", "2"], 1, "missing from the bundle"),
    (["sample", "{stale}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "stale"),
    (["sample", "{nan}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "NaN"),
    (["sample", "{inf}", "--solver", "ba", "--nfe", "4", "--n", "2"], 1, "NaN"),
    (["bench", "{nan}", "--solvers", "euler", "--nfe", "2", "--n", "4", "--reference", "rk4:8"], 1, "NaN"),
    (["bench", "/no/such/model"], 1, "not found"),
    (["inspect", "/no/such/bundle"], 1, "not found"),
    (["inspect", "{empty}"], 1, "is not a bundle"),
    (["inspect", "{badjson}"], 1, "not readable JSON"),
    (["inspect", "{tampered}"], 1, "integrity"),
    (["inspect", "{noonnx}"], 1, "integrity"),
    (["verify", "/no/such/bundle"], 1, "not found"),
    (["verify", "{empty}"], 1, "is not a bundle"),
    (["verify", "{tampered}", "--backends", "ort-cpu"], 1, "sha256"),
    (["verify", "{tampered16}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "is broken"),
    (["verify", "{root}", "--backends", "ort-cpu", "--precision", "fp32,bf16"], 1, "nothing was compared"),
    (["verify", "{root}", "--backends", "ort-cpu,ort-cuda", "--precision", "fp32"], 1, "nothing was compared"),
    (["build", "/no/such/bundle"], 1, ""),
    (["export", "/no/such/model", "--out", "{cwd}/b"], 1, "not found", TORCH),
    (["export", "{empty}", "--out", "{cwd}/b"], 1, "neither a bundle", TORCH),
    (["export", "{tampered}/bundle", "--out", "{cwd}/b"], 1, "no backbone checkpoint", TORCH),
    (["export", "{root}", "--out", "{cwd}/b", "--sidenet", "/no/such/sidenet"], 1, "does not exist", TORCH),
    (["train", "sidenet", "--backbone", "/no/such", "--out", "{cwd}/s"], 1, "not found", TORCH),
    (["train", "sidenet", "--backbone", "{tampered}", "--out", "{cwd}/s"], 1, "no backbone checkpoint", TORCH),
    (["train", "backbone", "--out", "{root}", "--steps", "1"], 1, "already exists", TORCH),
    (["train", "backbone", "--out", "{cwd}/none", "--resume"], 1, "does not exist", TORCH),
    (["bandit", "show", "/no/such/state.json"], 1, ""),
    (["bandit", "show", "{notjson}"], 1, ""),
    (["bandit", "show", "{empty}"], 1, ""),
    # -- outputs that cannot be written: refused before any work (exit 1) ------------------------
    (S + ["--out", ""], 1, "--out is empty"),
    (S + ["--out", "o.gif"], 1, "unknown image type"),
    (S + ["--out", "noext"], 1, "unknown image type"),
    (S + ["--out", "{empty}"], 1, "is a directory"),
    (S + ["--out", "{file}/x.png"], 1, "is a file, not a folder"),
    (S + ["--out", "/proc/anchorflow-x.png"], 1, "cannot write"),
    (S + ["--out", "/dev/null"], 1, "not a regular file"),
    (S + ["--out", "ok.png", "--npy", "{file}/x.npy"], 1, "is a file, not a folder"),
    (S + ["--out", "ok.png", "--npy", "/proc/x.npy"], 1, "cannot write"),
    (["sample", "{root}", "--solver", "fastflow", "--nfe", "10", "--n", "2", "--out", "ok.png", "--bandit-state",
      "{file}/b.json"], 1, "is a file, not a folder"),
    (B + ["--out", "{file}"], 1, "is a file"),
    (B + ["--out", "{file}/sub"], 1, "is a file, not a folder"),
    (B + ["--out", ""], 1, "--out is empty"),
    (["demo", "--out", "{file}"], 1, "is a file"),
    (["demo", "--out", "/proc/demo"], 1, "cannot write"),
    (["export", "default"], 1, "read-only", TORCH),
    (["export", "{root}", "--out", "{file}"], 1, "is a file", TORCH),
    (["export", "{root}", "--out", "/proc/b"], 1, "cannot write", TORCH),
    (["train", "backbone", "--out", "{file}", "--steps", "1"], 1, "is a file"),
    (["train", "sidenet", "--out", "/proc/side"], 1, "cannot write"),
    (["train", "sidenet", "--out", "%s/sidenet" % (ROOT)], 1, "read-only"),
    (["train", "classifier", "--out", "{file}/c"], 1, "is a file, not a folder"),
    (["bandit", "show", "{state}", "--plot", "{file}/p.png"], 1, ""),
    # -- a bundle is data; paths stay inside it; inspect checks what it reports ---------
    (["verify", "{evil}", "--backends", "torch,ort-cpu"], 1, "nothing was compared"),
    (["verify", "{evil}", "--backends", "torch"], 1, "nothing was compared"),
    (["verify", "{evil}", "--reference", "torch"], 1, "--trust-source"),
    (["sample", "{evil}", "--backend", "torch", "--nfe", "2", "--n", "2"], 1, "needs checkpoint folders"),
    (["inspect", "{extrel}"], 1, "outside the bundle folder"),
    (["inspect", "{extabs}"], 1, "outside the bundle folder"),
    (["sample", "{extrel}", "--solver", "ba", "--nfe", "4", "--n", "2"], 1, "outside the bundle folder"),
    (["verify", "{extabs}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "outside the bundle folder"),
    (["inspect", "{symlink}"], 1, "outside the bundle folder"),
    (["sample", "{symlink}", "--solver", "ba", "--nfe", "4", "--n", "2"], 1, "outside the bundle folder"),
    (["inspect", "{swapped}"], 1, "bundle.json declares"),
    (["sample", "{swapped}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, ""),
    (["inspect", "{renamed}"], 1, "bundle.json declares"),
    (["inspect", "{zeroed}"], 1, "exactly zero"),
    (["verify", "{zeroed}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "exactly zero"),
    (["inspect", "{nan}"], 1, "NaN or Inf"),
    (["inspect", "{nangrid}"], 1, "holds NaN or Inf"),
    (["inspect", "{upgrid}"], 1, "not strictly decreasing"),
    (["inspect", "{typegrid}"], 1, "no list of times"),
    (["verify", "{nangrid}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "tuned grids is broken"),
    (["sample", "{upgrid}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "not strictly decreasing"),
    (["inspect", "{fileup}"], 1, "lies outside the bundle folder"),
    (["sample", "{fileup}", "--solver", "ba", "--nfe", "4", "--n", "2"], 1, "lies outside the bundle folder"),
    (["inspect", "{fileabs}"], 1, "lies outside the bundle folder"),
    (["verify", "{fileabs}", "--backends", "ort-cpu"], 1, "lies outside the bundle folder"),
    (["inspect", "{gridsup}"], 1, "lies outside the bundle folder"),
    (["sample", "{gridsup}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "lies outside the bundle folder"),
    (["inspect", "{retyped}"], 1, "bundle.json declares"),
    (["inspect", "{reshaped}"], 1, "bundle.json declares"),
    (["sample", "{retyped}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "bundle.json declares"),
    (["inspect", "{tamperedtuned}"], 1, "integrity"),
    (["verify", "{tamperedtuned}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "sha256"),
    (["verify", "{tamperedfc}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "sha256"),
    (["sample", "{tamperedtuned}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "sha256"),
    # -- damaged files: one line naming the file and the fault ----------------------------------
    (["inspect", "{deepjson}"], 1, "nested more than"),
    (["sample", "{deepjson}"], 1, "nested more than"),
    (["inspect", "{hugeint}"], 1, "not readable JSON"),
    (["inspect", "{garbagejson}"], 1, "not UTF-8"),
    (["sample", "{latin1}"], 1, "not UTF-8"),
    (["inspect", "{bigint}"], 1, "networks.backbone.batch.max"),
    (["inspect", "{picklefc}"], 1, "not a readable .npy array"),
    (["sample", "{picklefc}", "--solver", "euler", "--nfe", "2", "--n", "2"], 1, "not a readable .npy array"),
    (["inspect", "{garbagefc}"], 1, "first_call.npy"),
    (["verify", "{garbagefc}", "--backends", "ort-cpu", "--precision", "fp32,fp16"], 1, "first-call table is broken"),
    (["sample", "{shapefc}", "--first-call", "cached", "--nfe", "4", "--n", "2"], 1, "shape (3, 2)"),
    (S + ["--noise", "{files}/noise.npz"], 1, "is an .npz archive"),
    (S + ["--cond", "{files}/neg.npz"], 1, "y labels must be in 0..9, got -5"),
    (S + ["--cond", "{files}/big.npz"], 1, "y labels must be in 0..9, got 4611686018427387904"),
    (S + ["--cond", "{files}/float.npz"], 1, "y must hold integers"),
    (S + ["--cond", "{files}/null.npz"], 1, "y labels must be in 0..9, got 10"),
    (S + ["--cfg", "2", "--null-cond", "{files}/big.npz"], 1, "y labels must be in 0..10 (10 = the null label)"),
    (S + ["--cond", "{files}/garbage.safetensors"], 1, "header is not JSON"),
    (S + ["--cond", "{files}/huge.safetensors"], 1, "declares a 1152921504606846976-byte header"),
    (["export", "{facs}/bad.py:raises", "--out", "{cwd}/b"], 1, "ValueError: the factory failed", TORCH),
    (["export", "{facs}/bad.py:wrong_state", "--out", "{cwd}/b", "--max-batch", "2", "--no-validate"], 1,
     "does not compute what the model declares", TORCH),
    # -- bandit states: one line, the state left as it was (a huge eta used to turn it into mu = inf)
    (FF + ["--bandit-state", "{hugecount}"], 1, "missing or non-numeric N"),
    (FF + ["--bandit-state", "{hugeeta}"], 1, "budget.eta must be in (0, 10]"),
    (FF + ["--bandit-state", "{deepstate}"], 1, "nested more than 64 levels"),
    (["bandit", "show", "{hugecount}"], 1, "missing or non-numeric N"),
    (["bandit", "show", "{deepstate}"], 1, "nested more than 64 levels"),
    (["bandit", "show", "{state}", "--model", "{other}"], 1, "is the bandit state of another model"),
    (["bandit", "show", "{state}", "--model", "/no/such/model"], 1, "not found"),
    # -- fastflow options: finite, in range, not both budgets ---------------------------------------
    (FF + ["--speedup", "0"], 1, "--speedup must be a finite number > 0"),
    (FF + ["--speedup", "nan"], 1, "--speedup must be a finite number > 0"),
    (FF + ["--speedup", "1e9"], 1, "leaves fewer than 3 of the 10 steps"),
    (FF + ["--calls", "-3"], 1, "--calls must be a finite number > 0"),
    (FF + ["--calls", "1e9"], 1, "calls must be in 3..T (10)"),
    (FF + ["--mu-factor", "-1"], 1, "--mu-factor must be a finite number > 0"),
    (FF + ["--mu-factor", "inf"], 1, "--mu-factor must be a finite number > 0"),
    (FF + ["--speedup", "-1"], 1, "--speedup must be a finite number > 0"),
    (FF + ["--speedup", "inf"], 1, "--speedup must be a finite number > 0"),
    (FF + ["--calls", "0"], 1, "--calls must be a finite number > 0"),
    (FF + ["--calls", "nan"], 1, "--calls must be a finite number > 0"),
    (FF + ["--mu-factor", "0"], 1, "--mu-factor must be a finite number > 0"),
    (FF + ["--mu-factor", "nan"], 1, "--mu-factor must be a finite number > 0"),
    (FF + ["--calls", "2", "--speedup", "2"], 1, "not both"),
    (S + ["--cfg", "1e300"], 1, "above the cap"),
    (S + ["--out", "same.png", "--npy", "same.png"], 1, "names the same file as --out"),
    (S + ["--out", "same.png", "--npy", "./sub/../same.png"], 1, "names the same file as --out"),
    # -- a refused tune writes nothing (it used to store 0 grids, or tune at cfg 0) -----------------
    (["tune", "{root}", "--solvers", "bogus", "--nfe", "2"], 1, "unknown solver 'bogus'"),
    (["tune", "{root}", "--cfg", "0", "--nfe", "2"], 1, "--cfg must be finite and > 0"),
    (["tune", "{root}", "--cfg", "-1", "--nfe", "2"], 1, "--cfg must be finite and > 0"),
    (["tune", "{root}", "--seed", "-1", "--nfe", "2"], 1, "--seed must be in 0.."),
    (["tune", "{root}", "--samples", "100000", "--nfe", "2"], 1, "--samples must be in 1..4096"),
    (["tune", "{root}", "--solvers", "heun", "--nfe", "4", "--first-call", "backbone", "--samples", "2",
      "--reference-steps", "2"], 1, "no grid could be tuned"),
    # -- training: labels in range, batches bounded ------------------------------------------------
    (TS + ["--cond", "{files}/neg.npz"], 1, "y labels must be in 0..9, got -5", TORCH),
    (TS + ["--cond", "{files}/big.npz"], 1, "y labels must be in 0..9, got 4611686018427387904", TORCH),
    (TS + ["--cond", "{files}/float.npz"], 1, "y must hold integer labels", TORCH),
    (TS + ["--null-cond", "{files}/null11.npz"], 1, "y labels must be in 0..10 (10 = the null label), got 11", TORCH),
    (["train", "backbone", "--out", "{cwd}/bb", "--batch", "1000000000000"], 1, "above the cap of 65536"),
    (TS + ["--batch", "100000"], 1, "above the cap of 65536"),
    # -- hangs: bounded before any work ------------------------------------------------------------
    (S + ["--threads", "100000"], 1, "--threads 100000 is more than"),
    (["demo", "--backend", "torch"], 2, "not one of"),
    (["serve", "default", "--port", "1", "--batch-wait-ms", "nan"], 1, "--batch-wait-ms must be a finite number >= 0"),
    (["serve", "default", "--port", "1", "--mu-factor", "nan"], 1, "--mu-factor must be a finite number > 0"),
    (["serve", "default", "--port", "1", "--mu-factor", "-1"], 1, "--mu-factor must be a finite number > 0"),
    (["serve", "default", "--port", "1", "--replica-cpus", "1000"], 1, "--replica-cpus must be a finite number > 0"),
    (["serve", "default", "--port", "1", "--address", "bogus"], 1, "--address must be HOST:PORT"),
    (["serve", "default", "--port", "1", "--threads", "100000"], 1, "--threads 100000 is more than"),
    (["serve", "default", "--port", "1", "--max-body-mb", "0"], 1, "--max-body-mb must be a finite number > 0"),
    (["serve", "default", "--port", "1", "--max-n", "10000000000"], 1, "--max-n 10000000000 is above the cap"),
    (["serve", "default", "--port", "1", "--threads", "0"], 1, "threads must be a positive integer"),
    (["serve", "{swapped}", "--port", "1"], 1, "bundle.json declares"),
    # -- special files are never replaced ----------------------------------------------------------
    (S + ["--out", "/dev/full"], 1, "not a regular file"),
    (S + ["--out", "ok.png", "--npy", "/dev/full"], 1, "not a regular file"),
    (["bandit", "show", "{state}", "--plot", "/dev/full"], 1, "not a regular file"),
    (B + ["--out", "/dev/null"], 1, "not a regular file"),
]
CASES_BEFORE_ISSUE_31 = 142
CASES_AFTER_ROUND_ONE = 217  # issue 31, first round; round two added serve, bandit --model, declared-type rows


def _params():
    for case in CASES:
        argv, status, words, *marks = case
        yield pytest.param(argv, status, words, marks=marks, id=" ".join(argv)[:90])


def _disk(paths) -> dict[str, tuple[int, int]]:
    """Every file (size, modification time) and folder (presence) under ``paths``."""
    out = {}
    for base in paths:
        for dirpath, dirnames, filenames in os.walk(base):
            out.update({os.path.join(dirpath, d): (0, 0) for d in dirnames})
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 80 and len(CASES) > CASES_AFTER_ROUND_ONE > CASES_BEFORE_ISSUE_31
    commands = {c[0][0] if c[0][0] != "train" or len(c[0]) < 2 else f"train {c[0][1]}" for c in CASES}
    assert {"demo", "sample", "bench", "verify", "inspect", "export", "build", "bandit", "solvers", "tune", "serve",
            "train backbone", "train sidenet", "train classifier"} <= commands


@pytest.mark.timeout(120)  # a hang is a failure, not a stuck suite
@pytest.mark.parametrize("argv, status, words", list(_params()))
def test_bad_input(world, capsys, monkeypatch, argv, status, words):
    argv = [a.format(**world) for a in argv]
    watched = [world["root"].parent, ROOT]  # every fixture model, file and the working folder; the package
    before = _disk(watched)
    monkeypatch.chdir(world["cwd"])
    with pytest.raises(SystemExit) as info:
        main(argv)
        sys.exit(0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    # what a terminal shows: a bar redrawn with \r leaves its last state; bars and warnings aside,
    # exactly one line remains, the error, and it comes last
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith(("warning: ", "grid: ", "note: "))
             and not BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.rstrip().endswith(lines[0]), err
    assert words in lines[0], lines[0]
    assert (info.value.code or 0) == status, lines[0]
    assert _disk(watched) == before, "files on disk changed"

"""`anchorflow invert` / `anchorflow edit` on the bundled digits model: real test digits through the CLI.

End to end: an inversion regenerated with the same label gives the image back (PSNR against the
image the command read); an edit of real 3s into 8s is classified as 8 by the bundled classifier;
the calls printed are N each way. Bad input: one ``error:`` line, exit 1, no traceback, nothing
written (the working folder and the inputs unchanged). Time: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from anchorflow.cli import main

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parent.parent


def _psnr(a, b, span=2.0):
    return float(10 * np.log10(span**2 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def digits():
    from anchorflow.trainers.data import load_dataset

    x, y = load_dataset("digits", "test")
    return x, y


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """Input files: real test digits as PNG / .npy, and the broken ones."""
    x, y = digits
    d = tmp_path_factory.mktemp("inputs")
    f = {}
    first3 = int(np.flatnonzero(y == 3)[0])
    px = np.rint((x[first3, 0] + 1.0) / 2.0 * 255.0).astype(np.uint8)
    f["three"] = d / "three.png"
    PIL.fromarray(px, "L").save(f["three"])
    f["threes"] = d / "threes.npy"
    np.save(f["threes"], x[y == 3][:12])
    f["big"] = d / "big.png"
    PIL.fromarray(np.zeros((16, 16), np.uint8), "L").save(f["big"])
    f["rgb"] = d / "rgb.png"
    PIL.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(f["rgb"])
    f["rgba"] = d / "rgba.png"
    PIL.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(f["rgba"])
    f["text"] = d / "notes.png"
    f["text"].write_text("not an image\n")
    f["shape"] = d / "shape.npy"
    np.save(f["shape"], np.zeros((2, 3, 8, 8), np.float32))
    f["range"] = d / "range.npy"
    np.save(f["range"], np.full((1, 1, 8, 8), 5.0, np.float32))
    f["ints"] = d / "ints.npy"
    np.save(f["ints"], np.zeros((1, 1, 8, 8), np.int64))
    return f


def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def _disk(*folders):
    out = {}
    for base in folders:
        for dirpath, _, names in os.walk(base):
            for n in names:
                st = os.lstat(os.path.join(dirpath, n))
                out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


def test_invert_then_regenerate_gives_the_png_back(files, tmp_path, capsys):
    """10 calls up, 10 down (BA): the digit comes back within 30 dB (the benchmark measures ~44 dB)."""
    from anchorflow.runtime import load_bundle
    from anchorflow.runtime.solving.invert import regenerate

    out = tmp_path / "noise.npy"
    code, text, err = _run(["invert", "default", "--image", files["three"], "--labels", "3", "--solver", "ba",
                            "--nfe", "10", "--out", out], capsys)
    assert code == 0, err
    assert "10 backbone calls" in text
    noise = np.load(out)
    assert noise.shape == (1, 1, 8, 8)
    image = np.asarray(PIL.open(files["three"]), np.float64)[None, None] / 255.0 * 2.0 - 1.0
    assert 0.5 < noise.std() < 2.0 and _psnr(noise, image) < 15  # it is noise, not the image
    b = load_bundle("default", backend="ort-cpu")
    back = regenerate("ba", b.velocity, noise, 10, cond={"y": np.array([3])}, sidenet=b.sidenet).x
    assert _psnr(back, image) > 30


def test_edit_turns_real_threes_into_eights(files, tmp_path, capsys):
    from anchorflow.runtime.evaluation.classifier import Classifier

    out, npy = tmp_path / "eights.png", tmp_path / "eights.npy"
    code, text, err = _run(["edit", "default", "--image", files["threes"], "--source", "3", "--target", "8",
                            "--nfe", "10", "--strength", "0.8", "--out", out, "--npy", npy], capsys)
    assert code == 0, err
    assert "10 calls to invert + 10 to regenerate" in text
    x = np.load(npy)
    clf = Classifier(ROOT / "anchorflow" / "bundled" / "digits" / "classifier")
    assert x.shape == (12, 1, 8, 8) and np.mean(clf.labels(x) == 8) >= 0.75
    with PIL.open(out) as img:
        assert img.size == (12 * 8, 8) and img.mode == "L"  # the edits side by side at the model's size


def test_edit_with_equal_source_and_target_keeps_the_image(files, tmp_path, capsys, digits):
    """Same condition both ways = a round trip: the edit stays close to the source (an edit to 8 does not)."""
    x, y = digits
    npy = tmp_path / "same.npy"
    code, _, err = _run(["edit", "default", "--image", files["threes"], "--source", "3", "--target", "3",
                         "--nfe", "10", "--out", tmp_path / "same.png", "--npy", npy], capsys)
    assert code == 0, err
    assert _psnr(np.load(npy), x[y == 3][:12]) > 30


B = ["default", "--solver", "euler", "--nfe", "4"]
INV = ["invert"] + B + ["--labels", "3", "--out", "{cwd}/noise.npy"]
EDIT = ["edit"] + B + ["--source", "3", "--target", "8", "--out", "{cwd}/edit.png"]
CASES = [
    (INV + ["--image", "{big}"], "is 16x16 pixels; this model takes 8x8"),
    (EDIT + ["--image", "{big}"], "is 16x16 pixels; this model takes 8x8"),
    (INV + ["--image", "{rgb}"], "has no VAE encoder"),
    (EDIT + ["--image", "{rgb}"], "has no VAE encoder"),
    (INV + ["--image", "{rgba}"], "pillow mode 'RGBA'"),
    (INV + ["--image", "{text}"], "is not an image pillow can read"),
    (EDIT + ["--image", "{text}"], "is not an image pillow can read"),
    (INV + ["--image", "{shape}"], "has shape (2, 3, 8, 8)"),
    (INV + ["--image", "{range}"], "outside the model's data range"),
    (INV + ["--image", "{ints}"], "finite floating-point"),
    (INV + ["--image", "{cwd}/missing.png"], "no such file"),
    (["invert"] + B + ["--labels", "3", "--image", "{three}", "--out", "{cwd}/noise.png"], "ending in .npy"),
    (EDIT[:-1] + ["{cwd}/edit.txt", "--image", "{three}"], "unknown image type"),
    (INV + ["--image", "{three}", "--labels", "12"], "--labels must be integers in 0..9"),
    (["invert"] + B + ["--image", "{three}", "--out", "{cwd}/noise.npy"], "give the image's class with --labels"),
    (EDIT + ["--image", "{three}", "--strength", "0"], "trajectory fraction"),
    (EDIT + ["--image", "{three}", "--switch", "0.95"], "switch"),
    (EDIT + ["--image", "{three}", "--target", "11"], "--target"),
    (["invert", "default", "--solver", "fastflow", "--nfe", "4", "--labels", "3", "--image", "{three}",
      "--out", "{cwd}/noise.npy"], "cannot invert"),
    (["invert", "default", "--solver", "heun", "--nfe", "4", "--labels", "3", "--image", "{three}",
      "--out", "{cwd}/noise.npy"], "nfe must be"),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0][:1] + c[0][-2:])[:70] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch, argv, words):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    names = {k: str(v) for k, v in files.items()} | {"cwd": str(cwd)}
    argv = [a.format(**names) for a in argv]
    watched = [cwd, files["three"].parent, ROOT / "anchorflow" / "bundled"]
    before = _disk(*watched)
    monkeypatch.chdir(cwd)
    code, out, err = _run(argv, capsys)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("warning: ", "note: "))]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]
    assert re.sub(r"\s+", " ", lines[0]) == lines[0]  # one line
    assert _disk(*watched) == before, "files on disk changed"

"""Quality presets on pipeline bundles (#26 items 1-2): `anchorflow tune PIPELINE_BUNDLE --target-psnr Q
--prompts FILE` and `anchorflow generate PIPELINE_BUNDLE --quality NAME|dB`.

The bundle is the tiny random-init StableDiffusion3Pipeline exported by the real exporter with a
SideNet (``_pipeline_fixtures.sd3_pipeline_bundle``, shared with test_pipeline.py: built once per
process); each module copy it is tuned in is its own. Truth for the recorded bound: the preset and
the reference solved again through the generate path (``Pipeline``, the prompts encoded row by
row), scored and bootstrapped here. Time: t = 1 noise, t = 0 data; NFE = transformer calls.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from _pipeline_fixtures import cli_error, run_cli, sd3_pipeline_bundle  # noqa: E402

PROMPTS = ["a red cat", "a dog on a car", "red dog"]
SAMPLES, SEED, TARGET = 6, 1, 40.0
TUNE = ["--solvers", "euler,ab2,ba", "--nfe", "3,4,6", "--samples", str(SAMPLES), "--seed", str(SEED)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A copy of the SD3 pipeline bundle with the preset ``fast`` recorded by the CLI at the default guidance."""
    root = tmp_path_factory.mktemp("quality")
    bundle = root / "b"
    shutil.copytree(sd3_pipeline_bundle(tmp_path_factory), bundle)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    mp = pytest.MonkeyPatch()
    run_cli(["tune", str(bundle), "--target-psnr", str(TARGET), "--prompts", str(root / "prompts.txt"),
             "--name", "fast", *TUNE], mp)
    mp.undo()
    return bundle, root / "prompts.txt"


def _tuning(bundle):
    from anchorflow.runtime.bundles.tuned_grids import read_tuning

    return read_tuning(bundle)


def _snapshot(bundle) -> dict:
    return {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}


def test_tune_records_a_preset_whose_bound_meets_the_target_recomputed_through_generate(tuned):
    from anchorflow.autoconfig import bootstrap_lower
    from anchorflow.bench.evaluate import span_of
    from anchorflow.runtime import load_pipeline
    from anchorflow.runtime.evaluation.metrics import psnr_per_sample

    bundle, prompts = tuned
    tuning = _tuning(bundle)  # hash-checked against bundle.json
    p = tuning.presets["fast"]
    assert p.lower_bound >= TARGET and p.target_psnr == TARGET and p.reference == "euler@50" and p.batch == SAMPLES
    assert (p.solver, p.nfe) != ("euler", 28) and p.nfe in (3, 4, 6)
    how = tuning.settings["pipeline_presets"]["fast"]
    meta = json.loads((bundle / "bundle.json").read_text())
    default_cfg = meta["pipeline"]["defaults"]["guidance_scale"]
    assert default_cfg > 1 and how["cfg"] == default_cfg and how["prompts"] == len(PROMPTS)  # the pipeline's guidance
    # the truth: the same noise and prompts through generate's own path (prompts encoded per row)
    pipe = load_pipeline(bundle)
    rows = [PROMPTS[i % len(PROMPTS)] for i in range(SAMPLES)]
    noise = np.random.default_rng(SEED).standard_normal((SAMPLES, *meta["model"]["state_shape"])).astype(np.float32)
    ref = pipe(rows, latents=noise, solver="euler", nfe=50, grid="uniform", cfg=default_cfg).latents
    x = pipe(rows, latents=noise, solver=p.solver, nfe=p.nfe, grid=np.asarray(p.times), cfg=default_cfg).latents
    per = psnr_per_sample(x, ref, span_of(ref))
    assert float(np.mean(per)) == pytest.approx(p.mean_psnr, abs=0.02)  # float32 batch-size noise in the encoders only
    bound = bootstrap_lower(per, p.confidence, 2000, np.random.default_rng(SEED + 1), SAMPLES)
    assert bound == pytest.approx(p.lower_bound, abs=0.05) and bound >= TARGET - 0.05
    # --bound conditions: two-level bootstrap over the prompts (row i has prompt i % P), then the samples
    from anchorflow.autoconfig import tune_pipeline_to_target

    lines = tune_pipeline_to_target(str(bundle), TARGET, prompts_file=str(prompts), solvers="euler,ab2,ba", nfe="3,4,6",
                                    samples=SAMPLES, seed=SEED, dry_run=True, bound="conditions", name="cond")
    row = next(ln for ln in lines if ln.startswith(f"{p.solver}@{p.nfe} {p.grid_label} "))
    printed = float(row.split()[-3])
    groups = np.arange(SAMPLES) % len(PROMPTS)
    two_level = bootstrap_lower(per, p.confidence, 2000, np.random.default_rng(SEED + 1), SAMPLES, groups)
    assert printed == pytest.approx(two_level, abs=0.05) and abs(printed - p.lower_bound) > 0.1


def test_generate_quality_is_the_preset_by_hand(tuned, tmp_path, monkeypatch, capsys):
    bundle, _ = tuned
    p = _tuning(bundle).presets["fast"]
    assert p.grid_label in ("uniform", "scheduler sigmas")  # no tuned grid recorded: one of the two generate runs
    by_hand = ["--solver", p.solver, "--nfe", str(p.nfe)] + (["--grid", "uniform"] if p.grid_label == "uniform" else [])
    base = ["generate", str(bundle), "--prompt", "a red cat", "--seed", "3"]
    capsys.readouterr()
    run_cli([*base, "--quality", "fast", "--out", str(tmp_path / "q.png"), "--npy", str(tmp_path / "q.npy")], monkeypatch)
    out = capsys.readouterr().out
    assert f"quality fast: {p.solver}@{p.nfe} {p.grid_label}" in out and f"{p.nfe} transformer calls" in out
    assert "guidance 7" in out
    run_cli([*base, *by_hand, "--out", str(tmp_path / "h.png"), "--npy", str(tmp_path / "h.npy")], monkeypatch)
    run_cli([*base, "--out", str(tmp_path / "d.png"), "--npy", str(tmp_path / "d.npy")], monkeypatch)  # the default
    q, h, d = (np.load(tmp_path / f"{k}.npy") for k in "qhd")
    np.testing.assert_array_equal(q, h)
    from PIL import Image

    rec = json.loads(Image.open(tmp_path / "q.png").text["anchorflow"])  # the output records what ran
    assert rec["quality"] == p.to_json() and (rec["solver"], rec["nfe"], rec["cfg"]) == (p.solver, p.nfe, 7.0)
    assert json.loads(Image.open(tmp_path / "h.png").text["anchorflow"])["quality"] is None
    assert np.abs(q - d).max() > 1e-4  # the preset is not generate's default (euler@28): the test can fail
    # a number of dB: the fastest preset whose bound meets it (here the one recorded)
    run_cli([*base, "--quality", f"{TARGET:g}", "--out", str(tmp_path / "n.png"), "--npy", str(tmp_path / "n.npy")],
            monkeypatch)
    np.testing.assert_array_equal(np.load(tmp_path / "n.npy"), q)
    # the Python API: Pipeline(quality=...) is the same call
    from anchorflow.runtime import load_pipeline

    gen = load_pipeline(bundle)("a red cat", seed=3, quality="fast")
    assert gen.quality == p and (gen.solver, gen.nfe, gen.cfg) == (p.solver, p.nfe, 7.0)
    np.testing.assert_array_equal(gen.pixels, q)
    # another guidance than the one tuned at runs, and says the bound was not measured there
    capsys.readouterr()
    run_cli([*base, "--quality", "fast", "--cfg", "2", "--out", str(tmp_path / "c.png")], monkeypatch)
    assert "note: quality fast's bound was measured at guidance 7, not 2" in capsys.readouterr().err


def test_bad_inputs_one_line_nothing_written(tuned, tmp_path, monkeypatch, capsys):
    from anchorflow.modelref import BUNDLED, DEFAULT_NAME

    bundle, prompts = tuned
    before = _snapshot(bundle)
    out = tmp_path / "x.png"
    gen = ["generate", str(bundle), "--prompt", "a cat", "--out", str(out)]
    assert cli_error([*gen, "--quality", "fast", "--solver", "ba", "--nfe", "5"], monkeypatch, capsys) == \
        "error: --quality fast chooses the solver, NFE and grid; drop --solver, --nfe"
    line = cli_error([*gen, "--quality", "best"], monkeypatch, capsys)
    assert "quality 'best' is not recorded" in line and "(presets: fast)" in line
    line = cli_error([*gen, "--quality", "99"], monkeypatch, capsys)
    assert "no recorded preset reaches 99 dB" in line and "'fast'" in line
    tune = ["tune", str(bundle), "--target-psnr", "30"]
    line = cli_error([*tune, "--prompts", str(tmp_path / "none.txt")], monkeypatch, capsys)
    assert "cannot read --prompts" in line
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "holds no prompt" in cli_error([*tune, "--prompts", str(tmp_path / "empty.txt")], monkeypatch, capsys)
    assert "fewer than the 3 prompts" in cli_error([*tune, "--prompts", str(prompts), "--samples", "2"], monkeypatch,
                                                   capsys)
    line = cli_error(["tune", str(bundle), "--prompts", str(prompts)], monkeypatch, capsys)
    assert "go with --target-psnr" in line
    assert "--name must be" in cli_error([*tune, "--prompts", str(prompts), "--name", "a b"], monkeypatch, capsys)
    line = cli_error(["tune", str(BUNDLED / DEFAULT_NAME / "bundle"), "--target-psnr", "30", "--prompts", str(prompts)],
                     monkeypatch, capsys)
    assert "without text encoders" in line
    assert _snapshot(bundle) == before and not out.exists()
    # a changed tuned.json is refused (hashed in bundle.json like a plain bundle's), nothing written
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    data = json.loads((bad / "tuned.json").read_text())
    data["presets"]["fast"]["lower_bound"] += 10
    (bad / "tuned.json").write_text(json.dumps(data))
    line = cli_error(["generate", str(bad), "--prompt", "a cat", "--quality", "fast", "--out", str(out)], monkeypatch,
                     capsys)
    assert "tuned.json" in line and not out.exists()


def test_impossible_target_refused_naming_the_best_bound(tuned, monkeypatch, capsys):
    bundle, prompts = tuned
    before = _snapshot(bundle)
    line = cli_error(["tune", str(bundle), "--target-psnr", "150", "--prompts", str(prompts), "--name", "x", *TUNE],
                     monkeypatch, capsys)
    assert "target PSNR 150 dB against euler@50 is not reachable" in line and "the best 95% lower bound is" in line
    best = float(line.split("lower bound is ")[1].split(" dB")[0])
    assert _tuning(bundle).presets["fast"].lower_bound <= best < 150
    assert _snapshot(bundle) == before


@pytest.mark.slow
def test_flux_dev_tunes_at_its_embedded_guidance_and_generate_uses_it(tmp_path_factory, monkeypatch, capsys):
    """FLUX-dev: the guidance is the transformer's embedded input (the pipeline's default 3.5), not CFG rows."""
    from _tiny_full_pipelines import flux

    root = tmp_path_factory.mktemp("fluxq")
    folder = flux(root / "pipe", dev=True)
    run_cli(["export", str(folder), "--out", str(root / "b"), "--max-batch", "4", "--no-validate"], monkeypatch)
    bundle = root / "b"
    (root / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    run_cli(["tune", str(bundle), "--target-psnr", "30", "--prompts", str(root / "p.txt"), "--name", "q",
             "--solvers", "euler,ab2", "--nfe", "2,3", "--samples", "4"], monkeypatch)
    tuning = _tuning(bundle)
    p = tuning.presets["q"]
    assert p.lower_bound >= 30 and tuning.settings["pipeline_presets"]["q"]["cfg"] == 3.5
    base = ["generate", str(bundle), "--prompt", "a red cat"]
    by_hand = ["--solver", p.solver, "--nfe", str(p.nfe)] + (["--grid", "uniform"] if p.grid_label == "uniform" else [])
    run_cli([*base, "--quality", "q", "--out", str(root / "q.png"), "--npy", str(root / "q.npy")], monkeypatch)
    run_cli([*base, *by_hand, "--cfg", "3.5", "--out", str(root / "h.png"), "--npy", str(root / "h.npy")], monkeypatch)
    run_cli([*base, *by_hand, "--cfg", "1.5", "--out", str(root / "g.png"), "--npy", str(root / "g.npy")], monkeypatch)
    q, h, g = (np.load(root / f"{k}.npy") for k in "qhg")
    np.testing.assert_array_equal(q, h)
    assert np.abs(q - g).max() > 1e-4  # the guidance matters: the preset's 3.5 is what ran


def test_dry_run_and_missing_prompts_write_nothing(tuned, monkeypatch, capsys):
    bundle, prompts = tuned
    before = _snapshot(bundle)
    line = cli_error(["tune", str(bundle), "--target-psnr", "30", "--nfe", "3"], monkeypatch, capsys)
    assert line == f"error: {bundle} is a pipeline bundle: give its held-out prompts with --prompts FILE (one a line)"
    capsys.readouterr()
    run_cli(["tune", str(bundle), "--target-psnr", str(TARGET), "--prompts", str(prompts), "--name", "dry", "--dry-run",
             *TUNE], monkeypatch)
    out = capsys.readouterr().out
    assert "quality dry: " in out and "stored in" not in out
    assert _snapshot(bundle) == before and "dry" not in _tuning(bundle).presets

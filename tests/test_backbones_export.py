"""Bring your own backbone: tiny random-init diffusers SD3 / FLUX-dev / FLUX-schnell / Sana and a factory module,
exported through the CLI and sampled by the runtime.

Truths: the torch adapter (ONNX parity), and the diffusers sampling convention computed in torch on the
ORIGINAL transformer (timestep = 1000 sigma for SD3 and Sana, sigma for FLUX with the pipeline's own packing and
ids; sigmas = linspace(1, 0, N + 1); x += (sigma_next - sigma) * v; CFG v = v_u + s (v_c - v_u)).
Time convention: t = 1 noise (= sigma), t = 0 data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from click.testing import CliRunner  # noqa: E402
from test_adapters import _reference  # noqa: E402
from tiny_diffusers import build, save  # noqa: E402

from anchorflow.cli import cli  # noqa: E402
from anchorflow.base.errors import AnchorflowError  # noqa: E402
from anchorflow.runtime import solve  # noqa: E402
from anchorflow.runtime.bundles.load import load_bundle  # noqa: E402
from anchorflow.runtime.bundles.format import read_bundle  # noqa: E402
from anchorflow.runtime.evaluation.parity import TOLERANCES  # noqa: E402
from anchorflow.runtime.evaluation.parity.verify import (  # noqa: E402
    E2E_FACTOR, build_cases, open_backend, verify_bundle)

FAMILIES = ("sd3", "flux-dev", "flux-schnell", "sana")
MAX_BATCH = 4
PARITY = 1e-4  # the exporter's fp32 tolerance (measured on these models: <= 7e-6, see bundle.json)
# Euler: N steps of |dt| = 1/N, each adding at most |dt| * (per-call error <= PARITY) to a state of
# unit scale, and the SD3/FLUX fields are Lipschitz ~1 at this size: N * (1/N) * PARITY = PARITY.
EULER = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """family -> bundle folder, each exported once through the CLI from a save_pretrained folder."""
    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for family in FAMILIES:
        src = save(family, root / f"{family}-transformer")
        bundle = root / f"{family}-bundle"
        res = CliRunner().invoke(cli, ["export", str(src), "--out", str(bundle), "--max-batch", str(MAX_BATCH),
                                       "--axis", "L=1:6:12", "--precision", "fp16"])
        assert res.exit_code == 0, res.output
        out[family] = bundle
    return out


def _inputs(b, n: int, length: int, seed: int) -> tuple[np.ndarray, dict]:
    spec_like = b.format.backbone
    rng = np.random.default_rng(seed)
    state = b.format.state_shape
    cond = {}
    for c in spec_like.conditions:
        shape = tuple(n if d == "batch" else length if d == "L" else int(d) for d in c.shape)
        if c.name == "encoder_attention_mask":  # Sana: odd rows have their last token padded out
            cond[c.name] = (np.arange(length)[None] < length - np.arange(n)[:, None] % 2).astype(np.int64)
            cond[c.name][:, 0] = 1
            continue
        cond[c.name] = (rng.uniform(1, 5, shape) if c.name == "guidance" else rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_normal((n, *state)).astype(np.float32), cond


@pytest.mark.parametrize("family", FAMILIES)
def test_export_records_parity_at_3_batches_and_2_text_lengths(exported, family):
    meta = json.loads((exported[family] / "bundle.json").read_text())
    bb = meta["networks"]["backbone"]
    v = bb["validation"]
    sizes = {c["case"].split(" b=")[0] for c in v["cases"]}
    batches = {c["case"].split(" b=")[1] for c in v["cases"]}
    assert v["passed"] and v["worst"]["max_abs"] <= PARITY and len(sizes) == 2 and len(batches) == 3
    assert meta["schema"] == "anchorflow.bundle/2" and bb["axes"]["L"] == {"min": 1, "opt": 6, "max": 12}
    names = [i["name"] for i in bb["inputs"]]
    second = "encoder_attention_mask" if family == "sana" else "pooled_projections"
    assert names[:4] == ["x", "t", "encoder_hidden_states", second]
    assert ("guidance" in names) == (family == "flux-dev")
    assert meta["guidance"]["mode"] == {"flux-dev": "embedded", "flux-schnell": "none"}.get(family, "rows")
    out = CliRunner().invoke(cli, ["inspect", str(exported[family])])
    assert out.exit_code == 0 and "conditions encoder_hidden_states float32 (batch, L, 16)" in out.output
    if family.startswith("flux"):  # no float64 in the graph (TensorRT cannot import it)
        import onnx

        from anchorflow.export.adapter_export import doubles

        assert doubles(onnx.load(str(exported[family] / "backbone.onnx"))) == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n, length", [(2, 3), (5, 11)])
def test_runtime_velocity_matches_torch_at_new_sizes(exported, family, n, length):
    b = load_bundle(exported[family], backend="ort-cpu")
    x, cond = _inputs(b, n, length, seed=n)
    t = np.linspace(0.9, 0.1, n).astype(np.float32)
    want = _reference(family, build(family), torch.from_numpy(x), torch.from_numpy(t),
                      {k: torch.from_numpy(v) for k, v in cond.items()}).numpy()
    assert np.abs(b.velocity(x, t, cond) - want).max() <= PARITY


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_variant_matches_torch_fp32_with_float32_io(exported, family):
    """The fp16 graph (float32 at its boundary) against the fp32 torch model at a new batch and text length.
    Tolerance: the exporter's fp16 rule (runtime/evaluation/parity/stats.py TOLERANCES: mean |err| <= u + 32 u mean |ref|,
    u = 2^-11; 2x the worst measured on trained nets, while a wrong cast gives O(1) relative errors)."""
    import onnx

    meta = json.loads((exported[family] / "bundle.json").read_text())
    assert meta["precisions"] == ["fp32", "fp16"]
    v16 = meta["networks"]["backbone"]["precisions"]["fp16"]
    assert v16["file"] == "backbone.fp16.onnx" and v16["validation"]["passed"]
    graph = onnx.load(str(exported[family] / v16["file"])).graph
    floats = {i.name: i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]}
    assert floats["x"] == floats["v"] == onnx.TensorProto.FLOAT  # float32 IO behind one Cast each
    b = load_bundle(exported[family], backend="ort-cpu", precision="fp16")
    x, cond = _inputs(b, 5, 9, seed=11)
    t = np.linspace(0.95, 0.05, 5).astype(np.float32)
    want = _reference(family, build(family), torch.from_numpy(x), torch.from_numpy(t),
                      {k: torch.from_numpy(v) for k, v in cond.items()}).numpy()
    err = np.abs(b.velocity(x, t, cond) - want)
    u = 2.0**-11
    assert np.isfinite(err).all() and err.mean() <= u + 32 * u * np.abs(want).mean()
    assert err.mean() > 1e-6  # it is the fp16 graph, not the fp32 one (fp32 parity is <= 1e-5)


def test_bf16_is_refused_for_diffusers_sources_in_one_line(tmp_path):
    src = save("sd3", tmp_path / "sd3")
    res = CliRunner().invoke(cli, ["export", str(src), "--out", str(tmp_path / "b"), "--precision", "fp16,bf16"])
    assert res.exit_code == 1 and isinstance(res.exception, AnchorflowError)
    assert "no bf16 kernels" in str(res.exception) and "\n" not in str(res.exception)
    assert not (tmp_path / "b").exists()


def _diffusers_euler(family, model, x, cond, null=None, scale=1.0):
    """The diffusers convention in torch: sigmas linspace(1, 0, N + 1), x += (sigma_next - sigma) v."""
    x = torch.from_numpy(x).clone()
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    tc = {k: torch.from_numpy(v) for k, v in cond.items()}
    tn = None if null is None else {k: torch.from_numpy(np.broadcast_to(v, cond[k].shape).copy()) for k, v in null.items()}
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((x.shape[0],), float(s))
        v = _reference(family, model, x, sig, tc)
        if tn is not None:
            v_u = _reference(family, model, x, sig, tn)
            v = v_u + scale * (v - v_u)
        x = x + (s_next - s) * v
    return x.numpy()


def _null(cond: dict) -> dict:
    """One shared "empty prompt" row: zero embeddings, and (Sana) a mask keeping its first token."""
    null = {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in cond.items()}
    if "encoder_attention_mask" in null:
        null["encoder_attention_mask"][:, 0] = 1
    return null


@pytest.mark.parametrize("family, guided", [("sd3", False), ("sd3", True), ("flux-dev", False), ("flux-schnell", False),
                                            ("sana", False), ("sana", True)])
def test_anchorflow_euler_equals_the_diffusers_convention(exported, family, guided):
    """SD3 and Sana with and without CFG rows; FLUX-dev with its embedded guidance (3.5 per sample); schnell plain."""
    b = load_bundle(exported[family], backend="ort-cpu")
    x, cond = _inputs(b, 3, 6, seed=7)
    if "guidance" in cond:
        cond["guidance"] = np.full(3, 3.5, np.float32)
    kw, null = {}, None
    if guided:  # one shared "empty prompt" row for the unconditional half
        null = _null(cond)
        kw = dict(null_cond=null, cfg_scale=2.0)
    got = solve("euler", b.velocity, x, STEPS, cond=cond, **kw)
    assert got.nfe == STEPS
    want = _diffusers_euler(family, build(family), x, cond, null, 2.0)
    assert np.abs(got.x - want).max() <= EULER


def test_a_guided_batch_beyond_the_exported_rows_runs_in_chunks_equal_to_one_call(exported):
    """6 samples with CFG rows = 12 rows per call on a bundle exported for 8: the runtime calls the graph on
    8 + 4 rows, which equals one onnxruntime call on all 12 (the ONNX batch axis is symbolic, so ORT takes
    12). Rows are independent, so only the kernels' blocking differs: the bound is the fp32 EULER one."""
    from anchorflow.runtime.bundles.backends import make_session

    b = load_bundle(exported["sd3"], backend="ort-cpu")
    assert b.format.backbone.batch[2] == 2 * MAX_BATCH == 8
    x, cond = _inputs(b, 6, 5, seed=5)
    session = make_session(exported["sd3"] / "backbone.onnx", "ort-cpu", threads=1)
    rows = []

    def whole(x, t, c):
        rows.append(x.shape[0])
        return session.run(["v"], {"x": x, "t": t, **c})[0]

    kw = dict(cond=cond, null_cond=_null(cond), cfg_scale=2.0)
    chunked, one = solve("euler", b.velocity, x, STEPS, **kw).x, solve("euler", whole, x, STEPS, **kw).x
    assert rows == [12] * STEPS and np.abs(chunked - one).max() <= EULER


def test_factory_from_a_test_file_exports_and_samples(tmp_path):
    """The factory in test_adapters.py (time map flip, CFG rows, text of length L) through the CLI."""
    from test_adapters import Toy

    bundle = tmp_path / "toy"
    res = CliRunner().invoke(cli, ["export", "test_adapters:make_backbone", "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    b = load_bundle(bundle, backend="ort-cpu")
    rng = np.random.default_rng(0)
    x, text = rng.standard_normal((2, 2, 6, 6)).astype(np.float32), rng.standard_normal((2, 5, 2)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    with torch.no_grad():
        want = -Toy()(torch.from_numpy(x), torch.from_numpy(1.0 - t), torch.from_numpy(text)).numpy()
    assert np.abs(b.velocity(x, t, {"text": text}) - want).max() <= PARITY


def test_external_data_is_written_hashed_and_loaded(tmp_path):
    from anchorflow.base.errors import CheckpointError
    from anchorflow.export.adapter_export import export_adapter
    from anchorflow.trainers.adapters import load_source

    bundle = tmp_path / "ext"
    export_adapter(load_source(str(save("sd3", tmp_path / "sd3"))), bundle, max_batch=2, external_data=True)
    meta = json.loads((bundle / "bundle.json").read_text())
    ext = meta["networks"]["backbone"]["external_data"]
    assert [e["file"] for e in ext] == ["backbone.onnx.data"] and (bundle / "backbone.onnx.data").is_file()
    assert meta["networks"]["backbone"]["validation"]["passed"]  # the parity ran on the graph + its data file
    b = load_bundle(bundle, backend="ort-cpu")
    x, cond = _inputs(b, 1, 4, seed=0)
    assert b.velocity(x, np.ones(1, np.float32), cond).shape == x.shape
    data = bytearray((bundle / "backbone.onnx.data").read_bytes())
    data[-1] ^= 1
    (bundle / "backbone.onnx.data").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="backbone.onnx.data does not match the sha256"):
        load_bundle(bundle, backend="ort-cpu")


def test_sample_cli_with_condition_files_equals_solve(exported, tmp_path):
    """sample --cond/--null-cond/--noise on the SD3 bundle writes what solve() computes in-process."""
    b = load_bundle(exported["sd3"], backend="ort-cpu")
    x, cond = _inputs(b, 2, 5, seed=3)
    null = {k: np.zeros((1, *v.shape[1:]), np.float32) for k, v in cond.items()}
    np.save(tmp_path / "noise.npy", x)
    np.savez(tmp_path / "cond.npz", **cond)
    np.savez(tmp_path / "null.npz", **null)
    args = ["sample", str(exported["sd3"]), "--solver", "euler", "--nfe", "3", "--cfg", "2", "--backend", "ort-cpu",
            "--noise", str(tmp_path / "noise.npy"), "--npy", str(tmp_path / "s.npy")]  # latents: no VAE, no --out
    res = CliRunner().invoke(cli, [*args, "--cond", str(tmp_path / "cond.npz"), "--null-cond", str(tmp_path / "null.npz")])
    assert res.exit_code == 0, res.output
    want = solve("euler", b.velocity, x, 3, cond=cond, null_cond=null, cfg_scale=2.0).x
    assert np.array_equal(np.load(tmp_path / "s.npy"), want)  # same inputs, same runtime: bit-identical
    np.savez(tmp_path / "short.npz", encoder_hidden_states=cond["encoder_hidden_states"])
    np.savez(tmp_path / "wide.npz", **{**cond, "encoder_hidden_states": np.zeros((2, 5, 7), np.float32)})
    for file, message in (("short.npz", "--cond: missing pooled_projections; the bundle expects: "
                                         "encoder_hidden_states float32 (batch, L, 16), pooled_projections float32"),
                          ("wide.npz", "--cond: encoder_hidden_states has shape (2, 5, 7), expected")):
        res = CliRunner().invoke(cli, [*args, "--cond", str(tmp_path / file), "--null-cond", str(tmp_path / "null.npz")])
        # a user error (AnchorflowError): the CLI's main prints it as one `error:` line, exit 1
        assert res.exit_code == 1 and isinstance(res.exception, AnchorflowError), res.output
        assert message in str(res.exception) and "\n" not in str(res.exception)


class Ratio(torch.nn.Module):
    """v = relu(x) / (relu(x) + 1e-15): 1 where x > 0, 0 elsewhere; 0 / 0 = NaN were the epsilon lost."""

    def forward(self, x, t):
        r = torch.relu(x)
        return r / (r + 1e-15) + 0.0 * t.reshape(-1, 1, 1, 1)


def test_a_tiny_epsilon_survives_the_export(tmp_path):
    """torch.onnx.export's optimizer deletes `x + c` for |c| <= 1e-8 as `x + 0` (what broke tiny Sana's linear
    attention); the exporter keeps such a graph unoptimized. Exact truth: the step function of x."""
    from anchorflow.export.adapter_export import export_adapter
    from anchorflow.trainers.adapters.base import AdapterSpec
    from anchorflow.trainers.adapters.factory import FactoryAdapter

    export_adapter(FactoryAdapter(Ratio(), AdapterSpec(name="ratio", state=(1, 4, 4))), tmp_path / "r", max_batch=2)
    b = load_bundle(tmp_path / "r", backend="ort-cpu")
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    assert np.array_equal(b.velocity(x, np.ones(2, np.float32), None), (x > 0).astype(np.float32))


@pytest.mark.parametrize("family", ("sd3", "flux-dev"))
def test_verify_cases_follow_the_declared_inputs(exported, family):
    """verify's cases come from the inputs bundle.json declares: text embeddings, pooled projections,
    the guidance scale; text length and latent size at opt and at min."""
    bundle = exported[family]
    fmt = read_bundle(bundle)
    cases = build_cases(fmt, open_backend(bundle, "ort-cpu", "fp32"), seed=0)["backbone"]
    decl = {i.name: i for i in fmt.backbone.inputs}
    lo = {a: r[0] for a, r in fmt.backbone.axes.items()}
    opt = {a: r[1] for a, r in fmt.backbone.axes.items()}
    seen = set()
    for case in cases:
        assert set(case.feeds) == set(decl)
        for name, value in case.feeds.items():
            sizes = opt if case.kind in ("random", "real") else lo  # the second set: every axis at its min
            want = tuple(case.batch if d == "batch" else sizes[d] if isinstance(d, str) else d for d in decl[name].shape)
            assert value.shape == want and value.dtype == np.dtype(decl[name].dtype), (case.label, name)
        seen.add((case.kind.split()[0], case.kind != "random" and case.kind != "real"))
    # random at opt and at min sizes, real (the reference's own samples, noised again) at opt
    assert seen == {("random", False), ("random", True), ("real", False)}
    if fmt.guidance.mode == "embedded":  # a guidance scale, not N(0, 1)
        g = np.concatenate([c.feeds[fmt.guidance.input] for c in cases])
        assert g.min() >= 1.0 and g.max() <= 5.0


@pytest.mark.parametrize("family", ("sd3", "flux-dev"))
def test_verify_compares_onnxruntime_with_the_torch_source(exported, family):
    """`verify` on a diffusers-source bundle: the torch reference is the source's adapter, loaded again."""
    bundle = exported[family]
    r = verify_bundle(bundle, ["torch", "ort-cpu"], ["fp32"], trust_source=True)  # this test made the bundle
    assert r.reference == "torch" and r.passed, r.text()
    rows = {x.network: x for x in r.reports}
    fmt = read_bundle(bundle)
    e2e = "e2e euler@7"
    assert set(rows) == {"backbone", e2e}
    # 2 axis-size sets x batches (1, 7, the maximum 8 rows; FLUX-dev without CFG rows: 1, 4) random, plus real
    assert len(rows["backbone"].results) == {"sd3": 9, "flux-dev": 6}[family]
    # the exporter's fp32 tolerance: a wrong op or constant shows up at 1e-2 or more
    assert 0 < rows["backbone"].worst().max_abs <= PARITY
    assert rows[e2e].tolerance.atol == pytest.approx(TOLERANCES["fp32"].atol * E2E_FACTOR)
    assert rows[e2e].worst().max_abs <= rows[e2e].tolerance.atol
    assert fmt.guidance.mode == {"sd3": "rows", "flux-dev": "embedded"}[family]

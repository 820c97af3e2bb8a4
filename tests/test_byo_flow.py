"""The bring-your-own flow of docs/byo.md, run through the CLI as a user would, on a tiny
random-init diffusers SD3 transformer folder and on a factory module (issue 24's must-show).

The commands come from the "your own model, start to finish" block of docs/byo.md (read from the
file, so the docs cannot drift from what is tested); the test only sets the block's variables and
appends the sizes of a tiny model (``TINY``). Each model's flow runs ONCE per module (the ``flow``
fixture, in-process through ``anchorflow.cli.main``, as the ``anchorflow`` script runs it); the
tests check one step each. ``serve`` runs as a real process (and Ray's): started in its own session,
sent the block's Python requests (3 with conditions, one bad: 400), stopped with SIGINT, and every
process it started must be gone afterwards. The bad inputs of tests/test_bad_input.py's matrix (its
rows that break a good sample / bench / verify / tune / serve command) are fed to the same bundles:
one ``error:`` line, exit 1, no traceback, nothing on disk changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from anchorflow.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "byo.md"
KINDS = ("sd3", "factory")
COND_SHAPES = {"sd3": {"encoder_hidden_states": (5, 16), "pooled_projections": (8,)}, "factory": {"text": (3, 2)}}
ROWS = 4  # rows of cond.npz: tune / bench / sample default their counts to them

FACTORY = '''
import torch


class Toy(torch.nn.Module):
    """A user's own velocity model: v = tanh(x w tau + mean_L(text)) in the model's time (tau = 1 - t)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(2, 2) * 0.5)

    def forward(self, x, tau, text):
        mixed = torch.einsum("oc,bchw->bohw", self.w, x) * tau[:, None, None, None]
        return torch.tanh(mixed + text.mean(1)[:, :, None, None])


def make():
    spec = {"name": "toy", "state": (2, "H", "W"), "axes": {"H": (2, 4, 8), "W": (2, 4, 8), "L": (1, 3, 6)},
            "conditions": [{"name": "text", "dtype": "float32", "shape": ("batch", "L", 2)}],
            "time": {"map": "flip"}, "guidance": {"mode": "rows"}}
    return Toy(), spec
'''


def read_block(kind: str) -> str:
    """The fenced block after ``<!-- byo-flow: KIND -->`` in docs/byo.md."""
    text = DOC.read_text()
    m = re.search(rf"<!-- byo-flow: {kind} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"docs/byo.md has no byo-flow {kind} block"
    return m.group(1)


def tiny_sizes(kind: str, root: Path) -> dict[str, list[str]]:
    """Sizes of a tiny model, appended to the block's commands (by their first words). No row
    counts: the commands sample, tune and bench the rows of $COND as written."""
    train = ["--data", "none", "--batch", "4", "--chain", "2", "--width", "8", "--start-states", "4",
             "--solve-steps", "2", "--cache-dir", str(root / "cache"), "--threads", "1"]
    export = ["--max-batch", "4"] + (["--axis", "L=1:5:8"] if kind == "sd3" else [])
    return {"export": export, "train sidenet": train,
            "tune": ["--reference-steps", "8", "--max-evals", "3", "--quiet"],
            "bench": ["--reference", "rk4:8", "--quiet", "--euler-ladder", "4,8"],
            "sample": [], "verify": [], "serve": ["--num-cpus", "1", "--replicas", "1"]}


def make_model(kind: str, root: Path) -> dict[str, str]:
    """The model and its condition files; returns the block's variables."""
    g = torch.Generator().manual_seed(7)
    if kind == "sd3":
        sys.path.insert(0, str(Path(__file__).parent))
        from tiny_diffusers import save

        save("sd3", root / "transformer")
        model = str(root / "transformer")
    else:
        (root / "myfactory.py").write_text(FACTORY)
        model = f"{root / 'myfactory.py'}:make"
    shapes = COND_SHAPES[kind]
    np.savez(root / "cond.npz", **{k: torch.randn(ROWS, *s, generator=g).numpy() for k, s in shapes.items()})
    np.savez(root / "null.npz", **{k: torch.randn(1, *s, generator=g).numpy() for k, s in shapes.items()})
    return {"MODEL": model, "COND": "cond.npz", "NULL": "null.npz", "MINUTES": "0.05"}


@dataclass
class Step:
    line: str  # the docs' line
    argv: list  # what ran (after 'anchorflow')
    want: int  # the exit status the docs promise
    code: object = None  # exit status, or "traceback" for an uncaught exception
    out: str = ""
    err: str = ""
    seconds: float = 0.0

    def check(self) -> "Step":
        """The step's promise: its exit status, no traceback, a failure ends in one ``error:`` line."""
        text = self.out + self.err
        assert "Traceback" not in text, f"{self.line}: a traceback\n{text[-4000:]}"
        assert self.code == self.want, f"{self.line}: exit {self.code}, expected {self.want}\n{text[-3000:]}"
        if self.want:
            assert self.err.strip().splitlines()[-1].startswith("error: "), self.err[-2000:]
        return self


def run_cli(argv: list, cwd: Path) -> tuple[object, str, str, float]:
    """``anchorflow ARGV`` in-process (``anchorflow.cli.main``, as the script runs it) in ``cwd``:
    (exit status or "traceback", stdout, stderr, seconds)."""
    out, err, old, t0 = io.StringIO(), io.StringIO(), os.getcwd(), time.monotonic()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what the user would see: a traceback
                err.write(traceback.format_exc())
                code = "traceback"
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue(), time.monotonic() - t0


def commands(variables: dict[str, str]) -> list[tuple[str, list[str], int, bool]]:
    """(line, argv after 'anchorflow', expected exit status, background) per command of the shell block."""
    out = []
    for line in read_block("shell").splitlines():
        code = line.split("#", 1)[0].strip()
        if not code:
            continue
        if re.fullmatch(r"[A-Z_]+=\S+", code):
            name = code.split("=", 1)[0]
            assert name in variables, f"docs/byo.md sets {name}, which the test does not know"
            continue
        for name, value in variables.items():
            code = code.replace(f"${name}", value)
        background = code.endswith("&")
        argv = shlex.split(code.rstrip("&"))
        assert argv[0] == "anchorflow", line
        m = re.search(r"#\s*exit (\d+)", line)
        out.append((line.split("#", 1)[0].strip(), argv[1:], int(m.group(1)) if m else 0, background))
    return out


def _sizes(argv: list[str], sizes: dict[str, list[str]]) -> list[str]:
    for prefix in sorted(sizes, key=len, reverse=True):
        if " ".join(argv).startswith(prefix):
            extra = list(sizes[prefix])
            if argv[0] == "serve" and "--port" in argv:  # a free port instead of the docs' 8000
                argv = argv[: argv.index("--port")] + argv[argv.index("--port") + 2:]
            return argv + extra
    return argv


@dataclass
class Flow:
    kind: str
    root: Path
    variables: dict
    steps: list  # Step per foreground command of the docs' block, in order
    serve_argv: list

    def step(self, head: str, nth: int = 0) -> Step:
        """The ``nth`` step whose argv starts with the words of ``head`` (e.g. "sample --solver ba")."""
        words = head.split()
        hits = [s for s in self.steps if s.argv[0] == words[0] and all(w in s.argv for w in words[1:])]
        assert len(hits) > nth, f"docs/byo.md has no step {head!r} (#{nth})"
        return hits[nth]

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"


@pytest.fixture(scope="module", params=KINDS)
def flow(request, tmp_path_factory) -> Flow:
    """The docs' flow on one model, every foreground step once, in order (a failing step stops it:
    the steps after it are not run and their tests fail naming it)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"byo-{kind}")
    variables = make_model(kind, root)
    sizes = tiny_sizes(kind, root)
    steps, serve_argv, broken = [], None, None
    for line, argv, want, background in commands(variables):
        argv = _sizes(argv, sizes)
        if background:
            serve_argv = argv
            continue
        step = Step(line, argv, want)
        if broken is None:
            step.code, step.out, step.err, step.seconds = run_cli(argv, root)
            try:
                step.check()
            except AssertionError as exc:
                broken = f"{line}: {exc}"
        else:
            step.code, step.err = "not run", f"not run: an earlier step failed: {broken[:3000]}"
        steps.append(step)
    print("\n".join(f"{kind:>8} {s.seconds:6.1f} s  exit {s.code}  {s.line}" for s in steps))
    return Flow(kind, root, variables, steps, serve_argv)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` or in its session (from /proc; serve runs in its own session)."""
    children: dict[int, list[int]] = {}
    session: set[int] = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                ppid, sid = int(fields[1]), int(fields[3])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
            if sid == pid and int(p.name) != pid:
                session.add(int(p.name))
    out, todo = set(session), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _state_shape(flow: Flow) -> tuple:
    return tuple(json.loads((flow.bundle / "bundle.json").read_text())["model"]["state_shape"])


# -- export -> train sidenet -> export --sidenet (fp32 + fp16) -----------------------------------------------

def test_export_train_and_export_sidenet(flow):
    """The three build steps pass; the bundle holds both networks in fp32 and a validated fp16 each."""
    for head in ("export", "train sidenet", "export --sidenet"):
        flow.step(head).check()
    assert flow.step("train sidenet").seconds < 60  # seconds, not the 1.4-1.8 h of the old defaults
    nets = json.loads((flow.bundle / "bundle.json").read_text())["networks"]
    assert set(nets) == {"backbone", "sidenet"}
    for name in ("backbone", "sidenet"):
        fp16 = nets[name]["precisions"]["fp16"]
        assert (flow.bundle / fp16["file"]).is_file() and fp16["validation"]["passed"] is True, (name, fp16)
    declared = {i["name"] for i in nets["backbone"]["inputs"] if i["role"] == "condition"}
    assert declared == set(COND_SHAPES[flow.kind])


def test_inspect_on_the_flow_bundle(flow):
    """inspect says what the bundle is, with no 'None' for a latent, text-conditioned model, and
    what tune refused."""
    flow.step("tune").check()
    code, out, err, _ = run_cli(["inspect", "bundle"], flow.root)
    assert code == 0 and "Traceback" not in out + err, err
    model = next(line for line in out.splitlines() if line.startswith("model "))
    assert "None" not in out, out  # was "None classes, null label None, data range None", "real inputs: None"
    assert "no class labels" in model and "latents (no data range)" in model, model
    assert all(name in model for name in COND_SHAPES[flow.kind]), model
    assert "first-call table  refused by tune: the cached first call is tabulated per class label y" in out, out


# -- tune --cond ---------------------------------------------------------------------------------------------

def test_tune_with_conditions(flow):
    """tune --cond: grids tuned on the held-out conditions (recorded with their sha256, rows = the
    file's rows); the cached first call is not measured on a text-conditioned backbone but refused,
    with the reason, in the tuning record (it used to fail measuring a labels-only table)."""
    import hashlib

    step = flow.step("tune").check()
    rec = json.loads((flow.bundle / "tuned.json").read_text())
    held = rec["settings"]["held_out"]
    for what, var in (("cond", "COND"), ("null_cond", "NULL")):
        path = flow.root / flow.variables[var]
        assert held[what]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["settings"]["samples"] == ROWS and rec["settings"]["cfg"] == 2.0
    assert rec["first_call"] is None and not (flow.bundle / "first_call.npy").exists()
    reason = rec["first_call_refused"]
    assert "tabulated per class label y" in reason and all(k in reason for k in COND_SHAPES[flow.kind]), reason
    assert "first-call table: not measured, refused" in step.out
    g = rec["grids"]["ba@4"]
    assert set(rec["grids"]) == {"ba@4"} and np.isfinite(g["psnr"]) and g["psnr"] >= g["uniform_psnr"], g


# -- bench --cond --------------------------------------------------------------------------------------------

def test_bench_with_conditions(flow):
    """bench --cond: every solver at the docs' budget on the file's rows, finite quality, a report."""
    flow.step("bench").check()
    res = json.loads((flow.root / "bench" / "results.json").read_text())
    assert res["settings"]["n"] == ROWS and res["settings"]["cfg_scales"] == [2.0]
    runs = {(r["solver"], r["nfe"]) for r in res["runs"] if np.isfinite(r["psnr"])}
    assert {("euler", 4), ("ba", 4)} <= runs, res["runs"]
    assert (flow.root / "bench" / "report.md").is_file()


# -- sample (ba, euler, fastflow) ----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["ba", "euler", "fastflow"])
def test_sample_with_conditions(flow, solver):
    """sample --cond: one row per condition row, finite; ba on the grid tune stored."""
    step = flow.step(f"sample --solver {solver}").check()
    x = np.load(flow.root / f"{solver}.npy")
    assert x.shape == (ROWS, *_state_shape(flow)) and np.isfinite(x).all()
    assert ("grid: tuned" in step.err) == (solver == "ba"), step.err


def test_sampled_euler_is_the_models_euler(flow):
    """The CLI's guided Euler on the exported bundle equals Euler with CFG computed in torch on the
    user's own model (the diffusers convention for SD3: timestep = 1000 sigma; the factory's time
    map: tau = 1 - t), on the same start noise: the whole export -> sample path, within fp32 parity."""
    from anchorflow.runtime import load_bundle

    flow.step("sample --solver euler").check()
    cond, null = np.load(flow.root / "cond.npz"), np.load(flow.root / "null.npz")
    b = load_bundle(flow.bundle, backend="ort-cpu")
    noise = b.plan(solver="euler", nfe=4, cond={k: cond[k] for k in cond.files},
                   null_cond={k: null[k] for k in null.files}, cfg_scale=2.0).start_noise()
    c = {k: torch.from_numpy(cond[k]) for k in cond.files}
    u = {k: torch.from_numpy(np.repeat(null[k], ROWS, 0)) for k in null.files}
    if flow.kind == "sd3":
        from diffusers import SD3Transformer2DModel

        net = SD3Transformer2DModel.from_pretrained(flow.variables["MODEL"]).eval()

        def v(x, sigma, k):  # d x / d sigma, sigma = t
            ts = torch.full((x.shape[0],), 1000.0 * sigma)
            return net(hidden_states=x, timestep=ts, return_dict=False, **k)[0]
    else:
        sys.path.insert(0, str(flow.root))
        net = __import__("myfactory").make()[0].eval()

        def v(x, sigma, k):  # the model's d x / d tau with tau = 1 - t: d x / d t = -that
            return -net(x, torch.full((x.shape[0],), 1.0 - sigma), k["text"])
    x = torch.from_numpy(noise.astype(np.float32))
    sig = np.linspace(1.0, 0.0, 5)
    with torch.no_grad():
        for s0, s1 in zip(sig[:-1], sig[1:]):
            vc, vu = v(x, s0, c), v(x, s0, u)
            x = x + float(s1 - s0) * (vu + 2.0 * (vc - vu))
    got = np.load(flow.root / "euler.npy")
    assert np.abs(got - x.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(got).max())), np.abs(got - x.numpy()).max()


# -- verify: exit 0, then exit 1 with an asked precision skipped ---------------------------------------------

def test_verify_passes_then_fails_on_a_skipped_precision(flow):
    ok = flow.step("verify", 0).check()
    assert "PASS" in ok.out and "FAIL" not in ok.out and re.search(r"all \d+ comparisons passed", ok.out), ok.out
    assert ok.out.startswith("reference: torch (fp32)"), ok.out  # the user's own model, in torch, is the reference
    for net in ("backbone", "sidenet", r"e2e ba@\d+"):
        for precision in ("fp32", "fp16"):
            assert re.search(rf"^{net} +ort-cpu +{precision} .*PASS *$", ok.out, re.M), (net, precision, ok.out)
    bad = flow.step("verify", 1)
    assert bad.want == 1
    bad.check()
    assert "asked but not compared: precision bf16" in bad.err.strip().splitlines()[-1], bad.err


# -- serve: start, 3 requests with conditions, 400 on a bad one, stop, no process left --------------------------

@pytest.mark.timeout(400)
def test_serve_with_conditions(flow):
    from anchorflow.serve.client import Client, free_port

    assert flow.serve_argv is not None, "docs/byo.md starts no serve"
    flow.step("tune").check()  # the service samples the tuned bundle
    root, port = flow.root, free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "anchorflow", *flow.serve_argv, "--port", str(port)], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    marks = {"start": time.monotonic()}
    try:
        client, deadline, up = Client(f"http://127.0.0.1:{port}", timeout=10), time.monotonic() + 240, False
        while time.monotonic() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)
            try:
                up = client.get("/healthz")[0] == 200
            except OSError:
                pass
            if up:
                break
            time.sleep(0.25)
        assert up, f"serve did not come up (exit {proc.poll()}):\n{(root / 'serve.log').read_text()[-3000:]}"
        seen |= _descendants(proc.pid)
        script = read_block("python").replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
        marks["up"] = time.monotonic()
        buf = io.StringIO()  # the docs' script, run in-process as a user's Python session would
        with contextlib.chdir(root), contextlib.redirect_stdout(buf):
            exec(compile(script, f"{DOC} (python block)", "exec"), {"__name__": "__byo__"})
        marks["requests"] = time.monotonic()
        lines = buf.getvalue().strip().splitlines()
        assert lines[:3] == [str((1, *_state_shape(flow)))] * 3, buf.getvalue()
        body = json.loads(lines[3])
        assert "nope" in json.dumps(body) and "Traceback" not in buf.getvalue(), body
        seen |= _descendants(proc.pid)
        assert len(seen) >= 2, seen  # Ray's processes were there to be stopped
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
        deadline = time.monotonic() + 30
        while _alive(seen | _descendants(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(seen | _descendants(proc.pid))
        marks["stopped"] = time.monotonic()
        print("serve: " + ", ".join(f"{k} {v - marks['start']:.1f} s" for k, v in marks.items()))
        for pid in left:  # clean up before failing (only processes this test started)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    text = (root / "serve.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert rc in (0, 130), f"serve exited {rc} on SIGINT:\n{text[-2000:]}"
    assert not left, f"processes left after serve stopped: {sorted(left)}"


# -- the bad-input matrix on the flow's bundles: one error line, exit 1, no traceback, nothing changed ---------

def _matrix_rows() -> list:
    """tests/test_bad_input.py's rows that break a good sample / bench / verify / tune / serve command
    (their bad part, moved onto the flow's bundles), except those about the digits model's labels and
    files; then rows of this flow's own: conditions that do not fit, the refused cached first call."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_bad_input import B, CASES, S, V

    rows = []
    for argv, status, words, *_ in CASES:
        for base, head in ((S, "sample"), (B, "bench"), (V, "verify"), (["tune", "{root}"], "tune"),
                           (["serve", "default"], "serve")):
            if argv[:len(base)] == base and status == 1:
                extra = argv[len(base):]
                if not any(re.search(r"\{(?!file\}|empty\})", a) or a in ("--labels", "--cond", "--null-cond")
                           for a in extra):
                    if head == "tune" and "--samples" in extra and "--samples" not in words:
                        i = extra.index("--samples")  # the rows come from --cond here
                        extra = extra[:i] + extra[i + 2:]
                    rows.append((head, extra, words))
                break
    return rows + BYO_ROWS


BYO_ROWS = [  # (command, its bad part, words in the error line)
    ("guided, no null", [], "needs a null value"),
    ("sample", ["--n", "3"], "expected"),  # 4 condition rows for 3 samples
    ("sample", ["--cond", "{bad}/wrongname.npz"], "expects"),
    ("sample", ["--cond", "{bad}/toolong.npz"], "L in 1.."),
    ("sample", ["--cond", "{bad}/nan.npz"], "NaN or Inf"),
    ("sample", ["--labels", "1,2"], "has no class labels"),
    ("sample", ["--first-call", "cached", "--solver", "ba", "--nfe", "4"], "refused this bundle's first-call table"),
    ("tune", ["--first-call", "cached"], "tabulated per class label y; this model also takes"),
    ("bench", ["--first-call", "cached"], "refused this model's first-call table"),
]
GOOD = {  # a good command per head, which the row's bad part breaks (cwd: the flow's folder)
    "sample": ["sample", "bundle", "--solver", "euler", "--nfe", "2", "--cond", "cond.npz", "--null-cond", "null.npz",
               "--cfg", "2", "--npy", "ok.npy"],
    "bench": ["bench", "bundle", "--solvers", "euler", "--nfe", "2", "--reference", "rk4:8", "--cond", "cond.npz",
              "--null-cond", "null.npz", "--cfg", "2", "--out", "bench-ok", "--quiet"],
    "verify": ["verify", "bundle", "--backends", "ort-cpu"],
    "tune": ["tune", "bundle", "--solvers", "euler", "--nfe", "2", "--cond", "cond.npz", "--null-cond", "null.npz",
             "--cfg", "2", "--reference-steps", "8", "--max-evals", "2", "--quiet"],
    "serve": ["serve", "bundle"],
    "guided, no null": ["sample", "bundle", "--solver", "euler", "--nfe", "2", "--cond", "cond.npz", "--cfg", "2",
                        "--npy", "ok.npy"],
}
MATRIX = _matrix_rows()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    """A plain file, an empty folder and condition files that do not fit either bundle."""
    base = tmp_path_factory.mktemp("byo-bad")
    (base / "a-file").write_text("a plain file\n")
    (base / "empty").mkdir()
    for kind, shapes in COND_SHAPES.items():
        (base / kind).mkdir()
        np.savez(base / kind / "wrongname.npz", nope=np.zeros((ROWS, 2), np.float32))
        first = next(iter(shapes))
        np.savez(base / kind / "toolong.npz", **{k: np.zeros((ROWS, 99, *s[1:]) if k == first else (ROWS, *s),
                                                             np.float32) for k, s in shapes.items()})
        np.savez(base / kind / "nan.npz", **{k: np.full((ROWS, *s), np.nan, np.float32) for k, s in shapes.items()})
    return {"file": base / "a-file", "empty": base / "empty", "base": base}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("head, extra, words", MATRIX, ids=[f"{h} {' '.join(e)}"[:80] for h, e, _ in MATRIX])
def test_bad_input_on_the_flow_bundles(flow, bad_files, head, extra, words):
    from test_bad_input import BAR, _disk

    flow.step("tune").check()  # the matrix runs on the finished bundle
    values = {"file": bad_files["file"], "empty": bad_files["empty"], "bad": bad_files["base"] / flow.kind}
    argv = GOOD[head] + [a.format(**values) for a in extra]
    watched = [flow.root, bad_files["base"]]
    before = _disk(watched)
    code, out, err, _ = run_cli(argv, flow.root)
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith(("warning: ", "grid: ", "note: "))
             and not BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.rstrip().endswith(lines[0]), err
    assert words in lines[0], lines[0]
    assert code == 1, (code, lines[0])
    assert _disk(watched) == before, "files on disk changed"


# -- the README's "Your own model, start to finish" block, on the flow's SD3 bundle --------------------------

README = DOC.parents[1] / "README.md"
# README lines known not to run as written (first words -> the reason): the step must fail with it;
# once the README is fixed the test fails here, naming the entry to remove
README_FIXES: dict[str, str] = {}  # README lines known not to run: command -> the error they give (none now)


def _readme_commands() -> list[list[str]]:
    text = README.read_text()
    m = re.search(r"## Your own model, start to finish.*?```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no 'Your own model, start to finish' bash block"
    block = re.sub(r"\\\n\s*", " ", m.group(1))
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines()
            if line.split("#", 1)[0].strip().startswith("anchorflow ")]


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)  # the block is written for an SD3 folder
def test_readme_block_runs_on_the_flow_bundle(flow, tmp_path):
    """README's block: export / train / build lines name only options their commands have (the
    flow ran them, build needs a GPU); tune, bench, sample and verify run as written on a copy of
    the flow's SD3 bundle (its file names mapped onto the flow's), no traceback, exit 0."""
    import shutil

    import click

    from anchorflow.cli import cli

    flow.step("export --sidenet").check()
    shutil.copytree(flow.bundle, tmp_path / "sd3-bundle")
    shutil.copytree(flow.root / "side", tmp_path / "sd3-side")
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "transformer").symlink_to(flow.root / "transformer")
    shutil.copy(flow.root / "cond.npz", tmp_path / "prompts.npz")
    shutil.copy(flow.root / "null.npz", tmp_path / "empty.npz")
    sizes = tiny_sizes("sd3", tmp_path)
    ran, fixed = [], []
    for argv in _readme_commands():
        cmd = cli.get_command(click.Context(cli), argv[0])
        if argv[0] in ("export", "train", "build"):
            if argv[0] == "train":
                cmd, argv = cmd.get_command(click.Context(cmd), argv[1]), argv[1:]
            known = {o for p in cmd.params for o in p.opts}
            unknown = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
            assert not unknown, f"README: {' '.join(argv)}: no such option {unknown}"
            continue
        code, out, err, _ = run_cli(_sizes(argv, sizes), tmp_path)
        assert "Traceback" not in out + err, err[-3000:]
        why = README_FIXES.get(argv[0])
        if why is not None and code == 1 and why in err:
            fixed.append(argv[0])
            continue
        assert why is None, f"README's {argv[0]} line runs now: remove it from README_FIXES"
        assert code == 0, f"README: {' '.join(argv)}: exit {code}\n{(out + err)[-2000:]}"
        ran.append(argv[0])
    assert {"tune", "bench", "sample"} <= set(ran) and set(fixed) == set(README_FIXES), (ran, fixed)

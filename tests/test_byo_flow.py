"""The bring-your-own flow of docs/byo.md, run through the CLI as a user would, on a tiny
random-init diffusers SD3 transformer folder and on a factory module.

The commands come from the "your own model, start to finish" block of docs/byo.md (read from the
file, so the docs cannot drift from what is tested); the test only sets the block's variables and
appends the sizes of a tiny model (``TINY``). Every step runs in its own process
(``python -m anchorflow``); none may print a traceback. ``serve`` is started in its own session,
sent the block's Python requests (3 with conditions, one bad: 400), stopped with SIGINT, and every
process it started (Ray's included) must be gone afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

pytestmark = [pytest.mark.slow, pytest.mark.xfail(
    reason="issue 24, unfinished: tune's default --first-call backbone,cached measures the t = 1 table with no "
           "conditions (runtime/first_call.measure_first_call) and fails on text-conditioned bundles", strict=False)]

DOC = Path(__file__).resolve().parents[1] / "docs" / "byo.md"

# Steps that wait for another helper's fix on main (step prefix -> what it waits for). A listed step
# that fails makes the test xfail naming it; a listed step that passes fails the test: remove it here.
WAITING: dict[str, str] = {}

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
    """Sizes of a tiny model, appended to the block's commands (by their first words)."""
    train = ["--data", "none", "--batch", "4", "--chain", "2", "--width", "8", "--start-states", "4",
             "--solve-steps", "2", "--cache-dir", str(root / "cache"), "--threads", "1"]
    export = ["--max-batch", "4"] + (["--axis", "L=1:5:8"] if kind == "sd3" else [])
    return {"export": export, "train sidenet": train,
            "tune": ["--samples", "4", "--reference-steps", "8", "--max-evals", "3", "--quiet"],
            "bench": ["--n", "4", "--reference", "rk4:8", "--quiet", "--euler-ladder", "4,8"],
            "sample": ["--n", "4"], "verify": [], "serve": ["--num-cpus", "1", "--replicas", "1"]}


def make_model(kind: str, root: Path) -> dict[str, str]:
    """The model and its condition files; returns the block's variables."""
    g = torch.Generator().manual_seed(7)
    if kind == "sd3":
        sys.path.insert(0, str(Path(__file__).parent))
        from _tiny_pipelines import sd3_pipe

        sd3_pipe(root / "transformer")
        model = str(root / "transformer")
        cond = {"encoder_hidden_states": (5, 16), "pooled_projections": (8,)}
    else:
        (root / "myfactory.py").write_text(FACTORY)
        model = f"{root / 'myfactory.py'}:make"
        cond = {"text": (3, 2)}
    np.savez(root / "cond.npz", **{k: torch.randn(4, *s, generator=g).numpy() for k, s in cond.items()})
    np.savez(root / "null.npz", **{k: torch.randn(1, *s, generator=g).numpy() for k, s in cond.items()})
    return {"MODEL": model, "COND": "cond.npz", "NULL": "null.npz", "MINUTES": "0.05"}


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


def _waiting(line: str) -> str | None:
    words = " ".join(line.split()[1:])
    for prefix, why in WAITING.items():
        head = prefix.split()
        if words.startswith(head[0]) and all(w in words for w in head[1:]):
            return why
    return None


def _sizes(argv: list[str], sizes: dict[str, list[str]]) -> list[str]:
    for prefix in sorted(sizes, key=len, reverse=True):
        if " ".join(argv).startswith(prefix):
            extra = list(sizes[prefix])
            if argv[0] == "serve" and "--port" in argv:  # a free port instead of the docs' 8000
                argv = argv[: argv.index("--port")] + argv[argv.index("--port") + 2:]
            return argv + extra
    return argv


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
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


def _serve(argv: list[str], root: Path, env: dict, report: list) -> None:
    """Start the service, run the docs' Python requests against it, SIGINT it, check nothing is left."""
    from anchorflow.serve.client import Client, free_port

    port = free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "anchorflow", *argv, "--port", str(port)], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
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
            time.sleep(1.0)
        assert up, f"serve did not come up (exit {proc.poll()}):\n{(root / 'serve.log').read_text()[-3000:]}"
        script = read_block("python").replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
        res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert res.stdout.count("(1,") == 3 and "error" in res.stdout.splitlines()[-1].lower(), res.stdout
        seen |= _descendants(proc.pid)
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
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(seen)
        for pid in left:  # clean up before failing (only processes this test started)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    text = (root / "serve.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert rc in (0, 130), f"serve exited {rc} on SIGINT:\n{text[-2000:]}"
    assert not left, f"processes left after serve stopped: {sorted(left)}"
    report.append(("serve", "pass"))


@pytest.mark.parametrize("kind", ["sd3", "factory"])
def test_bring_your_own_flow(kind, tmp_path):
    root = tmp_path
    variables = make_model(kind, root)
    sizes = tiny_sizes(kind, root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    report: list[tuple[str, str]] = []
    waited: list[str] = []
    for line, argv, want, background in commands(variables):
        argv = _sizes(argv, sizes)
        why = _waiting(line)
        try:
            if background:
                _serve(argv, root, env, report)
                continue
            res = subprocess.run([sys.executable, "-m", "anchorflow", *argv], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=600)
            out = res.stdout + res.stderr
            assert "Traceback" not in out, f"{line}: a traceback\n{out[-4000:]}"
            assert res.returncode == want, f"{line}: exit {res.returncode}, expected {want}\n{out[-3000:]}"
            if want:
                assert out.strip().splitlines()[-1].startswith("error: "), out[-2000:]
            report.append((line, "pass"))
        except AssertionError as exc:
            if why is None:
                raise
            report.append((line, f"waiting: {why}"))
            waited.append(f"{line.split()[1]} ({why}): {str(exc)[:400]}")
            continue
    passed_waiting = [line for line, status in report if status == "pass" and _waiting(line)]
    print("\n".join(f"{status:>8}  {line}" for line, status in report))
    assert not passed_waiting, f"these steps pass now; remove them from WAITING: {passed_waiting}"
    if waited:
        pytest.xfail("waiting for " + "; ".join(waited))
    assert (root / "ba.npy").is_file() and np.isfinite(np.load(root / "ba.npy")).all()

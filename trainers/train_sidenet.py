"""SideNet training by chain-based simulation: Algorithm 2 of BA-solver (arXiv 2601.21542).

A batch starts on the linear path ``x_t = (1 - t) x_data + t noise`` (t = 1 noise, t = 0 data,
t ~ U(0, 1)); the frozen backbone gives v at (x, t). Then ``chain`` times: draw a signed offset
h (:func:`sample_h`), move the state with the SideNet's own 3-point Gauss-Legendre rule to
``t - h`` (no grad), ask the backbone for v' there (the target and the next anchor), and regress
``v + S(x, v, t, h, y)`` onto v'. Only the SideNet gets gradients; every backbone call runs under
``torch.no_grad`` with ``requires_grad`` off.

The output folder is a checkpoint (``config.json`` + ``model.safetensors``, the EMA weights) plus
the resume state ``train_state.safetensors`` / ``train_state.json`` (raw weights, AdamW moments,
RNG); every write is atomic. The config records the backbone's identity (shape, classes, null
label, weights sha256, path), so a SideNet is never paired with the wrong backbone.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..base.errors import ConfigError
from .checkpoint import read_config, save_checkpoint
from .cond_rows import NULL_NEEDED, Cond, as_cond_backbone, drop_to_null, take, uses_null_rows
from .distributed import Dist, from_env, unwrap
from .flow import EMA, SINGLE, STATE_JSON, STATE_TENSORS, ResumableRun, check_settings, finite_loss
from .sidenet import RATIO, SideNet, backbone_identity, check_backbone, count_params, sidenet_arch
from .sidenet_cond import choose, pick

# 3-point Gauss-Legendre rule on [0, 1]: the SideNet's own quadrature for the simulated step.
GL3_NODES = ((1 - math.sqrt(0.6)) / 2, 0.5, (1 + math.sqrt(0.6)) / 2)
GL3_WEIGHTS = (5 / 18, 8 / 18, 5 / 18)
# Settings a resumed run must share with the saved one (the rest may change, e.g. iters).
RESUME_KEYS = ("chain", "batch", "rates", "lr", "seed", "label_dropout", "ema_decay", "width", "ratio", "sidenet_cond",
               "offset_grids", "grid_share")


def grid_probes() -> tuple[float, ...]:
    """BA's probe offsets in units of the interval length L (runtime/solving/solvers/ba.py): a, 1 - a, 1
    toward data and -a toward noise (the backward probe); a grid-mode sample picks one uniformly."""
    from ..runtime.solving.solvers.ba import LOBATTO_A  # lazily: trainers reach the runtime only at call time

    return (LOBATTO_A, 1.0 - LOBATTO_A, 1.0, -LOBATTO_A)


@dataclass
class SideNetTrainSettings:
    """Hyper-parameters of one run (the paper's defaults; recorded in config.json ``training``).

    ``rates``: rates of the truncated exponential for |h|; several values make a mixture (each
    sample picks one uniformly), e.g. (50, 5) adds the large offsets a 5-NFE sampler asks for.
    ``width``: SideNet width (None: sized to ``ratio`` of the backbone's parameters).
    ``offset_grids``: decreasing time grids (1 -> 0) a sampler will use, e.g. the tuned BA grids;
    ``grid_share`` of the samples (default 0.5 when grids are given) then take BA's probe offsets
    on the interval of a random grid that holds their t, the rest the exponential (:func:`sample_h`).
    """

    iters: int = 250
    chain: int = 8
    batch: int = 256
    rates: tuple[float, ...] = (50.0,)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9996
    label_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 50
    width: Optional[int] = None
    ratio: float = RATIO
    arch: dict = field(default_factory=dict)
    sidenet_cond: str = "auto"
    offset_grids: tuple[tuple[float, ...], ...] = ()
    grid_share: Optional[float] = None
    init: Optional[str] = None  # a SideNet checkpoint to start from (fine-tuning after a LoRA refit)

    def validate(self) -> None:
        check_settings(self, ("iters", "chain", "batch", "ckpt_every"))
        self.offset_grids = check_grids(self.offset_grids)
        if self.offset_grids and self.grid_share is None:
            self.grid_share = 0.5
        if self.grid_share is not None:
            if not self.offset_grids:
                raise ConfigError("--grid-share needs --offset-grids (the grids to draw offsets from)")
            self.grid_share = float(self.grid_share)
            if not 0.0 <= self.grid_share <= 1.0:
                raise ConfigError(f"--grid-share must be in [0, 1], got {self.grid_share}")
        self.rates = tuple(float(r) for r in self.rates)
        if not self.rates or not all(math.isfinite(r) and r > 0 for r in self.rates):
            raise ConfigError(f"--rate must be positive numbers, got {self.rates}")
        if not self.lr > 0 or not self.grad_clip > 0:
            raise ConfigError(f"--lr and the gradient clip must be positive, got {self.lr} and {self.grad_clip}")


def check_grids(grids) -> tuple[tuple[float, ...], ...]:
    """Grids as tuples of floats, each strictly decreasing from 1 to 0 (exact duplicates dropped)."""
    out: list[tuple[float, ...]] = []
    for i, grid in enumerate(grids or ()):
        try:
            g = tuple(float(v) for v in grid)
        except (TypeError, ValueError):
            raise ConfigError(f"offset grid {i} must be a list of numbers, got {grid!r}") from None
        if len(g) < 2 or g[0] != 1.0 or g[-1] != 0.0 or any(not b < a for a, b in zip(g, g[1:])):
            raise ConfigError(f"offset grid {i} must decrease strictly from 1 to 0, got {list(g)}; "
                              "pass the times of a sampler's grid (t = 1 noise, t = 0 data)")
        if g not in out:
            out.append(g)
    return tuple(out)


def grid_interval(t: torch.Tensor, grid: tuple[float, ...]) -> torch.Tensor:
    """Length (B,) float64 of the interval [t_{i+1}, t_i] of the decreasing ``grid`` holding each t
    (t in (t_{i+1}, t_i]; t = 0 in the last interval)."""
    asc = torch.tensor(grid[::-1], dtype=torch.float64, device=t.device)
    k = torch.searchsorted(asc, t.double().contiguous()).clamp(1, len(grid) - 1)
    return asc[k] - asc[k - 1]


def sample_h(t: torch.Tensor, rates: tuple[float, ...], gen: torch.Generator,
             dist: Optional[Dist] = None, grids: tuple[tuple[float, ...], ...] = (),
             grid_share: Optional[float] = None) -> torch.Tensor:
    """Signed offsets (B,) for times t (B,): toward data (h > 0) or noise (h < 0) with prob. 1/2.

    |h| follows an exponential of rate r (mean 1/r) truncated to the room left in that direction
    (t toward data, 1 - t toward noise): ``d = -log1p(u expm1(-r room)) / r``, ``d = min(d, room)``,
    so ``t - h`` never leaves [0, 1]. With several rates each sample draws its rate uniformly.
    This is the trainer's one offset sampler; ``dist``: t holds this rank's rows of the global batch.

    ``grids`` (decreasing 1 -> 0, see :func:`check_grids`): each sample takes grid mode with prob.
    ``grid_share`` (default 0.5): a uniformly chosen grid, the length L of its interval holding t
    (:func:`grid_interval`) and one of BA's probe offsets :func:`grid_probes` times L, uniformly
    (3/4 toward data, 1/4 toward noise), clipped to the same room. Without grids no extra numbers
    are drawn (the draws are the exponential sampler's, bit for bit); with grids every sample draws
    the same global tensors on every rank, whichever mode it takes.
    """
    d, b = dist or SINGLE, t.shape[0]
    toward_data = d.draw(torch.rand, gen, b).to(t.device) < 0.5
    rate = torch.tensor(rates, dtype=torch.float64, device=t.device)
    rate = rate[d.draw(lambda shape, **kw: torch.randint(0, len(rates), shape, **kw), gen, b).to(t.device)]
    u = d.draw(torch.rand, gen, b, dtype=torch.float64).to(t.device)
    if grids:
        probes = grid_probes()
        use_grid = d.draw(torch.rand, gen, b, dtype=torch.float64).to(t.device) < (
            0.5 if grid_share is None else grid_share)
        which = d.draw(lambda shape, **kw: torch.randint(0, len(grids), shape, **kw), gen, b).to(t.device)
        probe = d.draw(lambda shape, **kw: torch.randint(0, len(probes), shape, **kw), gen, b).to(t.device)
        lengths = torch.stack([grid_interval(t, g) for g in grids])  # (G, B)
        length = lengths.gather(0, which[None, :])[0]
        signed = torch.tensor(probes, dtype=torch.float64, device=t.device)[probe] * length
        toward_data = torch.where(use_grid, signed > 0, toward_data)
    room = torch.where(toward_data, t, 1 - t).double()
    mag = -torch.log1p(u * torch.expm1(-rate * room)) / rate
    if grids:
        mag = torch.where(use_grid, signed.abs(), mag)
    d = torch.minimum(mag, room).to(t.dtype)
    return torch.where(toward_data, d, -d)


@torch.no_grad()
def simulate_step(sidenet: torch.nn.Module, x, v, t, h, *conds) -> torch.Tensor:
    """``x - h * sum_k w_k (v + S(x, v, t, c_k h, *conds))`` with 3-point Gauss-Legendre, ONE SideNet call.

    ``conds``: the SideNet's condition inputs (rows first), e.g. the labels y (B,)."""
    k = len(GL3_NODES)
    nodes = torch.tensor(GL3_NODES, dtype=h.dtype, device=h.device)
    weights = torch.tensor(GL3_WEIGHTS, dtype=x.dtype, device=x.device)
    delta = sidenet(x.repeat(k, *[1] * (x.dim() - 1)), v.repeat(k, *[1] * (v.dim() - 1)),
                    t.repeat(k), (nodes[:, None] * h[None, :]).reshape(-1),
                    *(c.repeat(k, *[1] * (c.dim() - 1)) for c in conds))
    avg = v + torch.einsum("k,kb...->b...", weights, delta.unflatten(0, (k, x.shape[0])))
    return x - _bcast(h, x) * avg


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *[1] * (like.dim() - 1))


def chain_loss(backbone, sidenet, x_data, cond: Cond, gen: torch.Generator, s: SideNetTrainSettings,
               dist: Optional[Dist] = None) -> torch.Tensor:
    """Algorithm 2's loss for one batch: mean over chain steps of the velocity-matching MSE.

    ``backbone(x, t, cond)`` (see :func:`.cond_rows.as_cond_backbone`), x_data (b, *state_shape) at
    t = 0, cond a dict of (b, ...) rows (null rows already dropped in): this rank's rows of the
    global batch (``dist``). The SideNet gets the conditions its arch names (``cond_inputs``). The chain runs without gradients; the SideNet's
    predictions for all ``chain`` steps are then made in ONE call on chain * b rows (the loss is
    their mean, i.e. the mean over steps of each step's MSE), so a DDP-wrapped ``sidenet`` sees one
    forward per backward.
    """
    d, b = dist or SINGLE, x_data.shape[0]
    t = d.draw(torch.rand, gen, b).to(x_data.device)
    noise = d.draw(torch.randn, gen, b, *x_data.shape[1:]).to(x_data.device)
    x = (1 - _bcast(t, x_data)) * x_data + _bcast(t, x_data) * noise
    plain = unwrap(sidenet)
    side_cond = pick(cond, tuple(getattr(plain, "cond_inputs", ("y",))))
    with torch.no_grad():
        v = backbone(x, t, cond)
    steps = []
    for _ in range(s.chain):
        h = sample_h(t, s.rates, gen, d, s.offset_grids, s.grid_share)
        x_next = simulate_step(plain, x, v, t, h, *side_cond)
        t_next = (t - h).clamp(0.0, 1.0)
        with torch.no_grad():
            v_next = backbone(x_next, t_next, cond)
        steps.append((x, v, t, h, v_next))
        x, t, v = x_next, t_next, v_next
    xs, vs, ts, hs, targets = (torch.cat(parts) for parts in zip(*steps))
    pred = vs + sidenet(xs, vs, ts, hs, *(c.repeat(s.chain, *[1] * (c.dim() - 1)) for c in side_cond))
    return torch.mean((pred - targets) ** 2)


class _Run(ResumableRun):
    """Mutable state of a run: frozen backbone, SideNet, EMA, optimizer, generator, counters."""

    kind = "sidenet"

    def __init__(self, backbone, s: SideNetTrainSettings, dist: Dist, arch: Optional[dict] = None) -> None:
        self.backbone = backbone.eval().requires_grad_(False).to(dist.device)
        torch.manual_seed(s.seed)
        self.arch = dict(arch) if arch is not None else run_arch(backbone, s)
        self.model = SideNet(self.arch).to(dist.device)
        self.ema = EMA(self.model, s.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.dist, self.ddp = dist, dist.wrap(self.model)
        self._reset_counters()


def _check_resume(out: Path, s: SideNetTrainSettings, identity: dict) -> None:
    cfg = read_config(out)
    if cfg.get("kind") != "sidenet" or not (out / STATE_TENSORS).is_file() or not (out / STATE_JSON).is_file():
        raise ConfigError(f"{out} is not a resumable SideNet run (no {STATE_TENSORS}); train into a new --out")
    check_backbone(cfg, identity, where=f"the run in {out}")
    old = cfg.get("training", {}).get("settings", {})
    for key in RESUME_KEYS:
        new = _record(key, getattr(s, key))
        if key in old and old[key] != new:
            raise ConfigError(f"--resume: {key} {new!r} differs from the saved run's {old[key]!r}; "
                              "pass the saved value or train into a new --out")


def _record(key: str, value: Any) -> Any:
    """A setting as config.json holds it (tuples as lists)."""
    if key == "rates":
        return list(value)
    if key == "offset_grids":
        return [list(g) for g in value]
    return value


def _config(run: _Run, s: SideNetTrainSettings, identity: dict, data: Any, command: Optional[str],
            done: bool) -> dict:
    n_side, n_back = count_params(run.model), count_params(run.backbone)
    recent = [v for _, v in run.loss_log[-3:]]
    return {
        "kind": "sidenet",
        "arch": run.arch,
        "backbone": identity,
        "data": data,
        "param_count": n_side,
        "param_ratio": n_side / max(n_back, 1),
        "training": {
            "command": command, "settings": {k: _record(k, v) for k, v in asdict(s).items()}, "step": run.step,
            "iters": s.iters, "finished": done, "wall_s": round(run.wall_s, 1),
            "threads": torch.get_num_threads(), "loss_log": run.loss_log, "null_rows": run.null_p,
            "start_states": (data or {}).get("source", "dataset") if isinstance(data, dict) else "dataset",
            "final_loss": sum(recent) / len(recent) if recent else None,
            "objective": "BA-solver Algorithm 2 (arXiv 2601.21542): chain-based simulation with the SideNet's "
                         "3-point Gauss-Legendre rule, velocity matching against the frozen backbone, EMA weights",
        },
    }


def train_sidenet(backbone, x_data: torch.Tensor, cond_data: torch.Tensor | Cond, out: str | Path,
                  settings: SideNetTrainSettings, *, null_cond: Optional[Cond] = None,
                  identity: Optional[dict] = None, data: Any = None,
                  resume: bool = False, command: Optional[str] = None, progress: bool = True,
                  dist: Optional[Dist] = None, budget_s: Optional[float] = None,
                  started: Optional[float] = None, budget_default: bool = False) -> dict:
    """Train (or resume) a SideNet next to the frozen ``backbone``; returns the saved config.

    ``backbone``: ``forward(x, t, cond)`` with declared ``conditions`` (an adapter), or a
    class-conditional ``forward(x, t, y)`` module (wrapped as the condition ``y``).
    x_data (N, *state_shape) float32 start states (the t = 0 end: data, or the backbone's own
    samples in data-free training); cond_data the conditions of each row, a dict of (N, ...)
    tensors or (N,) int64 labels; ``null_cond`` the null condition (one row; default: the
    backbone's ``null_cond()``), dropped in for ``label_dropout`` of the rows. ``identity``
    describes the backbone (:func:`backbone_identity`; computed from the module when None).
    The backbone is put in eval mode with ``requires_grad`` off and never updated.
    Writes a checkpoint to ``out`` every ``ckpt_every`` iterations and at the end. Under torchrun
    (``dist``, default: from the environment) the global ``batch`` is split over the processes
    (DDP) and rank 0 alone writes.

    Time: the first iteration is timed and an ETA for the rest is printed (stderr) before the
    others run. ``budget_s``: seconds the whole run may take, counted from ``started`` (a
    ``time.monotonic()`` reading, default now; the CLI passes its start, so loading the backbone and
    making start states count too): after the first iteration ``settings.iters`` is lowered to the
    iterations that fit (at least one more; never raised) and the pick printed; the run also stops
    early if the budget is spent sooner than estimated. ``budget_default``: the budget is the CLI's
    default one (the message then says how to change it).
    Interrupts: SIGINT / SIGTERM finish the iteration under way, write the checkpoint of the last
    completed one (resumable with ``resume=True``) and raise KeyboardInterrupt (the CLI's exit 130);
    a second signal aborts at once without writing.
    """
    from tqdm.auto import tqdm

    from ..base._io import check_output

    settings.validate()
    dist = dist or from_env()
    dist.local_batch(settings.batch)
    out = Path(out)
    check_output(out, "--out", folder=True)
    identity = identity or backbone_identity(backbone)
    backbone = as_cond_backbone(backbone)
    cond_data = {"y": cond_data} if torch.is_tensor(cond_data) else dict(cond_data)
    if null_cond is None and hasattr(backbone, "null_cond"):
        null_cond = backbone.null_cond()
    init = check_init(backbone, settings) if settings.init else None  # its architecture, also on --resume
    run = _Run(backbone, settings, dist, arch=None if init is None else init[1])
    # null rows only where sampling guides on [cond; null] rows (not FLUX's embedded guidance, not 'none')
    run.null, run.null_p = null_cond, settings.label_dropout if uses_null_rows(backbone) and cond_data else 0.0
    if run.null_p > 0 and run.null is None:  # before anything is written (not at the first dropped row)
        raise ConfigError(NULL_NEEDED)
    if settings.init and not resume:
        _start_from(run, init[0])
    if resume:
        _check_resume(out, settings, identity)
        run.restore(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; pass --resume to continue it or choose another --out")
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    started = time.monotonic() if started is None else started
    first = run.step
    bar = tqdm(total=settings.iters, initial=run.step, desc="train sidenet", disable=not (progress and dist.main),
               dynamic_ncols=True)
    window: list[float] = []
    cfg, saved = None, run.step
    with _Interrupts() as interrupts:
        while run.step < settings.iters and not interrupts.stop(dist):
            start = time.perf_counter()
            window.append(finite_loss(_train_step(run, settings, x_data, cond_data), run.step + 1, out, saved))
            took = dist.mean(time.perf_counter() - start)  # the same on every rank: one pick for all
            run.wall_s += took
            run.step += 1
            if run.step == first + 1:
                _plan(settings, run.step, took, budget_s, started, bar, dist.main, budget_default)
            elif budget_s is not None and run.step < settings.iters and _over(started, budget_s, dist):
                if dist.main:
                    bar.write(f"the {budget_s / 60:g}-minute budget is spent at iteration {run.step} of the "
                              f"{settings.iters} picked; stopping there", file=sys.stderr)
                settings.iters = run.step
                bar.total = run.step
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window[-20:]) / len(window[-20:]):.4g}")
            if run.step % settings.ckpt_every == 0 or run.step == settings.iters or (interrupts.stop(dist) and window):
                run.loss_log.append([run.step, sum(window) / len(window)])
                window = []
                cfg = _save(out, run, settings, identity, data, command, done=run.step == settings.iters)
                saved = run.step
        bar.close()
        if interrupts.stop(dist):
            if dist.main:
                kept = (f"wrote the checkpoint of iteration {saved} to {out}; continue it with the same command "
                        "and --resume") if saved else "no iteration had finished, nothing was written"
                print(f"interrupted ({interrupts.caught or 'another rank'}): {kept}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
    return cfg if cfg is not None else _save(out, run, settings, identity, data, command, done=True)


def _over(started: float, budget_s: float, dist: Dist) -> bool:
    """Is the budget spent on any rank? (the same answer on every rank)"""
    return dist.mean(float(time.monotonic() - started >= budget_s)) > 0


def pick_iters(done: int, per_iter_s: float, left_s: float, most: int) -> int:
    """Total iterations for a budget: ``done`` plus the whole iterations of ``per_iter_s`` that fit in
    ``left_s``, at least ``done + 1`` (a budget too small for one more still trains one) and at most
    ``most``."""
    return min(most, done + max(1, int(left_s // max(per_iter_s, 1e-9))))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plan(s: SideNetTrainSettings, done: int, took: float, budget_s: Optional[float], started: float,
          bar: Any, main: bool, budget_default: bool = False) -> None:
    """After the first iteration: lower the iterations to the budget (if any) and print the ETA."""
    head = f"first iteration {took:.2f} s; {s.iters} iterations"
    if budget_s is not None:
        left = budget_s - (time.monotonic() - started)
        picked = pick_iters(done, took, left, s.iters)
        if picked < s.iters:
            which = ("the default budget of" if budget_default else "--budget-minutes") + f" {budget_s / 60:g} min"
            head = (f"first iteration {took:.2f} s; {s.iters} iterations would take {_duration((s.iters - done) * took)}"
                    f" more, {_duration(max(left, 0.0))} left of {which}: training {picked}")
            if budget_default:
                head += " (--budget-minutes M or --iters N to change it)"
            s.iters = picked
            bar.total = picked
            bar.refresh()
    eta = (s.iters - done) * took
    finish = time.strftime("%H:%M", time.localtime(time.time() + eta))
    if main:
        tip = "" if budget_s is not None or eta < 600 else " (--budget-minutes M stops it after M minutes)"
        bar.write(f"{head}: ETA {_duration(eta)} (about {finish}){tip}", file=sys.stderr)


class _Interrupts:
    """SIGINT / SIGTERM set ``caught`` (the signal's name) instead of stopping mid-iteration; a second
    one raises KeyboardInterrupt at once. Outside the main thread nothing is installed."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.caught: Optional[str] = None
        self._old: dict = {}

    def stop(self, dist: Dist) -> bool:
        """A signal reached this rank or another one (the same answer on every rank)."""
        return bool(self.caught) if dist.world == 1 else dist.mean(float(bool(self.caught))) > 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.caught:
            raise KeyboardInterrupt
        self.caught = signal.Signals(signum).name
        print(f"\n{self.caught}: finishing this iteration, then writing the checkpoint (again to abort at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_arch(backbone, s: SideNetTrainSettings) -> dict:
    """The SideNet architecture a run with settings ``s`` builds for ``backbone`` (from its shapes)."""
    arch = dict(s.arch)
    arch.setdefault("cond", choose(backbone.conditions, s.sidenet_cond, int(getattr(backbone, "num_classes", 0))))
    return sidenet_arch(backbone, width=s.width, ratio=s.ratio, **arch)


def check_init(backbone, s: SideNetTrainSettings) -> tuple[Any, dict]:
    """``--init``: the checkpoint to start from and the architecture the run keeps (the checkpoint's),
    checked before any start states are computed, so a mismatch costs nothing and writes nothing.

    Its backbone may differ (e.g. the base weights before a LoRA was fused): that is the point. What
    the backbone's shapes fix (state shape, classes, the conditions the SideNet reads) must agree, and
    so must every option given explicitly (--width/--patch/--blocks/--offset); the rest of the
    architecture is the checkpoint's. Returns (SideNet module, arch)."""
    from .checkpoint import load_checkpoint

    module, cfg = load_checkpoint(s.init, kind="sidenet")
    arch, fresh = dict(cfg.get("arch") or {}), run_arch(backbone, s)
    keys = ("state_shape", "num_classes", "null_label", "cond", *s.arch, *(("width",) if s.width is not None else ()))
    diff = sorted({k for k in keys if arch.get(k) != fresh.get(k)})
    if diff:
        raise ConfigError(f"--init {s.init}: its SideNet architecture differs from this run's ({', '.join(diff[:4])}); "
                          "drop the options that differ, give its backbone's shapes, or train from scratch")
    return module, arch


def _start_from(run: _Run, module) -> None:
    """The SideNet (and its EMA) start from ``module``'s weights (see check_init)."""
    from .flow import EMA

    run.model.load_state_dict(module.state_dict())
    run.ema = EMA(run.model, run.ema.decay)


def _save(out: Path, run: _Run, s: SideNetTrainSettings, identity: dict, data: Any, command: Optional[str],
          done: bool) -> dict:
    """Rank 0 writes the checkpoint and resume state (atomically); the other ranks wait for it."""
    cfg = _config(run, s, identity, data, command, done)
    if run.dist.main:
        tensors, meta = run.state_bytes()
        save_checkpoint(out, run.ema.module, cfg, extra_files={STATE_TENSORS: tensors, STATE_JSON: meta})
    run.dist.barrier()
    return cfg


def _train_step(run: _Run, s: SideNetTrainSettings, x_all: torch.Tensor, cond_all: Cond) -> float:
    """One optimizer step on this rank's rows of a global batch of ``s.batch``; the global mean loss."""
    d = run.dist
    idx = d.draw(lambda shape, **kw: torch.randint(0, x_all.shape[0], shape, **kw), run.gen,
                 d.local_batch(s.batch)).cpu()
    cond = drop_to_null(take(cond_all, idx, d.device), run.null, run.null_p, run.gen, d)
    loss = chain_loss(run.backbone, run.ddp, x_all[idx].to(d.device), cond, run.gen, s, d)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
    run.opt.step()
    run.ema.update(run.model)
    return d.mean(float(loss.detach()))

"""`anchorflow bandit show FILE`: what a FastFlow bandit state file has learned."""

from __future__ import annotations

from typing import Any, Optional

import click


@click.group("bandit")
def bandit() -> None:
    """Inspect FastFlow bandit state files.

    A state file is written by `anchorflow sample MODEL --solver fastflow --bandit-state FILE`:
    one UCB1 bandit per grid step k that picks how many of the next steps to skip
    (arXiv 2602.11105). It is keyed by the grid (T, schedule) and the model's identity.
    """


def summarize(b: Any) -> dict[str, Any]:
    """The learned state of a :class:`FastFlowBandit` as plain data (per-step greedy arm, Q, N)."""
    greedy = b.greedy()
    steps = [
        {"step": k, "t": float(b.grid[k]), "greedy_arm": greedy[k],
         "Q": [float(q) for q in b.Q[k]], "N": [int(n) for n in b.N[k]]}
        for k in range(b.T) if b.N[k].sum() > 0
    ]
    return {
        "model_id": b.key.model_id, "T": b.T, "grid_sha256": b.key.grid_sha256, "arms": list(b.arms),
        "gamma": b.gamma, "bonus": b.bonus, "mu": b.mu, "mu_factor": b.mu_factor, "generations": b.generations,
        "target_calls": b.target, "tol": b.tol, "recent_calls": [c for c, _ in b.history[-20:]], "steps": steps,
    }


def _text(s: dict[str, Any]) -> str:
    mu = "not calibrated yet" if s["mu"] is None else f"{s['mu']:.4g}"
    mu += "" if s["mu_factor"] == 1.0 else f" (calibrated x {s['mu_factor']:g})"
    if s["target_calls"] is None:
        budget = "none: fixed mu (the paper's rule)"
    else:
        recent = s["recent_calls"]
        budget = f"{s['target_calls']:.4g} backbone calls per generation (mu adapts)" + (
            f"; last {len(recent)} generations averaged {sum(recent) / len(recent):.4g}" if recent else "")
    lines = [
        f"model      {s['model_id'] or '(none)'}",
        f"grid       T = {s['T']} (sha256 {s['grid_sha256'][:12]}...)",
        f"arms       {s['arms']}  gamma {s['gamma']:g} (bonus unit: {s['bonus']})  mu {mu}",
        f"budget     {budget}" + ("" if s["tol"] is None else f"  quality guard tol {s['tol']:g}"),
        f"generations seen: {s['generations']}",
        "",
        f"{'step':>4} {'t':>7} {'greedy':>6}  " + "  ".join(f"{'Q(' + str(a) + ')':>11} {'N':>5}" for a in s["arms"]),
    ]
    for st in s["steps"]:
        cells = "  ".join(f"{q:>11.3e} {n:>5d}" if n else f"{'-':>11} {0:>5d}" for q, n in zip(st["Q"], st["N"]))
        lines.append(f"{st['step']:>4d} {st['t']:>7.4f} {str(st['greedy_arm']):>6}  {cells}")
    if not s["steps"]:
        lines.append("(no decisions recorded yet)")
    return "\n".join(lines)


def plot_state(b: Any, out: str) -> None:
    """PNG: greedy arm per step (top) and a heatmap of Q per step and arm (bottom, untried blank)."""
    import numpy as np

    from ..base._deps import require
    from ..base._io import atomic_path

    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = [np.nan if a is None else a for a in b.greedy()]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.step(np.arange(b.T), greedy, where="mid")
    ax1.set(ylabel="greedy arm (steps skipped)", yticks=list(b.arms),
            title=f"FastFlow bandits after {b.generations} generations (mu = {b.mu if b.mu is None else f'{b.mu:.3g}'})")
    q = np.where(b.N > 0, b.Q, np.nan).T
    im = ax2.imshow(q, aspect="auto", origin="lower", interpolation="nearest")
    ax2.set_yticks(range(len(b.arms)))
    ax2.set_yticklabels([str(a) for a in b.arms])
    ax2.set(xlabel="step k (t = 1 noise -> t = 0 data)", ylabel="arm (steps skipped)")
    fig.colorbar(im, ax=ax2, label="Q (mean reward)")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@bandit.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG: greedy arm per step and a heatmap of Q per arm (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the learned state as JSON instead of a table.")
@click.option("--model", "model", default=None, metavar="MODEL",
              help="Check that FILE is the state of MODEL (its weights' identity); refuse another model's state.")
def show(file: str, plot: Optional[str], as_json: bool, model: Optional[str]) -> None:
    """Print what the bandit state FILE has learned.

    Per grid step k that has made decisions: the greedy arm (best mean reward Q so far), Q and
    the count N of every arm; plus mu (reward per skipped step), gamma, and the number of
    generations seen, the calls budget and what recent generations spent. A corrupt or foreign file
    is refused with a message; with --model, so is the state of another model.
    """
    import json

    from ..runtime.bundles.models import model_identity
    from ..runtime.fastflow import state as bandit_state

    b = bandit_state.load(file) if model is None else bandit_state.load_for_model(file, model, model_identity(model))
    s = summarize(b)
    click.echo(json.dumps(s, indent=2) if as_json else _text(s))
    if plot:
        plot_state(b, plot)
        if not as_json:
            click.echo(f"wrote {plot}")

"""`anchorflow solvers`: list the registry."""

from __future__ import annotations

import click


@click.command("solvers")
def solvers() -> None:
    """List the solvers of the runtime's registry with their cost per step and order."""
    from anchorflow.runtime import SOLVERS, solver_names

    for name in solver_names():
        spec = SOLVERS[name]
        calls = "variable" if spec.calls_per_step is None else f"{spec.calls_per_step}/step"
        order = "-" if spec.order is None else str(spec.order)
        click.echo(f"{name:<12} calls {calls:<9} order {order:<2} {spec.summary}")

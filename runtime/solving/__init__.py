"""Solving: ``solve()``, results, the solver registry, the guided field, time grids and the
solvers (numpy only; imports only the base layer, this room and fastflow.bandit)."""

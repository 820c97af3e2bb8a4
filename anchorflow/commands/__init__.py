"""CLI commands, one module per command family; heavy imports stay inside the functions."""

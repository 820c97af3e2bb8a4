"""The base layer: errors, atomic files, optional dependencies, lazy attributes (stdlib only;
imports nothing above it)."""

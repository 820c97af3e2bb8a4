"""Bundles: bundle.json (format, schema), opening a bundle, the backends and their sessions,
a bundle's tuned grids (imports the base layer, solving and this room)."""

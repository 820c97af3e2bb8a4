"""Evaluation: quality metrics, the closed-form Gaussian mixture, the evaluation classifier,
backend parity (imports the base layer, solving, bundles, the plan and this room)."""

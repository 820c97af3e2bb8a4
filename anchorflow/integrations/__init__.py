"""Integrations of anchorflow with other frameworks (torch side; the runtime stays torch-free).

``anchorflow.integrations.diffusers``: our solvers as a diffusers scheduler, FastFlow as a
transformer hook, and the BA-solver driving a diffusers pipeline (extra ``anchorflow[diffusers]``).
"""

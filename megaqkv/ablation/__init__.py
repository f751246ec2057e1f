"""Variant ablations: train several variants on identical data and budget (ablate.py), read the runs (runs.py)
and compare them in a table and figures (compare.py, figures.py)."""

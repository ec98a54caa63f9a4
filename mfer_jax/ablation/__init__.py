"""Ablation sweeps: many main.py runs over fusion x sampling x seeds, and their table.

  runs.py    the run layout: variants, run directories, completion markers
  sweep.py   running (and resuming) the sweep, one main.py subprocess per run
  tables.py  the table (mean ± std over seeds) and the paper's claims checked against it

The command line is ``python -m mfer_jax.tools.ablate``.
"""

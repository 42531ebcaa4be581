"""Regenerate every figure and table of the analysis: ``biaslab figures [--quick] [--out DIR]``.

Each artifact is written atomically with the CSV behind it and a JSON of its configuration, seeds and the
library version (``artifact.py``). Figures are registered with ``@figure`` (``registry.py``) and run in registration
order, one module per family:

* ``table1``: every configuration's exact verdict and matched direction (markdown + CSV);
* ``fig2_length`` / ``fig2_kl``: exact relative bias ||E[g] - grad KL|| / ||grad KL|| and per-sample variance
  tr Cov[g] of each configuration against T / against KL(pi || pi_ref), tabular and neural toys;
* ``mse``: E||mean of N gradients - grad KL||^2 against N, Monte Carlo over the exact ||b||^2 + tr Cov[g] / N;
* ``directions``: each configuration's exact E[g] placed by its cosines with the reverse- and forward-KL gradients;
* ``values``: bias/true and stdev/true of k1, k2, k3 as value estimators (Gaussians and toys; markdown + CSV);
* ``train_*`` (``train.py``): where training with each configuration ends up, exact flows and Monte Carlo.

Plots are drawn from the CSV as written (numbers rounded by ``biaslab.core.io``), torch runs on one thread while
figures are made, and every random draw comes from a seeded generator, so two runs write identical bytes.
"""

from __future__ import annotations

import importlib

from .artifact import Artifact, new_figure, read_csv
from .registry import _FIGURES, FigureFn, figure, make_figures

#: the figure families, one module each; importing one registers its figures, so this is the order they run in
FAMILIES = ("table1", "bias_variance", "mse", "directions", "values", "train")
for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

__all__ = ["FAMILIES", "Artifact", "FigureFn", "_FIGURES", "figure", "make_figures", "new_figure", "read_csv"]

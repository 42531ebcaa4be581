"""biaslab: exact and statistical bias/variance of KL-divergence gradient estimators for RL on LLMs.

The package is layered; a layer imports only the layers above it in this list (``tests/test_layers.py``):

1. ``core``: the math, written once (estimators, placements, recipes, aggregation, the verdict rule, strict I/O);
2. ``engines``: toy models, the exact and Monte Carlo engines, statistics, the thread policy;
3. ``frameworks``: each training framework's keys and defaults mapped to a core ``Recipe``;
4. ``workflows``: what uses the engines (table, check, audit, training dynamics, values, sweeps, user losses);
5. ``figures``: one module per figure family on one artifact writer;
6. ``llm``: the same statistics on a real causal LM;
7. ``cli``: the command line, one module per subcommand.

The names below are the public API. The modules of biaslab <= 0.1's flat layout (``biaslab.exact``,
``biaslab.check``, ...) still import, with a DeprecationWarning naming their new place (``MOVED``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from ._version import __version__
from .core.estimators import (
    Estimator,
    EstimatorError,
    clamped,
    get_estimator,
    register_estimator,
    registered_estimators,
    straight_through,
)
from .core.placements import Credit, Level, Placement, TokenBatch, all_configs, make_config
from .core.recipes import Recipe
from .core.recipes import Recipe as KLConfig
from .engines.exact import EnumerationTooLarge, ExactEngine, ExactResult, enumerate_sequences
from .engines.toy import AutoregressiveModel, ModelError, NeuralAR, TabularAR, make_pair

__all__ = [
    "Estimator", "EstimatorError", "clamped", "get_estimator", "register_estimator", "registered_estimators",
    "straight_through", "EnumerationTooLarge", "ExactEngine", "ExactResult", "enumerate_sequences",
    "Credit", "KLConfig", "Level", "Placement", "TokenBatch", "all_configs", "make_config", "Recipe", "audit_loss",
    "AutoregressiveModel", "ModelError", "NeuralAR", "TabularAR", "make_pair", "__version__",
    "check_estimator", "load_function", "assert_unbiased", "assert_kl_unbiased",
]

#: imported on first use (they pull in scipy / the audit's presets)
_LAZY = {
    "audit_loss": "biaslab.workflows.audit",
    "check_estimator": "biaslab.workflows.check",
    "load_function": "biaslab.workflows.plugins",
    "assert_unbiased": "biaslab.workflows.testing",
    "assert_kl_unbiased": "biaslab.workflows.testing",
}

#: old flat module -> its place in the layered package
MOVED = {
    "biaslab.estimators": "biaslab.core.estimators",
    "biaslab.placements": "biaslab.core.placements",
    "biaslab.recipes": "biaslab.core.recipes",
    "biaslab.aggregation": "biaslab.core.aggregation",
    "biaslab.verdict": "biaslab.core.verdict",
    "biaslab.io": "biaslab.core.io",
    "biaslab.toy": "biaslab.engines.toy",
    "biaslab.exact": "biaslab.engines.exact",
    "biaslab.montecarlo": "biaslab.engines.montecarlo",
    "biaslab.offpolicy": "biaslab.engines.offpolicy",
    "biaslab.stats": "biaslab.engines.stats",
    "biaslab.threads": "biaslab.engines.threads",
    "biaslab.table": "biaslab.workflows.table",
    "biaslab.check": "biaslab.workflows.check",
    "biaslab.testing": "biaslab.workflows.testing",
    "biaslab.userloss": "biaslab.workflows.userloss",
    "biaslab.train": "biaslab.workflows.train",
    "biaslab.fixedpoints": "biaslab.workflows.fixedpoints",
    "biaslab.values": "biaslab.workflows.values",
    "biaslab.sweeps": "biaslab.workflows.sweeps",
    "biaslab.frameworks.audit": "biaslab.workflows.audit",
    "biaslab.figures_train": "biaslab.figures.train",
    "biaslab.plotting": "biaslab.figures.plotting",
    "biaslab.train_cli": "biaslab.cli.train",
    "biaslab.frameworks.cli": "biaslab.cli.audit",
    "biaslab.llm.cli": "biaslab.cli.llm",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old module name as the module at its new place (the same object), with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the module at the new place is already executed
        pass


sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'biaslab' has no attribute {name!r}")

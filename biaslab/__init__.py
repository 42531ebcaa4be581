"""biaslab: exact and statistical bias/variance of KL-divergence gradient estimators for RL on LLMs."""

from .estimators import (
    Estimator,
    EstimatorError,
    clamped,
    get_estimator,
    register_estimator,
    registered_estimators,
    straight_through,
)
from .exact import EnumerationTooLarge, ExactEngine, ExactResult, enumerate_sequences
from .placements import Credit, Level, Placement, TokenBatch, all_configs, make_config
from .recipes import Recipe
from .recipes import Recipe as KLConfig
from .toy import AutoregressiveModel, ModelError, NeuralAR, TabularAR, make_pair

__version__ = "0.1.0"

__all__ = [
    "Estimator", "EstimatorError", "clamped", "get_estimator", "register_estimator", "registered_estimators",
    "straight_through", "EnumerationTooLarge", "ExactEngine", "ExactResult", "enumerate_sequences",
    "Credit", "KLConfig", "Level", "Placement", "TokenBatch", "all_configs", "make_config", "Recipe", "audit_loss",
    "AutoregressiveModel", "ModelError", "NeuralAR", "TabularAR", "make_pair", "__version__",
]


def __getattr__(name: str):
    if name == "audit_loss":  # biaslab.audit_loss: audit any trainer's loss (imported on first use)
        from .frameworks.audit import audit_loss

        return audit_loss
    raise AttributeError(f"module 'biaslab' has no attribute {name!r}")

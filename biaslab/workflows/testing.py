"""Assertions for a user's own pytest suite.

from biaslab.workflows.testing import assert_unbiased

def test_my_kl_estimator_is_unbiased_in_reward_plus_loss():
    assert_unbiased(my_k3, placement="both")                 # exact, float64, no noise
    assert_unbiased(my_k3, placement="both", mode="mc", samples=20_000, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.estimators import Estimator
from .check import CheckReport, check_estimator


def assert_unbiased(estimator: Callable | Estimator | str, placement: str = "both", **kwargs: object) -> CheckReport:
    """Raise AssertionError (with the full report) unless ``estimator`` placed as given is unbiased for
    grad KL(pi || pi_ref) (exact mode), or the Monte Carlo test detects no bias (mode="mc": a test that does not
    reject has not shown unbiasedness; the report states the smallest bias it could detect). Keyword arguments go
    to ``biaslab.workflows.check.check_estimator``. Returns the report."""
    report = check_estimator(estimator, placement, **kwargs)
    if not report.passed:
        raise AssertionError("KL gradient estimator is not unbiased:\n" + report.format_text())
    return report


def assert_biased(estimator: Callable | Estimator | str, placement: str = "loss", **kwargs: object) -> CheckReport:
    """The converse: raise AssertionError unless the check finds a bias (e.g. to pin a known pitfall)."""
    report = check_estimator(estimator, placement, **kwargs)
    if report.passed:
        raise AssertionError("expected a biased KL gradient estimator, the check found none:\n" + report.format_text())
    return report


def assert_kl_unbiased(
    loss_fn: Callable, beta: float = 1.0, scenarios: tuple[str, ...] = ("on_policy",), **kwargs: object
) -> dict:
    """Raise AssertionError (with the audit's table) unless the trainer loss ``loss_fn(batch) -> scalar`` gives an
    unbiased estimate of beta * grad KL(pi || pi_ref) in each of ``scenarios`` ("on_policy", "variable_length",
    "off_policy"). Contract and keyword arguments (group_size, rewards, agg, ...): ``biaslab.audit_loss``.
    Returns the audit report.

        from biaslab.workflows.testing import assert_kl_unbiased

        def test_my_trainer_kl_is_unbiased():
            assert_kl_unbiased(my_trainer.loss, beta=0.05, agg="token-mean")
    """
    from .audit import audit_loss
    from .audit_report import format_text

    unknown = [s for s in scenarios if s not in ("on_policy", "variable_length", "off_policy")]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from on_policy, variable_length, off_policy")
    report = audit_loss(loss_fn, beta=beta, **kwargs)  # type: ignore[arg-type]
    bad = [s for s in scenarios if report[s]["verdict"] != "unbiased"]
    if bad:
        raise AssertionError(f"the loss's KL gradient is not unbiased ({', '.join(bad)}):\n" + format_text(report))
    return report

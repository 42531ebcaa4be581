"""Estimator values and gradients against closed forms; the registry; clear errors for bad estimators."""

import math

import pytest
import torch

from biaslab import EstimatorError, clamped, get_estimator, register_estimator, registered_estimators, straight_through
from biaslab.core.estimators import _REGISTRY

LP = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
REF = torch.tensor([-1.2, -1.5, -0.5], dtype=torch.float64)


def grad_token_mean(name):
    lp = LP.clone().requires_grad_(True)
    get_estimator(name)(lp, REF).mean().backward()
    return lp.grad


# Values: closed forms in delta = logp - logp_ref (r = exp(-delta)).
VALUE_CASES = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d**2,
    "k3": lambda d: math.exp(-d) - 1 + d,
    "abs": lambda d: abs(d),
    "k1_clamped": lambda d: max(min(d, 10), -10),
    "k2_clamped": lambda d: min(0.5 * d**2, 10),
    "k3_clamped": lambda d: min(math.exp(-max(min(d, 20), -20)) - 1 + max(min(d, 20), -20), 10),
    "k3_st_k2": lambda d: min(math.exp(-d) - 1 + d, 10),
    "k1_st_k2": lambda d: d,
    "abs_st_k2": lambda d: abs(d),
    "k3_lowclamp": lambda d: min(math.exp(-max(d, -10)) - 1 + max(d, -10), 10),
}
# d value / d logp, closed forms.
GRAD_CASES = {
    "k1": lambda d: 1.0,
    "k2": lambda d: d,
    "k3": lambda d: 1 - math.exp(-d),
    "abs": lambda d: math.copysign(1.0, d),
    "k1_clamped": lambda d: 1.0 if abs(d) < 10 else 0.0,
    "k2_clamped": lambda d: d if 0.5 * d**2 < 10 else 0.0,
    "k3_clamped": lambda d: (1 - math.exp(-d)) if abs(d) < 20 and math.exp(-d) - 1 + d < 10 else 0.0,
    "k3_st_k2": lambda d: d,
    "k1_st_k2": lambda d: d,
    "abs_st_k2": lambda d: d,
    "k3_lowclamp": lambda d: (1 - math.exp(-d)) if d > -10 and math.exp(-d) - 1 + d < 10 else 0.0,
}
FULL_CASES = {"rb", "neg_entropy"}  # tested separately (full distributions; neg_entropy in test_objectives.py)

DELTAS = [-25.0, -12.0, -3.0, -0.7, -0.1, 0.05, 0.4, 2.5, 6.0, 30.0]


def test_every_registered_estimator_is_tested():
    """Registry test: registering an estimator without adding it here fails."""
    assert set(_REGISTRY) == set(VALUE_CASES) | FULL_CASES


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_values_and_gradients_match_closed_forms(name):
    ref = torch.full((len(DELTAS),), -1.3, dtype=torch.float64)
    d = torch.tensor(DELTAS, dtype=torch.float64)
    lp = (ref + d).requires_grad_(True)
    out = get_estimator(name)(lp, ref)
    expected = torch.tensor([VALUE_CASES[name](x) for x in DELTAS], dtype=torch.float64)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), lp)
    expected_g = torch.tensor([GRAD_CASES[name](x) for x in DELTAS], dtype=torch.float64)
    torch.testing.assert_close(g, expected_g, rtol=1e-12, atol=1e-12)


def test_reference_gradients_token_mean():
    """Reference numbers (BACKGROUND section 5): token-mean KL loss gradients on a fixed example."""
    torch.testing.assert_close(grad_token_mean("k1"), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(grad_token_mean("k2"), torch.tensor([0.2 / 3, -0.5 / 3, 0.0], dtype=torch.float64))
    k3 = grad_token_mean("k3")
    torch.testing.assert_close(k3, (1 - torch.exp(REF - LP)) / 3)
    assert abs(k3[0] - 0.0604) < 5e-5 and abs(k3[1] - (-0.2162)) < 5e-5 and k3[2] == 0


def test_rb_is_the_exact_next_token_kl():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 4, 7, generator=g, dtype=torch.float64), -1)
    lr = torch.log_softmax(torch.randn(5, 4, 7, generator=g, dtype=torch.float64), -1)
    out = get_estimator("rb")(lp, lr)
    assert out.shape == (5, 4)
    manual = sum(lp[..., v].exp() * (lp[..., v] - lr[..., v]) for v in range(7))
    torch.testing.assert_close(out, manual, rtol=1e-12, atol=1e-14)
    assert (out >= 0).all()


def test_schulman_identities_exact_expectations():
    """E_pi[k1] = E_pi[k3] = KL exactly on a categorical; E_pi[k2] differs."""
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    lr = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    p = lp.exp()
    kl = float((p * (lp - lr)).sum())
    for name in ("k1", "k3"):
        assert abs(float((p * get_estimator(name)(lp, lr)).sum()) - kl) < 1e-12
    assert abs(float((p * get_estimator("k2")(lp, lr)).sum()) - kl) > 1e-3


def test_register_and_lookup_user_estimator():
    def half_k1(logp, logp_ref):
        """half of k1"""
        return 0.5 * (logp - logp_ref)

    est = register_estimator("test_half_k1", half_k1)
    try:
        assert get_estimator("test_half_k1") is est and est.description == "half of k1"
        with pytest.raises(EstimatorError, match="already registered"):
            register_estimator("test_half_k1", half_k1)
    finally:
        _REGISTRY.pop("test_half_k1")
    assert "test_half_k1" not in registered_estimators()


def test_unknown_estimator_lists_known_ones():
    with pytest.raises(EstimatorError, match=r"unknown estimator 'k9'.*k1.*k3"):
        get_estimator("k9")


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda lp, lr: (lp - lr).sum(), "shape"),
        (lambda lp, lr: (lp - lr) / 0.0, "non-finite"),
        (lambda lp, lr: [1.0], "expected a torch.Tensor"),
        (lambda lp, lr: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_bad_user_estimators_get_clear_errors(fn, message):
    from biaslab.core.estimators import Estimator

    est = Estimator("user", fn)
    with pytest.raises(EstimatorError, match=message):
        est(LP, REF)


def test_factories_name_their_parts():
    assert clamped("k3", 20, 10).name == "k3_clamped"
    st = straight_through("k3", "k2")
    assert st.name == "k3_st_k2" and "gradient of k2" in st.description

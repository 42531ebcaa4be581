"""How well k1, k2, k3 estimate the *value* of the reverse KL(q || p): bias/true and stdev/true.

Three sources, each reported as ``bias/true = (E[K] - KL) / KL`` and ``stdev/true = sd[K] / KL``:

* **unit Gaussians, closed form.** q = N(0, 1), p = N(mu, 1), KL(q || p) = mu^2 / 2. Under x ~ q the log-ratio
  log r = log p(x) - log q(x) is N(-KL, 2 KL), so with delta = -log r ~ N(KL, 2 KL):
      k1 = delta:             E = KL,             Var = 2 KL
      k2 = delta^2 / 2:       E = KL + KL^2 / 2,  Var = 2 KL^2 + 2 KL^3
      k3 = r - 1 - log r:     E = KL (E r = 1),   Var = e^{2 KL} - 1 - 2 KL
  (Schulman's "Approximating KL divergence" table; the exact k2 bias/true is KL / 2, 0.0025 at KL = 0.005.)
* **unit Gaussians, Monte Carlo**: seeded draws x ~ q fed to the registered estimators of ``biaslab.core.estimators``
  (logp = log q(x), logp_ref = log p(x)); reported with standard errors.
* **a toy autoregressive model, exact**: every sequence enumerated; K(y) = sum_t k(delta_t) (token level) or
  k(sum_t delta_t) (sequence level) computed by ``biaslab.core.placements.KLConfig.sequence_value``; the truth is the
  sequence-level KL(pi || pi_ref). The policy's ``kl_scale`` is solved for so that the KL hits the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.estimators import get_estimator
from ..core.placements import make_config
from ..engines.exact import ExactEngine
from ..engines.toy import make_pair

DTYPE = torch.float64
VALUE_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class ValueStats:
    """bias/true and stdev/true of one estimator at one true KL (with standard errors when sampled)."""

    estimator: str
    kl: float
    bias_over_true: float
    std_over_true: float
    bias_se: float = 0.0  # standard error of bias/true (0 for exact sources)
    std_se: float = 0.0  # standard error of stdev/true (delta method; 0 for exact sources)


# ------------------------------------------------------------------------------------------- Gaussians


def gaussian_closed_form(kl: float) -> dict[str, ValueStats]:
    """Exact bias/true and stdev/true of k1, k2, k3 for q = N(0,1), p = N(sqrt(2 KL), 1) (formulas above)."""
    if not kl > 0:
        raise ValueError(f"kl must be positive, got {kl}")
    mean_var = {
        "k1": (kl, 2 * kl),
        "k2": (kl + kl**2 / 2, 2 * kl**2 + 2 * kl**3),
        "k3": (kl, math.expm1(2 * kl) - 2 * kl),
    }
    return {k: ValueStats(k, kl, (m - kl) / kl, math.sqrt(v) / kl) for k, (m, v) in mean_var.items()}


def gaussian_log_probs(kl: float, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(x), log p(x)), each (n,), for x ~ q = N(0, 1) drawn with ``generator``; p = N(sqrt(2 KL), 1)."""
    mu = math.sqrt(2 * kl)
    x = torch.randn(n, generator=generator, dtype=DTYPE)  # (n,)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    return -0.5 * x**2 - half_log_2pi, -0.5 * (x - mu) ** 2 - half_log_2pi  # (n,), (n,)


def gaussian_monte_carlo(
    kl: float, n: int, seed: int, estimators: tuple[str, ...] = VALUE_ESTIMATORS
) -> dict[str, ValueStats]:
    """bias/true and stdev/true from ``n`` seeded draws, with standard errors.

    SE of the mean is s / sqrt(n); SE of the sample stdev s is sqrt(m4 - s^4) / (2 s sqrt(n)) (delta method,
    m4 the sample fourth central moment).
    """
    if n < 2:
        raise ValueError(f"need n >= 2 samples, got {n}")
    logq, logp = gaussian_log_probs(kl, n, torch.Generator().manual_seed(seed))
    out = {}
    for name in estimators:
        k = get_estimator(name)(logq, logp)  # (n,) the estimator evaluated at x ~ q, pi = q, pi_ref = p
        mean, sd = float(k.mean()), float(k.std())
        m4 = float(((k - k.mean()) ** 4).mean())
        std_se = math.sqrt(max(m4 - sd**4, 0.0)) / (2 * sd * math.sqrt(n)) if sd > 0 else 0.0
        out[name] = ValueStats(name, kl, (mean - kl) / kl, sd / kl, sd / math.sqrt(n) / kl, std_se / kl)
    return out


# ------------------------------------------------------------------------------------------- toy models


def toy_kl(model: str, vocab_size: int, length: int, seed: int, kl_scale: float) -> float:
    """Exact sequence-level KL(pi || pi_ref) of ``make_pair(model, V, T, seed, kl_scale)``."""
    policy, ref = make_pair(model, vocab_size, length, seed=seed, kl_scale=kl_scale)
    return float(ExactEngine(policy, ref).truths().kl_reverse)  # sum_y pi(y) log pi(y) / pi_ref(y)


def kl_scale_for(model: str, vocab_size: int, length: int, seed: int, target_kl: float) -> float:
    """The ``kl_scale`` at which the toy pair's exact KL(pi || pi_ref) equals ``target_kl`` (Brent's method)."""
    from scipy.optimize import brentq

    def f(scale: float) -> float:
        return toy_kl(model, vocab_size, length, seed, scale) - target_kl

    hi = 0.1
    while f(hi) < 0:
        hi *= 2
        if hi > 1e3:
            raise ValueError(f"the {model} toy never reaches KL = {target_kl}")
    return brentq(f, 0.0, hi, xtol=1e-13, rtol=1e-13)


def toy_exact(
    model: str,
    vocab_size: int,
    length: int,
    seed: int,
    kl_scale: float,
    level: str = "token",
    estimators: tuple[str, ...] = VALUE_ESTIMATORS,
) -> dict[str, ValueStats]:
    """Exact bias/true and stdev/true of K(y), y ~ pi, against the sequence-level KL(pi || pi_ref)."""
    policy, ref = make_pair(model, vocab_size, length, seed=seed, kl_scale=kl_scale)
    engine = ExactEngine(policy, ref)
    kl = engine.truths().kl_reverse
    w = engine.weights  # (N,) pi(y)
    out = {}
    with torch.no_grad():
        for name in estimators:
            big_k = make_config(name, "loss", level).sequence_value(engine.batch).detach()  # (N,) K(y)
            mean = float((w * big_k).sum())
            var = float((w * (big_k - mean) ** 2).sum())
            out[name] = ValueStats(name, kl, (mean - kl) / kl, math.sqrt(max(var, 0.0)) / kl)
    return out

"""Example estimators for `biaslab check` (see README).

Each takes (logp, logp_ref), the log-probabilities of the sampled tokens under the policy (differentiable) and the
reference, and returns a per-token estimate of KL(pi || pi_ref) with the same shape.
"""

import torch


def k3(logp, logp_ref):
    """k3 = r - 1 - log r with r = pi_ref / pi."""
    log_r = logp_ref - logp
    return torch.expm1(log_r) - log_r


def k1(logp, logp_ref):
    """k1 = log pi - log pi_ref."""
    return logp - logp_ref

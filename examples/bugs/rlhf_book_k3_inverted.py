"""rlhf-book code/policy_gradients/loss.py (issue #489): k3 written with the ratio upside down, r = pi / pi_ref
instead of pi_ref / pi, i.e. k = exp(delta) - 1 - delta with delta = log pi - log pi_ref.

Its expectation is not KL(pi || pi_ref) (E_pi[pi/pi_ref] - 1 is a chi-square-type divergence) and its gradient in
the loss follows neither KL direction exactly.
"""

import torch

REPORT = "rlhf-book code/policy_gradients/loss.py, issue #489 (k3 with the ratio inverted)"
BETA = 0.1
AGG = "token-mean"
FIX = "use r = pi_ref / pi: k3 = expm1(ref - logp) - (ref - logp)"


def loss(batch):
    delta = batch.logp - batch.ref_logp
    k = torch.expm1(delta) - delta
    return BETA * (k * batch.mask).sum() / batch.mask.sum()

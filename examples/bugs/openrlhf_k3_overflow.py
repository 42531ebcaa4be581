"""OpenRLHF #1335: k3 = exp(log pi_ref - log pi) - 1 - (log pi_ref - log pi) overflows to inf where log pi is
-inf (padding filled with -inf, or a token whose probability underflowed), and multiplying by the mask gives
0 * inf = NaN: NaN loss and NaN gradients. OpenRLHF now clamps the log-ratio at -10 before exp.

On fixed-length groups (no padding) the function is plain k3 in the loss; with variable lengths it is NaN.
"""

import torch

REPORT = "OpenRLHF #1335 (k3's exp overflows: 0 * inf = NaN)"
BETA = 0.1
AGG = "token-mean"
FIX = "clamp the log-ratio before exp (OpenRLHF: log_ratio.clamp(min=-10)) and select with torch.where, not * mask"


def loss(batch):
    m = batch.mask
    lp = batch.logp.masked_fill(m == 0, float("-inf"))  # padded positions: log-prob -inf
    d = batch.ref_logp - lp
    k3 = torch.exp(d) - 1 - d
    return BETA * (k3 * m).sum() / m.sum()

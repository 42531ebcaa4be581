"""unsloth-zoo #1240: k3 computed as exp(d) - d - 1 cancels catastrophically in float32/bfloat16 when pi is close
to pi_ref (|d| << 1, early in training): the value is rounding noise, often negative (a negative "KL"), and its
gradient exp(d) - 1 loses most digits. torch.expm1(d) - d keeps them.

In float64 the function is plain k3 in the loss (biased: forward_kl_token); the bug shows under ``--dtype``.
"""

import torch

REPORT = "unsloth-zoo #1240 (exp(d) - d - 1 cancels in float32 to a negative KL; expm1 fixes it)"
BETA = 0.1
AGG = "token-mean"
FIX = "k3 = torch.expm1(d) - d (and keep k3 out of the loss-only placement)"


def loss(batch):
    d = batch.ref_logp - batch.logp
    k3 = torch.exp(d) - d - 1
    return BETA * (k3 * batch.mask).sum() / batch.mask.sum()


def loss_fixed(batch):
    d = batch.ref_logp - batch.logp
    k3 = torch.expm1(d) - d
    return BETA * (k3 * batch.mask).sum() / batch.mask.sum()

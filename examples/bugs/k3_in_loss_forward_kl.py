"""verl / OpenRLHF / SkyRL GRPO default (use_kl_loss with low_var_kl): k3 in the loss. "A Comedy of Estimators"
(Shah et al., arXiv 2512.21852, Table 1): its expected gradient is a per-token *forward* KL(pi_ref || pi) gradient,
not grad KL(pi || pi_ref): mode-covering, higher entropy than the regularised optimum.
"""

import torch

REPORT = "arXiv 2512.21852 (A Comedy of Estimators), verl use_kl_loss + low_var_kl"
BETA = 0.1
AGG = "token-mean"
FIX = "k1 in the reward (verl: algorithm.use_kl_in_reward=true, kl_penalty=kl, use_kl_loss=false)"


def loss(batch):
    d = batch.ref_logp - batch.logp
    k3 = torch.expm1(d) - d
    return BETA * (k3 * batch.mask).sum() / batch.mask.sum()

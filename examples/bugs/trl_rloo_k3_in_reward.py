"""TRL #7086 / PRs #7095-#7096: RLOOTrainer's KL switched from k1 to k3 *in the reward*.

k3 = r - 1 - log r (r = pi_ref / pi) has the right expected value, but placed in the reward only its score-function
half reaches the gradient: E[k3 * grad log pi] is not grad KL (the configuration that collapses training in
"A Comedy of Estimators", arXiv 2512.21852).
"""

import torch

REPORT = "TRL #7086, PRs #7095-#7096 (RLOO: k1 -> k3 in the reward)"
BETA = 0.1
AGG = "seq-mean-token-sum"
FIX = "keep k1 (log pi - log pi_ref) in the reward, or add k3's pathwise half as a loss term"


def loss(batch):
    d = batch.ref_logp - batch.old_logp  # (B, T) log r
    k3 = (torch.expm1(d) - d) * batch.mask
    score = batch.rewards - BETA * k3.sum(-1)  # (B,)
    B = score.shape[0]
    adv = score - (score.sum() - score) / (B - 1)  # leave-one-out baseline
    return -(adv.detach() * (batch.logp * batch.mask).sum(-1)).mean()

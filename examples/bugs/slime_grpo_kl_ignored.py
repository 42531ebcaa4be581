"""slime #397 (and #2258): ``--kl-coef`` puts the KL into the reward only for ppo / reinforce_plus_plus; with
``--advantage-estimator grpo`` the KL reward is computed and then silently dropped: the advantages are built from
the task reward alone. The user believes beta > 0 regularises; nothing does.
"""

import torch

REPORT = "slime #397, #2258 (kl-coef silently ignored with advantage-estimator grpo)"
BETA = 0.1
AGG = "seq-mean-token-mean"
FIX = "use --use-kl-loss with --kl-loss-type k1 ... or an estimator that reads the KL reward (reinforce_plus_plus)"


def loss(batch):
    lp, old, ref, m = batch.logp, batch.old_logp, batch.ref_logp, batch.mask
    kl_reward = -BETA * (old - ref) * m  # computed ...
    _ = kl_reward  # ... and never used by the GRPO advantage
    r = batch.rewards
    adv = (r - r.mean()) / (r.std() + 1e-6)  # (B,)
    ratio = torch.exp(lp - old)
    per_tok = -adv[:, None] * ratio
    return ((per_tok * m).sum(-1) / m.sum(-1)).mean()

"""TRL #6586: with ``importance_sampling_level="sequence"`` and ``use_bias_correction_kl``, GRPOTrainer multiplies
the per-token k3 by the *sequence-level* ratio exp(mean_t log pi/pi_old) broadcast to every token
(trl/trainer/grpo_trainer.py ``_compute_loss``: ``per_token_kl * coef_1``).

On-policy the weight is 1 in value, but its gradient adds k3_t * (1/|y|) sum_s grad log pi_s to every token: a
score term for the wrong token set, so the KL gradient is neither the per-token nor the sequence reverse KL.
"""

import torch

REPORT = "TRL #6586 (use_bias_correction_kl with importance_sampling_level=sequence)"
BETA = 0.1
AGG = "token-mean"
FIX = "multiply the per-token KL by the per-token ratio exp(logp - old_logp), not the sequence-level one"


def loss(batch):
    lp, old, ref, m = batch.logp, batch.old_logp, batch.ref_logp, batch.mask
    log_w = ((lp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    d = ref - lp
    k3 = (torch.exp(d) - d - 1) * torch.exp(log_w)  # (B, T)
    return BETA * (k3 * m).sum() / m.sum()

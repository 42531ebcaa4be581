"""Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL" (arXiv 2506.09477): k2 (and
other per-token KL losses) backpropagated token by token give a *partial* gradient: each token's own next-token KL
with the prefix distribution held fixed, missing the effect on future tokens (reverse_kl_token, not reverse_kl).
"""

REPORT = "Tang & Munos 2025, arXiv 2506.09477 (per-token KL losses are partial gradients)"
BETA = 0.1
AGG = "seq-mean-token-sum"
FIX = "k2 at the sequence level, 0.5 * (sum_t log pi/pi_ref)^2, or k1 in the reward with reward-to-go"


def loss(batch):
    d = (batch.logp - batch.ref_logp) * batch.mask
    return BETA * (0.5 * d**2).sum(-1).mean()

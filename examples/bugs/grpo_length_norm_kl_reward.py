"""Dr. GRPO (Liu et al., arXiv 2503.20783): GRPO's 1/|y| per-response normalisation biases the update toward
shorter or longer answers. With k1 in the reward (reward-to-go) and a seq-mean-token-mean loss, the KL gradient is
exact when every response has the same length and biased as soon as lengths vary.
"""

REPORT = "Dr. GRPO, arXiv 2503.20783 (GRPO's 1/|y| length normalisation)"
BETA = 0.1
AGG = "seq-mean-token-mean"
FIX = "a constant normaliser: seq-mean-token-sum-norm / Dr. GRPO's sum / (B * max_len)"


def loss(batch):
    m = batch.mask
    k = (batch.old_logp - batch.ref_logp) * m
    rtg = k.flip(-1).cumsum(-1).flip(-1)  # reward-to-go of the KL reward
    per_tok = BETA * rtg.detach() * batch.logp
    return ((per_tok * m).sum(-1) / m.sum(-1)).mean()

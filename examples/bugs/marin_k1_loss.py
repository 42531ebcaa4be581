"""marin PR #5943: a KL penalty written as the differentiated k1, beta * mean(log pi - log pi_ref), in the loss.

Its gradient is beta * sum_t grad log pi(y_t|y_<t), whose expectation under pi is exactly 0: the "KL" term adds
noise and no regularisation at all ("A Comedy of Estimators": k1 in loss is zero in expectation).
"""

REPORT = "marin PR #5943 (k1 in the loss)"
BETA = 0.1
AGG = "seq-mean-token-sum"
FIX = "put k1 in the reward (detached, REINFORCE credit), or use k2 / k3 with the matching score term"


def loss(batch):
    return BETA * ((batch.logp - batch.ref_logp) * batch.mask).sum(-1).mean()

"""SkyRL #2104: with the GDPO advantage estimator, ``use_kl_in_reward`` is silently dropped: GDPO normalises each
reward component separately and the KL penalty, added to the token rewards, is not one of the components.
"""

REPORT = "SkyRL #2104 (GDPO silently drops KL-in-reward)"
BETA = 0.1
AGG = "seq-mean-token-sum"
FIX = "put the KL in the loss for GDPO, or add the KL penalty after the per-component normalisation"


def loss(batch):
    lp, old, ref, m = batch.logp, batch.old_logp, batch.ref_logp, batch.mask
    token_rewards = -BETA * (old - ref) * m  # the KL reward is built ...
    components = [batch.rewards]  # ... but GDPO's advantages read only the named reward components
    _ = token_rewards
    adv = 0.0
    for c in components:
        adv = adv + (c - c.mean()) / (c.std() + 1e-6)
    return -(adv * (lp * m).sum(-1)).mean()

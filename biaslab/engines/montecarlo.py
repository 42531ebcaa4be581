"""Monte Carlo engine: sample groups of responses and compute every group's update g, an estimate of
grad KL(pi_theta || pi_ref) (reverse, sequence level) times the configuration's nominal scale, with the same
configuration objects (``biaslab.core.recipes.Recipe``, ``make_config``) and the same interface as the exact engine.

Groups of B responses are drawn i.i.d. from the behaviour policy mu (the policy itself on-policy), each response
until EOS or T tokens; a group's update is g = sum_{i,t} a_it grad log pi(y_it|y_i,<t) (+ full-distribution terms)
with a = dL/dlogp of ``Recipe.batch_loss``, so E[g] here is the exact engine's E[g]. ``biaslab.engines.stats`` turns the
per-group gradients into bias tests and confidence intervals (``moments`` streams them: memory independent of n).
Per-response gradients are closed form for tabular models (optionally projected on k directions without forming
the P-vector), torch.func otherwise. Everything is batched and driven by a torch.Generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..core.placements import Coefficients, KLConfig, loss_coefficients, make_config
from .stats import Moments
from .toy import DTYPE, AutoregressiveModel, TabularAR, at_tokens, check_models, per_sample_grads


@torch.no_grad()
def sample_complete(
    model: AutoregressiveModel, n: int, eos: int | None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(tokens (n, T), mask (n, T)): responses drawn from ``model`` until ``eos`` or T tokens, padded with 0.

    The toy's next-token law does not depend on what follows, so a fixed-length draw cut after its first EOS is a
    draw of a complete response; the EOS token itself belongs to the response (mask 1)."""
    tokens = model.sample(n, generator=generator)  # (n, T)
    if eos is None:
        return tokens, torch.ones(tokens.shape, dtype=DTYPE)
    is_eos = (tokens == eos).to(torch.long)  # (n, T)
    ended_before = torch.cumsum(is_eos, 1) - is_eos  # (n, T) number of eos strictly before t
    mask = (ended_before == 0).to(DTYPE)  # (n, T)
    return tokens * mask.to(torch.long), mask


#: the unbiased, low-variance reference estimator of grad KL(pi || pi_ref): Rao-Blackwellized KL in reward + loss
REFERENCE_CONFIG = ("rb", "both", "token", "rtg")


def _tabular_grads(model: TabularAR, tokens: Tensor, logp_full: Tensor, coef: Coefficients, q: Tensor | None) -> Tensor:
    """(n, P) per-sample gradients of a tabular model, or (n, k) projections on the rows of q (k, P): each token's
    block ``TabularAR.coefficient_blocks`` placed at its prefix row."""
    n = tokens.shape[0]
    block = model.coefficient_blocks(tokens, coef.tok, coef.full, logp_full)  # (n, T, V)
    cols = model.block_columns(tokens)  # (n, T, V) flat parameter indices
    if q is None:
        out = torch.zeros(n, model.n_params(), dtype=block.dtype)
        out.scatter_add_(1, cols.reshape(n, -1), block.reshape(n, -1))
        return out  # (n, P)
    return torch.einsum("ntv,ntvk->nk", block, q.T[cols])  # (n, k)


class MonteCarloEngine:
    """Sample-based statistics of gradient estimators for any ``AutoregressiveModel`` pair.

    Args:
        policy: pi_theta (its parameters receive gradients).
        ref: pi_ref.
        behaviour: optional mu to sample from (the update is computed as trainers do, with mu's log-probs as
            ``logp_old``; no importance weight is added beyond what the configuration itself applies).
        eos: end-of-sequence token id (None: fixed length T).
        group_size: B, the responses per group.
    """

    def __init__(
        self,
        policy: AutoregressiveModel,
        ref: AutoregressiveModel,
        behaviour: AutoregressiveModel | None = None,
        eos: int | None = None,
        group_size: int = 1,
    ) -> None:
        check_models(policy, ref, behaviour, group_size, eos)
        self.policy, self.ref, self.behaviour = policy, ref, behaviour
        self.eos, self.B = eos, int(group_size)
        self.n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)

    def sample(self, n: int, generator: torch.Generator, from_ref: bool = False) -> Tensor:
        """(n, T) sequences from the behaviour policy (or the policy; or the reference with ``from_ref``)."""
        model = self.ref if from_ref else (self.behaviour or self.policy)
        return model.sample(n, generator)

    def sample_complete(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(tokens (n, T), mask (n, T)): responses from mu, each until EOS or T tokens, padded with token 0."""
        return sample_complete(self.behaviour or self.policy, n, self.eos, generator)

    def group_grads(
        self, config, tokens: Tensor, mask: Tensor | None = None, projection: Tensor | None = None
    ) -> Tensor:
        """(E, P) the update g of every group (or (E, k) projected); tokens and mask (E, B, T)."""
        E, B, T = tokens.shape
        flat = tokens.reshape(E * B, T)
        m = torch.ones(flat.shape, dtype=torch.float64) if mask is None else mask.reshape(E * B, T).to(torch.float64)
        with torch.no_grad():
            logp_full = self.policy.log_probs(flat)  # (n, T, V)
            logp_ref_full = self.ref.log_probs(flat)  # (n, T, V)
            lp = at_tokens(logp_full, flat) * m  # (n, T)
            lr = at_tokens(logp_ref_full, flat) * m
            lmu = lp if self.behaviour is None else at_tokens(self.behaviour.log_probs(flat), flat) * m
        full = None
        if getattr(config, "needs_full_logits", False):
            full = (logp_full.view(E, B, T, -1), logp_ref_full.view(E, B, T, -1))
        groups = [x.view(E, B, T) for x in (lp, lmu, lr, m)]  # logp, logp_old, logp_ref, mask
        a, c = loss_coefficients(config, *groups, None, full)
        a = a.reshape(E * B, T) * m
        c = None if c is None else c.reshape(E * B, T, -1) * m[..., None]
        g = self._grads(flat, logp_full, Coefficients(a, c), projection)  # (n, P)
        return g.view(E, B, -1).sum(1)

    def grads_for(self, config: KLConfig, tokens: Tensor, projection: Tensor | None = None) -> Tensor:
        """(n, P) per-sample updates (groups of one) for the given sequences (or (n, k) projected)."""
        return self.group_grads(config, tokens.unsqueeze(1), None, projection)

    def coefficient_grads(self, tokens: Tensor, coef: Coefficients, projection: Tensor | None = None) -> Tensor:
        """(n, P) gradients sum_t a_t grad log pi(y_t|y_<t) + sum_{t,v} c_tv grad log pi(v|y_<t), given coefficients."""
        with torch.no_grad():
            logp_full = self.policy.log_probs(tokens)
        return self._grads(tokens, logp_full, coef, projection)

    def _grads(self, tokens: Tensor, logp_full: Tensor, coef: Coefficients, projection: Tensor | None) -> Tensor:
        if self.policy.closed_form_grads:
            return _tabular_grads(self.policy, tokens, logp_full, coef, projection)
        full = coef.dense(tokens, logp_full.shape[-1])  # (n, T, V)
        g = torch.cat([g for _, g in per_sample_grads(self.policy, tokens, full)])  # (n, P)
        return g if projection is None else g @ projection.T

    def iter_grads(
        self,
        config: KLConfig,
        n: int,
        generator: torch.Generator,
        batch_size: int = 4096,
        projection: Tensor | None = None,
        progress: bool = False,
    ) -> Iterator[Tensor]:
        """Yield batches of per-group updates (E, P), n groups of B responses in all."""
        from tqdm.auto import tqdm

        with tqdm(total=n, desc=f"mc {config.label}", disable=not progress, leave=False) as bar:
            done = 0
            while done < n:
                m = min(max(1, batch_size // self.B), n - done)
                tokens, mask = self.sample_complete(m * self.B, generator)  # mask all ones without EOS
                T = tokens.shape[1]
                yield self.group_grads(config, tokens.view(m, self.B, T), mask.view(m, self.B, T), projection)
                done += m
                bar.update(m)

    def sample_grads(
        self,
        config: KLConfig,
        n: int,
        generator: torch.Generator,
        batch_size: int = 4096,
        projection: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """(n, P) per-sample gradient estimates of ``config`` on n fresh samples (or (n, k) projected)."""
        return torch.cat(list(self.iter_grads(config, n, generator, batch_size, projection, progress)))

    def moments(
        self,
        config: KLConfig,
        n: int,
        generator: torch.Generator,
        batch_size: int = 4096,
        projection: Tensor | None = None,
        progress: bool = False,
    ) -> Moments:
        """Streaming ``Moments`` of the per-sample gradients (memory independent of n)."""
        return Moments.accumulate(self.iter_grads(config, n, generator, batch_size, projection, progress))

    def direction_moments(
        self, name: str, n: int, generator: torch.Generator, batch_size: int = 4096, projection: Tensor | None = None
    ) -> Moments:
        """Streaming ``Moments`` of n samples of an unbiased estimator of a named direction: ``reverse_kl``
        (``reference_grads``), ``forward_kl``, ``forward_kl_token``, ``reverse_kl_token`` (memory independent of n).
        """
        draw = {
            "reverse_kl": lambda m: self.reference_grads(m, generator, projection),
            "forward_kl": lambda m: self.forward_kl_grads(m, generator, projection),
            "forward_kl_token": lambda m: self.token_direction_grads("forward_kl_token", m, generator, projection),
            "reverse_kl_token": lambda m: self.token_direction_grads("reverse_kl_token", m, generator, projection),
        }
        if name not in draw:
            raise ValueError(f"unknown direction {name!r}; choose one of: {', '.join(draw)}")
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        return Moments.accumulate(draw[name](m) for m in sizes)

    # -------------------------------------------------------------- reference directions by sampling

    def reference_grads(self, n: int, generator: torch.Generator, projection: Tensor | None = None) -> Tensor:
        """(n, P) samples of an unbiased low-variance estimator of grad KL(pi || pi_ref): the Rao-Blackwellized
        full-vocabulary KL in reward + loss with reward-to-go, sum_t [grad KL_t(y_<t) + grad log pi(y_t|y_<t)
        sum_{s>=t} KL_s(y_<s)], y ~ pi (always on-policy)."""
        saved, self.behaviour = self.behaviour, None
        try:
            return self.sample_grads(make_config(*REFERENCE_CONFIG), n, generator, projection=projection)
        finally:
            self.behaviour = saved

    def forward_kl_grads(self, n: int, generator: torch.Generator, projection: Tensor | None = None) -> Tensor:
        """(n, P) samples of grad KL(pi_ref || pi) = -E_{y~pi_ref}[grad log pi(y)]: y from the reference,
        coefficient -1 on every token."""
        tokens = self.sample(n, generator, from_ref=True)
        coef = Coefficients(-torch.ones(tokens.shape, dtype=torch.float64), None)
        return self.coefficient_grads(tokens, coef, projection)

    def token_direction_grads(
        self, kind: str, n: int, generator: torch.Generator, projection: Tensor | None = None
    ) -> Tensor:
        """(n, P) samples of the token-level directions with the prefix law held fixed (y ~ pi):
        ``forward_kl_token``: -sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t);
        ``reverse_kl_token``: sum_t sum_v pi(v|y_<t) (log pi(v|y_<t)/pi_ref(v|y_<t) + 1) grad log pi(v|y_<t)."""
        tokens = self.policy.sample(n, generator)
        with torch.no_grad():
            lp, lr = self.policy.log_probs(tokens), self.ref.log_probs(tokens)  # (n, T, V)
        if kind == "forward_kl_token":
            full = -lr.exp()
        elif kind == "reverse_kl_token":
            full = lp.exp() * (lp - lr + 1)
        else:
            raise ValueError(f"unknown token direction {kind!r}; choose forward_kl_token or reverse_kl_token")
        return self.coefficient_grads(tokens, Coefficients(torch.zeros(tokens.shape, dtype=lp.dtype), full), projection)

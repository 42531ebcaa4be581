"""Monte Carlo engine: sample sequences, compute every sample's gradient estimate g(y) of
grad KL(pi_theta || pi_ref) (reverse, sequence level) with the same ``KLConfig`` objects as the exact engine.

For y_1..y_n ~ pi (or ~ mu, a behaviour policy, with the sequence importance weight rho = pi(y)/mu(y) multiplying
each g), the sample mean estimates E[g]; ``biaslab.stats`` turns the per-sample gradients into bias tests and
confidence intervals. Per-sample gradients are computed from the surrogate's coefficients a = dS/dlogp
(``placements.surrogate_coefficients``): in closed form for tabular models (optionally projected on k directions
without forming the P-vector), with torch.func otherwise. Everything is batched and driven by a torch.Generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .persample import per_sample_grads
from .placements import Coefficients, KLConfig, make_config, surrogate_coefficients
from .stats import Moments
from .toy import AutoregressiveModel, ModelError, TabularAR

#: the unbiased, low-variance reference estimator of grad KL(pi || pi_ref): Rao-Blackwellized KL in reward + loss
REFERENCE_CONFIG = ("rb", "both", "token", "rtg")


def _tabular_grads(model: TabularAR, tokens: Tensor, logp_full: Tensor, coef: Coefficients, q: Tensor | None) -> Tensor:
    """(n, P) per-sample gradients of a tabular model, or (n, k) projections on the rows of q (k, P).

    The block at the prefix row of level t is a_t e_{y_t} + c_t - p_t (a_t + sum_v c_tv)  (see TabularAR).
    """
    n, T = tokens.shape
    V = model.vocab_size
    p = logp_full.detach().exp()  # (n, T, V)
    block = coef.dense(tokens, V)  # (n, T, V)
    block -= p * block.sum(-1, keepdim=True)  # (n, T, V)
    rows = model.prefix_rows(tokens)  # (n, T)
    offsets = torch.tensor([sum(V**s * V for s in range(t)) for t in range(T)])  # (T,)
    cols = (offsets + rows * V).unsqueeze(-1) + torch.arange(V)  # (n, T, V) flat parameter indices
    if q is None:
        out = torch.zeros(n, model.n_params(), dtype=block.dtype)
        out.scatter_add_(1, cols.reshape(n, -1), block.reshape(n, -1))
        return out  # (n, P)
    qt = q.T  # (P, k)
    return torch.einsum("ntv,ntvk->nk", block, qt[cols])  # (n, k)


class MonteCarloEngine:
    """Sample-based statistics of gradient estimators for any ``AutoregressiveModel`` pair.

    Args:
        policy: pi_theta (its parameters receive gradients).
        ref: pi_ref.
        behaviour: optional mu to sample from; each g is then multiplied by rho(y) = pi(y)/mu(y) (detached), which
            keeps E_mu[rho g] = E_pi[g].
    """

    def __init__(
        self, policy: AutoregressiveModel, ref: AutoregressiveModel, behaviour: AutoregressiveModel | None = None
    ) -> None:
        for other, name in ((ref, "reference"), (behaviour, "behaviour policy")):
            if other is not None and (other.vocab_size, other.length) != (policy.vocab_size, policy.length):
                raise ModelError(
                    f"policy and {name} disagree: policy V={policy.vocab_size}, T={policy.length}; "
                    f"{name} V={other.vocab_size}, T={other.length}"
                )
        policy.check_finite("policy")
        ref.check_finite("reference", reference=True)
        self.policy, self.ref, self.behaviour = policy, ref, behaviour
        self.n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)

    def sample(self, n: int, generator: torch.Generator, from_ref: bool = False) -> Tensor:
        """(n, T) sequences from the behaviour policy (or the policy; or the reference with ``from_ref``)."""
        model = self.ref if from_ref else (self.behaviour or self.policy)
        return model.sample(n, generator)

    def grads_for(self, config: KLConfig, tokens: Tensor, projection: Tensor | None = None) -> Tensor:
        """(n, P) per-sample gradient estimates for the given sequences (or (n, k) projected on projection's rows)."""
        with torch.no_grad():
            logp_full = self.policy.log_probs(tokens)  # (n, T, V)
            logp_ref_full = self.ref.log_probs(tokens)  # (n, T, V)
        coef = surrogate_coefficients(config, tokens, logp_full, logp_ref_full)
        return self._grads(tokens, logp_full, coef, projection) * self._rho(tokens, logp_full)[:, None]

    def coefficient_grads(self, tokens: Tensor, coef: Coefficients, projection: Tensor | None = None) -> Tensor:
        """(n, P) gradients sum_t a_t grad log pi(y_t|y_<t) + sum_{t,v} c_tv grad log pi(v|y_<t), given coefficients."""
        with torch.no_grad():
            logp_full = self.policy.log_probs(tokens)
        return self._grads(tokens, logp_full, coef, projection)

    def _grads(self, tokens: Tensor, logp_full: Tensor, coef: Coefficients, projection: Tensor | None) -> Tensor:
        if isinstance(self.policy, TabularAR):
            return _tabular_grads(self.policy, tokens, logp_full, coef, projection)
        full = coef.dense(tokens, logp_full.shape[-1])  # (n, T, V)
        chunks = [g for _, g in per_sample_grads(self.policy, tokens, full)]
        g = torch.cat(chunks)  # (n, P)
        return g if projection is None else g @ projection.T

    def _rho(self, tokens: Tensor, logp_full: Tensor) -> Tensor:
        if self.behaviour is None:
            return torch.ones(tokens.shape[0], dtype=logp_full.dtype)
        with torch.no_grad():
            lmu = self.behaviour.log_probs(tokens).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
        lp = logp_full.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
        return (lp - lmu).exp()  # (n,)

    def iter_grads(
        self,
        config: KLConfig,
        n: int,
        generator: torch.Generator,
        batch_size: int = 4096,
        projection: Tensor | None = None,
        progress: bool = False,
    ) -> Iterator[Tensor]:
        """Yield per-sample gradient batches, n samples in all."""
        from tqdm.auto import tqdm

        with tqdm(total=n, desc=f"mc {config.label}", disable=not progress, leave=False) as bar:
            done = 0
            while done < n:
                m = min(batch_size, n - done)
                yield self.grads_for(config, self.sample(m, generator), projection)
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
        m = Moments(0, torch.zeros(0), torch.zeros(0))
        for g in self.iter_grads(config, n, generator, batch_size, projection, progress):
            m = m.merge(Moments.from_samples(g))
        return m

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

"""Exact expectations of a recipe's update: every complete response, every group of B responses, any behaviour.

For a policy pi_theta, a reference pi_ref and a behaviour policy mu (mu = pi: on-policy), a recipe's update on a
group (y_1..y_B) drawn i.i.d. from mu is g = grad_theta L(y_1..y_B) (``biaslab.recipes.batch_loss``). Its
exact expectation

    E_mu[g] = sum over all N**B groups of prod_i mu(y_i) * sum_{i,t} dL/dlogp_it * grad log pi(y_it | y_i,<t)

is a finite sum over the enumerated complete responses (``biaslab.varlen``; variable lengths with an
end-of-sequence token, or all V**T sequences). dL/dlogp comes from one autograd pass over all groups, and
grad log pi(y_t|y_<t) from one Jacobian (N, T, P) of the policy, so E[g] and the variance trace
E||g - E g||^2 are exact up to float64 round-off.

The target is the true gradient of the sequence-level reverse KL(pi_theta || pi_ref) over complete responses,
scaled by the recipe's nominal scale (beta, batch size, aggregation constant, whitening std). Verdicts:
``unbiased`` (E g = nominal * grad KL), ``rescaled`` (right direction, other scale: a different effective beta),
``zero``, ``biased``. Named directions (reverse/forward KL, sequence or per-token with the prefix law held
fixed) are matched up to a positive scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import functional_call, jacrev

from .exact import DEFAULT_MAX_BYTES, RTOL, EnumerationTooLarge
from .recipes import Recipe, advantages, batch_loss
from .toy import AutoregressiveModel, ModelError
from .varlen import enumerate_complete

ATOL = 1e-12
MAX_GROUPS = 2_000_000

#: Named directions for variable-length responses (reverse / forward KL, sequence level or per token).
DIRECTIONS = {
    "reverse_kl": "grad KL(pi || pi_ref) over complete responses (the objective)",
    "forward_kl": "grad KL(pi_ref || pi) over complete responses",
    "reverse_kl_token": "sum_t E_prefix grad KL(pi(.|prefix) || pi_ref(.|prefix)), prefix law held fixed",
    "forward_kl_token": "sum_t E_prefix grad KL(pi_ref(.|prefix) || pi(.|prefix)), prefix law held fixed",
}


@dataclass
class RecipeResult:
    """Exact statistics of one recipe's update on groups of ``group_size`` responses drawn from mu."""

    recipe: Recipe
    expected_grad: Tensor  # (P,)
    variance: float  # E||g - E g||^2
    nominal_scale: float  # c: an unbiased recipe has E g = c * grad KL
    scale: float  # <E g, grad KL> / (c ||grad KL||^2): 1 when the magnitude along grad KL is right
    rel_bias: float  # ||E g - c grad KL|| / ||c grad KL||
    cos_reverse: float
    verdict: str  # unbiased | rescaled | zero | biased | no_kl
    matches: dict[str, float] = field(default_factory=dict)  # direction -> scale (relative to c), exact matches
    nearest: str = "none"  # direction with the largest cosine
    nearest_cos: float = math.nan

    @property
    def matched(self) -> str:
        """First exactly matched named direction, or "none"."""
        return next(iter(self.matches), "none")

    def as_dict(self, with_grad: bool = False) -> dict:
        d = {
            "recipe": self.recipe.describe(),
            "verdict": self.verdict,
            "matched": self.matched,
            "matches": self.matches,
            "nearest": self.nearest,
            "nearest_cos": self.nearest_cos,
            "rel_bias": self.rel_bias,
            "scale": self.scale,
            "variance": self.variance,
            "nominal_scale": self.nominal_scale,
            "cos_reverse": self.cos_reverse,
        }
        if with_grad:
            d["expected_grad"] = self.expected_grad.tolist()
        return d


@dataclass
class GroupMC:
    """Monte Carlo mean of a recipe's update over sampled groups, with per-coordinate standard errors."""

    mean: Tensor  # (P,)
    se: Tensor  # (P,)
    target: Tensor  # (P,) nominal scale * grad KL
    n_groups: int
    group_size: int

    def z_scores(self, reference: Tensor | None = None) -> Tensor:
        """(P,) (mean - reference) / se on coordinates with se > 0 (reference: the target)."""
        ref = self.target if reference is None else reference
        keep = self.se > 0
        return (self.mean - ref)[keep] / self.se[keep]

    def consistent_with(self, reference: Tensor | None = None, failure_rate: float = 1e-3) -> bool:
        """True when every coordinate lies within the Bonferroni-corrected normal interval at ``failure_rate``."""
        z = self.z_scores(reference)
        if z.numel() == 0:
            return True
        from statistics import NormalDist

        crit = NormalDist().inv_cdf(1 - failure_rate / (2 * z.numel()))
        return bool(z.abs().max() <= crit)


def _flat_params(model: AutoregressiveModel) -> tuple[list[str], tuple[Tensor, ...]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return names, tuple(params[n] for n in names)


class RecipeEngine:
    """Enumerate complete responses and groups; evaluate recipes exactly (see module docstring).

    Args:
        policy: pi_theta (its parameters receive the gradient).
        ref: pi_ref.
        behaviour: mu, the policy that sampled the data (None: on-policy, mu = pi).
        eos: end-of-sequence token id (None: fixed length T).
        group_size: B, the responses per group (baselines and aggregation act within a group).
        task_reward: optional (N,) task reward of each enumerated response (default 0); the KL part of the update
            is then g(recipe) - g(recipe without KL).
    """

    def __init__(
        self,
        policy: AutoregressiveModel,
        ref: AutoregressiveModel,
        behaviour: AutoregressiveModel | None = None,
        eos: int | None = None,
        group_size: int = 1,
        task_reward: Tensor | None = None,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        for what, m in (("reference", ref), ("behaviour", behaviour)):
            if m is not None and (m.vocab_size, m.length) != (policy.vocab_size, policy.length):
                raise ModelError(
                    f"{what} model has V={m.vocab_size}, T={m.length}; the policy has "
                    f"V={policy.vocab_size}, T={policy.length}"
                )
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.policy, self.ref, self.behaviour = policy, ref, behaviour
        self.V, self.T, self.eos, self.B = policy.vocab_size, policy.length, eos, int(group_size)
        self.tokens, self.mask = enumerate_complete(self.V, self.T, eos)  # (N, T), (N, T)
        self.N = self.tokens.shape[0]
        if self.N**self.B > max_groups:
            raise ValueError(
                f"exact enumeration of groups needs N**B = {self.N}**{self.B} = {self.N**self.B:.3g} groups "
                f"(limit {max_groups:.3g}); use a smaller group size or toy"
            )
        self.names, self.params = _flat_params(policy)
        if not self.names:
            raise ModelError("the policy has no parameters that require grad")
        n_params = sum(p.numel() for p in self.params)
        need = self.N * self.T * n_params * 8 * 2  # the Jacobian (N, T, P) in float64, and one gathered chunk
        if need > DEFAULT_MAX_BYTES:
            raise EnumerationTooLarge(
                f"the exact recipe engine needs about {need / 2**30:.3g} GiB for the Jacobian of {self.N} responses x "
                f"{self.T} tokens x {n_params} parameters (limit {DEFAULT_MAX_BYTES / 2**30:.3g} GiB, "
                "BIASLAB_MAX_BYTES); use a smaller toy"
            )
        with torch.no_grad():
            self.logp = self._tok_logp(policy)  # (N, T)
            self.logp_ref = self._tok_logp(ref)  # (N, T)
            self.logp_mu = self.logp if behaviour is None else self._tok_logp(behaviour)  # (N, T)
        self.prob_mu = self.logp_mu.sum(-1).exp()  # (N,) mu(y)
        total = float(self.prob_mu.sum())
        if abs(total - 1) > 1e-9:
            raise ModelError(f"enumerated response probabilities sum to {total!r}, not 1")
        if task_reward is not None:
            task_reward = torch.as_tensor(task_reward, dtype=self.logp.dtype)
            if task_reward.shape != (self.N,) or not torch.isfinite(task_reward).all():
                raise ValueError(f"task_reward must be a finite ({self.N},) tensor, one value per complete response")
        self.task_reward = task_reward
        self.jac = self._jacobian()  # (N, T, P)
        self.P = self.jac.shape[-1]
        self._truths: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ model pieces

    def _tok_logp(self, model: AutoregressiveModel) -> Tensor:
        lp = model.log_probs(self.tokens)  # (N, T, V)
        return lp.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1) * self.mask  # (N, T)

    def _functional_logp_full(self, params: tuple[Tensor, ...]) -> Tensor:
        return functional_call(self.policy, dict(zip(self.names, params)), (self.tokens,), strict=False)  # (N,T,V)

    def _jacobian(self) -> Tensor:
        """(N, T, P) grad_theta log pi(y_t | y_<t) for every response token (0 on padding)."""

        def f(params: tuple[Tensor, ...]) -> Tensor:
            lp = self._functional_logp_full(params)
            return lp.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1) * self.mask  # (N, T)

        jac = jacrev(f)(tuple(p.detach() for p in self.params))
        return torch.cat([j.reshape(self.N, self.T, -1) for j in jac], -1)  # (N, T, P)

    def flat_grad(self, scalar_fn) -> Tensor:
        """Flat gradient of ``scalar_fn(params)`` (built with functional_call) with respect to theta."""
        params = tuple(p.detach().requires_grad_(True) for p in self.params)
        grads = torch.autograd.grad(scalar_fn(params), params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])

    # ------------------------------------------------------------------ truths

    def truths(self) -> dict[str, Tensor]:
        """The named gradient directions (see ``DIRECTIONS``), by autograd of their defining sums."""
        if self._truths is not None:
            return self._truths
        mask, tokens = self.mask, self.tokens
        with torch.no_grad():
            lr_full = self.ref.log_probs(tokens)  # (N, T, V)
        lr_seq = self.logp_ref.sum(-1)  # (N,)
        w = self.logp.sum(-1).exp()  # (N,) pi(y), fixed weights for the per-token directions

        def seq_logp(params):
            lp = self._functional_logp_full(params).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return (lp * mask).sum(-1)  # (N,)

        def reverse(params):
            lp = seq_logp(params)
            return (lp.exp() * (lp - lr_seq)).sum()

        def forward(params):
            return (lr_seq.exp() * (lr_seq - seq_logp(params))).sum()

        def reverse_tok(params):
            lp = self._functional_logp_full(params)  # (N, T, V)
            kl = (lp.exp() * (lp - lr_full)).sum(-1)  # (N, T)
            return (w[:, None] * mask * kl).sum()

        def forward_tok(params):
            lp = self._functional_logp_full(params)
            kl = (lr_full.exp() * (lr_full - lp)).sum(-1)  # (N, T)
            return (w[:, None] * mask * kl).sum()

        self._truths = {
            "reverse_kl": self.flat_grad(reverse),
            "forward_kl": self.flat_grad(forward),
            "reverse_kl_token": self.flat_grad(reverse_tok),
            "forward_kl_token": self.flat_grad(forward_tok),
        }
        return self._truths

    def kl_reverse(self) -> float:
        """KL(pi || pi_ref) over complete responses."""
        lp, lr = self.logp.sum(-1), self.logp_ref.sum(-1)
        return float((lp.exp() * (lp - lr)).sum())

    # ------------------------------------------------------------------ groups

    def _group_chunks(self, chunk: int):
        """Yield (idx (E, B) response indices, prob (E,) group probability under mu) over all N**B groups."""
        total = self.N**self.B
        powers = self.N ** torch.arange(self.B - 1, -1, -1)  # (B,)
        for start in range(0, total, chunk):
            n = torch.arange(start, min(start + chunk, total))
            idx = (n.unsqueeze(1) // powers) % self.N  # (E, B)
            yield idx, self.prob_mu[idx].prod(-1)

    def _inputs(self, idx: Tensor):
        rew = None if self.task_reward is None else self.task_reward[idx]  # (E, B)
        return self.logp[idx], self.logp_mu[idx], self.logp_ref[idx], self.mask[idx], rew  # (E, B, T) each

    def whiten_stats(self, recipe: Recipe, chunk: int = 65536) -> tuple[float, float]:
        """Population (mean, std) of the per-token advantages of ``recipe`` under mu: the limit of a large
        rollout batch's token-level whitening."""
        s0 = s1 = s2 = 0.0
        for idx, prob in self._group_chunks(chunk):
            lp, lo, lr, m, rew = self._inputs(idx)
            adv = advantages(recipe, lo, lp, lr, m, rew)  # (E, B, T)
            s0 += float((prob[:, None, None] * m).sum())
            s1 += float((prob[:, None, None] * m * adv).sum())
            s2 += float((prob[:, None, None] * m * adv**2).sum())
        mean = s1 / s0
        var = max(s2 / s0 - mean**2, 0.0)
        return mean, math.sqrt(max(var, 1e-8))

    def coefficients(self, recipe: Recipe, idx: Tensor, whiten_stats=None) -> Tensor:
        """(E, B, T) dL/dlogp of every group's loss (the KL part when a task reward is set)."""
        lp, lo, lr, m, rew = self._inputs(idx)
        leaf = lp.clone().requires_grad_(True)
        loss = batch_loss(recipe, leaf, lo, lr, m, rew, whiten_stats)  # (E,)
        (a,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True) if loss.requires_grad else (None,)
        a = torch.zeros_like(lp) if a is None else a
        if self.task_reward is not None:
            base = recipe.without_kl()
            leaf0 = lp.clone().requires_grad_(True)
            loss0 = batch_loss(base, leaf0, lo, lr, m, rew, whiten_stats)
            if loss0.requires_grad:
                (a0,) = torch.autograd.grad(loss0.sum(), leaf0, allow_unused=True)
                if a0 is not None:
                    a = a - a0
        return a * m

    def moments(self, recipe: Recipe, chunk: int | None = None) -> tuple[Tensor, float, float | None]:
        """(E[g] (P,), E||g||^2, whitening std or None) over all groups."""
        stats = self.whiten_stats(recipe) if recipe.whiten else None
        chunk = chunk or max(1, int(2e7 // (self.B * self.T * max(self.P, 1))))
        mean = torch.zeros(self.P, dtype=self.logp.dtype)
        second = 0.0
        for idx, prob in self._group_chunks(chunk):
            a = self.coefficients(recipe, idx, stats)  # (E, B, T)
            g = torch.einsum("ebt,ebtp->ep", a, self.jac[idx])  # (E, P) one update per group
            if not torch.isfinite(g).all():
                raise ValueError(
                    f"{recipe.describe()}: the update is non-finite (NaN/inf) for some groups, e.g. a division by a "
                    "zero group std with grpo_eps = 0"
                )
            mean += prob @ g
            second += float(prob @ (g**2).sum(-1))
        return mean, second, (None if stats is None else stats[1])

    # ------------------------------------------------------------------ Monte Carlo over groups

    def monte_carlo(
        self,
        recipe: Recipe,
        n_groups: int,
        generator: torch.Generator,
        group_size: int | None = None,
        chunk: int = 4096,
    ) -> GroupMC:
        """Monte Carlo estimate of E[g] over ``n_groups`` groups of ``group_size`` responses drawn i.i.d. from mu.

        For group sizes whose N**B groups cannot be enumerated: responses are still the enumerated complete ones
        (so each group's update is computed exactly), only the groups are sampled. Returns the mean update, its
        per-coordinate standard error and the target (nominal scale times grad KL) to test against.
        """
        B = self.B if group_size is None else int(group_size)
        if n_groups < 2 or B < 1:
            raise ValueError(f"need n_groups >= 2 and group_size >= 1, got {n_groups}, {B}")
        if recipe.whiten:
            raise ValueError("Monte Carlo over groups does not support whitened recipes (population statistics)")
        total = torch.zeros(self.P, dtype=self.logp.dtype)
        total_sq = torch.zeros(self.P, dtype=self.logp.dtype)
        done = 0
        while done < n_groups:
            n = min(chunk, n_groups - done)
            idx = torch.multinomial(self.prob_mu, n * B, replacement=True, generator=generator).view(n, B)  # (n, B)
            a = self.coefficients(recipe, idx)  # (n, B, T)
            g = torch.einsum("ebt,ebtp->ep", a, self.jac[idx])  # (n, P)
            total += g.sum(0)
            total_sq += (g**2).sum(0)
            done += n
        mean = total / n_groups
        var = (total_sq / n_groups - mean**2).clamp(min=0) * n_groups / (n_groups - 1)  # (P,) unbiased
        target = recipe.nominal_scale(B, self.T) * self.truths()["reverse_kl"]
        return GroupMC(mean=mean, se=(var / n_groups).sqrt(), target=target, n_groups=n_groups, group_size=B)

    # ------------------------------------------------------------------ verdict

    def evaluate(self, recipe: Recipe) -> RecipeResult:
        """Exact expected update, variance, bias against nominal * grad KL, verdict and matched directions."""
        tr = self.truths()
        mean, second, wstd = self.moments(recipe)
        variance = max(second - float(mean @ mean), 0.0)
        nominal = recipe.nominal_scale(self.B, self.T, wstd)
        target = nominal * tr["reverse_kl"]
        tnorm = float(target.norm())
        gnorm = float(mean.norm())
        rev = tr["reverse_kl"]
        rev_sq = float(rev @ rev)
        if nominal == 0:
            verdict = "no_kl"
            rel_bias = math.nan
            scale = math.nan
        else:
            rel_bias = float((mean - target).norm()) / tnorm if tnorm > 0 else (0.0 if gnorm == 0 else math.inf)
            scale = float(mean @ rev) / (nominal * rev_sq) if rev_sq > 0 else math.nan
            if rel_bias <= RTOL or float((mean - target).norm()) <= ATOL:
                verdict = "unbiased"
            elif gnorm <= RTOL * tnorm + ATOL:
                verdict = "zero"
            else:
                verdict = "biased"
        matches: dict[str, float] = {}
        best, best_cos = "none", -2.0
        for name, d in tr.items():
            dd = float(d @ d)
            if dd == 0 or gnorm == 0:
                continue
            s = float(mean @ d) / dd
            cos = float(mean @ d) / (gnorm * math.sqrt(dd))
            if cos > best_cos:
                best, best_cos = name, cos
            if s > 0 and float((mean - s * d).norm()) <= RTOL * gnorm + ATOL:
                matches[name] = s / nominal if nominal else s
        if verdict == "biased" and "reverse_kl" in matches:
            verdict = "rescaled"
        return RecipeResult(
            recipe=recipe,
            expected_grad=mean,
            variance=variance,
            nominal_scale=nominal,
            scale=scale,
            rel_bias=rel_bias,
            cos_reverse=(float(mean @ rev) / (gnorm * math.sqrt(rev_sq)) if gnorm > 0 and rev_sq > 0 else math.nan),
            verdict=verdict,
            matches=matches,
            nearest=best,
            nearest_cos=best_cos if best != "none" else math.nan,
        )


__all__ = ["DIRECTIONS", "GroupMC", "RecipeEngine", "RecipeResult"]

"""Where training ends up: exact and stochastic training dynamics of KL-regularised RL on enumerable toys.

Training ascends J = E_pi[R] - beta * KL(pi || pi_ref) (the reverse KL, sequence level) with the task reward R(y)
through the score function and the KL gradient estimated by one configuration (estimator x placement x level, see
``biaslab.core.placements``). Its update is E[R(y) grad log pi(y)] - beta * E[g(y)], where g is the configuration's
per-sample KL gradient estimate. Which end point that update reaches depends on the divergence E[g] really follows
(``biaslab.workflows.fixedpoints`` gives each end point in closed form).

* ``mode="exact"`` (``ExactFlow``): every step is the exact expected update, summed over all V**T sequences. On
  tabular models each prefix's logit block is preconditioned by 1/pi(prefix) (the update conditional on reaching the
  prefix), with step min(1, 1/beta); the enumeration, the reference and the index tables are built once.
* ``mode="mc"`` (``MonteCarloTrainer``): N samples per step from the behaviour policy (the policy ``lag`` steps ago),
  a baseline on the task reward (none / mean / RLOO / GRPO), per-token importance ratios pi/mu with optional PPO
  clipping, SGD or Adam; all seeds advance together as one batched tensor.

Every KL value comes from ``biaslab.core.estimators``; the coefficients dS/dlogp of the KL terms from
``biaslab.core.placements.surrogate_coefficients``, and the Monte Carlo trainer's importance ratios, PPO clipping and KL
credit from the core recipe's batch loss (``policy_gradient_recipe``, ``biaslab.core.recipes``). ``logit_grad`` maps
coefficients to the stacked tabular logits of many seeds at once (``TabularAR.weighted_grad`` for one model).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core.placements import Coefficients, loss_coefficients, make_config, surrogate_coefficients
from ..core.recipes import Recipe
from ..engines.exact import enumerate_sequences
from ..engines.stats import clopper_pearson
from ..engines.toy import DTYPE, AutoregressiveModel, ModelError, TabularAR
from .fixedpoints import TARGETS, entropy, kl, sequence_log_probs, sequence_probs, targets

if TYPE_CHECKING:  # a configuration from make_config (the core's one configuration type)
    from ..core.placements import KLConfig

NO_KL = "none"
DEFAULT_EXACT_STEPS = 50_000  # V <= 4, T <= 4, beta in [0.3, 1]: the slowest seen reaches L1 1e-6 by ~38,000
DEFAULT_TOL = 1e-12
CONVERGED_L1 = 1e-6  # a converged run "converges to TARGET" when its L1 distance is below this
COLLAPSE_REWARD = 0.01
BASELINES = ("none", "mean", "rloo", "grpo")


# ============================================================================ names and inputs


def parse_config(spec: str) -> KLConfig | None:
    """``ESTIMATOR:PLACEMENT[:LEVEL]`` (e.g. ``k3:loss:sequence``) to a configuration; ``none`` is no KL at all."""
    spec = spec.strip()
    if spec == NO_KL:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"configuration {spec!r}: expected ESTIMATOR:PLACEMENT[:LEVEL] (e.g. k3:loss) or 'none'")
    return make_config(*parts)


def parse_configs(spec: str) -> list[KLConfig | None]:
    """A comma-separated list of ``parse_config`` specs."""
    out = [parse_config(s) for s in spec.split(",") if s.strip()]
    if not out:
        raise ValueError("no configuration given")
    return out


def config_name(config: KLConfig | None) -> str:
    """The short ``ESTIMATOR:PLACEMENT[:sequence]`` name of a configuration (``none`` for no KL)."""
    if config is None:
        return NO_KL
    name = f"{config.estimator.name}:{config.placement.value}"
    return name + (":sequence" if config.level.value == "sequence" else "")


def parse_reward(spec: str, vocab_size: int, length: int, seed: int = 0) -> Tensor:
    """(V**T,) sequence rewards in base-V order (first token most significant).

    ``binary:K``: 1 on K sequences drawn without replacement (seeded), else 0; ``uniform``: i.i.d. U(0, 1) (seeded);
    ``zero``: R = 0; ``FILE.npy``: V**T values (any shape with that many elements, read in C order).
    """
    n = vocab_size**length
    g = torch.Generator().manual_seed(seed + 7919)
    if spec.startswith("binary:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"reward {spec!r}: expected binary:K with an integer K") from None
        if not 1 <= k <= n:
            raise ValueError(f"reward {spec!r}: K must lie in [1, V**T = {n}]")
        r = torch.zeros(n, dtype=DTYPE)
        r[torch.randperm(n, generator=g)[:k]] = 1.0
        return r
    if spec == "uniform":
        return torch.rand(n, generator=g, dtype=DTYPE)
    if spec == "zero":
        return torch.zeros(n, dtype=DTYPE)
    if spec.endswith(".npy"):
        import numpy as np

        try:
            arr = np.load(spec, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"reward file {spec} does not exist") from None
        if arr.size != n:
            raise ValueError(f"reward file {spec} holds {arr.size} values; expected V**T = {n}")
        r = torch.as_tensor(np.asarray(arr, dtype=np.float64).reshape(-1))
        if not torch.isfinite(r).all():
            raise ValueError(f"reward file {spec} holds non-finite values")
        return r
    raise ValueError(f"unknown reward {spec!r}; use binary:K, uniform, zero or FILE.npy")


def cond_tables(model: AutoregressiveModel) -> list[Tensor]:
    """[(V**t, V)] the model's next-token probabilities at every prefix (detached), base-V row order."""
    if isinstance(model, TabularAR):
        return model.level_probs()
    V, T = model.vocab_size, model.length
    with torch.no_grad():
        logp = model.log_probs_enumerated(enumerate_sequences(V, T))  # (N, T, V)
    return [logp[:: V ** (T - t), t].exp() for t in range(T)]  # the first sequence of each prefix


# ============================================================================ the tabular problem


class TabularProblem:
    """One enumeration shared by every flow: tokens, prefix rows, the reference and the reward.

    Logits of all levels are stacked as one (P, V) matrix, P = sum_t V**t rows; level t's prefix h sits at row
    ``offset[t] + h``. ``row_ids`` (N, T) is the row of each sequence's prefix at each position.
    """

    def __init__(self, ref: TabularAR, reward: Tensor) -> None:
        V, T = ref.vocab_size, ref.length
        if reward.shape != (V**T,):
            raise ValueError(f"reward must have V**T = {V**T} values, got {tuple(reward.shape)}")
        self.V, self.T = V, T
        self.offsets = [sum(V**s for s in range(t)) for t in range(T)]
        self.n_rows = sum(V**t for t in range(T))
        self.tokens = enumerate_sequences(V, T)  # (N, T)
        self.row_ids = ref.prefix_rows(self.tokens) + torch.tensor(self.offsets)  # (N, T)
        self.ref_logits = self.stack([lvl.detach() for lvl in ref.levels])  # (P, V)
        self.lq_rows = torch.log_softmax(self.ref_logits, -1)  # (P, V)
        self.lq_full = self.lq_rows[self.row_ids]  # (N, T, V)
        self.lq_tok = self.lq_full.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
        self.lq_seq = self.lq_tok.sum(-1)  # (N,)
        self.q_seq = self.lq_seq.exp()  # (N,)
        self.reward = reward.to(DTYPE)  # (N,)
        self._targets: dict[float, dict[str, Tensor]] = {}

    def stack(self, levels: list[Tensor]) -> Tensor:
        """(P, V) the levels (V**t, V) stacked in order."""
        return torch.cat([x.to(DTYPE).reshape(-1, self.V) for x in levels], 0)

    def levels(self, rows: Tensor) -> list[Tensor]:
        """[(..., V**t, V)] per-level views of stacked rows (..., P, V)."""
        return [rows[..., o : o + self.V**t, :] for t, o in enumerate(self.offsets)]

    def seq_log_probs(self, logits: Tensor) -> Tensor:
        """(..., N) log pi(y) of stacked logits (..., P, V)."""
        return sequence_log_probs(self.levels(torch.log_softmax(logits, -1)))

    def targets(self, beta: float) -> dict[str, Tensor]:
        """The closed-form end points at ``beta`` (``biaslab.workflows.fixedpoints``), cached."""
        if beta not in self._targets:
            q_cond = [torch.softmax(x, -1) for x in self.levels(self.ref_logits)]
            self._targets[beta] = targets(q_cond, self.reward, beta)
        return self._targets[beta]

    def metrics(self, logp_seq: Tensor, beta: float) -> dict[str, float]:
        """``flow_metrics`` of pi(y) = exp(logp_seq) against this problem's targets at ``beta``."""
        return flow_metrics(logp_seq, self.lq_seq, self.reward, self.targets(beta))


def flow_metrics(logp_seq: Tensor, lq_seq: Tensor, reward: Tensor, tgt: dict[str, Tensor]) -> dict[str, float]:
    """Reward, reverse and forward KL, entropy and the L1 distance to each target of pi(y) = exp(logp_seq) (N,),
    with log pi_ref(y) = lq_seq (N,)."""
    p = logp_seq.exp()  # (N,)
    out = {
        "reward": float(p @ reward),
        "reverse_kl": float((p * (logp_seq - lq_seq)).sum()),
        "forward_kl": float((lq_seq.exp() * (lq_seq - logp_seq)).sum()),
        "entropy": float(entropy(p)),
    }
    out.update({f"l1_{name}": float((p - target).abs().sum()) for name, target in tgt.items()})
    return out


def expected_coefficients(
    config: KLConfig | None, beta: float, reward: Tensor, tokens: Tensor, logp_full: Tensor, lq_full: Tensor,
    lp_tok: Tensor, lq_tok: Tensor,
) -> Coefficients:
    """Coefficients (tok (N, T), full (N, T, V) or None) of one response's on-policy ascent direction on log pi:
    the full credit R(y) of the sequence reward minus beta times the configuration's dS/dlogp
    (``surrogate_coefficients``)."""
    tok = reward.unsqueeze(-1).expand_as(lp_tok)  # (N, T) full credit of the sequence reward
    if config is None:
        return Coefficients(tok, None)
    c = surrogate_coefficients(config, tokens, logp_full, lq_full, lp_tok, lq_tok)
    return Coefficients(tok - beta * c.tok, None if c.full is None else -beta * c.full)


def logit_grad(
    weights: Tensor, tok: Tensor, full: Tensor | None, tokens: Tensor, row_ids: Tensor, probs: Tensor
) -> Tensor:
    """(P, V) sum_{n,t} weights[n,t] * (the gradient of the coefficients at sample n, position t) for stacked
    tabular logits with next-token probabilities ``probs`` (P, V).

    The block at prefix row h = row_ids[n,t] is tok e_{y_t} + full - p_h (tok + sum_v full): d log softmax(theta)_v /
    d theta = e_v - p. weights, tok, tokens, row_ids: (N, T); full: (N, T, V) or None.
    """
    P, V = probs.shape
    acc = probs.new_zeros(P * V)
    acc.index_add_(0, (row_ids * V + tokens).reshape(-1), (weights * tok).reshape(-1))
    acc = acc.view(P, V)
    if full is not None:
        acc.index_add_(0, row_ids.reshape(-1), (weights.unsqueeze(-1) * full).reshape(-1, V))
    return acc - probs * acc.sum(-1, keepdim=True)


def policy_gradient_recipe(config: KLConfig | None, beta: float, clip: float | None = None) -> Recipe:
    """The score-function part of the trainer's update as the core configuration type: REINFORCE on the sequence
    advantage (baselined by the caller), the configuration's KL in the reward (coefficient beta, computed from the
    behaviour policy's log-probabilities) as per-token credit, per-token importance ratios pi/mu and, with ``clip``
    eps, the PPO objective min(rho A, clip(rho, 1-eps, 1+eps) A); token-sum, each sample its own group."""
    reward = config is not None and config.has_reward_kl
    return Recipe(
        reward_estimator=config.reward_estimator if reward else None,
        reward_coef=beta * config.reward_coef if reward else 0.0,
        reward_credit=config.reward_credit if reward else "rtg",
        level=config.level if reward else "token",
        pg_ratio="token",
        pg_clip=None if clip is None else (clip, clip),
        pg_agg="token-sum",
    )


def sample_coefficients(
    config: KLConfig | None, beta: float, tokens: Tensor, logp_full: Tensor, logp_mu_full: Tensor, lq_full: Tensor,
    advantage: Tensor, clip: float | None = None,
) -> Coefficients:
    """Per-sample coefficients (tok (N, T), full (N, T, V) or None) of the ascent direction on log pi.

    Samples come from the behaviour policy mu (``logp_mu_full``; equal to ``logp_full`` on-policy). The score part is
    minus dL/dlogp of ``policy_gradient_recipe``'s batch loss: rho_t * A_t with rho_t = pi(y_t|h)/mu(y_t|h) and
    A_t = advantage - beta * c_t, c_t the KL credit of the reward half computed from mu's log-probabilities (a
    detached reward is computed at rollout), zero where PPO clipping binds. The loss half adds -beta * dK/dlogp
    computed at pi, with no importance weight (as trainers write KL losses).
    """
    idx = tokens.unsqueeze(-1)
    lp_tok, lmu_tok, lq_tok = (x.gather(-1, idx).squeeze(-1) for x in (logp_full, logp_mu_full, lq_full))  # (N, T)
    pg = policy_gradient_recipe(config, beta, clip)
    full = (logp_mu_full[:, None], lq_full[:, None]) if pg.needs_full_logits else None  # KL-in-reward values from mu
    ones = torch.ones_like(lp_tok)[:, None]  # (N, 1, T): every sample its own group
    pg_coef = loss_coefficients(pg, lp_tok[:, None], lmu_tok[:, None], lq_tok[:, None], ones, advantage[:, None], full)
    score = -pg_coef.tok.squeeze(1)  # (N, T)
    if config is None or not config.has_loss_kl:
        return Coefficients(score, None)
    c = surrogate_coefficients(replace(config, reward_estimator=None, reward_coef=0.0), tokens, logp_full, lq_full)
    return Coefficients(score + -beta * c.tok, None if c.full is None else -beta * c.full)


# ============================================================================ results


@dataclass
class TrainRun:
    """One configuration at one beta: trajectory, end state and verdict."""

    config: str
    label: str
    beta: float
    mode: str
    steps: int
    status: str  # "converged" | "diverged" | "running" (mc: "mc")
    verdict: str
    final: dict[str, float]
    final_seq_probs: list[float]
    trajectory: list[dict[str, float]] = field(default_factory=list)
    nearest_target: str = ""
    mc: dict[str, object] | None = None

    def as_dict(self, with_trajectory: bool = True) -> dict[str, object]:
        keys = ("config", "label", "beta", "mode", "steps", "status", "verdict", "nearest_target", "final")
        d: dict[str, object] = {k: getattr(self, k) for k in (*keys, "final_seq_probs")}
        if self.mc is not None:
            d["mc"] = self.mc
        if with_trajectory:
            d["trajectory"] = self.trajectory
        return d


def _run(config: KLConfig | None, beta: float, mode: str, steps: int, status: str, verdict: str,
         final: dict[str, float], probs: Tensor, trajectory: list, nearest: str, mc: dict | None = None) -> TrainRun:
    """The ``TrainRun`` of a finished run ending at pi(y) = ``probs`` (N,)."""
    label = "no KL" if config is None else config.label
    return TrainRun(config_name(config), label, beta, mode, steps, status, verdict, final, probs.tolist(), trajectory,
                    nearest, mc)


def _record_steps(steps: int, points: int = 120) -> set[int]:
    """0, ~``points`` geometrically spaced steps up to ``steps``, and every step up to 20."""
    out = set(range(min(steps, 20) + 1))
    x = 1.0
    while x <= steps:
        out.add(int(round(x)))
        x *= max(1.0 + 1e-9, steps ** (1.0 / points))
    out.add(steps)
    return out


def _nearest(final: dict[str, float]) -> tuple[str, float]:
    """The closest target; ties (e.g. R constant, where every target is pi_ref) go to the first in ``TARGETS``."""
    best = min(final[f"l1_{n}"] for n in TARGETS)
    name = next(n for n in TARGETS if final[f"l1_{n}"] <= best + 1e-9)
    return name, final[f"l1_{name}"]


def collapse_threshold(reward: Tensor, beta: float) -> float:
    """|log pi(v|h) - log pi_ref(v|h)| beyond which a run counts as diverged: every closed-form end point keeps the
    conditional log-ratio within (max R - min R)/beta (plus log(1/beta)-sized terms), so this leaves a wide margin."""
    spread = float(reward.max() - reward.min())
    return 50.0 + 2.0 * spread / beta + 2.0 * abs(math.log(beta))


# ============================================================================ exact flow


@dataclass(eq=False)  # compared and hashed by identity, like any object
class ExactFlow:
    """The exact expected-update flow of one configuration (None: no KL) on a tabular problem (one enumeration, one
    step function). ``precondition``: divide each prefix's block by pi(prefix), else plain gradient ascent; ``lr``:
    step size (default min(1, 1/beta) either way)."""

    problem: TabularProblem
    config: KLConfig | None
    beta: float
    precondition: bool = True
    lr: float | None = None

    def __post_init__(self) -> None:
        self.beta = float(self.beta)
        self.lr = min(1.0, 1.0 / self.beta) if self.lr is None else float(self.lr)

    def direction(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """((P, V) the expected ascent direction, (P, V) log pi(.|h) per row, (N,) log pi(y)) at stacked logits."""
        pb = self.problem
        logp_rows = torch.log_softmax(logits, -1)  # (P, V)
        logp_full = logp_rows[pb.row_ids]  # (N, T, V)
        lp_tok = logp_full.gather(-1, pb.tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
        logp_seq = lp_tok.sum(-1)  # (N,)
        if self.precondition:
            weights = lp_tok.flip(-1).cumsum(-1).flip(-1).exp()  # (N, T) pi(y_{>=t} | y_<t) = pi(y) / pi(prefix)
        else:
            weights = logp_seq.exp().unsqueeze(-1).expand_as(lp_tok)  # (N, T) pi(y)
        tok, full = expected_coefficients(
            self.config, self.beta, pb.reward, pb.tokens, logp_full, pb.lq_full, lp_tok, pb.lq_tok
        )
        return logit_grad(weights, tok, full, pb.tokens, pb.row_ids, logp_rows.exp()), logp_rows, logp_seq

    def run(
        self, start: Tensor, steps: int = DEFAULT_EXACT_STEPS, tol: float = DEFAULT_TOL, record: bool = True
    ) -> TrainRun:
        """Iterate from stacked logits ``start`` (P, V) until the update is below ``tol`` relative to the logits
        (converged), a conditional log-ratio passes ``collapse_threshold`` (diverged) or ``steps`` steps."""
        pb = self.problem
        logits = start.to(DTYPE).clone()
        when = _record_steps(steps) if record else set()
        limit = collapse_threshold(pb.reward, self.beta)
        trajectory: list[dict[str, float]] = []
        status, step, size = "running", 0, 0.0
        while True:
            d, logp_rows, logp_seq = self.direction(logits)  # at the current logits
            if step in when:
                trajectory.append({"step": step, **pb.metrics(logp_seq, self.beta)})
            if float((logp_rows - pb.lq_rows).abs().max()) > limit:
                status = "diverged"
                break
            if step >= steps:
                break
            update = self.lr * d
            size = float(update.abs().max())
            if not math.isfinite(size):
                status = "diverged"
                break
            logits += update
            step += 1
            if size <= tol * max(1.0, float(logits.abs().max())):
                status = "converged"
                break
        logp_seq = pb.seq_log_probs(logits)
        final = pb.metrics(logp_seq, self.beta)
        if record and (not trajectory or trajectory[-1]["step"] != step):
            trajectory.append({"step": step, **final})
        final["max_abs_log_ratio"] = float((torch.log_softmax(logits, -1) - pb.lq_rows).abs().max())
        final["last_update"] = size if step else 0.0
        nearest, l1 = _nearest(final)
        if status == "running" and l1 < CONVERGED_L1:
            status = "converged"  # on a target to L1 < 1e-6, the update still above the round-off criterion
        if status == "converged":
            if l1 < CONVERGED_L1:
                verdict = f"converges to {nearest} (L1 {l1:.1e})"
            else:
                verdict = f"converges to a point that is none of the targets (nearest {nearest}, L1 {l1:.2g})"
        elif status == "diverged":
            verdict = (
                f"diverges (collapse): a conditional log-ratio passed {limit:.0f} at step {step}, "
                f"entropy {final['entropy']:.3g}"
            )
        else:
            verdict = (
                f"no fixed point in {steps} steps (still moving: last update {size:.1e}; reward {final['reward']:.4g}, "
                f"entropy {final['entropy']:.3g}; nearest target {nearest} at L1 {l1:.2g})"
            )
        return _run(self.config, self.beta, "exact", step, status, verdict, final, logp_seq.exp(), trajectory, nearest)


def neural_flow(
    policy: AutoregressiveModel, ref: AutoregressiveModel, reward: Tensor, config: KLConfig | None, beta: float,
    steps: int = 2000, lr: float = 0.5, tol: float = DEFAULT_TOL,
) -> TrainRun:
    """The exact expected-gradient flow for any model (plain gradient ascent through autograd, no preconditioning).

    The model's own parameterisation restricts where it can go: the closed-form targets are reported as distances.
    """
    V, T = policy.vocab_size, policy.length
    tokens = enumerate_sequences(V, T)  # (N, T)
    with torch.no_grad():
        lq_full = ref.log_probs_enumerated(tokens)  # (N, T, V)
    lq_tok = lq_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
    lq_seq = lq_tok.sum(-1)
    tgt = targets(cond_tables(ref), reward, beta)
    params = [p for p in policy.parameters() if p.requires_grad]
    when = _record_steps(steps)
    trajectory, status, step = [], "running", 0
    while True:
        logp_full = policy.log_probs_enumerated(tokens)  # (N, T, V), differentiable
        lp_tok = logp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
        logp_seq = lp_tok.detach().sum(-1)  # (N,)
        if step in when:
            trajectory.append({"step": step, **flow_metrics(logp_seq, lq_seq, reward, tgt)})
        if step >= steps:
            break
        w = logp_seq.exp().unsqueeze(-1)  # (N, 1)
        tok, full = expected_coefficients(
            config, beta, reward, tokens, logp_full.detach(), lq_full, lp_tok.detach(), lq_tok
        )
        s = (w * tok * lp_tok).sum()
        if full is not None:
            s = s + (w.unsqueeze(-1) * full * logp_full).sum()
        grads = torch.autograd.grad(s, params)
        size = 0.0
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(lr * g)
                size = max(size, float((lr * g).abs().max()))
        step += 1
        if not math.isfinite(size):
            status = "diverged"
            break
        if size <= tol * max(1.0, max(float(p.detach().abs().max()) for p in params)):
            status = "converged"
            break
    with torch.no_grad():
        logp_seq = policy.log_probs_enumerated(tokens).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    final = flow_metrics(logp_seq, lq_seq, reward, tgt)
    nearest, l1 = _nearest(final)
    verdict = {
        "converged": f"converges (nearest {nearest}, L1 {l1:.2g})",
        "diverged": "diverges (non-finite update)",
    }.get(status, f"no fixed point in {steps} steps (nearest {nearest}, L1 {l1:.2g})")
    return _run(config, beta, "exact", step, status, verdict, final, logp_seq.exp(), trajectory, nearest)


# ============================================================================ lagged expected update (exact)


def expected_update(
    problem: TabularProblem, logits: Tensor, behaviour_logits: Tensor, config: KLConfig | None, beta: float,
    clip: float | None = None,
) -> Tensor:
    """(P, V) the exact expectation, over y ~ mu (the behaviour policy's logits), of the Monte Carlo trainer's
    per-sample ascent direction with no baseline (``sample_coefficients``), at the policy's stacked ``logits``."""
    pb = problem
    logp_rows = torch.log_softmax(logits.to(DTYPE), -1)  # (P, V)
    lmu_rows = torch.log_softmax(behaviour_logits.to(DTYPE), -1)  # (P, V)
    logp_full, lmu_full = logp_rows[pb.row_ids], lmu_rows[pb.row_ids]  # (N, T, V)
    mu_seq = lmu_full.gather(-1, pb.tokens.unsqueeze(-1)).squeeze(-1).sum(-1).exp()  # (N,)
    tok, full = sample_coefficients(config, beta, pb.tokens, logp_full, lmu_full, pb.lq_full, pb.reward, clip)
    weights = mu_seq.unsqueeze(-1).expand_as(tok)  # (N, T)
    return logit_grad(weights, tok, full, pb.tokens, pb.row_ids, logp_rows.exp())


# ============================================================================ Monte Carlo training


def baseline_advantage(reward: Tensor, kind: str) -> Tensor:
    """(S, N) advantages of sequence rewards (S, N) within each seed's group of N samples.

    ``none``: R; ``mean`` (Dr. GRPO): R - mean; ``rloo``: R - mean of the other N-1;
    ``grpo``: (R - mean) / (std + 1e-6) with the population std (``biaslab.core.recipes``' group baseline, which
    the exact engine uses, takes Bessel's std and keeps R for a group of one; this one is the trainer's own).
    """
    if kind == "none":
        return reward
    n = reward.shape[-1]
    mean = reward.mean(-1, keepdim=True)
    if kind == "mean":
        return reward - mean
    if kind == "rloo":
        if n < 2:
            raise ValueError("the RLOO baseline needs --samples >= 2")
        return (reward - mean) * n / (n - 1)
    if kind == "grpo":
        return (reward - mean) / (reward.std(-1, keepdim=True, unbiased=False) + 1e-6)
    raise ValueError(f"unknown baseline {kind!r}; choose one of: {', '.join(BASELINES)}")


@dataclass(eq=False)  # compared and hashed by identity, like any object
class MonteCarloTrainer:
    """Stochastic training of one configuration, all seeds at once (logits (S, P, V)).

    Each step: the behaviour policy mu is the policy ``lag`` steps ago; N sequences per seed are drawn from mu;
    the ascent direction is the mean over the N samples of ``sample_coefficients`` mapped by ``logit_grad``; SGD or
    Adam (elementwise, so seeds stay independent) takes the step. A seed whose conditional log-ratio passes the
    divergence threshold is frozen at its last finite state and counted as diverged. Collapse: the exact expected
    reward E_pi[R] falls below ``collapse_reward`` at some step.
    """

    problem: TabularProblem
    config: KLConfig | None
    beta: float
    samples: int = 8
    seeds: int = 16
    optimizer: str = "adam"
    lr: float = 0.1
    baseline: str = "rloo"
    lag: int = 0
    clip: float | None = None
    seed: int = 0
    collapse_reward: float = COLLAPSE_REWARD

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose one of: {', '.join(BASELINES)}")
        if self.samples < 1 or self.seeds < 1 or self.lag < 0:
            raise ValueError("need --samples >= 1, --seeds >= 1 and --lag >= 0")
        if self.clip is not None and not 0 <= self.clip < 1:
            raise ValueError(f"--clip (PPO epsilon) must lie in [0, 1), got {self.clip}")
        self.beta = float(self.beta)

    def _sample(self, mu_probs: Tensor, gen: torch.Generator, S: int) -> tuple[Tensor, Tensor]:
        """(tokens (S*N, T), global rows (S*N, T)) sampled from mu_probs (S*P, V)."""
        pb, N = self.problem, self.samples
        base = (torch.arange(S) * pb.n_rows).repeat_interleave(N)  # (S*N,)
        prefix = torch.zeros(S * N, dtype=torch.long)
        tokens = torch.empty(S * N, pb.T, dtype=torch.long)
        rows = torch.empty(S * N, pb.T, dtype=torch.long)
        u = torch.rand(S * N, pb.T, generator=gen, dtype=DTYPE)  # (S*N, T)
        for t in range(pb.T):
            r = base + pb.offsets[t] + prefix
            cdf = mu_probs[r].cumsum(-1)  # (S*N, V)
            y = (u[:, t : t + 1] > cdf).sum(-1).clamp_(max=pb.V - 1)  # inverse CDF
            tokens[:, t], rows[:, t] = y, r
            prefix = prefix * pb.V + y
        return tokens, rows

    def directions(self, logits: Tensor, behaviour: Tensor, gen: torch.Generator) -> Tensor:
        """(S, P, V) one step's ascent direction per seed: the mean over N samples from ``behaviour`` (S, P, V) of
        the per-sample direction at the policy's ``logits`` (S, P, V)."""
        pb, S, N = self.problem, logits.shape[0], self.samples
        logp_rows = torch.log_softmax(logits.reshape(S * pb.n_rows, pb.V), -1)  # (S*P, V)
        lmu_rows = torch.log_softmax(behaviour.reshape(S * pb.n_rows, pb.V), -1)  # (S*P, V)
        tokens, rows = self._sample(lmu_rows.exp(), gen, S)  # (S*N, T)
        seq = (tokens * (pb.V ** torch.arange(pb.T - 1, -1, -1))).sum(-1)  # (S*N,) base-V index
        adv = baseline_advantage(pb.reward[seq].view(S, N), self.baseline).reshape(-1)  # (S*N,)
        lq_rows = pb.lq_rows.repeat(S, 1)  # (S*P, V)
        tok, full = sample_coefficients(
            self.config, self.beta, tokens, logp_rows[rows], lmu_rows[rows], lq_rows[rows], adv, self.clip
        )
        weights = torch.full_like(tok, 1.0 / N)  # (S*N, T)
        return logit_grad(weights, tok, full, tokens, rows, logp_rows.exp()).view(S, pb.n_rows, pb.V)

    def run(self, start: Tensor, steps: int = 500) -> TrainRun:
        """Train every seed from stacked logits ``start`` (P, V) for ``steps`` steps."""
        pb, S, N, beta = self.problem, self.seeds, self.samples, self.beta
        logits = start.to(DTYPE).unsqueeze(0).repeat(S, 1, 1).contiguous()  # (S, P, V)
        gen = torch.Generator().manual_seed(self.seed)
        history: deque[Tensor] = deque(maxlen=self.lag + 1)
        m, v = torch.zeros_like(logits), torch.zeros_like(logits)  # Adam's moments
        b1, b2, eps = 0.9, 0.999, 1e-8
        limit = min(collapse_threshold(pb.reward, beta), 600.0 / pb.T)
        alive = torch.ones(S, dtype=torch.bool)
        collapsed = torch.zeros(S, dtype=torch.bool)
        first_collapse = torch.full((S,), -1, dtype=torch.long)
        when = _record_steps(steps, 60)
        trajectory: list[dict[str, float]] = []

        def observe(step: int) -> None:
            lp = pb.seq_log_probs(logits)  # (S, N_seq)
            p = lp.exp()
            rew = p @ pb.reward  # (S,)
            low = rew < self.collapse_reward
            first_collapse[low & ~collapsed] = step
            collapsed.logical_or_(low)
            if step in when:
                trajectory.append(
                    {
                        "step": step,
                        "reward": float(rew.mean()),
                        "reverse_kl": float((p * (lp - pb.lq_seq)).sum(-1).mean()),
                        "entropy": float(entropy(p).mean()),
                        "collapse_fraction": float(collapsed.double().mean()),
                        "diverged_fraction": float((~alive).double().mean()),
                    }
                )

        observe(0)
        for step in range(1, steps + 1):
            history.append(logits.clone())
            # the behaviour policy: the policy `lag` steps ago (the oldest kept; the start while fewer are kept)
            g = self.directions(logits, history[0], gen)  # (S, P, V)
            if self.optimizer == "sgd":
                update = self.lr * g
            else:
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                update = self.lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
            update[~alive] = 0.0
            new = logits + update
            ratio = (torch.log_softmax(new, -1) - pb.lq_rows).abs().amax((-1, -2))  # (S,)
            bad = ~torch.isfinite(ratio) | (ratio > limit)
            alive &= ~bad
            logits = torch.where(alive[:, None, None], new, logits)
            observe(step)
        lp = pb.seq_log_probs(logits)
        p = lp.exp()  # (S, N_seq)
        rew = p @ pb.reward
        k = int(collapsed.sum())
        lo, hi = clopper_pearson(k, S)
        mean_p = p.mean(0)
        final = pb.metrics(mean_p.log(), beta)  # metrics of the seed-averaged distribution
        final.update(reward_mean_over_seeds=float(rew.mean()), entropy_mean_over_seeds=float(entropy(p).mean()))
        final["collapse_fraction"] = k / S
        diverged = int((~alive).sum())
        settings = ("optimizer", "lr", "baseline", "lag", "clip", "seed", "collapse_reward")
        mc = {
            "samples": N,
            "seeds": S,
            **{name: getattr(self, name) for name in settings},
            "collapsed": k,
            "collapse_fraction": k / S,
            "collapse_ci95": [lo, hi],
            "diverged": diverged,
            "first_collapse_step": first_collapse.tolist(),
            "final_reward_per_seed": rew.tolist(),
        }
        verdict = (
            f"collapses in {k}/{S} seeds ({k / S:.2f}, 95% CI [{lo:.2f}, {hi:.2f}]); "
            f"diverged {diverged}/{S}; mean final reward {float(rew.mean()):.3g}"
        )
        return _run(self.config, beta, "mc", steps, "mc", verdict, final, mean_p, trajectory, "", mc)


# ============================================================================ one entry point


@dataclass
class TrainSetup:
    """A problem to train on: the start policy, the reference and the reward."""

    policy: AutoregressiveModel
    ref: AutoregressiveModel
    reward: Tensor

    @property
    def tabular(self) -> bool:
        return isinstance(self.policy, TabularAR) and isinstance(self.ref, TabularAR)


def train(
    setup: TrainSetup, configs: list[KLConfig | None], betas: list[float], mode: str = "exact",
    steps: int | None = None, tol: float = DEFAULT_TOL, precondition: bool = True, lr: float | None = None,
    record: bool = True, **mc_options: object,
) -> TrainResult:
    """Train every configuration at every beta (``mc_options``: ``MonteCarloTrainer`` arguments).

    ``TrainResult.targets`` maps each beta (as a string) to the closed-form end points (``final_seq_probs`` layout)
    with their reward, KLs and entropy.
    """
    if mode not in ("exact", "mc"):
        raise ValueError(f"unknown mode {mode!r}; choose exact or mc")
    if any(not (b > 0 and math.isfinite(b)) for b in betas):
        raise ValueError(f"every beta must be positive and finite, got {betas}")
    runs: list[TrainRun] = []
    problem = TabularProblem(setup.ref, setup.reward) if setup.tabular else None
    if mode == "mc" and problem is None:
        raise ModelError("--mode mc trains tabular models only (use --model tabular or --logits)")
    start = None if problem is None else problem.stack([lvl.detach() for lvl in setup.policy.levels])
    for beta in betas:
        for config in configs:
            if problem is None:
                policy = copy.deepcopy(setup.policy).requires_grad_(True)
                run = neural_flow(policy, setup.ref, setup.reward, config, beta, 2000 if steps is None else steps,
                                  0.5 if lr is None else lr, tol)
            elif mode == "exact":
                flow = ExactFlow(problem, config, beta, precondition=precondition, lr=lr)
                run = flow.run(start, steps=DEFAULT_EXACT_STEPS if steps is None else steps, tol=tol, record=record)
            else:
                trainer = MonteCarloTrainer(problem, config, beta, lr=0.1 if lr is None else lr, **mc_options)  # type: ignore[arg-type]
                run = trainer.run(start, steps=500 if steps is None else steps)
            runs.append(run)
    q_cond = cond_tables(setup.ref)
    q_seq = sequence_probs(q_cond)  # (V**T,)

    def stats(p: Tensor) -> dict[str, object]:
        return {"seq_probs": p.tolist(), "reward": float(p @ setup.reward), "reverse_kl": float(kl(p, q_seq)),
                "forward_kl": float(kl(q_seq, p)), "entropy": float(entropy(p))}

    tg = {str(b): {name: stats(p) for name, p in targets(q_cond, setup.reward, b).items()} for b in betas}
    return TrainResult(runs, tg)


@dataclass
class TrainResult:
    """Every run and the closed-form targets per beta."""

    runs: list[TrainRun]
    targets: dict[str, object]

    def as_dict(self, with_trajectory: bool = True) -> dict[str, object]:
        """JSON-ready: ``{"runs": [...], "targets": {beta: {name: {...}}}}``."""
        return {"runs": [r.as_dict(with_trajectory) for r in self.runs], "targets": self.targets}


__all__ = [
    "NO_KL",
    "parse_config",
    "parse_configs",
    "config_name",
    "parse_reward",
    "cond_tables",
    "TabularProblem",
    "logit_grad",
    "policy_gradient_recipe",
    "sample_coefficients",
    "expected_update",
    "ExactFlow",
    "neural_flow",
    "MonteCarloTrainer",
    "baseline_advantage",
    "clopper_pearson",
    "TrainRun",
    "TrainSetup",
    "TrainResult",
    "train",
]

"""The statistics pass on a real causal LM: sample, score, differentiate every configuration, merge, test.

For y ~ pi_theta (the LoRA-adapted model) and each ``KLConfig`` c, the per-sample gradient g_c(y) of the
surrogate (``placements``) estimates grad KL(pi_theta || pi_ref) (reverse, sequence level). The reference gradient
r is the mean of the unbiased Rao-Blackwellized configuration ``rb`` in reward + loss with reward-to-go
(``montecarlo.REFERENCE_CONFIG``) on the same samples. Because both are computed on the same y, the bias of c is
tested on the paired differences d(y) = g_c(y) - g_ref(y), whose mean is unbiased for E[g_c] - grad KL whatever r
is; ``stats.bias_test`` runs on d shifted by r (so its relative numbers are relative to ||r||).

Directions reported by cosine: reverse (r); forward f = grad KL(pi_ref || pi) = -E_{y~pi_ref} grad log pi(y)
(samples of the reference); token-level forward with the prefix law held fixed, f_tok =
-E_{y~pi} sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t) (what k3 in the loss follows).

Padding: a response ends at its EOS token; positions after it are padded. At padded positions the policy's
log-probabilities are replaced by the reference's (``masked_logp``): every registered estimator is then exactly 0
there (delta = 0, and rb reads KL(p || p) = 0), sequence sums are unchanged, and the coefficients on padded
positions are multiplied by 0 (they are constants of theta), so padding contributes nothing to any g(y).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .. import __version__
from ..estimators import get_estimator
from ..montecarlo import REFERENCE_CONFIG
from ..placements import Coefficients, KLConfig, Level, TokenBatch, make_config, surrogate_coefficients
from ..stats import BiasTest, Moments, bias_test
from . import distributed as D
from .grads import PerSampleGrads, logit_cotangent, make_sketch, select_params
from .models import TINY_MODELS, LLMError, load_model
from .policy import DEFAULT_TARGETS, attach_lora, perturb_lora, reference_mode, train_lora
from .sample import (
    DEFAULT_PROMPTS,
    Generation,
    encode_prompts,
    generate,
    random_prompts,
    read_prompts,
    score_logits,
)

DEFAULT_CONFIGS = (
    "k1:reward",
    "k1:loss",
    "k2:loss",
    "k3:reward",
    "k3:loss",
    "k3:both",
    "k1:loss:sequence",
    "k3:loss:sequence",
)
VALUE_ESTIMATORS = ("k1", "k2", "k3")
REFERENCE_KEY = "reference"


def parse_config(text: str) -> KLConfig:
    """``estimator:placement[:level[:credit]]``, e.g. ``k3:loss`` or ``k1:reward:token:full`` (defaults token, rtg)."""
    parts = [p.strip() for p in text.split(":")]
    if not 2 <= len(parts) <= 4 or not all(parts):
        raise LLMError(f"--configs entry {text!r}: expected estimator:placement[:level[:credit]], e.g. k3:loss")
    est, placement = parts[0], parts[1]
    level = parts[2] if len(parts) > 2 else "token"
    credit = parts[3] if len(parts) > 3 else "rtg"
    return make_config(est, placement, level, credit)


def config_key(cfg: KLConfig) -> str:
    credit = f":{cfg.credit.value}" if cfg.credit is not None else ""
    return f"{cfg.estimator.name}:{cfg.placement.value}:{cfg.level.value}{credit}"


@dataclass
class LLMOptions:
    """Everything one statistics pass depends on (recorded in the JSON output)."""

    model: str = "tiny-random"
    prompts: str | None = None
    samples: int = 64
    max_new_tokens: int = 8
    params: str = "lora"
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    device: str = "cpu"
    dtype: str = "float32"  # compute: float32, or bfloat16 autocast
    weights_dtype: str = "float32"
    seed: int = 0
    batch_size: int = 8
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    perturb: float | None = None  # None: 0.3 on the tiny random models, 0.05 on real ones (KL ~ 0.2-0.5)
    train_steps: int = 0
    train_lr: float = 1e-2
    projections: int = 128
    max_dense: int = 1024
    alpha: float = 0.05
    test_projections: int = 3  # Hotelling test directions: reverse, forward, token-level forward (+ random beyond 3)
    vocab_size: int = 16  # tiny random models only
    prompt_length: int = 4  # tiny random models only
    n_random_prompts: int = 4  # tiny random models only
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for text in self.configs:
            parse_config(text)  # unknown names fail here, before any model is loaded
        if not self.configs:
            raise LLMError("--configs is empty; give at least one estimator:placement")
        if self.samples < 3:
            raise LLMError(f"--samples must be >= 3 (a bias test needs 3 samples), got {self.samples}")
        if self.batch_size < 1:
            raise LLMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.alpha < 1:
            raise LLMError(f"--alpha must lie in (0, 1), got {self.alpha}")
        from ..stats import FULL_COV_MAX

        if self.max_dense > FULL_COV_MAX and self.max_dense < 10**9:
            raise LLMError(f"--max-dense above {FULL_COV_MAX} keeps no covariance; project (--projections) instead")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise LLMError(f"--dtype {self.dtype!r}: choose float32 or bfloat16")


# ---------------------------------------------------------------------------------------------- masking


def masked_logp(logp_full: Tensor, logp_ref_full: Tensor, mask: Tensor) -> Tensor:
    """(B, L, V) policy log-probs on response positions and the reference's (fixed) on padding."""
    return torch.where(mask.bool().unsqueeze(-1), logp_full, logp_ref_full)


def masked_coefficients(cfg: KLConfig, tokens: Tensor, logp_m: Tensor, logp_ref_full: Tensor, mask: Tensor):
    """dS/dlogp of ``cfg`` on masked log-probs, with padded positions zeroed (they do not depend on theta).

    Refuses an estimator that is not exactly 0 at delta = 0: padding would then change the sample's value.
    """
    if cfg.level is Level.TOKEN and not bool(mask.all()):
        with torch.no_grad():
            k = cfg.token_values(TokenBatch(tokens, logp_m, logp_ref_full))  # (B, L)
        if bool((k[~mask.bool()] != 0).any()):
            raise LLMError(
                f"estimator {cfg.estimator.name!r} is not 0 when logp == logp_ref, so padded positions would "
                "change its value; use fixed-length responses (no EOS) for it"
            )
    coef = surrogate_coefficients(cfg, tokens, logp_m, logp_ref_full)
    full = None if coef.full is None else coef.full * mask.unsqueeze(-1)
    return Coefficients(coef.tok * mask, full)


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    loaded: object
    prompts: list[list[int]]
    psg: PerSampleGrads
    configs: dict[str, KLConfig]
    train_history: list[float]


def build(opts: LLMOptions, device: str) -> Setup:
    """Load the model, attach and set the LoRA adapter (the policy), choose parameters and configurations."""
    configs = {config_key(c): c for c in (parse_config(t) for t in opts.configs)}
    loaded = load_model(opts.model, device=device, dtype=opts.weights_dtype, seed=opts.seed,
                        vocab_size=opts.vocab_size, progress=opts.progress)
    model = loaded.model
    if opts.prompts is not None:
        if loaded.tokenizer is None:
            raise LLMError(f"--prompts needs a model with a tokenizer; {opts.model} has none (it uses random ids)")
        prompts = encode_prompts(loaded.tokenizer, read_prompts(opts.prompts))
    elif loaded.tokenizer is not None:
        prompts = encode_prompts(loaded.tokenizer, DEFAULT_PROMPTS)
    else:
        avoid = [loaded.eos_token_id] if loaded.eos_token_id is not None else []
        prompts = random_prompts(opts.n_random_prompts, opts.prompt_length, loaded.vocab_size, opts.seed, avoid)
    attach_lora(model, opts.lora_targets, opts.lora_rank, alpha=float(opts.lora_rank))
    perturb_lora(model, default_perturb(opts), opts.seed)
    history: list[float] = []
    if opts.train_steps > 0:
        history = train_lora(model, prompts, steps=opts.train_steps, lr=opts.train_lr, batch=opts.batch_size,
                             max_new_tokens=opts.max_new_tokens, seed=opts.seed, eos=_eos(loaded, opts),
                             pad=loaded.pad_token_id, vocab_size=loaded.vocab_size)
    subset = select_params(model, opts.params)
    sketch = make_sketch(subset, opts.max_dense, opts.projections, opts.seed)
    return Setup(loaded, prompts, PerSampleGrads(model, subset, sketch), configs, history)


def default_perturb(opts: LLMOptions) -> float:
    """The LoRA perturbation scale sigma: the user's, else 0.3 for the tiny random models and 0.05 for real ones
    (SmolLM2-135M, rank 4 on q/v: sequence KL about 0.2 nats per 16 tokens; 0.3 there gives about 8 nats)."""
    if opts.perturb is not None:
        return float(opts.perturb)
    return 0.3 if opts.model in TINY_MODELS else 0.05


def _eos(loaded, opts: LLMOptions) -> int | None:
    # tiny random models generate fixed-length responses: no EOS, every position is a response token
    return None if opts.model in TINY_MODELS else loaded.eos_token_id


# ---------------------------------------------------------------------------------------------- one chunk


def sample_grads(setup: Setup, gen: Generation, dtype: str = "float32") -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients on given responses y (scored, not sampled here): {"reference": g_ref, config key: g_c,
    "forward_kl_token": f_tok(y)} each (B, dim) float64, and the (B, 8) value rows (``value_rows``)."""
    psg, model = setup.psg, setup.loaded.model
    with torch.no_grad(), reference_mode(model):
        logp_ref_full = torch.log_softmax(score_logits(model, gen, dtype), -1)  # (B, L, V)
    with psg.recording():
        logits = score_logits(model, gen, dtype)  # (B, L, V) with the graph to the parameters
    tokens, mask = gen.completion, gen.mask.to(logits.dtype)  # (B, L)
    logp_ref_full = logp_ref_full.to(logits.dtype)
    logp_m = masked_logp(torch.log_softmax(logits.detach(), -1), logp_ref_full, mask)  # (B, L, V)

    def grads_of(coef: Coefficients) -> Tensor:
        return psg.grads(logits, logit_cotangent(coef, tokens, logits, mask))  # (B, dim)

    out = {REFERENCE_KEY: grads_of(masked_coefficients(make_config(*REFERENCE_CONFIG), tokens, logp_m,
                                                       logp_ref_full, mask))}
    for key, cfg in setup.configs.items():
        out[key] = grads_of(masked_coefficients(cfg, tokens, logp_m, logp_ref_full, mask))
    fwd_tok = Coefficients(torch.zeros_like(mask), -logp_ref_full.exp() * mask.unsqueeze(-1))
    out["forward_kl_token"] = grads_of(fwd_tok)
    return out, value_rows(tokens, logp_m, logp_ref_full, mask)


def forward_grads(setup: Setup, gen: Generation, dtype: str = "float32") -> Tensor:
    """(B, dim) -grad log pi(y) for given responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    psg = setup.psg
    with psg.recording():
        logits = score_logits(setup.loaded.model, gen, dtype)  # (B, L, V)
    mask = gen.mask.to(logits.dtype)
    coef = Coefficients(-torch.ones_like(mask), None)
    return psg.grads(logits, logit_cotangent(coef, gen.completion, logits, mask))


def _generate(setup: Setup, opts: LLMOptions, start: int, stop: int, stream: int) -> Generation:
    idx = list(range(start, stop))
    prompts = [setup.prompts[i % len(setup.prompts)] for i in idx]
    loaded = setup.loaded
    return generate(loaded.model, prompts, opts.max_new_tokens, sample_seeds=[(opts.seed, stream, i) for i in idx],
                    eos=_eos(loaded, opts), pad=loaded.pad_token_id, dtype=opts.dtype)


def policy_chunk(setup: Setup, opts: LLMOptions, start: int, stop: int) -> dict[str, Moments]:
    """Moments of this chunk's samples y ~ pi: each configuration's g and g - g_ref, the reference, the token-level
    forward direction, and the value statistics."""
    grads, values = sample_grads(setup, _generate(setup, opts, start, stop, 1), opts.dtype)
    g_ref = grads[REFERENCE_KEY]
    out = {k: Moments.from_samples(grads[k]) for k in (REFERENCE_KEY, "forward_kl_token")}
    for key in setup.configs:
        out[f"raw|{key}"] = Moments.from_samples(grads[key])
        out[f"diff|{key}"] = Moments.from_samples(grads[key] - g_ref)
    out["values"] = Moments.from_samples(values)
    return out


def reference_chunk(setup: Setup, opts: LLMOptions, start: int, stop: int) -> dict[str, Moments]:
    """Moments of -grad log pi(y) for y ~ pi_ref: samples of the forward direction grad KL(pi_ref || pi)."""
    with reference_mode(setup.loaded.model):
        gen = _generate(setup, opts, start, stop, 2)
    return {"forward_kl": Moments.from_samples(forward_grads(setup, gen, opts.dtype))}


def value_rows(tokens: Tensor, logp_m: Tensor, logp_ref_full: Tensor, mask: Tensor) -> Tensor:
    """(B, 8) per sample: sum_t rb_t (the exact per-token KLs summed), sum_t k_t for k1, k2, k3, sum_t (k_t - rb_t)^2
    for k1, k2, k3, and the number of response tokens. rb_t = KL(pi(.|y_<t) || pi_ref(.|y_<t)), exact."""
    with torch.no_grad():
        lp = logp_m.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, L)
        lr = logp_ref_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, L)
        rb = get_estimator("rb")(logp_m, logp_ref_full)  # (B, L), 0 on padding
        ks = [get_estimator(name)(lp, lr) for name in VALUE_ESTIMATORS]  # 3 x (B, L)
        cols = [rb.sum(1)] + [k.sum(1) for k in ks] + [((k - rb) ** 2).sum(1) for k in ks] + [mask.sum(1)]
    return torch.stack(cols, 1).to(torch.float64)  # (B, 8)


# ---------------------------------------------------------------------------------------------- the pass


def collect(opts: LLMOptions) -> tuple[dict[str, Moments], Setup, dict]:
    """Run (this rank's share of) the pass and merge every chunk's moments across ranks in chunk order."""
    import time

    from tqdm.auto import tqdm

    opts.validate()
    rank, size, device = D.init_from_env(opts.device)
    torch.manual_seed(opts.seed)
    setup = build(opts, device)
    chunks = D.my_chunks(opts.samples, opts.batch_size, rank, size)
    local: dict[int, dict[str, Moments]] = {}
    show = opts.progress and rank == 0
    t0 = time.perf_counter()
    with tqdm(total=2 * sum(b - a for _, a, b in chunks), desc="llm: sample+score+grads", disable=not show) as bar:
        for j, a, b in chunks:
            local[j] = policy_chunk(setup, opts, a, b)
            bar.update(b - a)
            local[j].update(reference_chunk(setup, opts, a, b))
            bar.update(b - a)
    merged = D.merge_chunks(local)
    timing = {"seconds_rank0": time.perf_counter() - t0, "world_size": size, "device": str(device)}
    return merged, setup, timing


def test_directions(reference: Tensor, others: list[Tensor], k: int, seed: int) -> Tensor:
    """(k', P) orthonormal rows spanning the reference, the named directions ``others`` (forward, token-level
    forward) and seeded random Gaussian directions up to k in all (fewer when P < k)."""
    P = reference.shape[0]
    k = min(k, P)
    g = torch.Generator().manual_seed(seed)
    cols = [reference.to(torch.float64)] + [d.to(torch.float64) for d in others]
    cols = [c for c in cols if float(c.norm()) > 0][:k]
    extra = torch.randn(P, k - len(cols), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([torch.stack(cols, 1), extra], 1))  # (P, k), first column along r
    return q.T.contiguous()


def subspace_bias_test(
    m: Moments, reference: Tensor, others: list[Tensor], k: int, alpha: float, seed: int
) -> BiasTest:
    """``stats.bias_test`` (Hotelling) of H0: E[g] = reference on the projections onto ``test_directions``.

    Random projections alone miss a bias that lives in few directions; including the directions a bias is
    expected toward (forward KL, token-level forward KL) keeps the power, and the test stays valid because the
    directions are fixed before the configuration's mean is looked at. The reference is the first direction, so
    the relative bias along it and its CI are those of the full space. Falls back to the full-space
    ``bias_test`` when the moments keep no comoment."""
    if m.comoment is None or m.dim <= k:
        return bias_test(m, reference, alpha=alpha, seed=seed, n_projections=min(k, m.dim))
    q = test_directions(reference, others, k, seed)
    return bias_test(m.project(q), q @ reference.to(torch.float64), alpha=alpha, seed=seed, n_projections=q.shape[0])


def directional_ci(m: Moments, reference: Tensor, direction: Tensor, alpha: float) -> tuple[float, float, float]:
    """(b_u, low, high): the bias component b . u = (E[g] - r) . u along the unit vector u of ``direction``, with
    its normal (1 - alpha) confidence interval b_u +- z sqrt(u^T S u / n) (S the per-sample covariance)."""
    from scipy import stats

    u = direction.to(torch.float64) / direction.norm().clamp_min(1e-300)
    mu = m.project(u.unsqueeze(0))  # 1-D moments of g . u
    b_u = float(mu.mean[0] - reference.to(torch.float64) @ u)
    half = float(stats.norm.ppf(1 - alpha / 2)) * float(mu.se[0])
    return b_u, b_u - half, b_u + half


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def summarize(merged: dict[str, Moments], setup: Setup, opts: LLMOptions, timing: dict) -> dict:
    """The JSON-ready report: per configuration the bias test, variance and cosines; the sequence KL; values."""
    ref = merged[REFERENCE_KEY]
    r, f, f_tok = ref.mean, merged["forward_kl"].mean, merged["forward_kl_token"].mean
    rows = []
    r_norm = max(float(r.norm()), 1e-300)
    for key, cfg in setup.configs.items():
        raw, diff = merged[f"raw|{key}"], merged[f"diff|{key}"]
        shifted = Moments(diff.n, diff.mean + r, diff.m2, diff.comoment)  # d + r: mean E[g_c] - E[g_ref] + r
        test = subspace_bias_test(shifted, r, [f, f_tok], opts.test_projections, opts.alpha, opts.seed)
        toward, toward_lo, toward_hi = directional_ci(shifted, r, f_tok - r, opts.alpha)
        rows.append({
            "config": key,
            "label": cfg.label,
            "n": raw.n,
            "rel_bias": float((raw.mean - r).norm()) / max(float(r.norm()), 1e-300),
            "rel_bias_along_reference": float(test.along),
            "ci_low": float(test.ci_low),
            "ci_high": float(test.ci_high),
            "p_value": test.p_value,
            "biased": test.biased,
            "detectable_rel_bias": test.detectable_rel_bias,
            "variance": raw.var_trace,
            "rel_variance": raw.var_trace / max(float(r @ r), 1e-300),
            "rel_bias_toward_forward_token": toward / r_norm,
            "toward_ci_low": toward_lo / r_norm,
            "toward_ci_high": toward_hi / r_norm,
            "cos_reverse": _cos(raw.mean, r),
            "cos_forward": _cos(raw.mean, f),
            "cos_forward_token": _cos(raw.mean, f_tok),
            "test_method": f"paired {test.method} on reverse, forward, forward-token + random directions",
        })
    v = merged["values"]
    cov = v.cov if v.comoment is not None else None
    n = v.n
    total_tokens = float(v.mean[7]) * n
    values = {}
    for i, name in enumerate(VALUE_ESTIMATORS):
        j = 1 + i
        var_diff = float(cov[j, j] + cov[0, 0] - 2 * cov[0, j]) if cov is not None else math.nan
        values[name] = {
            "mean_sequence_value": float(v.mean[j]),
            "se": float(v.se[j]),
            "bias_vs_exact": float(v.mean[j] - v.mean[0]),
            "bias_se": math.sqrt(max(var_diff, 0.0) / n),
            "token_rmse_vs_exact": math.sqrt(float(v.mean[4 + i]) * n / max(total_tokens, 1.0)),
            "sequence_std": math.sqrt(float(v.var[j])),
        }
    loaded = setup.loaded
    return {
        "biaslab_version": __version__,
        "options": {
            **{k: (list(x) if isinstance(x, tuple) else x) for k, x in asdict(opts).items() if k != "extra"},
            "perturb": default_perturb(opts),
        },
        "model": {"name": loaded.name, "vocab_size": loaded.vocab_size, **loaded.info},
        "parameters": {
            "spec": opts.params,
            "count": setup.psg.subset.numel,
            "tensors": len(setup.psg.subset.names),
            "per_sample_method": setup.psg.subset.method,
            "projected_dim": setup.psg.dim if setup.psg.sketch is not None else None,
        },
        "sequence_kl": {"mean": float(v.mean[0]), "se": float(v.se[0]),
                        "direction": "KL(pi_theta || pi_ref), sum of exact per-token KLs over y ~ pi_theta"},
        "mean_response_tokens": float(v.mean[7]),
        "reference": {
            "config": config_key(make_config(*REFERENCE_CONFIG)),
            "norm": float(r.norm()),
            "rel_se": math.sqrt(ref.var_trace / ref.n) / max(float(r.norm()), 1e-300),
            "cos_forward": _cos(r, f),
            "cos_forward_token": _cos(r, f_tok),
        },
        "train_rewards": setup.train_history,
        "configs": rows,
        "values": values,
        "timing": timing,
    }


def run_llm(opts: LLMOptions) -> dict | None:
    """The whole pass; returns the report on rank 0 (None on the other ranks)."""
    merged, setup, timing = collect(opts)
    rank, _ = D.world()
    return summarize(merged, setup, opts, timing) if rank == 0 else None


__all__ = ["DEFAULT_CONFIGS", "LLMOptions", "collect", "masked_coefficients", "masked_logp", "parse_config",
           "run_llm", "sample_grads", "forward_grads", "summarize", "value_rows"]

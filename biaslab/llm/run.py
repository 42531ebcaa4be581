"""The statistics pass on a real causal LM: sample, score, differentiate every configuration, gather, test.

For y ~ pi_theta (the LoRA-adapted model) and each ``KLConfig`` c, the per-sample gradient g_c(y) of the
surrogate (``placements``) estimates grad KL(pi_theta || pi_ref) (reverse, sequence level). The pass draws three
independent sets of responses (separate random streams):

* main (``--samples`` n, y ~ pi_theta): g_c(y) for every configuration, the unbiased Rao-Blackwellized reference
  g_ref(y) (``rb`` in reward + loss, reward-to-go: the exact next-token KLs from full logits) on the same y, the
  token-level forward direction and the value statistics;
* directions (``--direction-samples``, y ~ pi_theta): an independent estimate of grad KL(pi || pi_ref) and of the
  token-level forward KL direction f_tok = -E_{y~pi} sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t) (what k3 in
  the loss follows);
* forward (as many, y ~ pi_ref): -grad log pi(y), samples of grad KL(pi_ref || pi) (forward KL).

The bias of c is tested on the paired differences g_c(y) - g_ref(y) projected on directions fixed by the other two
sets, so tests and intervals carry no selection effect and include the reference's own noise
(``calibration.analyze``: Hotelling, Holm over configurations, Fieller ratio intervals, bootstrap of |b|).

Numerics: the trunk may run under bf16 autocast, but the head, log_softmax, every KL and cotangent run in float32
(float64 with float64 weights) and the LoRA delta in float32 (``sample.head_logits``, ``policy.LoRALinear``); the
report's ``numeric_floor`` is the sequence-KL error the chosen dtype causes, measured on a subsample.

Padding: a response ends at its EOS token; positions after it are padded. At padded positions the policy's
log-probabilities are replaced by the reference's: every registered estimator is then exactly 0 there, sequence
sums are unchanged, and the coefficients on padded positions are multiplied by 0, so padding contributes nothing.

Memory: per-token quantities are computed in slices of positions; besides the graph, about three (B, L, V)
float32 tensors are alive at once (policy logits, reference log-probs, one cotangent). Per-sample gradients are
kept as (n, P) rows (P = projected dimension), so statistics are exact and identical whatever the process count.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .. import __version__
from ..estimators import get_estimator
from ..placements import Coefficients, KLConfig, make_config, surrogate_coefficients
from . import distributed as D
from .calibration import MIN_CALIBRATED_SAMPLES, Directions, analyze
from .grads import PerSampleGrads, logit_cotangent, make_sketch, select_params
from .models import TINY_MODELS, LLMError, load_model
from .policy import (
    DEFAULT_TARGETS,
    attach_lora,
    broadcast_lora,
    perturb_lora,
    reference_mode,
    scale_lora,
    train_lora,
)
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
REFERENCE_CONFIG = ("rb", "both", "token", "rtg")
FORWARD_TOKEN_KEY = "forward_kl_token"
POSITION_SLICE = 16  # positions per slice of the per-token computations
FLOOR_SAMPLES = 8
FLOOR_WARN = 0.05  # warn when the numeric floor exceeds this fraction of the sequence KL


@dataclass(frozen=True)
class LLMConfig:
    """One configuration of the pass: its key ``estimator:placement:level[:credit]``, the estimator's name and level
    (for the padding check), and the configuration object of ``placements.make_config`` (``recipe``)."""

    key: str
    estimator: str
    level: str
    recipe: KLConfig

    @property
    def label(self) -> str:
        return self.recipe.label

    @property
    def needs_full_logits(self) -> bool:
        return get_estimator(self.estimator).needs_full_logits


def parse_config(text: str) -> LLMConfig:
    """``estimator:placement[:level[:credit]]``, e.g. ``k3:loss`` or ``k1:reward:token:full`` (defaults token, rtg)."""
    parts = [p.strip() for p in text.split(":")]
    if not 2 <= len(parts) <= 4 or not all(parts):
        raise LLMError(f"--configs entry {text!r}: expected estimator:placement[:level[:credit]], e.g. k3:loss")
    est, placement = parts[0], parts[1]
    level = parts[2] if len(parts) > 2 else "token"
    credit = parts[3] if len(parts) > 3 else "rtg"
    recipe = make_config(est, placement, level, credit)
    key = f"{est}:{placement}:{level}" + ("" if placement == "loss" else f":{credit}")
    return LLMConfig(key, est, level, recipe)


def config_key(cfg: LLMConfig) -> str:
    return cfg.key


@dataclass
class LLMOptions:
    """Everything one statistics pass depends on (recorded in the JSON output)."""

    model: str = "tiny-random"
    reference: str | None = None  # a second checkpoint as pi_ref; then ``model`` is pi_theta and no LoRA is set
    prompts: str | None = None
    samples: int = MIN_CALIBRATED_SAMPLES
    direction_samples: int | None = None  # None: samples // 2 (at least 16)
    max_new_tokens: int | None = None  # None: 16 on the tiny random models, 64 on real ones (room for EOS)
    params: str = "auto"
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    device: str = "cpu"
    dtype: str = "float32"  # compute: float32, float64 (weights too), or bfloat16 autocast of the trunk
    weights_dtype: str = "float32"
    seed: int = 0
    batch_size: int = 8
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    perturb: float | None = None  # None: 0.06 on the tiny random models, 0.05 on real ones (KL ~ 0.5 nats)
    target_kl: float | None = None  # rescale the perturbation to this sequence KL(pi || pi_ref), in nats
    train_steps: int = 0
    train_lr: float = 1e-2
    projections: int = 128
    max_dense: int = 1024
    alpha: float = 0.05
    bootstrap: int = 1000
    vocab_size: int = 16  # tiny random models only
    prompt_length: int = 4  # tiny random models only
    n_random_prompts: int = 4  # tiny random models only
    eos: bool | None = None  # None: EOS ends responses on real models, not on the tiny random ones
    allow_tf32: bool = False
    numeric_floor: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def n_dir(self) -> int:
        return self.direction_samples if self.direction_samples is not None else max(16, self.samples // 2)

    def resolve(self) -> None:
        """Fill the defaults that depend on the model."""
        if self.max_new_tokens is None:
            self.max_new_tokens = 16 if self.model in TINY_MODELS else 64

    def validate(self) -> None:
        self.resolve()
        if not self.configs:
            raise LLMError("--configs is empty; give at least one estimator:placement")
        for text in self.configs:
            parse_config(text)  # unknown names fail here, before any model is loaded
        if self.samples < 8:
            raise LLMError(f"--samples must be >= 8 (a 4-direction Hotelling test needs more), got {self.samples}")
        if self.n_dir < 2:
            raise LLMError(f"--direction-samples must be >= 2, got {self.n_dir}")
        if self.batch_size < 1:
            raise LLMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.alpha < 1:
            raise LLMError(f"--alpha must lie in (0, 1), got {self.alpha}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise LLMError(f"--dtype {self.dtype!r}: choose float32, float64 or bfloat16")
        if self.target_kl is not None and not self.target_kl > 0:
            raise LLMError(f"--target-kl must be > 0 nats, got {self.target_kl}")
        if self.reference is not None and (self.train_steps or self.target_kl is not None):
            raise LLMError("--reference gives a fixed checkpoint pair: --target-kl and --train-steps need the LoRA")


def _weights_dtype(opts: LLMOptions) -> str:
    return "float64" if opts.dtype == "float64" else opts.weights_dtype


# ---------------------------------------------------------------------------------------------- masking


def masked_logp(logp_full: Tensor, logp_ref_full: Tensor, mask: Tensor) -> Tensor:
    """(B, L, V) policy log-probs on response positions and the reference's (fixed) on padding."""
    return torch.where(mask.bool().unsqueeze(-1), logp_full, logp_ref_full)


def masked_coefficients(cfg: LLMConfig, tokens: Tensor, logp_m: Tensor, logp_ref_full: Tensor, mask: Tensor):
    """dS/dlogp of ``cfg`` on masked (B, L, V) log-probs, padded positions zeroed (they do not depend on theta).

    Refuses an estimator that is not exactly 0 at delta = 0: padding would then change the sample's value.
    """
    _refuse_nonzero_padding(cfg, logp_ref_full, mask)
    coef = surrogate_coefficients(cfg.recipe, tokens, logp_m, logp_ref_full)
    full = None if coef.full is None else coef.full * mask.unsqueeze(-1)
    return Coefficients(coef.tok * mask, full)


def _refuse_nonzero_padding(cfg: LLMConfig, logp_ref: Tensor, mask: Tensor) -> None:
    """Padded positions carry logp == logp_ref; a token-level estimator must be exactly 0 there."""
    if cfg.level == "token" and not bool(mask.all()):
        with torch.no_grad():
            k = get_estimator(cfg.estimator)(logp_ref, logp_ref)  # (B, L) or (B, L) from (B, L, V)
        if bool((k[~mask.bool()] != 0).any()):
            raise LLMError(
                f"estimator {cfg.estimator!r} is not 0 when logp == logp_ref, so padded positions would "
                "change its value; use fixed-length responses (no EOS) for it"
            )


def token_coefficients(cfg: LLMConfig, tokens: Tensor, lp: Tensor, lr: Tensor, mask: Tensor) -> Tensor:
    """(B, L) dS/dlogp on the sampled tokens for an estimator that reads only them (no (B, L, V) tensor):
    ``lp`` the masked policy log-probs of the sampled tokens, ``lr`` the reference's."""
    _refuse_nonzero_padding(cfg, lr, mask)
    dummy, dummy_ref = lp.unsqueeze(-1), lr.unsqueeze(-1)  # (B, L, 1): never read by such estimators
    coef = surrogate_coefficients(cfg.recipe, tokens, dummy, dummy_ref, lp, lr)
    return coef.tok * mask


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    loaded: object
    prompts: list[list[int]]
    psg: PerSampleGrads
    configs: dict[str, LLMConfig]
    train_history: list[float]
    eos: int | None
    policy_info: dict = field(default_factory=dict)
    ref_model: object = None  # a separate pi_ref model (--reference), else None: the LoRA switched off


def _prompts(opts: LLMOptions, loaded) -> list[list[int]]:
    if opts.prompts is not None:
        if loaded.tokenizer is None:
            raise LLMError(f"--prompts needs a model with a tokenizer; {opts.model} has none (it uses random ids)")
        return encode_prompts(loaded.tokenizer, read_prompts(opts.prompts))
    if loaded.tokenizer is not None:
        return encode_prompts(loaded.tokenizer, DEFAULT_PROMPTS)
    avoid = [loaded.eos_token_id] if loaded.eos_token_id is not None else []
    return random_prompts(opts.n_random_prompts, opts.prompt_length, loaded.vocab_size, opts.seed, avoid)


def build(opts: LLMOptions, device: str) -> Setup:
    """Load the model, attach and set the LoRA adapter (the policy), choose parameters and configurations."""
    opts.resolve()
    configs = {config_key(c): c for c in (parse_config(t) for t in opts.configs)}
    wd = _weights_dtype(opts)
    loaded = load_model(opts.model, device=device, dtype=wd, seed=opts.seed, vocab_size=opts.vocab_size,
                        progress=opts.progress)
    model = loaded.model
    prompts = _prompts(opts, loaded)
    use_eos = opts.eos if opts.eos is not None else opts.model not in TINY_MODELS
    eos = loaded.eos_token_id if use_eos else None
    history: list[float] = []
    info: dict = {}
    ref_model = None
    if opts.reference is not None:
        ref = load_model(opts.reference, device=device, dtype=wd, seed=opts.seed, vocab_size=opts.vocab_size,
                         progress=opts.progress)
        if ref.vocab_size != loaded.vocab_size:
            raise LLMError(f"--reference has vocabulary {ref.vocab_size}, --policy {loaded.vocab_size}: not a pair")
        ref_model = ref.model
        if opts.params == "lora":
            raise LLMError("--reference: the policy checkpoint has no LoRA adapter; choose --params last-layer or "
                           "parameter names")
        info["source"] = f"checkpoint pair: policy {opts.model}, reference {opts.reference}"
    else:
        attach_lora(model, opts.lora_targets, opts.lora_rank, alpha=float(opts.lora_rank))
        perturb_lora(model, default_perturb(opts), opts.seed)
        info["perturb"] = default_perturb(opts)
        if opts.train_steps > 0:
            history = train_lora(model, prompts, steps=opts.train_steps, lr=opts.train_lr, batch=opts.batch_size,
                                 max_new_tokens=opts.max_new_tokens, seed=opts.seed, eos=eos,
                                 pad=loaded.pad_token_id, vocab_size=loaded.vocab_size)
            broadcast_lora(model)  # every rank samples rank 0's pi_theta
    subset = select_params(model, opts.params)
    sketch = make_sketch(subset, opts.max_dense, opts.projections, opts.seed)
    setup = Setup(loaded, prompts, PerSampleGrads(model, subset, sketch), configs, history, eos, info, ref_model)
    if opts.target_kl is not None:
        info["target_kl"] = reach_target_kl(setup, opts)
        broadcast_lora(model)  # GPU kernels need not be bitwise reproducible: every rank takes rank 0's scale
    return setup


def default_perturb(opts: LLMOptions) -> float:
    """The LoRA perturbation scale sigma before any --target-kl rescaling: the user's, else 0.06 for the tiny random
    models (sequence KL about 0.5 nats over 16 tokens) and 0.05 for real ones (SmolLM2: about 0.5 nats over ~40)."""
    if opts.perturb is not None:
        return float(opts.perturb)
    return 0.06 if opts.model in TINY_MODELS else 0.05


def reach_target_kl(setup: Setup, opts: LLMOptions, pilot: int = 32, rounds: int = 4) -> dict:
    """Rescale the adapter's B until the pilot estimate of the sequence KL(pi || pi_ref) is within 10% of
    ``opts.target_kl`` (KL ~ scale^2 near pi_ref: each round multiplies B by sqrt(target / estimate)). The pilot
    responses use their own random stream; the run's own KL estimate is reported separately."""
    history = []
    total = 1.0
    for _ in range(rounds):
        gen = _generate(setup, opts, 0, pilot, stream=4)
        kl = float(sequence_kls(setup, gen, opts.dtype).mean())
        history.append(kl)
        if not kl > 0:
            raise LLMError("the perturbation gives a zero KL; raise --perturb")
        if abs(kl / opts.target_kl - 1) < 0.1:
            break
        factor = min(max(math.sqrt(opts.target_kl / kl), 0.1), 10.0)
        scale_lora(setup.loaded.model, factor)
        total *= factor
    return {"target": opts.target_kl, "pilot_kls": history, "pilot_samples": pilot, "scale": total}


# ---------------------------------------------------------------------------------------------- per-token pieces


def _ref_logp_full(setup: Setup, gen: Generation, dtype: str) -> Tensor:
    """(B, L, V) log pi_ref(. | x, y_<t), float32 (or float64), no graph."""
    with torch.no_grad():
        if setup.ref_model is not None:
            logits = score_logits(setup.ref_model, gen, dtype)
        else:
            with reference_mode(setup.loaded.model):
                logits = score_logits(setup.loaded.model, gen, dtype)
        return logits.log_softmax(-1)


def _slices(L: int):
    for a in range(0, L, POSITION_SLICE):
        yield slice(a, min(a + POSITION_SLICE, L))


def token_stats(logits: Tensor, logp_ref_full: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """(lp, lr, kl) each (B, L): masked policy log-prob of the sampled token (the reference's on padding), the
    reference's, and the exact next-token KL(pi(.|y_<t) || pi_ref(.|y_<t)) (0 on padding); computed over slices of
    positions so no extra (B, L, V) tensor is kept."""
    B, L, _ = logits.shape
    lp = logits.new_zeros(B, L)
    kl = logits.new_zeros(B, L)
    with torch.no_grad():
        for s in _slices(L):
            logp = logits[:, s].detach().log_softmax(-1)  # (B, l, V)
            lp[:, s] = logp.gather(-1, tokens[:, s].unsqueeze(-1)).squeeze(-1)
            kl[:, s] = (logp.exp() * (logp - logp_ref_full[:, s])).sum(-1)
    lr = logp_ref_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, L)
    m = mask.bool()
    return torch.where(m, lp, lr), lr, kl * mask


def _token_cotangent(logits: Tensor, tokens: Tensor, tok: Tensor, out: Tensor) -> Tensor:
    """out (B, L, V) <- tok_t (1[v = y_t] - p_tv), the logit cotangent of sum_t tok_t log pi(y_t|y_<t)."""
    for s in _slices(logits.shape[1]):
        torch.mul(logits[:, s].detach().softmax(-1), -tok[:, s].unsqueeze(-1), out=out[:, s])
    return out.scatter_add_(-1, tokens.unsqueeze(-1), tok.unsqueeze(-1))


def _reference_cotangent(logits: Tensor, logp_ref_full: Tensor, tokens: Tensor, kl: Tensor, mask: Tensor,
                         out: Tensor) -> Tensor:
    """Cotangent of rb in reward + loss (reward-to-go): score part c_t (1[v = y_t] - p_v) with c_t = sum_{s>=t} KL_s,
    plus the pathwise gradient of KL_t = sum_v p_v (log p_v - log q_v): p_v (log p_v - log q_v - KL_t)."""
    rtg = kl.flip(-1).cumsum(-1).flip(-1) * mask  # (B, L)
    _token_cotangent(logits, tokens, rtg, out)
    for s in _slices(logits.shape[1]):
        logp = logits[:, s].detach().log_softmax(-1)  # (B, l, V)
        out[:, s] += logp.exp() * (logp - logp_ref_full[:, s] - kl[:, s].unsqueeze(-1)) * mask[:, s].unsqueeze(-1)
    return out


def _forward_token_cotangent(logits: Tensor, logp_ref_full: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """Cotangent of -sum_t sum_v q_v log p_v (the token-level forward KL, prefix law fixed): p_v - q_v, masked."""
    for s in _slices(logits.shape[1]):
        torch.sub(logits[:, s].detach().softmax(-1), logp_ref_full[:, s].exp(), out=out[:, s])
        out[:, s] *= mask[:, s].unsqueeze(-1)
    return out


def value_rows(lp: Tensor, lr: Tensor, kl: Tensor, mask: Tensor) -> Tensor:
    """(B, 8) per sample: sum_t KL_t (the exact per-token KLs summed), sum_t k_t for k1, k2, k3, sum_t (k_t - KL_t)^2
    for k1, k2, k3, and the number of response tokens."""
    with torch.no_grad():
        ks = [get_estimator(name)(lp, lr) * mask for name in VALUE_ESTIMATORS]  # 3 x (B, L)
        cols = [kl.sum(1)] + [k.sum(1) for k in ks] + [(((k - kl) * mask) ** 2).sum(1) for k in ks] + [mask.sum(1)]
    return torch.stack(cols, 1).to(torch.float64)  # (B, 8)


# ---------------------------------------------------------------------------------------------- gradients


def sample_grads(setup: Setup, gen: Generation, dtype: str = "float32",
                 keys: tuple[str, ...] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients on given responses y (scored, not sampled here): {"reference": g_ref, config key: g_c,
    "forward_kl_token": f_tok(y)} each (B, dim) float64 (``keys`` restricts them), and the (B, 8) value rows."""
    psg, model = setup.psg, setup.loaded.model
    logp_ref_full = _ref_logp_full(setup, gen, dtype)  # (B, L, V)
    with psg.recording():
        logits = score_logits(model, gen, dtype)  # (B, L, V) with the graph to the parameters
    logp_ref_full = logp_ref_full.to(logits.dtype)
    tokens, mask = gen.completion, gen.mask.to(logits.dtype)  # (B, L)
    lp, lr, kl = token_stats(logits, logp_ref_full, tokens, mask)
    want = keys if keys is not None else (REFERENCE_KEY, *setup.configs, FORWARD_TOKEN_KEY)
    buf = torch.empty_like(logits)  # (B, L, V) the one cotangent buffer
    out: dict[str, Tensor] = {}
    done: list[tuple[Tensor, str]] = []  # token coefficients already differentiated: equal ones share a backward
    for key in want:
        if key == REFERENCE_KEY:
            dz = _reference_cotangent(logits, logp_ref_full, tokens, kl, mask, buf)
        elif key == FORWARD_TOKEN_KEY:
            dz = _forward_token_cotangent(logits, logp_ref_full, mask, buf)
        else:
            cfg = setup.configs[key]
            if cfg.needs_full_logits:  # the general (B, L, V) path
                logp_m = masked_logp(logits.detach().log_softmax(-1), logp_ref_full, mask)
                dz = logit_cotangent(masked_coefficients(cfg, tokens, logp_m, logp_ref_full, mask), tokens,
                                     logits, mask)
            else:
                tok = token_coefficients(cfg, tokens, lp, lr, mask)  # (B, L)
                same = next((k for t, k in done if torch.equal(t, tok)), None)
                if same is not None:  # e.g. k1 in the loss at token and sequence level
                    out[key] = out[same]
                    continue
                done.append((tok, key))
                dz = _token_cotangent(logits, tokens, tok, buf)
        out[key] = psg.grads(logits, dz)  # (B, dim)
    return out, value_rows(lp, lr, kl, mask)


def forward_grads(setup: Setup, gen: Generation, dtype: str = "float32") -> Tensor:
    """(B, dim) -grad log pi(y) for given responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    psg = setup.psg
    with psg.recording():
        logits = score_logits(setup.loaded.model, gen, dtype)  # (B, L, V)
    mask = gen.mask.to(logits.dtype)
    return psg.grads(logits, _token_cotangent(logits, gen.completion, -mask, torch.empty_like(logits)))


def sequence_kls(setup: Setup, gen: Generation, dtype: str) -> Tensor:
    """(B,) float64 sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t)) over each response (exact per-token KLs)."""
    with torch.no_grad():
        logp_ref_full = _ref_logp_full(setup, gen, dtype)
        logits = score_logits(setup.loaded.model, gen, dtype)
        mask = gen.mask.to(logits.dtype)
        return token_stats(logits, logp_ref_full.to(logits.dtype), gen.completion, mask)[2].sum(1).double()


def _generate(setup: Setup, opts: LLMOptions, start: int, stop: int, stream: int, reference: bool = False
              ) -> Generation:
    idx = list(range(start, stop))
    prompts = [setup.prompts[i % len(setup.prompts)] for i in idx]
    loaded = setup.loaded
    seeds = [(opts.seed, stream, i) for i in idx]
    if reference and setup.ref_model is not None:
        return generate(setup.ref_model, prompts, opts.max_new_tokens, sample_seeds=seeds, eos=setup.eos,
                        pad=loaded.pad_token_id, dtype=opts.dtype)
    with reference_mode(loaded.model) if reference else _nullcontext():
        return generate(loaded.model, prompts, opts.max_new_tokens, sample_seeds=seeds, eos=setup.eos,
                        pad=loaded.pad_token_id, dtype=opts.dtype)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- numeric floor


def numeric_floor(setup: Setup, gen: Generation, opts: LLMOptions) -> dict:
    """The sequence-KL error (nats) the chosen dtype causes on the responses ``gen``: against float32 for bfloat16,
    against float64 for float32 (the model is converted in place and back, exactly); 0 for float64."""
    if opts.dtype == "float64":
        return {"nats": 0.0, "mean_abs_nats": 0.0, "against": "float64", "samples": gen.completion.shape[0]}
    kl = sequence_kls(setup, gen, opts.dtype)
    models = [m for m in (setup.loaded.model, setup.ref_model) if m is not None]
    if opts.dtype == "bfloat16":
        against = "float32"
        hi = sequence_kls(setup, gen, "float32")
    else:
        against = "float64"
        for m in models:
            m.double()
        try:
            hi = sequence_kls(setup, gen, "float64")
        finally:
            for m in models:
                m.float()
    err = (kl - hi).abs()
    return {"nats": float(err.max()), "mean_abs_nats": float(err.mean()), "error_of_mean_nats":
            float((kl - hi).mean().abs()), "against": against, "samples": int(kl.shape[0])}


# ---------------------------------------------------------------------------------------------- the pass


def _set_tf32(allow: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def _gather_rows(local: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{chunk: {key: (b, P)}} of every rank, concatenated per key in chunk (= sample) order."""
    every: dict[int, dict[str, Tensor]] = {}
    for part in D.gather({j: {k: v.cpu() for k, v in d.items()} for j, d in local.items()}):
        every.update(part)  # type: ignore[arg-type]
    keys = next(iter(every.values())).keys() if every else []
    return {k: torch.cat([every[j][k] for j in sorted(every)]) for k in keys}


def collect(opts: LLMOptions) -> tuple[dict[str, dict[str, Tensor]], Setup, dict]:
    """Run (this rank's share of) the three sample sets and gather every rank's rows in sample order:
    {"main": {...}, "directions": {...}, "forward": {...}}."""
    from tqdm.auto import tqdm

    opts.validate()
    _set_tf32(opts.allow_tf32)
    rank, size, device = D.init_from_env(opts.device)
    torch.manual_seed(opts.seed)
    setup = build(opts, device)
    t0 = time.perf_counter()
    show = opts.progress and rank == 0
    main_chunks = D.my_chunks(opts.samples, opts.batch_size, rank, size)
    dir_chunks = D.my_chunks(opts.n_dir, opts.batch_size, rank, size)
    total = sum(b - a for _, a, b in main_chunks) + 2 * sum(b - a for _, a, b in dir_chunks)
    local: dict[str, dict[int, dict[str, Tensor]]] = {"main": {}, "directions": {}, "forward": {}}
    floor_gen = None
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tqdm(total=total, desc="llm: sample+score+grads", disable=not show) as bar:
        for j, a, b in dir_chunks:
            grads, _ = sample_grads(setup, _generate(setup, opts, a, b, 3), opts.dtype,
                                    keys=(REFERENCE_KEY, FORWARD_TOKEN_KEY))
            local["directions"][j] = grads
            bar.update(b - a)
            gen = _generate(setup, opts, a, b, 2, reference=True)
            local["forward"][j] = {"forward_kl": forward_grads(setup, gen, opts.dtype)}
            bar.update(b - a)
        for j, a, b in main_chunks:
            gen = _generate(setup, opts, a, b, 1)
            if j == 0:
                floor_gen = gen
            grads, values = sample_grads(setup, gen, opts.dtype, keys=(REFERENCE_KEY, *setup.configs))
            ended = (gen.completion == setup.eos) & gen.mask.bool() if setup.eos is not None else gen.mask[:, :0]
            local["main"][j] = {**grads, "values": values, "ended": ended.any(1).double().unsqueeze(1)}
            bar.update(b - a)
    rows = {name: _gather_rows(part) for name, part in local.items()}
    timing = {"seconds_rank0": time.perf_counter() - t0, "world_size": size, "device": str(device),
              "threads": torch.get_num_threads()}
    if str(device).startswith("cuda"):
        timing["gpu"] = torch.cuda.get_device_name(torch.device(device))
        timing["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0 and opts.numeric_floor and floor_gen is not None:
        sub = Generation(*(t[:FLOOR_SAMPLES] for t in (floor_gen.prompt, floor_gen.prompt_mask,
                                                       floor_gen.completion, floor_gen.mask)))
        timing["numeric_floor"] = numeric_floor(setup, sub, opts)
    return rows, setup, timing


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def summarize(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, timing: dict) -> dict:
    """The JSON-ready report: per configuration the calibrated test, intervals, variance and cosines; the sequence
    KL; values; the numeric floor; warnings."""
    main = rows["main"]
    dirs = Directions(rows["directions"][REFERENCE_KEY].mean(0), rows["directions"][FORWARD_TOKEN_KEY].mean(0),
                      rows["forward"]["forward_kl"].mean(0))
    keys = list(setup.configs)
    stats_rows = analyze(main, keys, dirs, alpha=opts.alpha, seed=opts.seed, n_boot=opts.bootstrap)
    ref = main[REFERENCE_KEY]
    r = ref.mean(0)
    n = ref.shape[0]
    r_sq = max(float(r @ r), 1e-300)
    f, f_tok = dirs.f_dir, dirs.ftok_dir
    out_rows = []
    for key, srow in zip(keys, stats_rows):
        g = main[key]
        mean = g.mean(0)
        var = float(g.var(0).sum())
        out_rows.append({
            "config": key,
            "label": setup.configs[key].label,
            **{k: v for k, v in srow.items() if k != "config"},
            "variance": var,
            "rel_variance": var / r_sq,
            "cos_reverse": _cos(mean, r),
            "cos_forward": _cos(mean, f),
            "cos_forward_token": _cos(mean, f_tok),
        })
    v = main["values"]  # (n, 8)
    values = {}
    for i, name in enumerate(VALUE_ESTIMATORS):
        j = 1 + i
        diff = v[:, j] - v[:, 0]
        values[name] = {
            "mean_sequence_value": float(v[:, j].mean()),
            "se": float(v[:, j].std() / math.sqrt(n)),
            "bias_vs_exact": float(diff.mean()),
            "bias_se": float(diff.std() / math.sqrt(n)),
            "token_rmse_vs_exact": math.sqrt(float(v[:, 4 + i].sum()) / max(float(v[:, 7].sum()), 1.0)),
            "sequence_std": float(v[:, j].std()),
        }
    kl_mean, kl_se = float(v[:, 0].mean()), float(v[:, 0].std() / math.sqrt(n))
    lengths = v[:, 7]
    warn = []
    if n < MIN_CALIBRATED_SAMPLES:
        warn.append(f"--samples {n} is below {MIN_CALIBRATED_SAMPLES}, the smallest sample size at which the test "
                    "and intervals were found calibrated on the enumerable model: p-values and intervals may be "
                    "optimistic")
    floor = timing.get("numeric_floor")
    if floor is not None and floor["nats"] > FLOOR_WARN * max(kl_mean, 1e-300):
        warn.append(f"numeric floor {floor['nats']:.3g} nats ({opts.dtype} against {floor['against']}) is not small "
                    f"against the sequence KL {kl_mean:.3g}: gradients of this size are numerical noise")
    ended = float(main["ended"].mean()) if setup.eos is not None else None
    if ended is not None and ended < 0.5:
        warn.append(f"only {100 * ended:.0f}% of responses ended at EOS within --max-new-tokens "
                    f"{opts.max_new_tokens}: raise it, or the statistics describe truncated responses")
    for w in warn:
        warnings.warn(w, stacklevel=2)
    loaded = setup.loaded
    return {
        "biaslab_version": __version__,
        "options": {k: (list(x) if isinstance(x, tuple) else x) for k, x in asdict(opts).items() if k != "extra"},
        "model": {"name": loaded.name, "vocab_size": loaded.vocab_size, **loaded.info},
        "policy": setup.policy_info,
        "parameters": {
            "spec": opts.params if setup.psg.subset.spec == opts.params else f"{opts.params} ({setup.psg.subset.spec})",
            "count": setup.psg.subset.numel,
            "tensors": len(setup.psg.subset.names),
            "per_sample_method": setup.psg.subset.method,
            "projected_dim": setup.psg.dim if setup.psg.sketch is not None else None,
        },
        "samples": {"main": n, "directions": int(rows["directions"][REFERENCE_KEY].shape[0]),
                    "forward": int(rows["forward"]["forward_kl"].shape[0])},
        "sequence_kl": {"mean": kl_mean, "se": kl_se,
                        "direction": "KL(pi_theta || pi_ref), sum of exact per-token KLs over y ~ pi_theta"},
        "numeric_floor": floor,
        "mean_response_tokens": float(lengths.mean()),
        "ended_at_eos": ended,
        "reference": {
            "config": ":".join(REFERENCE_CONFIG),
            "norm": math.sqrt(r_sq),
            "rel_se": math.sqrt(float(ref.var(0).sum()) / n) / math.sqrt(r_sq),
            "cos_directions_estimate": _cos(r, dirs.r_dir),
            "cos_forward": _cos(r, f),
            "cos_forward_token": _cos(r, f_tok),
        },
        "train_rewards": setup.train_history,
        "configs": out_rows,
        "values": values,
        "warnings": warn,
        "timing": timing,
    }


def run_llm(opts: LLMOptions) -> dict | None:
    """The whole pass; returns the report on rank 0 (None on the other ranks)."""
    rows, setup, timing = collect(opts)
    rank, _ = D.world()
    return summarize(rows, setup, opts, timing) if rank == 0 else None


__all__ = [
    "DEFAULT_CONFIGS", "LLMConfig", "LLMOptions", "REFERENCE_KEY", "build", "collect", "forward_grads",
    "masked_coefficients", "masked_logp", "numeric_floor", "parse_config", "run_llm", "sample_grads", "sequence_kls",
    "summarize", "token_coefficients", "token_stats", "value_rows",
]

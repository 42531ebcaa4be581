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

import contextlib
import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .._version import __version__
from ..core.estimators import get_estimator
from ..core.placements import Coefficients, KLConfig, make_config, surrogate_coefficients
from ..core.verdict import cosine
from . import distributed as D
from .calibration import MIN_CALIBRATED_SAMPLES, Directions, analyze
from .grads import PerSampleGrads, logit_cotangent, make_sketch, select_params
from .models import TINY_MODELS, LLMError, load_model
from .policy import DEFAULT_TARGETS, attach_lora, broadcast_lora, perturb_lora, reference_mode, scale_lora, train_lora
from .recipes import LLMRule, build_rules, rule_coefficients, whiten_stats
from .sample import (
    DEFAULT_PROMPTS,
    Generation,
    encode_prompts,
    generate,
    head_logits,
    random_prompts,
    read_prompts,
    score_hidden,
    score_logits,
)
from .sample import rows as gen_rows

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
    generation_batch: int | None = None  # None: the smallest multiple of the micro-batch >= 64
    stacked: bool = True  # all cotangents through the head analytically and ONE batched backward pass
    truncations: tuple[int, ...] | None = None  # None: L/4, L/2 with --target-kl (KL sweep by truncation), else ()
    framework: str | None = None  # a preset of biaslab.frameworks (biaslab audit --framework)
    framework_settings: tuple[str, ...] = ()  # KEY=VALUE in the framework's own names
    framework_config: str | None = None
    enable_kl: bool = False
    losses: tuple[str, ...] = ()  # FILE:FUNC (biaslab.workflows.userloss contract)
    loss_beta: float | None = None
    loss_agg: str | None = None
    group_size: int | None = None  # responses per group of the recipes (default: the preset's; 2 for --loss)
    extra: dict = field(default_factory=dict)

    @property
    def n_dir(self) -> int:
        if self.direction_samples is not None:
            return self.direction_samples
        return _round_up(max(16, self.samples // 2), int(self.extra.get("group", 1)))  # whole groups

    @property
    def micro_batch(self) -> int:
        """--batch-size rounded up to whole groups of the recipes."""
        return _round_up(self.batch_size, int(self.extra.get("group", 1)))

    @property
    def gen_batch(self) -> int:
        """Responses generated at once (a multiple of the micro-batch): sampling step by step is dominated by
        per-step costs, so bigger generation batches are much cheaper per response on a CPU."""
        b = self.micro_batch
        return _round_up(self.generation_batch if self.generation_batch is not None else max(b, 64), b)

    def resolve(self) -> None:
        """Fill the defaults that depend on the model."""
        if self.max_new_tokens is None:
            self.max_new_tokens = 16 if self.model in TINY_MODELS else 64
        if self.truncations is None:
            L = int(self.max_new_tokens)
            self.truncations = tuple(sorted({L // 4, L // 2} - {0, L})) if self.target_kl is not None else ()
        self.truncations = tuple(int(t) for t in self.truncations)

    def validate(self) -> None:
        self.resolve()
        if not self.configs:
            raise LLMError("--configs is empty; give at least one estimator:placement")
        for text in self.configs:
            parse_config(text)  # unknown names fail here, before any model is loaded
        _, group = _rules_and_group(self)  # unknown frameworks, keys, loss files fail here too
        if self.samples % group:
            raise LLMError(f"--samples {self.samples} is not a multiple of the recipes' group size {group} "
                           "(each group of consecutive responses shares a prompt)")
        if self.direction_samples is not None and self.direction_samples % group:
            raise LLMError(f"--direction-samples {self.direction_samples} is not a multiple of the recipes' group "
                           f"size {group}")
        # the independent units are groups: a 4-direction Hotelling test needs at least 8 of them
        if self.samples < 8 * group:
            unit = "" if group == 1 else f" ({self.samples // group} groups of {group} responses)"
            raise LLMError(f"--samples {self.samples}{unit}: the 4-direction Hotelling test needs at least 8 "
                           f"independent {'groups' if group > 1 else 'responses'}; use --samples >= {8 * group}")
        if self.n_dir < 2 * group:
            raise LLMError(f"--direction-samples must be >= {2 * group} (two groups), got {self.n_dir}")
        if self.batch_size < 1:
            raise LLMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.alpha < 1:
            raise LLMError(f"--alpha must lie in (0, 1), got {self.alpha}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise LLMError(f"--dtype {self.dtype!r}: choose float32, float64 or bfloat16")
        if self.target_kl is not None and not self.target_kl > 0:
            raise LLMError(f"--target-kl must be > 0 nats, got {self.target_kl}")
        if any(not 0 < t < self.max_new_tokens for t in self.truncations):
            raise LLMError(f"--sweep-truncate {list(self.truncations)}: each length must lie in [1, "
                           f"--max-new-tokens {self.max_new_tokens})")
        if self.generation_batch is not None and self.generation_batch < 1:
            raise LLMError(f"--generation-batch must be >= 1, got {self.generation_batch}")
        if self.reference is not None and (self.train_steps or self.target_kl is not None):
            raise LLMError("--reference gives a fixed checkpoint pair: --target-kl and --train-steps need the LoRA")
        if self.reference is not None and self.params == "lora":
            raise LLMError("--reference: the policy checkpoint has no LoRA adapter; choose --params last-layer or "
                           "parameter names")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _rules_and_group(opts: LLMOptions) -> tuple[list[LLMRule], int]:
    """The recipes' rules and their group (the lcm of their group sizes, 1 without rules), recorded in ``opts``."""
    rules = build_rules(opts)
    opts.extra["group"] = math.lcm(1, *(r.group_size for r in rules))
    return rules, opts.extra["group"]


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
    rules: dict[str, LLMRule] = field(default_factory=dict)  # --framework / --loss, measured per group
    group: int = 1  # consecutive samples sharing a prompt (the lcm of the rules' group sizes)
    max_new_tokens: int = 16
    whiten: dict = field(default_factory=dict)  # (rule key, length) -> population (mean, std) of its advantages

    @property
    def reference_model(self):
        """pi_ref: the --reference model, else the policy (its LoRA is switched off with ``reference_mode``)."""
        return self.ref_model if self.ref_model is not None else self.loaded.model

    @property
    def head_in_subset(self) -> bool:
        """True when a differentiated parameter belongs to the output head (tied embeddings included)."""
        head = self.loaded.model.get_output_embeddings()
        ids = {id(p) for p in head.parameters()}
        return any(id(p) in ids for p in self.psg.subset.params) or any(
            m is head for m in self.psg.subset.owners.values())


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
    configs = {c.key: c for c in (parse_config(t) for t in opts.configs)}
    rule_list, group = _rules_and_group(opts)
    rules = {r.key: r for r in rule_list}
    weights = "float64" if opts.dtype == "float64" else opts.weights_dtype
    load = functools.partial(load_model, device=device, dtype=weights, seed=opts.seed, vocab_size=opts.vocab_size,
                             progress=opts.progress)
    loaded = load(opts.model)
    model = loaded.model
    prompts = _prompts(opts, loaded)
    use_eos = opts.eos if opts.eos is not None else opts.model not in TINY_MODELS
    eos = loaded.eos_token_id if use_eos else None
    history: list[float] = []
    info: dict = {}
    ref_model = None
    if opts.reference is not None:
        ref = load(opts.reference)
        if ref.vocab_size != loaded.vocab_size:
            raise LLMError(f"--reference has vocabulary {ref.vocab_size}, --policy {loaded.vocab_size}: not a pair")
        ref_model = ref.model
        info["source"] = f"checkpoint pair: policy {opts.model}, reference {opts.reference}"
    else:
        attach_lora(model, opts.lora_targets, opts.lora_rank, alpha=float(opts.lora_rank))
        info["perturb"] = default_perturb(opts)
        perturb_lora(model, info["perturb"], opts.seed)
        if opts.train_steps > 0:
            history = train_lora(model, prompts, steps=opts.train_steps, lr=opts.train_lr, batch=opts.batch_size,
                                 max_new_tokens=opts.max_new_tokens, seed=opts.seed, eos=eos,
                                 pad=loaded.pad_token_id, vocab_size=loaded.vocab_size)
            broadcast_lora(model)  # every rank samples rank 0's pi_theta
    subset = select_params(model, opts.params)
    sketch = make_sketch(subset, opts.max_dense, opts.projections, opts.seed)
    setup = Setup(loaded, prompts, PerSampleGrads(model, subset, sketch), configs, history, eos, info, ref_model,
                  rules, group, int(opts.max_new_tokens))
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


def reach_target_kl(setup: Setup, opts: LLMOptions, pilot: int = 32, rounds: int = 3) -> dict:
    """Rescale the adapter's B until the pilot estimate of the sequence KL(pi || pi_ref) is within its own noise of
    ``opts.target_kl`` (within max(10%, 2 pilot standard errors); KL ~ scale^2 near pi_ref: each round multiplies B
    by sqrt(target / estimate)). The pilot responses use their own random stream; the run's own KL estimate is
    reported separately."""
    history, ses = [], []
    total = 1.0
    for _ in range(rounds):
        gen = _generate(setup, opts, 0, pilot, stream=4)
        step = opts.micro_batch
        kls = torch.cat([sequence_kls(setup, gen_rows(gen, torch.arange(a, min(a + step, pilot))), opts.dtype)
                         for a in range(0, pilot, step)])
        kl = float(kls.mean())
        se = float(kls.std() / math.sqrt(pilot))
        history.append(kl)
        ses.append(se)
        if not kl > 0:
            raise LLMError("the perturbation gives a zero KL; raise --perturb")
        if abs(kl / opts.target_kl - 1) < max(0.1, 2 * se / kl):
            break
        factor = min(max(math.sqrt(opts.target_kl / kl), 0.1), 10.0)
        scale_lora(setup.loaded.model, factor)
        total *= factor
    return {"target": opts.target_kl, "pilot_kls": history, "pilot_ses": ses, "pilot_samples": pilot, "scale": total}


# ---------------------------------------------------------------------------------------------- per-token pieces


def _ref_logp_full(setup: Setup, gen: Generation, dtype: str) -> Tensor:
    """(B, L, V) log pi_ref(. | x, y_<t), float32 (or float64), no graph."""
    with torch.no_grad(), reference_mode(setup.reference_model):
        return score_logits(setup.reference_model, gen, dtype).log_softmax(-1)


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


FORWARD_KEY = "forward_kl"
TOKENS_KEY = "tokens"


def _suffix(length: int | None) -> str:
    return "" if length is None else f"@{length}"


class _Scored:
    """One micro-batch scored under pi_ref and pi_theta: the recorded pass's root (hidden states before the head on
    the stacked path, else logits) and the per-token pieces every cotangent is built from."""

    def __init__(self, setup: Setup, gen: Generation, dtype: str, stacked: bool, need_ref: bool = True) -> None:
        model = setup.loaded.model
        self.setup = setup
        self.stacked = stacked and not setup.head_in_subset
        self.lr_full = _ref_logp_full(setup, gen, dtype) if need_ref else None  # (B, L, V)
        with setup.psg.recording():
            if self.stacked:
                self.root = score_hidden(model, gen, dtype)  # (B, L, d) with the graph to the parameters
                with torch.no_grad():
                    self.logits = head_logits(model, self.root.detach())  # (B, L, V), no graph
            else:
                self.root = self.logits = score_logits(model, gen, dtype)  # (B, L, V) with the graph
        if self.lr_full is not None:
            self.lr_full = self.lr_full.to(self.logits.dtype)
        self.tokens, self.mask = gen.completion, gen.mask.to(self.logits.dtype)  # (B, L)
        self.W = model.get_output_embeddings().weight.detach()  # (V, d)
        self.kl: Tensor | None = None  # (B, L) exact next-token KLs, set by the caller

    # hidden-space pieces: dz @ W for the logit cotangents dz of the module docstring, one (B, L, V) matmul each
    def _proj(self, f) -> Tensor:
        """(B, L, d) sum_v f(slice)_tv W_v over position slices, f giving (B, l, V)."""
        B, L, _ = self.logits.shape
        out = self.logits.new_empty(B, L, self.W.shape[1])
        W = self.W.to(self.logits.dtype)
        for s in _slices(L):
            out[:, s] = f(s) @ W
        return out

    @functools.cached_property
    def pbar(self) -> Tensor:
        return self._proj(lambda s: self.logits[:, s].softmax(-1))  # E_p[W_v] per position

    @functools.cached_property
    def score_dir(self) -> Tensor:
        """(B, L, d) W_{y_t} - E_p[W_v]: the hidden cotangent of log pi(y_t|y_<t) at each position."""
        return self.W.to(self.logits.dtype)[self.tokens] - self.pbar

    @functools.cached_property
    def path_dir(self) -> Tensor:
        """(B, L, d) sum_v p_v (log p_v - log q_v - KL_t) W_v: the hidden cotangent of KL_t (pathwise)."""

        def f(s):
            logp = self.logits[:, s].log_softmax(-1)
            return logp.exp() * (logp - self.lr_full[:, s] - self.kl[:, s].unsqueeze(-1))
        return self._proj(f)

    @functools.cached_property
    def fwd_dir(self) -> Tensor:
        """(B, L, d) E_p[W_v] - E_q[W_v]: the hidden cotangent of -sum_v q_v log p_v."""
        return self.pbar - self._proj(lambda s: self.lr_full[:, s].exp())


def sample_grads(setup: Setup, gen: Generation, dtype: str = "float32", keys: tuple[str, ...] | None = None,
                 truncations: tuple[int, ...] = (), stacked: bool = True) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients on given responses y (scored, not sampled here): {"reference": g_ref, config key: g_c,
    "forward_kl_token": f_tok(y)} each (B, dim) float64 (``keys`` restricts them; a recipe key of ``setup.rules``
    gives (B / group, dim) rows, each group's gradient divided by the rule's nominal scale), and the (B, 8) value
    rows. ``truncations`` L' add the same keys suffixed ``@L'`` for the responses cut after L' tokens (exact samples
    of the policy capped at L' tokens: the KL sweep by truncation) and their value rows as ``values@L'``; key
    ``tokens`` adds (B, 3, max_new_tokens) rows of masked log pi, log pi_ref and the mask.

    ``stacked`` (default): the cotangent of every key on the logits, dz, is taken through the output head
    analytically (dz @ W_head: one (B, L, V) matmul shared by all token coefficients, W_{y_t} - E_p[W]) and all
    keys' per-sample gradients come from ONE batched backward pass from the hidden states
    (``PerSampleGrads.grads_stack``); otherwise one backward pass from the logits per distinct cotangent (the
    former path; equal numbers, tested). When a differentiated parameter belongs to the head the logits path is
    used."""
    want = keys if keys is not None else (REFERENCE_KEY, *setup.configs, FORWARD_TOKEN_KEY)
    sc = _Scored(setup, gen, dtype, stacked)
    logits, lr_full, tokens, mask = sc.logits, sc.lr_full, sc.tokens, sc.mask
    lp, lr, kl = token_stats(logits, lr_full, tokens, mask)
    sc.kl = kl
    B, L, _ = logits.shape
    specs: list[tuple[str, str, object, Tensor]] = []  # (out key, kind, payload, mask)
    extra: dict[str, Tensor] = {}
    alias: dict[str, str] = {}
    post: dict[str, tuple[LLMRule, int]] = {}
    values = value_rows(lp, lr, kl, mask)
    for cut in (None, *truncations):
        sfx = _suffix(cut)
        if cut is None:
            m, lp_c, kl_c = mask, lp, kl
        else:  # the response cut after ``cut`` tokens: the reference's log-probs (and KL 0) past it
            m = mask * (torch.arange(L, device=mask.device) < cut).to(mask.dtype)
            lp_c, kl_c = torch.where(m.bool(), lp, lr), kl * m
            extra[f"values{sfx}"] = value_rows(lp_c, lr, kl_c, m)
        done: list[tuple[Tensor, str]] = []
        for key in want:
            out_key = key + sfx
            if key == TOKENS_KEY:
                if cut is None:
                    pad = setup.max_new_tokens - L
                    t3 = torch.stack([lp * mask, lr * mask, mask], 1).to(torch.float64)  # (B, 3, L)
                    extra[TOKENS_KEY] = torch.nn.functional.pad(t3, (0, pad)) if pad > 0 else t3
                continue
            if key == REFERENCE_KEY:
                specs.append((out_key, "ref", kl_c, m))
            elif key == FORWARD_TOKEN_KEY:
                specs.append((out_key, "fwd", None, m))
            elif key in setup.rules:
                r = setup.rules[key]
                tok = rule_coefficients(r, lp_c, lr, m, setup.whiten.get((key, cut or setup.max_new_tokens)))
                specs.append((out_key, "tok", tok.to(mask.dtype), m))
                post[out_key] = (r, cut or setup.max_new_tokens)
            else:
                cfg = setup.configs[key]
                if cfg.needs_full_logits:  # the general (B, L, V) path
                    logp_m = masked_logp(logits.detach().log_softmax(-1), lr_full, m)
                    specs.append((out_key, "full", masked_coefficients(cfg, tokens, logp_m, lr_full, m), m))
                else:
                    tok = token_coefficients(cfg, tokens, lp_c, lr, m)  # (B, L)
                    same = next((k for t, k in done if torch.equal(t, tok)), None)
                    if same is not None:  # e.g. k1 in the loss at token and sequence level
                        alias[out_key] = same
                        continue
                    done.append((tok, out_key))
                    specs.append((out_key, "tok", tok, m))
    out = _grads_of_specs(sc, specs)
    for k, src in alias.items():
        out[k] = out[src]
    for k, (r, length) in post.items():  # sum each group's rows, divide by the nominal scale
        g = out[k]
        wstd = setup.whiten.get((r.key, length), (0.0, None))[1] if r.needs_whitening else None
        out[k] = g.reshape(B // r.group_size, r.group_size, -1).sum(1) / r.nominal(length, wstd)
    out = {k: out[k] for k in [s[0] for s in specs] + list(alias) if k in out}
    out.update(extra)
    return out, values


def _grads_of_specs(sc: _Scored, specs: list) -> dict[str, Tensor]:
    """Per-sample gradient rows of every cotangent spec: stacked (hidden-space cotangents, one batched backward)
    or one logits backward per spec."""
    psg = sc.setup.psg
    if not specs:
        return {}
    if sc.stacked:  # each hidden-space piece of _Scored is computed once, for the specs that need it
        cots = []
        for _, kind, payload, m in specs:
            if kind == "tok":
                cots.append(payload.unsqueeze(-1) * sc.score_dir)
            elif kind == "ref":
                rtg = payload.flip(-1).cumsum(-1).flip(-1) * m
                cots.append(rtg.unsqueeze(-1) * sc.score_dir + sc.path_dir * m.unsqueeze(-1))
            elif kind == "fwd":
                cots.append(sc.fwd_dir * m.unsqueeze(-1))
            else:  # full coefficients: the (B, L, V) cotangent, through the head
                dz = logit_cotangent(payload, sc.tokens, sc.logits, m)
                cots.append(dz @ sc.W.to(dz.dtype))
        rows = psg.grads_stack(sc.root, torch.stack(cots))
        return {s[0]: g for s, g in zip(specs, rows)}
    out = {}
    buf = torch.empty_like(sc.logits)  # (B, L, V) the one cotangent buffer
    for key, kind, payload, m in specs:
        if kind == "tok":
            dz = _token_cotangent(sc.logits, sc.tokens, payload, buf)
        elif kind == "ref":
            dz = _reference_cotangent(sc.logits, sc.lr_full, sc.tokens, payload, m, buf)
        elif kind == "fwd":
            dz = _forward_token_cotangent(sc.logits, sc.lr_full, m, buf)
        else:
            dz = logit_cotangent(payload, sc.tokens, sc.logits, m)
        out[key] = psg.grads(sc.root, dz)  # (B, dim)
    return out


def forward_grads(setup: Setup, gen: Generation, dtype: str = "float32", stacked: bool = True) -> Tensor:
    """(B, dim) -grad log pi(y) for given responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    return forward_rows(setup, gen, dtype, (), stacked)[FORWARD_KEY]


def forward_rows(setup: Setup, gen: Generation, dtype: str = "float32", truncations: tuple[int, ...] = (),
                 stacked: bool = True) -> dict[str, Tensor]:
    """{"forward_kl": (B, dim) -grad log pi(y), and "forward_kl@L'" for the responses cut after L' tokens} for given
    responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    sc = _Scored(setup, gen, dtype, stacked, need_ref=False)
    L = sc.logits.shape[1]
    specs = []
    for cut in (None, *truncations):
        m = sc.mask if cut is None else sc.mask * (torch.arange(L) < cut).to(sc.mask.dtype)
        specs.append((FORWARD_KEY + _suffix(cut), "tok", -m, m))
    return _grads_of_specs(sc, specs)


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
    prompts = [setup.prompts[(i // setup.group) % len(setup.prompts)] for i in idx]  # a group shares its prompt
    model = setup.reference_model if reference else setup.loaded.model
    with reference_mode(model) if reference else contextlib.nullcontext():
        return generate(model, prompts, opts.max_new_tokens, sample_seeds=[(opts.seed, stream, i) for i in idx],
                        eos=setup.eos, pad=setup.loaded.pad_token_id, dtype=opts.dtype)


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


def _gather_rows(local: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{chunk: {key: (b, P)}} of every rank, concatenated per key in chunk (= sample) order."""
    every: dict[int, dict[str, Tensor]] = {}
    for part in D.gather({j: {k: v.cpu() for k, v in d.items()} for j, d in local.items()}):
        every.update(part)  # type: ignore[arg-type]
    keys = next(iter(every.values())).keys() if every else []
    return {k: torch.cat([every[j][k] for j in sorted(every)]) for k in keys}


def _micro_batches(gen: Generation, micro: int, group: int) -> list[Tensor]:
    """Index tensors of the micro-batches of a generation batch: whole groups, sorted by their longest response
    (similar lengths together: less padding to score and differentiate)."""
    n = gen.completion.shape[0]
    lengths = gen.mask.sum(1).reshape(-1, group).max(1).values  # (n / group,)
    order = torch.argsort(lengths.cpu(), stable=True)
    idx = (order.unsqueeze(1) * group + torch.arange(group)).reshape(-1).to(gen.completion.device)
    return [idx[a : a + micro] for a in range(0, n, micro)]


def _by_micro_batch(gen: Generation, micro: int, group: int, fn) -> dict[str, Tensor]:
    """``fn(sub_generation) -> {key: rows}`` on each micro-batch, rows put back in sample order (per-group rows of a
    recipe in group order)."""
    n = gen.completion.shape[0]
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for idx in _micro_batches(gen, micro, group):
        for key, t in fn(gen_rows(gen, idx)).items():
            per = idx.shape[0] // t.shape[0]  # 1, or the group size of a recipe's rows
            parts.setdefault(key, []).append((idx.reshape(-1, per)[:, 0].cpu() // per, t))
    out = {}
    for key, ps in parts.items():
        count = sum(t.shape[0] for _, t in ps)
        full = ps[0][1].new_empty((count, *ps[0][1].shape[1:]))
        for where, t in ps:
            full[where] = t
        out[key] = full
        assert count * (n // count) == n
    return out


def collect(opts: LLMOptions) -> tuple[dict[str, dict[str, Tensor]], Setup, dict]:
    """Run (this rank's share of) the three sample sets and gather every rank's rows in sample order:
    {"main": {...}, "directions": {...}, "forward": {...}}. Responses are generated in batches of
    ``opts.gen_batch`` (the unit shared among processes), then scored and differentiated in micro-batches of
    ``opts.micro_batch`` whole groups."""
    from tqdm.auto import tqdm

    opts.validate()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.allow_tf32
    rank, size, device = D.init_from_env(opts.device)
    torch.manual_seed(opts.seed)
    setup = build(opts, device)
    t0 = time.perf_counter()
    show = opts.progress and rank == 0
    gb, micro, group, cuts = opts.gen_batch, opts.micro_batch, setup.group, opts.truncations
    main_chunks = D.my_chunks(opts.samples, gb, rank, size)
    dir_chunks = D.my_chunks(opts.n_dir, gb, rank, size)
    total = sum(b - a for _, a, b in main_chunks) + 2 * sum(b - a for _, a, b in dir_chunks)
    local: dict[str, dict[int, dict[str, Tensor]]] = {"main": {}, "directions": {}, "forward": {}}
    floor_gen = None
    whitened = [r for r in setup.rules.values() if r.needs_whitening]
    dir_keys = (REFERENCE_KEY, FORWARD_TOKEN_KEY) + ((TOKENS_KEY,) if whitened else ())
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tqdm(total=total, desc="llm: sample+score+grads", disable=not show) as bar:
        for j, a, b in dir_chunks:
            gen = _generate(setup, opts, a, b, 3)
            local["directions"][j] = _by_micro_batch(
                gen, micro, group, lambda g: sample_grads(setup, g, opts.dtype, dir_keys, cuts, opts.stacked)[0])
            bar.update(b - a)
            gen = _generate(setup, opts, a, b, 2, reference=True)
            local["forward"][j] = _by_micro_batch(
                gen, micro, group, lambda g: forward_rows(setup, g, opts.dtype, cuts, opts.stacked))
            bar.update(b - a)
        if whitened:  # population statistics of the whitened recipes' advantages, from the direction samples
            toks = _gather_rows({j: {TOKENS_KEY: d[TOKENS_KEY]} for j, d in local["directions"].items()})[TOKENS_KEY]
            for r in whitened:
                for cut in (setup.max_new_tokens, *cuts):
                    m = toks[:, 2] * (torch.arange(toks.shape[2]) < cut).to(toks.dtype)
                    setup.whiten[(r.key, cut)] = whiten_stats(r, toks[:, 0], toks[:, 1], m)

        def main_fn(g: Generation) -> dict[str, Tensor]:
            grads, values = sample_grads(setup, g, opts.dtype, (REFERENCE_KEY, *setup.configs, *setup.rules), cuts,
                                         opts.stacked)
            ended = (g.completion == setup.eos) & g.mask.bool() if setup.eos is not None else g.mask[:, :0]
            return {**grads, "values": values, "ended": ended.any(1).double().unsqueeze(1)}

        for j, a, b in main_chunks:
            gen = _generate(setup, opts, a, b, 1)
            if j == 0:
                floor_gen = gen
            local["main"][j] = _by_micro_batch(gen, micro, group, main_fn)
            bar.update(b - a)
    rows_ = {name: _gather_rows(part) for name, part in local.items()}
    timing = {"seconds_rank0": time.perf_counter() - t0, "world_size": size, "device": str(device),
              "threads": torch.get_num_threads(), "generation_batch": gb, "micro_batch": micro,
              "stacked_backward": opts.stacked and not setup.head_in_subset}
    if str(device).startswith("cuda"):
        timing["gpu"] = torch.cuda.get_device_name(torch.device(device))
        timing["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0 and opts.numeric_floor and floor_gen is not None:
        timing["numeric_floor"] = numeric_floor(
            setup, gen_rows(floor_gen, torch.arange(min(FLOOR_SAMPLES, floor_gen.completion.shape[0]))), opts)
    return rows_, setup, timing


def config_rows(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, cut: int | None = None
                ) -> tuple[list[dict], Tensor]:
    """Per configuration and recipe (at truncation ``cut``, None: the full responses) the calibrated test,
    intervals, variance and cosines; and the reference rows' mean."""
    sfx = _suffix(cut)
    main = dict(rows["main"])
    dirs = _directions(rows, sfx)
    ref = main[REFERENCE_KEY + sfx]
    main["reference"] = ref
    refs = {}
    for key, rule in setup.rules.items():  # each group's mean of g_ref pairs with the group's update
        name = f"reference/B={rule.group_size}"
        main[name] = ref.reshape(-1, rule.group_size, ref.shape[1]).mean(1)
        refs[key + sfx] = name
    keys = [k + sfx for k in (*setup.configs, *setup.rules)]
    stats_rows = analyze(main, keys, dirs, alpha=opts.alpha, seed=opts.seed, n_boot=opts.bootstrap, references=refs)
    out_rows = []
    for key, srow in zip((*setup.configs, *setup.rules), stats_rows):
        g = main[key + sfx]
        r = main[refs.get(key + sfx, "reference")].mean(0)
        mean, var = g.mean(0), float(g.var(0).sum())
        rule = setup.rules.get(key)
        extra = {} if rule is None else {
            "recipe": rule.description, "group_size": rule.group_size, "groups": int(g.shape[0]),
            "notes": rule.notes, "nominal_scale_length": cut or setup.max_new_tokens}
        out_rows.append({
            "config": key,
            "label": (setup.configs[key] if rule is None else rule).label,
            **{k: v for k, v in srow.items() if k != "config"},
            "variance": var,
            "rel_variance": var / max(float(r @ r), 1e-300),
            "cos_reverse": cosine(mean, r),
            "cos_forward": cosine(mean, dirs.f_dir),
            "cos_forward_token": cosine(mean, dirs.ftok_dir),
            **extra,
        })
    return out_rows, ref.mean(0)


def _directions(rows: dict[str, dict[str, Tensor]], sfx: str = "") -> Directions:
    """The fixed test directions (means of the direction and forward sample sets), at truncation suffix ``sfx``."""
    return Directions(rows["directions"][REFERENCE_KEY + sfx].mean(0),
                      rows["directions"][FORWARD_TOKEN_KEY + sfx].mean(0), rows["forward"][FORWARD_KEY + sfx].mean(0))


def truncation_sweep(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, full: dict) -> dict | None:
    """The KL sweep by truncation: one point per cut L' (the run's own responses cut after L' tokens, which are
    exact samples of the policy capped at L' tokens) plus the full responses, in ``sweep.run_sweep``'s format
    (one seed per point; n = the run's samples at every point; points share samples, so they are correlated)."""
    if not opts.truncations:
        return None
    points = []
    for cut in (*opts.truncations, None):
        if cut is None:
            cfgs, kl, tokens = full["configs"], full["sequence_kl"]["mean"], full["mean_response_tokens"]
        else:
            cfgs, _ = config_rows(rows, setup, opts, cut)
            v = rows["main"][f"values@{cut}"]
            kl, tokens = float(v[:, 0].mean()), float(v[:, 7].mean())
        configs = [{
            "config": c["config"], "label": c["label"], "rel_bias_mean": c["rel_bias_along_reference"],
            "rel_bias_spread": 0.0, "ci_low_mean": c["ci_low"], "ci_high_mean": c["ci_high"],
            "rel_bias_norm_mean": c["rel_bias_norm"], "rel_variance_mean": c["rel_variance"],
            "biased_seeds": int(bool(c["biased"])), "verdict": c["verdict"],
            "per_seed": [{k: c[k] for k in ("rel_bias_along_reference", "ci_low", "ci_high", "verdict")}],
        } for c in cfgs]
        points.append({"target_kl": opts.target_kl, "max_new_tokens": cut or setup.max_new_tokens,
                       "seeds": [opts.seed], "n_seeds": 1, "sequence_kl": kl, "sequence_kl_spread": 0.0,
                       "mean_response_tokens": tokens, "numeric_floor_nats": (full["numeric_floor"] or {}).get(
                           "nats", 0.0), "samples": int(rows["main"]["values"].shape[0]), "configs": configs})
    return {
        "kind": "truncation sweep",
        "biaslab_version": __version__,
        "design": "one run: its responses cut after L' tokens are exact samples of the same policy with "
                  "--max-new-tokens L'; every point uses all the run's samples (n each; points are correlated)",
        "options": full["options"],
        "sweep": {"target_kls": [opts.target_kl], "lengths": [p["max_new_tokens"] for p in points], "n_seeds": 1,
                  "truncation": True},
        "points": points,
    }


def summarize(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, timing: dict) -> dict:
    """The JSON-ready report: per configuration the calibrated test, intervals, variance and cosines; the sequence
    KL; values; the numeric floor; warnings; with truncations, the KL sweep by truncation (``sweep``)."""
    main = rows["main"]
    out_rows, r = config_rows(rows, setup, opts)
    ref = main[REFERENCE_KEY]
    n = ref.shape[0]
    r_sq = max(float(r @ r), 1e-300)
    dirs = _directions(rows)
    v = main["values"]  # (n, 8): the columns of ``value_rows``
    values = {}
    for i, name in enumerate(VALUE_ESTIMATORS):
        seq, diff = v[:, 1 + i], v[:, 1 + i] - v[:, 0]
        values[name] = {
            "mean_sequence_value": float(seq.mean()),
            "se": float(seq.std() / math.sqrt(n)),
            "bias_vs_exact": float(diff.mean()),
            "bias_se": float(diff.std() / math.sqrt(n)),
            "token_rmse_vs_exact": math.sqrt(float(v[:, 4 + i].sum()) / max(float(v[:, 7].sum()), 1.0)),
            "sequence_std": float(seq.std()),
        }
    kl_mean, kl_se = float(v[:, 0].mean()), float(v[:, 0].std() / math.sqrt(n))
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
    for row in out_rows:
        if "groups" in row and row["groups"] < MIN_CALIBRATED_SAMPLES:
            warn.append(f"{row['label']}: {row['groups']} groups, below the calibrated {MIN_CALIBRATED_SAMPLES} "
                        "(each group is one sample of the update): p-values and intervals may be optimistic")
        if row.get("bootstrap_degenerate"):
            p_floor = (1 + row["bootstrap_degenerate"]) / (1 + row["bootstrap_resamples"])
            warn.append(f"{row['label']}: {row['bootstrap_degenerate']} of {row['bootstrap_resamples']} bootstrap "
                        f"resamples of its {row['n']} independent samples keep fewer than {row['tested_directions']} "
                        f"directions; they count against rejection (raw p >= {p_floor:.2g}): use more --samples")
        for note in row.get("notes", []):
            if "updates per rollout" in note:
                warn.append(f"{row['label']}: {note}")
    for w in warn:
        warnings.warn(w, stacklevel=2)
    loaded = setup.loaded
    report = {
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
                    "forward": int(rows["forward"][FORWARD_KEY].shape[0])},
        "sequence_kl": {"mean": kl_mean, "se": kl_se,
                        "direction": "KL(pi_theta || pi_ref), sum of exact per-token KLs over y ~ pi_theta"},
        "numeric_floor": floor,
        "mean_response_tokens": float(v[:, 7].mean()),
        "ended_at_eos": ended,
        "reference": {
            "config": ":".join(REFERENCE_CONFIG),
            "norm": math.sqrt(r_sq),
            "rel_se": math.sqrt(float(ref.var(0).sum()) / n) / math.sqrt(r_sq),
            "cos_directions_estimate": cosine(r, dirs.r_dir),
            "cos_forward": cosine(r, dirs.f_dir),
            "cos_forward_token": cosine(r, dirs.ftok_dir),
        },
        "train_rewards": setup.train_history,
        "configs": out_rows,
        "values": values,
        "warnings": warn,
        "timing": timing,
    }
    sweep = truncation_sweep(rows, setup, opts, report)
    if sweep is not None:
        report["sweep"] = sweep
    return report


def run_llm(opts: LLMOptions) -> dict | None:
    """The whole pass; returns the report on rank 0 (None on the other ranks)."""
    rows, setup, timing = collect(opts)
    rank, _ = D.world()
    return summarize(rows, setup, opts, timing) if rank == 0 else None


__all__ = [
    "DEFAULT_CONFIGS", "FORWARD_KEY", "LLMConfig", "LLMOptions", "REFERENCE_KEY", "build", "collect",
    "config_rows", "forward_grads", "forward_rows", "truncation_sweep",
    "masked_coefficients", "masked_logp", "numeric_floor", "parse_config", "run_llm", "sample_grads", "sequence_kls",
    "summarize", "token_coefficients", "token_stats", "value_rows",
]

"""The options of one statistics pass on a real causal LM (``LLMOptions``), the configuration keys it evaluates
(``estimator:placement:level[:credit]``, ``parse_config``) and the constants shared by the pass (reference key, slice
sizes, floor sample counts), and ``Setup``, the state a pass is built into."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..core.estimators import get_estimator
from ..core.placements import KLConfig, make_config
from .calibration import MIN_CALIBRATED_SAMPLES
from .grads import PerSampleGrads
from .models import TINY_MODELS, LLMError
from .policy import DEFAULT_TARGETS
from .recipes import LLMRule, build_rules

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

"""Setting up a pass: the model and its LoRA adapter (seeded perturbation, optional training, a scale reaching a
target KL(pi || pi_ref)), the prompts and the per-sample gradient machinery (``Setup``, ``build``)."""

from __future__ import annotations

import functools
import math

import torch

from .grads import PerSampleGrads, make_sketch, select_params
from .models import TINY_MODELS, LLMError, load_model
from .options import (
    LLMOptions,
    Setup,
    _rules_and_group,
    parse_config,
)
from .policy import attach_lora, broadcast_lora, perturb_lora, scale_lora, train_lora
from .sample import (
    DEFAULT_PROMPTS,
    encode_prompts,
    random_prompts,
    read_prompts,
)
from .sample import rows as gen_rows
from .tokens import (
    _generate,
    sequence_kls,
)


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

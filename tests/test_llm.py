"""The real-LLM path on tiny random Hugging Face models: exact checks in float64.

* per-sample gradients from module hooks equal one backward pass per sample (LoRA and last-layer, Llama and GPT-2);
* padding after an EOS contributes nothing: a padded response has the gradients and values of the same response
  scored alone without padding, for every placement, level and credit;
* enumerating every response of a tiny model (V**L of them) and weighting the LLM path's per-sample gradients by
  pi(y) reproduces the toy engine's table in kind, exactly: k1 in reward and k3 in reward+loss give grad
  KL(pi||pi_ref), k1 in loss gives 0, k3 in loss (token) gives the token-level forward KL direction, k3 in loss
  (sequence) gives grad KL(pi_ref||pi).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.engines.exact import enumerate_sequences  # noqa: E402
from biaslab.llm.run import REFERENCE_KEY, LLMOptions, build, forward_grads, sample_grads  # noqa: E402
from biaslab.llm.sample import Generation, generate, score_logits  # noqa: E402

CONFIGS = ("k1:reward", "k1:reward:token:full", "k1:loss", "k2:loss", "k3:loss", "k3:both", "k3:loss:sequence",
           "k2:loss:sequence", "k3:reward:sequence", "rb:reward")


def _setup(model="tiny-random", params="lora", vocab=5, length=3, perturb=0.4, configs=CONFIGS, seed=0):
    opts = LLMOptions(model=model, vocab_size=vocab, max_new_tokens=length, weights_dtype="float64", params=params,
                      n_random_prompts=1, perturb=perturb, configs=configs, seed=seed, progress=False,
                      max_dense=10**9)
    return opts, build(opts, "cpu")


@pytest.mark.parametrize("model,params", [("tiny-random", "lora"), ("tiny-random", "last-layer"),
                                          ("tiny-random-gpt2", "lora"), ("tiny-random-gpt2", "last-layer")])
def test_hook_grads_equal_per_sample_backward(model, params):
    opts, setup = _setup(model, params, vocab=11, length=4)
    gen = generate(setup.loaded.model, setup.prompts * 3, 4, sample_seeds=[(0, 1, i) for i in range(3)], eos=None,
                   pad=setup.loaded.pad_token_id)
    assert setup.psg.subset.method == "hooks"
    fast, _ = sample_grads(setup, gen, "float64")
    setup.psg.subset.method = "loop"
    slow, _ = sample_grads(setup, gen, "float64")
    for key in fast:
        scale = slow[key].abs().max()
        assert scale > 0
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-9, atol=1e-12 * float(scale))


def test_streamed_sketch_equals_the_projection_of_the_loop():
    """With projections, the hooks path projects one module's per-sample gradients at a time; it must equal the
    projection of the naive loop's full per-sample gradients."""
    opts = LLMOptions(model="tiny-random", vocab_size=11, max_new_tokens=4, weights_dtype="float64",
                      params="last-layer", n_random_prompts=1, perturb=0.4, configs=("k1:reward", "k3:loss"),
                      progress=False, max_dense=64, projections=16)
    setup = build(opts, "cpu")
    assert setup.psg.sketch is not None and setup.psg.dim == 16
    gen = generate(setup.loaded.model, setup.prompts * 3, 4, sample_seeds=[(0, 1, i) for i in range(3)], eos=None,
                   pad=setup.loaded.pad_token_id)
    fast, _ = sample_grads(setup, gen, "float64")
    setup.psg.subset.method = "loop"
    slow, _ = sample_grads(setup, gen, "float64")
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-9, atol=1e-12 * float(slow[key].abs().max()))


def _by_itself(gen: Generation, i: int) -> Generation:
    n = int(gen.mask[i].sum())
    return Generation(gen.prompt[i : i + 1], gen.prompt_mask[i : i + 1], gen.completion[i : i + 1, :n],
                      torch.ones((1, n), dtype=gen.mask.dtype))


def test_padding_contributes_nothing():
    opts, setup = _setup(vocab=9, length=5)
    eos, L = 1, 5
    g = torch.Generator().manual_seed(3)
    lengths = [2, 5, 3, 1]
    completion = torch.randint(2, 9, (4, L), generator=g)
    mask = torch.zeros((4, L), dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if n < L:
            completion[i, n - 1] = eos
    prompt = torch.tensor(setup.prompts * 4)
    gen = Generation(prompt, torch.ones_like(prompt), completion, mask)
    grads, values = sample_grads(setup, gen, "float64")
    # other padding tokens: nothing changes
    other = completion.clone()
    other[mask == 0] = 7
    grads2, values2 = sample_grads(setup, Generation(prompt, torch.ones_like(prompt), other, mask), "float64")
    for key in grads:
        torch.testing.assert_close(grads[key], grads2[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(values, values2, rtol=1e-12, atol=1e-14)
    # each response alone, unpadded
    for i in range(4):
        alone, v_alone = sample_grads(setup, _by_itself(gen, i), "float64")
        for key in grads:
            torch.testing.assert_close(grads[key][i : i + 1], alone[key], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(values[i : i + 1], v_alone, rtol=1e-9, atol=1e-12)
    assert values[:, 7].tolist() == [float(n) for n in lengths]


def _enumerate(setup, vocab, length):
    tokens = enumerate_sequences(vocab, length)  # (N, L)
    n = tokens.shape[0]
    prompt = torch.tensor(setup.prompts * n)
    gen = Generation(prompt, torch.ones_like(prompt), tokens, torch.ones(tokens.shape, dtype=torch.float64))
    from biaslab.llm.policy import reference_mode

    model = setup.loaded.model
    with torch.no_grad():
        lp = torch.log_softmax(score_logits(model, gen), -1).gather(-1, tokens[..., None]).squeeze(-1).sum(1)
        with reference_mode(model):
            lr = torch.log_softmax(score_logits(model, gen), -1).gather(-1, tokens[..., None]).squeeze(-1).sum(1)
    return gen, lp.exp(), lr.exp(), lp - lr


def test_enumeration_reproduces_the_table_exactly():
    vocab, length = 5, 3
    # GPT-2: every operation runs in float64 (Llama's RMSNorm computes in float32, which limits identities to ~1e-7)
    opts, setup = _setup("tiny-random-gpt2", vocab=vocab, length=length)
    gen, pi, pi_ref, log_ratio = _enumerate(setup, vocab, length)
    assert abs(float(pi.sum()) - 1) < 1e-12 and abs(float(pi_ref.sum()) - 1) < 1e-12
    grads, values = sample_grads(setup, gen, "float64")
    expect = {k: pi @ g for k, g in grads.items()}  # E_{y~pi}[g(y)]
    fwd = pi_ref @ forward_grads(setup, gen, "float64")  # grad KL(pi_ref || pi)
    r = expect[REFERENCE_KEY]
    scale = float(r.norm())
    assert scale > 1e-3

    def same(a, b, tol=1e-8):
        assert float((a - b).norm()) <= tol * scale, (float((a - b).norm()), scale)

    kl = float(pi @ log_ratio)
    assert kl > 0.05  # a perturbation worth measuring
    assert abs(float(pi @ values[:, 0]) - kl) < 1e-10  # sum_t rb_t is unbiased for the sequence KL
    assert abs(float(pi @ values[:, 1]) - kl) < 1e-10  # k1 and k3 values are unbiased, k2 is not
    assert abs(float(pi @ values[:, 3]) - kl) < 1e-10
    assert abs(float(pi @ values[:, 2]) - kl) > 1e-3
    same(expect["k1:reward:token:rtg"], r)
    same(expect["k1:reward:token:full"], r)
    same(expect["k3:both:token:rtg"], r)
    same(expect["k1:loss:token"], torch.zeros_like(r))
    same(expect["k3:loss:token"], expect["forward_kl_token"])
    same(expect["k3:loss:sequence"], fwd)
    same(expect["k2:loss:sequence"], r)  # same per-sample gradient as k1 in reward with full credit
    for biased in ("k3:loss:token", "k2:loss:token", "k3:reward:sequence:rtg", "rb:reward:token:rtg"):
        assert float((expect[biased] - r).norm()) > 1e-3 * scale, biased  # 1e5 times the round-off tolerance
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    assert cos(expect["k3:loss:token"], expect["forward_kl_token"]) > cos(expect["k3:loss:token"], r)


def test_training_the_adapter_raises_the_reward():
    """``train``: REINFORCE steps on the LoRA toward the liked half of the vocabulary. The mean reward of the last
    5 steps exceeds that of the first 5 by more than 0.15 (seen: +0.42, +0.32, +0.24 for seeds 0, 1, 2)."""
    opts = LLMOptions(model="tiny-random-gpt2", vocab_size=16, max_new_tokens=6, train_steps=30, train_lr=0.05,
                      batch_size=16, seed=0, progress=False)
    history = build(opts, "cpu").train_history
    assert len(history) == 30 and all(0 <= h <= 1 for h in history)
    assert sum(history[-5:]) / 5 > sum(history[:5]) / 5 + 0.15


def test_estimator_not_zero_at_equal_logps_is_refused_with_padding():
    from biaslab.core.estimators import register_estimator
    from biaslab.llm.models import LLMError
    from biaslab.llm.run import parse_config, token_coefficients

    register_estimator("test_llm_k1_plus_1", lambda lp, lr: lp - lr + 1.0)
    cfg = parse_config("test_llm_k1_plus_1:reward:token:full")
    tokens = torch.tensor([[1, 2, 0]])
    lp = torch.log_softmax(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)), -1)[..., 0]  # (1, 3)
    lr = lp.flip(-1)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    with pytest.raises(LLMError, match="not 0 when logp == logp_ref"):
        token_coefficients(cfg, tokens, torch.where(mask.bool(), lp, lr), lr, mask)
    coef = token_coefficients(cfg, tokens, lp, lr, torch.ones(1, 3))  # no padding: accepted
    assert coef.shape == (1, 3)


def test_fast_cotangents_equal_the_general_surrogate_path():
    """The memory-light cotangents (token coefficients, closed-form rb reference, forward-token direction) give the
    per-sample gradients of the general path: placements' surrogate differentiated on full (B, L, V) log-probs."""
    from biaslab.core.placements import Coefficients
    from biaslab.llm.grads import logit_cotangent
    from biaslab.llm.run import (
        FORWARD_TOKEN_KEY,
        REFERENCE_CONFIG,
        _ref_logp_full,
        masked_coefficients,
        masked_logp,
        parse_config,
    )

    opts, setup = _setup("tiny-random-gpt2", vocab=7, length=4)
    completion = torch.tensor([[2, 3, 1, 0], [4, 4, 4, 4], [5, 1, 6, 6]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    prompt = torch.tensor(setup.prompts * 3)
    gen = Generation(prompt, torch.ones_like(prompt), completion, mask)
    fast, _ = sample_grads(setup, gen, "float64")
    psg, model = setup.psg, setup.loaded.model
    lr_full = _ref_logp_full(setup, gen, "float64")
    with psg.recording():
        logits = score_logits(model, gen, "float64")
    logp_m = masked_logp(logits.detach().log_softmax(-1), lr_full, mask)
    for key in [*setup.configs, REFERENCE_KEY]:
        cfg = parse_config(":".join(REFERENCE_CONFIG) if key == REFERENCE_KEY else key)
        coef = masked_coefficients(cfg, completion, logp_m, lr_full, mask)
        slow = psg.grads(logits, logit_cotangent(coef, completion, logits, mask))
        torch.testing.assert_close(fast[key], slow, rtol=1e-9, atol=1e-12, msg=key)
    coef = Coefficients(torch.zeros_like(mask), -lr_full.exp() * mask.unsqueeze(-1))
    slow = psg.grads(logits, logit_cotangent(coef, completion, logits, mask))
    torch.testing.assert_close(fast[FORWARD_TOKEN_KEY], slow, rtol=1e-9, atol=1e-12)


def _splitmix_uniform(seed: int, step: int) -> float:
    """Pure-Python splitmix64 (the published constants), independent of the tensor implementation."""
    m = (1 << 64) - 1
    x = (seed ^ ((0x9E3779B97F4A7C15 * (step + 1)) & m)) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return (x >> 11) * 2.0**-53


def test_device_uniforms_equal_python_splitmix():
    from biaslab.llm.sample import stream_seed, uniforms

    seeds = [stream_seed(0, 1, i) for i in range(50)] + [2**63 - 1, 0, 1]
    for step in (0, 1, 17):
        got = uniforms(torch.tensor(seeds), step).tolist()
        assert got == [_splitmix_uniform(s, step) for s in seeds]


def test_generation_with_eos_matches_a_naive_loop():
    """Generation on the tiny Llama with an EOS token, checked against an independent computation: for each
    response, full forward passes without a KV cache on prompt + prefix, softmax, inverse CDF at the Python
    splitmix uniform, stop right after EOS. Tokens, mask (EOS included, zero after) and padding must agree."""
    from biaslab.llm.sample import stream_seed

    opts = LLMOptions(model="tiny-random", vocab_size=6, max_new_tokens=7, weights_dtype="float64", perturb=0.3,
                      n_random_prompts=3, progress=False, seed=1)
    setup = build(opts, "cpu")
    model, eos, pad = setup.loaded.model, 1, setup.loaded.pad_token_id
    prompts = [setup.prompts[i % 3] for i in range(12)]
    seeds = [(5, 9, i) for i in range(12)]
    gen = generate(model, prompts, 7, sample_seeds=seeds, eos=eos, pad=pad)
    n_ended = 0
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        ids, toks = list(p), []
        for t in range(7):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            cdf = torch.softmax(logits, -1).cumsum(-1)
            u = _splitmix_uniform(stream_seed(*s), t) * float(cdf[-1])
            v = int((cdf <= u).sum())
            toks.append(v)
            ids.append(v)
            if v == eos:
                break
        n_ended += toks[-1] == eos
        n = len(toks)
        assert gen.completion[i, :n].tolist() == toks, i
        assert gen.mask[i].tolist() == [1.0] * n + [0.0] * (7 - n), i
        assert gen.completion[i, n:].tolist() == [pad] * (7 - n)
    assert 3 <= n_ended < 12  # EOS is exercised, and so is the length cap


def test_bf16_autocast_keeps_the_head_and_the_lora_delta_in_float32():
    """Under bf16 autocast the trunk runs in bf16 but the logits are float32 and equal the float32 head applied to
    the trunk's hidden states; the LoRA delta is computed in float32 (equal to a float64 computation to 1e-6)."""
    from biaslab.llm.policy import lora_modules
    from biaslab.llm.sample import head_logits

    opts = LLMOptions(model="tiny-random", vocab_size=32, max_new_tokens=4, perturb=0.05, progress=False)
    setup = build(opts, "cpu")
    model = setup.loaded.model
    gen = generate(model, setup.prompts, 4, sample_seeds=[(0, 1, i) for i in range(4)], eos=None, pad=0,
                   dtype="bfloat16")
    logits = score_logits(model, gen, "bfloat16")
    assert logits.dtype == torch.float32
    ids = torch.cat([gen.prompt, gen.completion], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.base_model(input_ids=ids).last_hidden_state[:, -5:-1]
    w = model.get_output_embeddings().weight
    torch.testing.assert_close(logits, h.float() @ w.T, rtol=0, atol=1e-5)
    assert head_logits(model, h).dtype == torch.float32
    lora = next(iter(lora_modules(model).values()))
    x = torch.randn(3, lora.lora_A.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora(x)
        base = lora.base(x)
    assert out.dtype == torch.float32
    exact = (x.double() @ lora.lora_A.double().T @ lora.lora_B.double().T) * lora.scale
    torch.testing.assert_close((out - base.float()).double(), exact, rtol=0, atol=1e-6)


def test_read_prompts_jsonl_and_text(tmp_path):
    from biaslab.llm.models import LLMError
    from biaslab.llm.sample import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "What is 2+2?"}\n\n"Name a color."\n{"question": "Why?"}\n')
    assert read_prompts(str(f)) == ["What is 2+2?", "Name a color.", "Why?"]
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(LLMError, match="line 1"):
        read_prompts(str(tmp_path / "bad.jsonl"))

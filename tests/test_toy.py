"""Toy models: O(T) sampling gives the samples of the old O(T^2) algorithm, numbers pinned, memory helpers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from biaslab.engines.toy import AutoregressiveModel, NeuralAR, TabularAR, make_pair


@torch.no_grad()
def prefix_rerun_sample(model: AutoregressiveModel, n: int, generator: torch.Generator) -> Tensor:
    """The pre-O(T) algorithm, kept as the reference: the whole prefix re-read at every step (O(T^2))."""
    tokens = torch.zeros(n, model.length, dtype=torch.long)
    for t in range(model.length):
        logp_t = model.next_log_probs(tokens[:, :t])  # (n, V)
        tokens[:, t] = torch.multinomial(logp_t.exp(), 1, generator=generator).squeeze(-1)
    return tokens


@torch.no_grad()
def gru_definition_log_probs(model: NeuralAR, prefix: Tensor) -> Tensor:
    """(n, V) log pi(. | prefix) written from NeuralAR's definition: inputs BOS (id V), y_0..y_{t-1}; GRU cell
    r = s(W_xr x + W_hr h), z = s(W_xz x + W_hz h), m = tanh(W_xm x + r * (W_hm h)), h' = (1 - z) m + z h, h_0 = 0;
    log_softmax of the linear head on the last state."""
    n, H = prefix.shape[0], model.hidden
    inp = torch.cat([torch.full((n, 1), model.vocab_size, dtype=torch.long), prefix], 1)  # (n, t+1)
    wx, bx, wh, bh = model.w_x.weight, model.w_x.bias, model.w_h.weight, model.w_h.bias  # (3H, E), (3H,), ...
    h = torch.zeros(n, H, dtype=torch.float64)
    for s in range(inp.shape[1]):
        gx = model.embed.weight[inp[:, s]] @ wx.T + bx  # (n, 3H)
        gh = h @ wh.T + bh  # (n, 3H)
        r = torch.sigmoid(gx[:, :H] + gh[:, :H])
        z = torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
        m = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * m + z * h
    return torch.log_softmax(h @ model.head.weight.T + model.head.bias, -1)  # (n, V)


@pytest.mark.parametrize("kind, V, T, seed", [("neural", 3, 4, 0), ("neural", 5, 9, 1), ("tabular", 3, 5, 2)])
def test_carried_state_sampling_equals_prefix_rerun(kind: str, V: int, T: int, seed: int) -> None:
    policy, _ = make_pair(kind, V, T, seed=seed, kl_scale=0.7)
    for gen_seed in range(3):
        fast = policy.sample(500, torch.Generator().manual_seed(gen_seed))
        slow = prefix_rerun_sample(policy, 500, torch.Generator().manual_seed(gen_seed))
        assert torch.equal(fast, slow)


def test_neural_next_log_probs_match_the_definition() -> None:
    policy, _ = make_pair("neural", 4, 6, seed=3, kl_scale=0.5)
    y = policy.sample(200, torch.Generator().manual_seed(0))
    full = policy.log_probs(y)  # (n, T, V)
    for t in range(policy.length):
        want = gru_definition_log_probs(policy, y[:, :t])
        torch.testing.assert_close(policy.next_log_probs(y[:, :t]), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(full[:, t].detach(), want, rtol=1e-12, atol=1e-12)


def test_neural_sampling_runs_one_cell_per_position(monkeypatch: pytest.MonkeyPatch) -> None:
    policy, _ = make_pair("neural", 3, 12, seed=0)
    calls = []
    cell = NeuralAR._cell

    def counting(self: NeuralAR, x: Tensor, h: Tensor) -> Tensor:
        calls.append(1)
        return cell(self, x, h)

    monkeypatch.setattr(NeuralAR, "_cell", counting)
    policy.sample(10, torch.Generator().manual_seed(0))
    assert len(calls) == 12  # O(T); the prefix re-run made T (T + 1) / 2 = 78


# make_pair(kind, V, T, seed, kl_scale=0.8), 64 samples from Generator seed 11: sum_n,t (t+1) y_nt, sum of the policy's
# log-probabilities (N, T, V), sum of the reference's log-probabilities of the samples, sum of the policy's parameters.
# Recorded from the toy models before the O(T) sampling change (commit 6443e8a).
PINNED = [
    (("tabular", 3, 4, 0), 384, -1175.1242329625263, -245.56830560176945, 5.961397877134502),
    (("neural", 3, 4, 2), 688, -2260.3657863337226, -301.0145863265067, -29.05051660795962),
    (("neural", 5, 6, 7), 2807, -4356.295481728121, -561.0782373470478, -3.8887537615279157),
]


@pytest.mark.parametrize("key, tok, lp_sum, ref_lp_sum, param_sum", PINNED, ids=lambda v: str(v))
def test_numbers_are_pinned(key: tuple, tok: int, lp_sum: float, ref_lp_sum: float, param_sum: float) -> None:
    kind, V, T, seed = key
    policy, ref = make_pair(kind, V, T, seed=seed, kl_scale=0.8)
    y = policy.sample(64, torch.Generator().manual_seed(11))
    assert int((y * torch.arange(1, T + 1)).sum()) == tok
    with torch.no_grad():
        assert float(policy.log_probs(y).sum()) == pytest.approx(lp_sum, rel=1e-12)
        assert float(ref.log_probs(y).gather(-1, y[..., None]).sum()) == pytest.approx(ref_lp_sum, rel=1e-12)
        assert float(policy.flat(list(policy.parameters())).sum()) == pytest.approx(param_sum, rel=1e-12)


def test_memory_helpers() -> None:
    tab = TabularAR.random(3, 4, seed=0)
    assert tab.n_sequences() == 81
    assert tab.log_probs_bytes() == 81 * 4 * 3 * 8
    assert tab.log_probs_bytes(10) == 10 * 4 * 3 * 8
    assert tab.per_sample_grads_bytes(5) == 5 * tab.n_params() * 8
    neural = NeuralAR.random(50, 20, seed=0)
    assert neural.per_sample_grads_bytes(1) == 8 * neural.n_params()


def test_tabular_token_logp_jacobian_matches_autograd() -> None:
    policy, _ = make_pair("tabular", 3, 4, seed=5, kl_scale=0.9)
    y = policy.sample(30, torch.Generator().manual_seed(1))
    mask = torch.ones(30, 4)
    mask[::3, 2:] = 0  # some padded tails
    jac = policy.token_logp_jacobian(y, mask)  # (N, T, P)
    params = list(policy.parameters())
    lp = policy.log_probs(y).gather(-1, y[..., None]).squeeze(-1) * mask  # (N, T)
    for n in range(0, 30, 7):
        for t in range(4):
            g = torch.autograd.grad(lp[n, t], params, retain_graph=True, allow_unused=True)
            want = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)])
            torch.testing.assert_close(jac[n, t], want, rtol=1e-13, atol=1e-13)
    assert int(policy.param_offsets()[-1]) == policy.n_params() - 3**3 * 3


def test_a_tabular_policy_with_frozen_levels_is_refused_by_both_engines() -> None:
    """The closed-form tabular gradients cover every level: a frozen level would give gradient vectors of another
    length than the trainable parameters (a silent mismatch), so both engines refuse it with one message."""
    from biaslab import ExactEngine
    from biaslab.engines.montecarlo import MonteCarloEngine
    from biaslab.engines.toy import ModelError

    policy, ref = make_pair("tabular", 3, 3, seed=0, kl_scale=0.5)
    policy.levels[0].requires_grad_(False)
    for engine in (ExactEngine, MonteCarloEngine):
        with pytest.raises(ModelError, match="levels must all be trainable"):
            engine(policy, ref)

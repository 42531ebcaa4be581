"""Per-prefix divergences and the full-distribution estimators of distillation, against formulas written here with
plain Python loops over the vocabulary (nothing from biaslab.core.objectives is reused on the expected side)."""

from __future__ import annotations

import math

import pytest
import torch

from biaslab.core.estimators import get_estimator
from biaslab.core.objectives import OBJECTIVES, ObjectiveError, objective

D = torch.float64


def dists(seed: int, n: int = 4, V: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(2 * torch.randn(n, V, generator=g, dtype=D), -1) for _ in range(2))


def py_kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.exp().tolist()


def top(q: list[float], k: int) -> list[int]:
    return sorted(range(len(q)), key=lambda i: -q[i])[:k]


HAND = {
    "reverse_kl_token": lambda p, q: py_kl(p, q),
    "forward_kl_token": lambda p, q: py_kl(q, p),
    "reverse_kl_token_ref": lambda p, q: py_kl(p, q),
    "neg_entropy_token": lambda p, q: sum(x * math.log(x) for x in p),
    "jsd_token:0": lambda p, q: py_kl(q, p),
    "jsd_token:1": lambda p, q: py_kl(p, q),
    "jsd_token:0.3": lambda p, q: (0.3 * py_kl(q, [0.7 * a + 0.3 * b for a, b in zip(p, q)])
                                   + 0.7 * py_kl(p, [0.7 * a + 0.3 * b for a, b in zip(p, q)])),
    "forward_kl_token_topk:2": lambda p, q: sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in top(q, 2)),
    "mixed_kl_token_topk:3:0.25": lambda p, q: (
        lambda keep: (lambda pt, qt: 0.25 * py_kl(qt, pt) + 0.75 * py_kl(pt, qt))(
            [p[i] / sum(p[j] for j in keep) for i in keep], [q[i] / sum(q[j] for j in keep) for i in keep]
        )
    )(top(q, 3)),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_per_prefix_divergences_equal_the_hand_formulas(name):
    p_log, q_log = dists(1)
    ob = objective(name)
    assert ob.kind == "token" and ob.law == ("reference" if name.endswith("_ref") else "policy")
    got = ob.divergence(p_log, q_log)
    expected = [HAND[name](p, q) for p, q in zip(rows(p_log), rows(q_log))]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)


def test_every_objective_has_a_case_here():
    """Registry test: a new objective without a hand-written case fails (sequence ones: tests/test_exact_opd.py)."""
    covered = {n.split(":")[0] for n in HAND} | {"reverse_kl", "forward_kl", "neg_entropy"}
    assert set(OBJECTIVES) == covered


def test_jsd_is_symmetric_in_its_mixing_and_zero_at_equality():
    p_log, q_log = dists(2)
    d = objective("jsd_token:0.5").divergence
    torch.testing.assert_close(d(p_log, q_log), d(q_log, p_log))
    assert float(d(p_log, p_log).abs().max()) < 1e-15


@pytest.mark.parametrize("bad", ["nope", "jsd_token", "jsd_token:2", "forward_kl_token_topk:0", "reverse_kl:3",
                                 "mixed_kl_token_topk:3"])
def test_bad_objective_names_are_refused(bad):
    with pytest.raises(ObjectiveError):
        objective(bad)


# ---------------------------------------------------------------- the estimators that place these in a loss


def test_verl_topk_forward_kl_is_clamped_at_zero_and_reports_where():
    """verl forward_kl_topk (losses.py:365 clamp_min(0)): negative truncated KLs become 0 with zero gradient, and the
    clamp mask marks exactly those prefixes."""
    p_log, q_log = dists(3, n=8)
    boost = torch.zeros_like(q_log).scatter_(-1, torch.topk(q_log, 2, -1).indices, 1.5)  # more mass on q's top 2
    p_log = torch.where(torch.arange(8)[:, None] % 2 == 0, torch.log_softmax(q_log + boost, -1), p_log)
    p_log = p_log.clone().requires_grad_(True)
    est = get_estimator("fkl_topk:2")
    raw = [HAND["forward_kl_token_topk:2"](p, q) for p, q in zip(rows(p_log.detach()), rows(q_log))]
    out = est(p_log, q_log)
    torch.testing.assert_close(out.detach(), torch.tensor([max(x, 0.0) for x in raw], dtype=D), rtol=1e-12, atol=0)
    assert est.clamp_mask(p_log.detach(), q_log).tolist() == [x < 0 for x in raw]
    assert any(x < 0 for x in raw) and any(x > 0 for x in raw)  # both sides exercised
    (g,) = torch.autograd.grad(out.sum(), p_log)
    for i, x in enumerate(raw):
        if x < 0:
            assert float(g[i].abs().max()) == 0.0
        else:  # d/dlogp_v of -sum_{v in K} q_v log p_v (log p as free coordinates): -q_v on K, 0 elsewhere
            q = rows(q_log)[i]
            expected = [-q[v] if v in top(q, 2) else 0.0 for v in range(len(q))]
            torch.testing.assert_close(g[i], torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-14)


def test_miles_topk_penalty_never_reads_the_sampled_token():
    """miles --opd-log-prob-top-k: sum over the student's top-k with p renormalised there; a prefix function."""
    p_log, q_log = dists(4)
    got = get_estimator("rkl_topk_student:3")(p_log, q_log)
    expected = []
    for p, q in zip(rows(p_log), rows(q_log)):
        keep = top(p, 3)
        z = sum(p[i] for i in keep)
        expected.append(sum(p[i] / z * (math.log(p[i]) - math.log(q[i])) for i in keep))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)


def test_neg_entropy_and_jsd_estimators():
    p_log, q_log = dists(5)
    torch.testing.assert_close(get_estimator("neg_entropy")(p_log, q_log),
                               torch.tensor([sum(x * math.log(x) for x in p) for p in rows(p_log)], dtype=D))
    torch.testing.assert_close(get_estimator("jsd:0.3")(p_log, q_log),
                               torch.tensor([HAND["jsd_token:0.3"](p, q) for p, q in zip(rows(p_log), rows(q_log))],
                                            dtype=D))


def test_clamped_estimators_mark_their_active_clamps():
    """verl's k3 clamps delta at +-20 and the value at +-10: the mask is exactly where either bites."""
    ref = torch.zeros(5, dtype=D)
    lp = torch.tensor([-30.0, -3.0, 0.5, 12.0, 25.0], dtype=D)  # delta; k3 = e^-d - 1 + d
    mask = get_estimator("k3_clamped").clamp_mask(lp, ref).tolist()
    k3 = [math.exp(-max(min(d, 20), -20)) - 1 + max(min(d, 20), -20) for d in lp.tolist()]
    assert mask == [abs(d) > 20 or v > 10 for d, v in zip(lp.tolist(), k3)] == [True, True, False, True, True]
    assert get_estimator("k3").clamp_mask is None


def test_parameterised_estimator_names_are_checked():
    from biaslab.core.estimators import EstimatorError

    for bad in ("fkl_topk:x", "jsd:", "mixed_topk:3"):
        with pytest.raises(EstimatorError):
            get_estimator(bad)

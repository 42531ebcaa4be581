"""Bad input gets a clear error, never a silent wrong number."""

import numpy as np
import pytest
import torch

from biaslab import EnumerationTooLarge, ExactEngine, ModelError, NeuralAR, TabularAR, make_config, make_pair
from biaslab.core.io import atomic_write_text
from biaslab.engines.exact import check_enumerable
from biaslab.engines.logits import load_logits_npz


def test_enumeration_too_large_is_refused_before_allocating():
    with pytest.raises(EnumerationTooLarge, match=r"(50\*\*20|V=50, T=20).*iB.*Monte Carlo"):
        check_enumerable(50, 20)
    policy, ref = make_pair("neural", 12, 9, seed=0)  # 12**9 = 5e9 sequences: small model, huge enumeration
    with pytest.raises(EnumerationTooLarge, match="would need about"):
        ExactEngine(policy, ref)


def test_limit_is_configurable():
    with pytest.raises(EnumerationTooLarge, match="limit 1 KiB"):
        check_enumerable(2, 3, max_bytes=1024)


def test_tabular_too_large_is_refused():
    with pytest.raises(ModelError, match="logits"):
        TabularAR.random(50, 20)


def test_nan_and_inf_logits():
    ref = TabularAR.random(3, 2, seed=0).requires_grad_(False)
    bad = TabularAR.random(3, 2, seed=1)
    with torch.no_grad():
        bad.levels[1][2, 1] = float("nan")
    with pytest.raises(ModelError, match="policy level 1 contains NaN"):
        ExactEngine(bad, ref)
    with torch.no_grad():
        bad.levels[1][2, 1] = float("inf")
    with pytest.raises(ModelError, match="infinite"):
        ExactEngine(bad, ref)


def test_zero_reference_probability():
    ref = TabularAR.random(3, 2, seed=0)
    with torch.no_grad():
        ref.levels[0][0, 2] = -float("inf")
    with pytest.raises(ModelError, match="reference level 0 gives zero probability"):
        ExactEngine(TabularAR.random(3, 2, seed=1), ref.requires_grad_(False))


def test_mismatched_vocabulary_or_length():
    with pytest.raises(ModelError, match="disagree"):
        ExactEngine(TabularAR.random(3, 2), TabularAR.random(4, 2))
    with pytest.raises(ModelError, match="disagree"):
        ExactEngine(TabularAR.random(3, 2), TabularAR.random(3, 3))


def test_wrong_level_shapes():
    with pytest.raises(ModelError, match=r"level 1 must have shape \(V\*\*1, V\) = \(3, 3\)"):
        TabularAR([np.zeros((1, 3)), np.zeros((2, 3))])


def test_wrong_token_shape_and_range():
    m = NeuralAR.random(3, 4)
    with pytest.raises(ModelError, match=r"shape \(N, 4\)"):
        m.log_probs(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ModelError, match=r"lie in \[0, 3\)"):
        m.log_probs(torch.full((2, 4), 3))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown placement 'los'.*reward, loss, both"):
        make_config("k3", "los")
    with pytest.raises(ValueError, match="unknown level"):
        make_config("k3", "loss", "tokens")
    with pytest.raises(ModelError, match="unknown model"):
        make_pair("lstm")


def test_user_estimator_errors_surface_through_the_engine():
    from biaslab import Estimator, EstimatorError

    policy, ref = make_pair("tabular", 2, 2)
    engine = ExactEngine(policy, ref)
    cfg = make_config(Estimator("bad", lambda lp, lr: (lp - lr).mean(-1)), "loss", "token")
    with pytest.raises(EstimatorError, match="'bad' returned shape"):
        engine.evaluate(cfg)


def write_npz(path, V=3, T=2, **override):
    g = np.random.default_rng(0)
    arrays = {f"policy_{t}": g.normal(size=(V**t, V)) for t in range(T)}
    arrays |= {f"ref_{t}": g.normal(size=(V**t, V)) for t in range(T)}
    arrays |= override
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_contract(tmp_path):
    policy, ref = load_logits_npz(write_npz(tmp_path / "ok.npz"))
    assert policy.vocab_size == 3 and ref.length == 2
    with pytest.raises(ModelError, match="policy has 2 levels but reference has 1"):
        load_logits_npz(write_npz(tmp_path / "a.npz", ref_1=None))
    with pytest.raises(ModelError, match="vocabularies differ"):
        load_logits_npz(write_npz(tmp_path / "b.npz", ref_0=np.zeros((1, 4)), ref_1=np.zeros((4, 4))))
    with pytest.raises(ModelError, match="zero probability"):
        load_logits_npz(write_npz(tmp_path / "c.npz", ref_1=np.full((3, 3), -np.inf)))
    with pytest.raises(ModelError, match="NaN"):
        load_logits_npz(write_npz(tmp_path / "d.npz", policy_0=np.full((1, 3), np.nan)))
    with pytest.raises(ModelError, match="no such file"):
        load_logits_npz(tmp_path / "missing.npz")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_estimator_returning_complex_or_integer_values():
    from biaslab import Estimator, EstimatorError

    lp, lr = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(EstimatorError, match="'c' returned dtype complex128; expected real floating-point"):
        Estimator("c", lambda a, b: (a - b).to(torch.complex128))(lp, lr)
    with pytest.raises(EstimatorError, match="'i' returned dtype int64"):
        Estimator("i", lambda a, b: (a - b).long())(lp, lr)
    assert Estimator("ok", lambda a, b: a - b)(lp, lr).dtype == torch.float64


def test_npy_or_folder_instead_of_npz(tmp_path):
    np.save(tmp_path / "levels.npy", np.zeros((1, 3)))
    with pytest.raises(ModelError, match=r"single array \(a .npy file\); expected an .npz archive"):
        load_logits_npz(tmp_path / "levels.npy")
    with pytest.raises(ModelError, match="is a folder"):
        load_logits_npz(tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable .npz file"):
        load_logits_npz(tmp_path / "junk.npz")


def test_npz_with_text_arrays(tmp_path):
    np.savez(tmp_path / "s.npz", policy_0=np.array([["a", "b"]]), ref_0=np.array([["a", "b"]]))
    with pytest.raises(ModelError, match="array policy_0 is not numeric"):
        load_logits_npz(tmp_path / "s.npz")

"""Thread policy (biaslab.engines.threads): one thread below the work threshold, env override, user pinning respected,
previous counts restored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from biaslab.engines import threads

SMALL, LARGE = threads.SMALL_WORK - 1, threads.SMALL_WORK


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch at its 'default' of 2 threads, no pinning env vars, no BIASLAB_THREADS; everything restored after."""
    saved = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    monkeypatch.setattr(threads, "_ours", None)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_small_problem_gets_one_thread_and_restores(clean: None) -> None:
    with threads.small_problem_threads(SMALL) as k:
        assert k == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads.small_problem_threads(LARGE) as k:
        assert k == 2
    with threads.small_problem_threads(None) as k:  # unknown size: untouched
        assert k == 2


def test_restores_on_exception(clean: None) -> None:
    with pytest.raises(RuntimeError), threads.small_problem_threads(SMALL):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_thread_policy_persists_and_undoes_its_own_choice(clean: None) -> None:
    assert threads.thread_policy(SMALL) == 1
    assert torch.get_num_threads() == 1
    assert threads.thread_policy(LARGE) == 2  # the 1 was ours, so a large problem gets the default back
    assert threads.thread_policy(None) == 2


def test_env_override(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.ENV_VAR, "3")
    with threads.small_problem_threads(LARGE) as k:
        assert k == 3
    with threads.small_problem_threads(None) as k:
        assert k == 3
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # BIASLAB_THREADS wins over a pinned OMP count
    assert threads.choose_threads(SMALL) == 3
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert threads.choose_threads(SMALL) is None  # auto, but OMP_NUM_THREADS pinned
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads(SMALL) == 1
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(threads.ENV_VAR, bad)
        with pytest.raises(ValueError, match=threads.ENV_VAR):
            threads.choose_threads(SMALL)


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_pinning_env_is_respected(clean: None, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "2")
    with threads.small_problem_threads(SMALL) as k:
        assert k == 2
    assert threads.thread_policy(SMALL) == 2


def test_explicit_set_num_threads_is_respected(clean: None) -> None:
    torch.set_num_threads(3)  # not torch's default: the user's choice
    assert threads.user_pinned()
    with threads.small_problem_threads(SMALL) as k:
        assert k == 3
    assert threads.thread_policy(SMALL) == 3


def test_helpers() -> None:
    assert threads.work_size(10, 4, 3) == 120
    assert threads.default_threads() >= 1

"""The figure registry and the driver of ``biaslab figures``: ``@figure(name)`` registers ``fn(out_dir, quick,
progress=False) -> [written paths]``; ``make_figures`` runs them in registration order on one torch thread (the
toys' tensors are small: one thread is faster and sums in a fixed order, so two runs write identical bytes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FigureFn = Callable[..., list[Path]]
_FIGURES: dict[str, FigureFn] = {}


def figure(name: str) -> Callable[[FigureFn], FigureFn]:
    """Register ``fn(out_dir, quick, progress=False) -> [written paths]`` as the figure ``name``."""

    def deco(fn: FigureFn) -> FigureFn:
        _FIGURES[name] = fn
        return fn

    return deco


def make_figures(
    out: str | Path = "figures", quick: bool = False, progress: bool = True, only: list[str] | None = None
) -> list[Path]:
    """Run every registered figure (or those in ``only``) into ``out``; return the written paths."""
    import torch
    from tqdm.auto import tqdm

    out = Path(out)
    names = list(_FIGURES) if only is None else only
    unknown = set(names) - set(_FIGURES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; known: {', '.join(_FIGURES)}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toys' tensors are small: one thread is faster and sums in a fixed order
    try:
        for name in tqdm(names, desc="figures", disable=not progress):
            written += _FIGURES[name](out, quick, progress=progress)
    finally:
        torch.set_num_threads(threads)
    return written

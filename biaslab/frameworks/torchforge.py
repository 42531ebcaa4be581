"""TorchForge (meta-pytorch/torchforge, late 2026) apps/grpo: unclamped k3 (exp(ref - lp) - (ref - lp) - 1) times
``beta`` (0.1) added to the per-token policy loss, averaged per response then over the batch; GRPO advantages
(group mean and std of the reward).

Sources (TorchForge main, late 2026): apps/grpo/main.py (simple_grpo_loss, ComputeAdvantages), apps/grpo/qwen3_1_7b.yaml
(defaults: beta 0.1, group_size 8).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, kl_terms


class TorchForge(Preset):
    name = "torchforge"
    title = "TorchForge GRPO"
    version = "main (late 2026)"
    functions = "apps/grpo/main.py simple_grpo_loss"
    sources = "TorchForge main (late 2026): apps/grpo/main.py, apps/grpo/qwen3_1_7b.yaml"
    keys = (
        Key("beta", 0.1, "float"),
        Key("group_size", 8, "int"),
    )
    group_key = "group_size"

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta = float(cfg["beta"])
        return Recipe(
            name="torchforge",
            baseline="grpo",
            pg_agg="seq-mean-token-mean",
            **kl_terms(loss=("k3", beta) if beta != 0 else None),
            loss_agg="seq-mean-token-mean",
        )

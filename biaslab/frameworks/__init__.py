"""Framework presets: verl, OpenRLHF, TRL (GRPO and PPO), SkyRL, slime, NeMo-RL, each in its own config keys."""

from __future__ import annotations

from .base import Key, Preset, PresetError
from .nemo_rl import NemoRL
from .openrlhf import OpenRLHF
from .skyrl import SkyRL
from .slime import Slime
from .trl import TRLGRPO, TRLPPO
from .verl import Verl

PRESETS: dict[str, Preset] = {p.name: p for p in (Verl(), OpenRLHF(), TRLGRPO(), TRLPPO(), SkyRL(), Slime(), NemoRL())}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive), or an error listing the known frameworks."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    raise PresetError(f"unknown framework {name!r}; choose one of: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "Key", "Preset", "PresetError", "get_preset"]

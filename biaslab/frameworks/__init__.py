"""Framework presets, each in its own config keys: verl, OpenRLHF, TRL (GRPO, RLOO, PPO), SkyRL, slime, NeMo-RL,
ROLL, AReaL, EasyR1, ms-swift, Oat, TorchForge, Tinker cookbook."""

from __future__ import annotations

from .areal import AReaL
from .base import Key, Preset, PresetError
from .easyr1 import EasyR1
from .nemo_rl import NemoRL
from .oat import Oat
from .openrlhf import OpenRLHF
from .roll import Roll
from .skyrl import SkyRL
from .slime import Slime
from .swift import MsSwift
from .tinker import Tinker
from .torchforge import TorchForge
from .trl import TRLGRPO, TRLPPO, TRLRLOO
from .verl import Verl

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Verl(),
        OpenRLHF(),
        TRLGRPO(),
        TRLRLOO(),
        TRLPPO(),
        SkyRL(),
        Slime(),
        NemoRL(),
        Roll(),
        AReaL(),
        EasyR1(),
        MsSwift(),
        Oat(),
        TorchForge(),
        Tinker(),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive), or an error listing the known frameworks."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    raise PresetError(f"unknown framework {name!r}; choose one of: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "Key", "Preset", "PresetError", "get_preset"]

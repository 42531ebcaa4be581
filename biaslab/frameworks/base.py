"""What a framework preset is: that framework's own config keys and defaults, mapped to a ``Recipe``.

A ``Preset`` lists its ``Key``s exactly as the framework names them (dotted Hydra paths for verl/SkyRL/NeMo-RL,
argparse flags without dashes for OpenRLHF/slime, config fields for TRL). ``config(settings)`` merges user
settings over the defaults and rejects unknown keys or values with the accepted ones listed; ``recipe(cfg)``
reproduces the framework's formulas through ``biaslab.recipes`` and its estimators through the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..estimators import Estimator
from ..recipes import Recipe

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"null", "none", "~", ""}


class PresetError(ValueError):
    """Unknown framework, key or value (the message lists the accepted ones)."""


@dataclass(frozen=True)
class Key:
    """One config key: its framework name, default, type and (for choices) accepted values."""

    name: str
    default: object
    kind: str  # "bool" | "float" | "int" | "choice"
    choices: tuple = ()
    nullable: bool = False
    help: str = ""

    def parse(self, raw: object) -> object:
        """Validated value from a string (``--set``) or a YAML/JSON value."""
        if isinstance(raw, str) and raw.strip().lower() in _NONE and self.nullable:
            return None
        if raw is None:
            if self.nullable:
                return None
            raise PresetError(f"{self.name} cannot be null")
        if self.kind == "bool":
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise PresetError(f"{self.name} takes true or false, not {raw!r}")
        if self.kind in ("float", "int"):
            try:
                value = float(raw) if self.kind == "float" else int(str(raw))
            except ValueError:
                raise PresetError(f"{self.name} takes a number ({self.kind}), not {raw!r}") from None
            if self.choices and value not in self.choices:
                accepted = ", ".join(str(c) for c in self.choices)
                raise PresetError(f"{self.name}={raw!r} is not modelled; accepted values: {accepted}")
            return value
        value = raw if not isinstance(raw, str) else raw.strip()
        if value not in self.choices:
            raise PresetError(
                f"unknown value {raw!r} for {self.name}; accepted values: {', '.join(str(c) for c in self.choices)}"
            )
        return value


class Preset:
    """A framework's configuration space. Subclasses set the class attributes and implement ``recipe``."""

    name: str = ""
    title: str = ""
    version: str = ""
    functions: str = ""  # the framework functions whose formulas the preset reproduces
    keys: tuple[Key, ...] = ()
    search_keys: tuple[str, ...] = ()  # keys the nearest-unbiased search may change
    strip_prefixes: tuple[str, ...] = ("--",)

    def key(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise PresetError(f"unknown {self.title} key {name!r}; accepted keys: {', '.join(k.name for k in self.keys)}")

    def normalize_name(self, name: str) -> str:
        for p in self.strip_prefixes:
            if name.startswith(p):
                name = name[len(p) :]
        return name

    def defaults(self) -> dict[str, object]:
        return {k.name: k.default for k in self.keys}

    def config(self, settings: Mapping[str, object] | None = None) -> dict[str, object]:
        """Defaults overlaid with validated ``settings`` (framework key -> raw value)."""
        cfg = self.defaults()
        for raw_name, raw in (settings or {}).items():
            k = self.key(self.normalize_name(raw_name))
            cfg[k.name] = k.parse(raw)
        self.validate(cfg)
        return cfg

    def validate(self, cfg: dict[str, object]) -> None:
        """Raise ``PresetError`` for combinations the framework itself rejects."""

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        raise NotImplementedError

    def kl_enabled(self, cfg: Mapping[str, object]) -> bool:
        r = self.recipe(cfg)
        return r.has_reward_kl or r.has_loss_kl

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        """(cfg with KL switched on the way the framework's docs do it, the keys changed)."""
        raise NotImplementedError

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return 1

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        """Modelling assumptions worth printing next to a verdict."""
        return []

    def search_values(self, name: str, cfg: Mapping[str, object]) -> list[object]:
        """Candidate values of one key for the nearest-unbiased search (all but the current one)."""
        k = self.key(name)
        if k.kind == "bool":
            values: list[object] = [True, False]
        elif k.kind == "choice":
            values = list(k.choices)
        else:
            values = []
        return [v for v in values if v != cfg[name]]


def estimator_of(table: Mapping[str, Estimator | str], key: str, value: str) -> Estimator | str:
    try:
        return table[value]
    except KeyError:
        raise PresetError(f"unknown value {value!r} for {key}; accepted values: {', '.join(table)}") from None


__all__ = ["Key", "Preset", "PresetError", "estimator_of"]

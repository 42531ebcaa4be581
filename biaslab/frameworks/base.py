"""What a framework preset is: that framework's own config keys and defaults, mapped to a ``Recipe``.

A ``Preset`` lists its ``Key``s exactly as the framework names them (dotted Hydra paths for verl/SkyRL/NeMo-RL,
argparse flags without dashes for OpenRLHF/slime, config fields for TRL). ``config(settings)`` merges user
settings over the defaults and rejects unknown keys or values with the accepted ones listed; ``recipe(cfg)``
reproduces the framework's formulas through ``biaslab.recipes`` and its estimators through the registry.
"""

from __future__ import annotations

import math
import re
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
    why: str = ""  # why values outside ``choices`` are refused (appended to the error)

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
                flag = raw
            elif str(raw).strip().lower() in _TRUE:
                flag = True
            elif str(raw).strip().lower() in _FALSE:
                flag = False
            else:
                raise PresetError(f"{self.name} takes true or false, not {raw!r}")
            if self.choices and flag not in self.choices:
                why = f" ({self.why})" if self.why else ""
                accepted = ", ".join("true" if c else "false" for c in self.choices)
                raise PresetError(f"{self.name}={raw!r} is not modelled{why}; accepted values: {accepted}")
            return flag
        if self.kind in ("float", "int"):
            try:
                value = float(raw) if self.kind == "float" else int(str(raw))
            except ValueError:
                raise PresetError(f"{self.name} takes a number ({self.kind}), not {raw!r}") from None
            if self.choices and value not in self.choices:
                accepted = ", ".join(str(c) for c in self.choices)
                why = f" ({self.why})" if self.why else ""
                raise PresetError(f"{self.name}={raw!r} is not modelled{why}; accepted values: {accepted}")
            return value
        value = raw if not isinstance(raw, str) else raw.strip()
        if value not in self.choices:
            why = f" ({self.why})" if self.why else ""
            raise PresetError(
                f"unknown value {raw!r} for {self.name}{why}; accepted values: "
                f"{', '.join(str(c) for c in self.choices)}"
            )
        return value


class Preset:
    """A framework's configuration space. Subclasses set the class attributes and implement ``recipe``."""

    name: str = ""
    title: str = ""
    version: str = ""
    functions: str = ""  # the framework functions whose formulas the preset reproduces
    sources: str = ""  # the source files (and release) the preset follows
    keys: tuple[Key, ...] = ()
    search_keys: tuple[str, ...] = ()  # keys the nearest-unbiased search may change
    strip_prefixes: tuple[str, ...] = ("--",)
    aliases: Mapping[str, str] = {}  # other spellings of a key -> its name
    group_key: str = ""  # the key holding the responses per prompt B ('' : B = 1)
    kl_switch: Mapping[str, object] = {}  # the keys ``enable_kl`` sets (the framework docs' way to switch KL on)
    lag_keys: tuple[str, ...] = ()  # keys whose product is ``updates_per_rollout`` (a preset may override both)
    unit_keys: tuple[str, ...] = ()  # keys that must lie in [0, 1] (discounts)
    positive_keys: tuple[str, ...] = ()  # keys that must be >= 1 (epochs, batch sizes)

    def key(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise PresetError(f"unknown {self.title} key {name!r}; accepted keys: {', '.join(k.name for k in self.keys)}")

    def normalize_name(self, name: str) -> str:
        for p in self.strip_prefixes:
            if name.startswith(p):
                name = name[len(p) :]
        return self.aliases.get(name, name)

    def defaults(self) -> dict[str, object]:
        return {k.name: k.default for k in self.keys}

    def config(self, settings: Mapping[str, object] | None = None) -> dict[str, object]:
        """Defaults overlaid with validated ``settings`` (framework key -> raw value)."""
        cfg = self.defaults()
        for raw_name, raw in (settings or {}).items():
            k = self.key(self.normalize_name(raw_name))
            cfg[k.name] = k.parse(raw)
        for k in self.unit_keys:
            if not 0.0 <= cfg[k] <= 1.0:
                raise PresetError(f"{k} must lie in [0, 1], got {cfg[k]}")
        for k in self.positive_keys:
            if cfg[k] < 1:
                raise PresetError(f"{k} must be >= 1, got {cfg[k]}")
        self.validate(cfg)
        return cfg

    def read_config(
        self, settings: Mapping[str, object] | None, lenient: bool = False
    ) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
        """(cfg, read, ignored). ``lenient`` (a whole config file): keys the preset does not know are returned in
        ``ignored`` (irrelevant to the KL gradient) instead of refused; Hydra interpolations ``${a.b}`` and
        ``${oc.select:a.b,default}`` among the read keys are resolved from the same settings."""
        settings = dict(settings or {})
        known = {k.name for k in self.keys}
        read: dict[str, object] = {}
        ignored: dict[str, object] = {}
        for raw_name, raw in settings.items():
            name = self.normalize_name(raw_name)
            if name in known:
                read[name] = resolve_interpolation(raw, settings, self.key(name))
            elif lenient:
                ignored[name] = raw
            else:
                self.key(name)  # raises with the accepted keys
        return self.config(read), read, ignored

    def validate(self, cfg: dict[str, object]) -> None:
        """Raise ``PresetError`` for combinations the framework itself rejects (beyond the key ranges)."""

    def updates_per_rollout(self, cfg: Mapping[str, object]) -> int:
        """Optimizer updates fed by one rollout batch (1: every update on-policy)."""
        return math.prod(int(cfg[k]) for k in self.lag_keys)

    def lag_reason(self, cfg: Mapping[str, object]) -> str:
        """The keys behind ``updates_per_rollout``, for the notes."""
        return " x ".join(f"{k}={cfg[k]}" for k in self.lag_keys)

    def needs_critic(self, cfg: Mapping[str, object]) -> bool:
        """True when the configuration trains a value network (the audit takes the critic as 0)."""
        return False

    def companions(self, changes: Mapping[str, object], cfg: Mapping[str, object]) -> dict[str, object]:
        """Keys a suggested change also needs to act (e.g. a normalizer constant)."""
        return {}

    def suggestion_notes(self, changes: Mapping[str, object], cfg: Mapping[str, object]) -> list[str]:
        """Caveats of a suggested configuration (a critic, a companion key)."""
        notes = []
        if self.needs_critic(cfg):
            notes.append(
                "this configuration trains a critic: the audit took the critic as 0 (its verdict is for the "
                "KL credit assignment only)"
            )
        return notes

    def no_kl_reason(self, cfg: Mapping[str, object]) -> str:
        """Why the configuration has no KL term although it asks for one ('' if it does not ask)."""
        return ""

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        raise NotImplementedError

    def kl_enabled(self, cfg: Mapping[str, object]) -> bool:
        r = self.recipe(cfg)
        return r.has_reward_kl or r.has_loss_kl

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        """(cfg with KL switched on the way the framework's docs do it, the keys changed)."""
        return {**cfg, **self.kl_switch}, dict(self.kl_switch)

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg[self.group_key]) if self.group_key else 1

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


_INTERP = re.compile(r"^\$\{(?:oc\.select:)?([^,}]+)(?:,([^}]*))?\}$")


def resolve_interpolation(
    raw: object, settings: Mapping[str, object], key: Key | None = None, depth: int = 0
) -> object:
    """A Hydra/OmegaConf ``${a.b}`` or ``${oc.select:a.b,default}`` value resolved from ``settings`` (dotted keys);
    an unresolvable one falls back to the select default, else to the key's default."""
    if not isinstance(raw, str) or depth > 8:
        return raw
    m = _INTERP.match(raw.strip())
    if m is None:
        if "${" in raw:
            if key is None:
                return raw
            raise PresetError(f"{key.name}={raw!r}: an interpolation the audit cannot resolve; set the value itself")
        return raw
    target, default = m.group(1).strip(), m.group(2)
    if target in settings:
        return resolve_interpolation(settings[target], settings, key, depth + 1)
    if default is not None:
        return default.strip()
    if key is not None:
        return key.default
    return raw


def estimator_of(table: Mapping[str, Estimator | str], key: str, value: str) -> Estimator | str:
    try:
        return table[value]
    except KeyError:
        raise PresetError(f"unknown value {value!r} for {key}; accepted values: {', '.join(table)}") from None


__all__ = ["Key", "Preset", "PresetError", "estimator_of", "resolve_interpolation"]

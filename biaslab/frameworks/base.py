"""What a framework preset is: that framework's own config keys and defaults, mapped to a ``Recipe``.

A ``Preset`` lists its ``Key``s exactly as the framework names them (dotted Hydra paths for verl/SkyRL/NeMo-RL,
argparse flags without dashes for OpenRLHF/slime, config fields for TRL). ``config(settings)`` merges user
settings over the defaults and rejects unknown keys or values with the accepted ones listed; ``recipe(cfg)``
reproduces the framework's formulas through ``biaslab.core.recipes`` and its estimators through the registry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..core.recipes import Recipe

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
    why: str = ""  # why values outside ``choices`` are refused (appended to the error)
    search: tuple = ()  # candidate values of a number key for the nearest-unbiased search

    def parse(self, raw: object) -> object:
        """Validated value from a string (``--set``) or a YAML/JSON value."""
        if isinstance(raw, str) and raw.strip().lower() in _NONE and self.nullable:
            return None
        if raw is None:
            if self.nullable:
                return None
            raise PresetError(f"{self.name} cannot be null")
        why = f" ({self.why})" if self.why else ""
        if self.kind == "choice":
            value = raw.strip() if isinstance(raw, str) else raw
            if value not in self.choices:
                raise PresetError(
                    f"unknown value {raw!r} for {self.name}{why}; accepted values: "
                    f"{', '.join(str(c) for c in self.choices)}"
                )
            return value
        if self.kind == "bool":
            if isinstance(raw, bool):
                value = raw
            elif str(raw).strip().lower() in _TRUE | _FALSE:
                value = str(raw).strip().lower() in _TRUE
            else:
                raise PresetError(f"{self.name} takes true or false, not {raw!r}")
        else:
            try:
                value = float(raw) if self.kind == "float" else int(str(raw))
            except ValueError:
                raise PresetError(f"{self.name} takes a number ({self.kind}), not {raw!r}") from None
        if self.choices and value not in self.choices:
            accepted = ", ".join(("true" if c else "false") if self.kind == "bool" else str(c) for c in self.choices)
            raise PresetError(f"{self.name}={raw!r} is not modelled{why}; accepted values: {accepted}")
        return value


def fixed_kl(name: str, default: object = "fixed") -> Key:
    """A key whose other values switch on adaptive KL control: only ``default`` (fixed beta) is accepted; a null
    default makes it a number key that must stay unset."""
    why = (
        "it switches on the adaptive KL controller, and an adaptive controller changes beta between steps; audit "
        "one step with a fixed beta"
    )
    if default is None:
        return Key(name, None, "float", (None,), nullable=True, why=why)
    return Key(name, default, "choice", (default,), why=why)


class Preset:
    """A framework's configuration space. Subclasses set the class attributes and implement ``recipe``."""

    name: str = ""
    title: str = ""
    version: str = ""
    functions: str = ""  # the framework functions whose formulas the preset reproduces
    sources: str = ""  # the source files (and release) the preset follows
    keys: tuple[Key, ...] = ()
    search_keys: tuple[str, ...] = ()  # keys the nearest-unbiased search may change
    aliases: Mapping[str, str] = {}  # other spellings of a key -> its name
    group_key: str = ""  # the key holding the responses per prompt B ('' : B = 1)
    kl_switch: Mapping[str, object] = {}  # the keys ``enable_kl`` sets (the framework docs' way to switch KL on)
    lag_keys: tuple[str, ...] = ()  # epochs-like keys: their product multiplies ``updates_per_rollout``
    rollout_keys: tuple[str, ...] = ()  # keys whose product is the rollout batch, split into mini-batches of
    minibatch_key: str = ""  # this key's size (no split while any of them is null)
    unit_keys: tuple[str, ...] = ()  # keys that must lie in [0, 1] (discounts)
    positive_keys: tuple[str, ...] = ()  # keys that must be null or >= 1 (epochs, batch sizes)
    dual_clip_keys: tuple[str, ...] = ()  # dual-clip constants: null or > 1 (the frameworks assert it)
    critic_when: tuple[str, object] | None = None  # (key, value): that value trains a critic (the audit takes it as 0)

    def key(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise PresetError(f"unknown {self.title} key {name!r}; accepted keys: {', '.join(k.name for k in self.keys)}")

    def normalize_name(self, name: str) -> str:
        name = name.removeprefix("--")
        return self.aliases.get(name, name)

    def config(self, settings: Mapping[str, object] | None = None) -> dict[str, object]:
        """Defaults overlaid with validated ``settings`` (framework key -> raw value)."""
        cfg = {k.name: k.default for k in self.keys}
        for raw_name, raw in (settings or {}).items():
            k = self.key(self.normalize_name(raw_name))
            cfg[k.name] = k.parse(raw)
        for k in self.unit_keys:
            if not 0.0 <= cfg[k] <= 1.0:
                raise PresetError(f"{k} must lie in [0, 1], got {cfg[k]}")
        for k in self.positive_keys:
            if cfg[k] is not None and cfg[k] < 1:
                raise PresetError(f"{k} must be >= 1, got {cfg[k]}")
        for k in self.dual_clip_keys:
            if cfg[k] is not None and not cfg[k] > 1:
                raise PresetError(f"{k} (the dual clip) must be > 1, got {cfg[k]}")
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
        """Optimizer updates fed by one rollout batch (1: every update on-policy): the product of ``lag_keys``
        times the mini-batches of ``minibatch_key`` in the rollout batch (the product of ``rollout_keys``)."""
        updates = math.prod(int(cfg[k]) for k in self.lag_keys)
        if self.minibatch_key:
            sizes = [cfg[k] for k in (*self.rollout_keys, self.minibatch_key)]
            if None not in sizes:
                updates *= max(1, math.ceil(math.prod(sizes[:-1]) / sizes[-1]))
        return updates

    def lag_reason(self, cfg: Mapping[str, object]) -> str:
        """The keys behind ``updates_per_rollout``, for the notes (rollout keys / mini-batch key x lag keys; a
        rollout key with the previous one's dotted prefix is shown without it)."""
        terms = [f"{k}={cfg[k]}" for k in self.lag_keys]
        if self.minibatch_key:
            shown, prefix = [], ""
            for k in self.rollout_keys:
                head, _, tail = k.rpartition(".")
                shown.append(f"{tail if head and head == prefix else k}={cfg[k]}")
                prefix = head
            terms.insert(0, f"{' x '.join(shown)} / {self.minibatch_key}={cfg[self.minibatch_key]}")
        return " x ".join(terms)

    def needs_critic(self, cfg: Mapping[str, object]) -> bool:
        """True when the configuration trains a value network (the audit takes the critic as 0)."""
        return self.critic_when is not None and cfg[self.critic_when[0]] == self.critic_when[1]

    def companions(self, changes: Mapping[str, object], cfg: Mapping[str, object]) -> dict[str, object]:
        """Keys a suggested change also needs to act (e.g. a normalizer constant)."""
        return {}

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
        values = (True, False) if k.kind == "bool" else k.choices if k.kind == "choice" else k.search
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


def clip_range(cfg: Mapping[str, object], low: str, high: str | None = None) -> tuple[float, float]:
    """(eps_low, eps_high) of the PPO clip: ``high`` null (or not given) is ``low``."""
    eps = float(cfg[low])
    return eps, eps if high is None or cfg[high] is None else float(cfg[high])


def kl_terms(reward: tuple | None = None, loss: tuple | None = None) -> dict[str, object]:
    """The ``Recipe`` fields of the KL terms: ``reward`` / ``loss`` = (estimator, coefficient), None where that term
    is off (no estimator, coefficient 0)."""
    out: dict[str, object] = {}
    for place, term in (("reward", reward), ("loss", loss)):
        if term is not None:
            out[f"{place}_estimator"], out[f"{place}_coef"] = term[0], float(term[1])
    return out


__all__ = ["Key", "Preset", "PresetError", "clip_range", "fixed_kl", "kl_terms", "resolve_interpolation"]

"""Audit a framework configuration: exact verdicts on a default toy, and the nearest unbiased configuration.

Everything is computed by ``biaslab.exact_recipes.RecipeEngine`` on a small tabular toy (never read from a
table): the configuration's recipe is evaluated

* on-policy with fixed-length responses (the main verdict: estimator, placement, baseline, clipping);
* on-policy with variable lengths (an end-of-sequence token; adds the aggregation's length effects);
* off-policy, with samples from a behaviour policy mu = pi + noise (a stale policy; importance weights,
  clipping and the frameworks' choice of computing the in-reward KL from mu's log-probs).

The nearest unbiased configuration is found by breadth-first search over the preset's ``search_keys`` (one
changed key, then two, then three), each candidate evaluated exactly on the fixed-length toy on-policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..exact_recipes import RecipeEngine, RecipeResult
from ..recipes import Recipe
from ..toy import TabularAR
from . import get_preset
from .base import Preset, PresetError


@dataclass(frozen=True)
class AuditToy:
    """The default toy: tabular, V = 3 tokens (token 2 doubles as end-of-sequence), T = 3."""

    vocab: int = 3
    length: int = 3
    seed: int = 0
    kl_scale: float = 1.0
    behaviour_shift: float = 0.5
    max_group: int = 3  # exact enumeration of groups: N**B groups
    search_group: int = 2
    max_depth: int = 4
    max_evals: int = 400

    def models(self) -> tuple[TabularAR, TabularAR, TabularAR]:
        """(policy, reference, behaviour): reference from ``seed``, policy = ref + kl_scale noise, behaviour =
        policy + behaviour_shift noise."""
        ref = TabularAR.random(self.vocab, self.length, seed=self.seed)
        policy = ref.perturbed(self.kl_scale, seed=self.seed + 10_007)
        behaviour = policy.perturbed(self.behaviour_shift, seed=self.seed + 20_011)
        ref.requires_grad_(False)
        behaviour.requires_grad_(False)
        return policy, ref, behaviour

    @property
    def eos(self) -> int:
        return self.vocab - 1


def _direction(r: RecipeResult) -> str:
    if r.verdict == "no_kl":
        return "-"
    if r.matches:
        name, s = next(iter(r.matches.items()))
        return name if abs(s - 1) < 1e-6 else f"{name} (x{s:.4g})"
    if r.verdict == "zero":
        return "zero"
    return f"~{r.nearest} (cos {r.nearest_cos:.6f})"


def _row(r: RecipeResult) -> dict:
    return {
        "verdict": r.verdict,
        "direction": _direction(r),
        "matches": r.matches,
        "nearest": r.nearest,
        "nearest_cos": r.nearest_cos,
        "rel_bias": r.rel_bias,
        "scale": r.scale,
        "variance": r.variance,
    }


@dataclass
class Engines:
    """The three engines of an audit (fixed / variable length on-policy, fixed length off-policy)."""

    fixed: RecipeEngine
    varlen: RecipeEngine
    offpolicy: RecipeEngine
    group: int


def build_engines(toy: AuditToy, group: int) -> Engines:
    policy, ref, behaviour = toy.models()
    g = max(1, min(group, toy.max_group))
    return Engines(
        fixed=RecipeEngine(policy, ref, group_size=g),
        varlen=RecipeEngine(policy, ref, eos=toy.eos, group_size=g),
        offpolicy=RecipeEngine(policy, ref, behaviour=behaviour, group_size=g),
        group=g,
    )


@dataclass
class Candidate:
    changes: dict[str, object]
    recipe: Recipe
    fixed: RecipeResult
    varlen: RecipeResult | None = None


@dataclass
class SearchResult:
    nearest: Candidate | None
    nearest_all_lengths: Candidate | None
    evaluated: int
    notes: list[str] = field(default_factory=list)


def nearest_unbiased(preset: Preset, cfg: Mapping[str, object], toy: AuditToy, group: int) -> SearchResult:
    """Breadth-first search over the preset's search keys for configurations whose recipe is unbiased on the
    fixed-length toy; also the nearest that stays unbiased with variable lengths (within the depth/eval budget)."""
    policy, ref, _ = toy.models()
    g = max(1, min(group, toy.search_group))
    fixed = RecipeEngine(policy, ref, group_size=g)
    varlen = RecipeEngine(policy, ref, eos=toy.eos, group_size=g)
    cache: dict[Recipe, tuple[RecipeResult, RecipeResult | None]] = {}
    best: Candidate | None = None
    best_all: Candidate | None = None
    evaluated = 0
    options = [(k, v) for k in preset.search_keys for v in preset.search_values(k, cfg)]
    for depth in range(1, toy.max_depth + 1):
        found_here: list[Candidate] = []
        for combo in itertools.combinations(options, depth):
            keys = [k for k, _ in combo]
            if len(set(keys)) < depth:
                continue
            changes = dict(combo)
            try:
                cand_cfg = preset.config({**cfg, **changes})
                recipe = preset.recipe(cand_cfg)
            except PresetError:
                continue
            if not (recipe.has_reward_kl or recipe.has_loss_kl):
                continue
            if recipe not in cache:
                if evaluated >= toy.max_evals:
                    break
                evaluated += 1
                cache[recipe] = (fixed.evaluate(recipe), None)
            res, vres = cache[recipe]
            if res.verdict != "unbiased":
                continue
            if vres is None:
                vres = varlen.evaluate(recipe)
                cache[recipe] = (res, vres)
            found_here.append(Candidate(changes, recipe, res, vres))
        if found_here and best is None:
            best = min(found_here, key=lambda c: (c.varlen.verdict != "unbiased", c.fixed.variance))
        all_ok = [c for c in found_here if c.varlen is not None and c.varlen.verdict == "unbiased"]
        if all_ok and best_all is None:
            best_all = min(all_ok, key=lambda c: c.fixed.variance)
        if best is not None and best_all is not None:
            break
        if evaluated >= toy.max_evals:
            break
    notes = [] if evaluated < toy.max_evals else [f"search stopped after {toy.max_evals} evaluations"]
    return SearchResult(best, best_all, evaluated, notes)


def fmt_value(x: object) -> str:
    """A config value as the framework's YAML/CLI would spell it (true/false/null)."""
    return "true" if x is True else "false" if x is False else "null" if x is None else str(x)


def _fmt_changes(changes: Mapping[str, object]) -> str:
    return " ".join(f"--set {k}={fmt_value(x)}" for k, x in changes.items())


def audit(
    framework: str,
    settings: Mapping[str, object] | None = None,
    toy: AuditToy | None = None,
    enable_kl: bool = False,
    search: bool = True,
    engines: Engines | None = None,
) -> dict:
    """Audit one configuration; returns a JSON-ready dict (see module docstring)."""
    toy = toy or AuditToy()
    preset = get_preset(framework)
    cfg = preset.config(settings)
    changed: dict[str, object] = {}
    if enable_kl and not preset.kl_enabled(cfg):
        cfg, changed = preset.enable_kl(cfg)
    recipe = preset.recipe(cfg)
    requested = preset.group_size(cfg)
    eng = engines or build_engines(toy, requested)
    out: dict = {
        "framework": preset.name,
        "title": preset.title,
        "version": preset.version,
        "functions": preset.functions,
        "settings": {k: v for k, v in (settings or {}).items()},
        "kl_enabled_by_audit": {k: v for k, v in changed.items()},
        "recipe": recipe.describe(),
        "toy": {
            "model": "tabular",
            "vocab": toy.vocab,
            "length": toy.length,
            "eos": toy.eos,
            "seed": toy.seed,
            "kl_scale": toy.kl_scale,
            "behaviour_shift": toy.behaviour_shift,
            "group_size": eng.group,
            "group_size_requested": requested,
        },
        "notes": preset.notes(cfg),
    }
    if eng.group != requested:
        out["notes"].append(f"exact enumeration uses groups of {eng.group} (the configuration has {requested})")
    if not (recipe.has_reward_kl or recipe.has_loss_kl):
        out.update(verdict="no_kl", on_policy={"verdict": "no_kl"}, variable_length=None, off_policy=None)
        out["notes"].append("KL is disabled in this configuration: nothing to audit (pass --enable-kl)")
        out["nearest_unbiased"] = None
        return out
    main = eng.fixed.evaluate(recipe)
    out["verdict"] = main.verdict
    out["on_policy"] = _row(main)
    out["variable_length"] = _row(eng.varlen.evaluate(recipe))
    out["off_policy"] = _row(eng.offpolicy.evaluate(recipe))
    out["nearest_unbiased"] = None
    out["nearest_unbiased_all_lengths"] = None
    if search:
        if main.verdict == "unbiased":
            out["nearest_unbiased"] = {"changes": {}, "set": "", "variance": main.variance}
        sr = nearest_unbiased(preset, cfg, toy, requested) if main.verdict != "unbiased" else None
        if sr is not None:
            out["search_evaluations"] = sr.evaluated
            out["notes"].extend(sr.notes)
            if sr.nearest is not None:
                out["nearest_unbiased"] = {
                    "changes": sr.nearest.changes,
                    "set": _fmt_changes(sr.nearest.changes),
                    "recipe": sr.nearest.recipe.describe(),
                    "variance": sr.nearest.fixed.variance,
                    "variable_length_verdict": sr.nearest.varlen.verdict if sr.nearest.varlen else None,
                }
            if sr.nearest_all_lengths is not None:
                out["nearest_unbiased_all_lengths"] = {
                    "changes": sr.nearest_all_lengths.changes,
                    "set": _fmt_changes(sr.nearest_all_lengths.changes),
                    "recipe": sr.nearest_all_lengths.recipe.describe(),
                }
    return out


def audit_defaults(toy: AuditToy | None = None) -> list[dict]:
    """One audit per framework default (KL switched on where the default has it off), without the search."""
    from . import PRESETS

    toy = toy or AuditToy()
    cache: dict[int, Engines] = {}
    rows = []
    for name, preset in PRESETS.items():
        cfg = preset.config({})
        g = max(1, min(preset.group_size(cfg), toy.max_group))
        if g not in cache:
            cache[g] = build_engines(toy, g)
        rows.append(audit(name, {}, toy, enable_kl=True, search=False, engines=cache[g]))
    return rows


__all__ = ["AuditToy", "Engines", "audit", "audit_defaults", "build_engines", "fmt_value", "nearest_unbiased"]

"""Audit a framework configuration or a trainer's own loss: exact verdicts on a default toy, and the nearest
unbiased configuration.

Everything is computed by the exact engine (``biaslab.engines.exact.ExactEngine``) on a small tabular toy (never read
from a
table); the update rule (a preset's recipe, or ``biaslab.workflows.userloss.UserLoss``) is evaluated

* on-policy with fixed-length responses (the main verdict: estimator, placement, baseline, clipping);
* on-policy with variable lengths (an end-of-sequence token; adds the aggregation's length effects);
* off-policy, with samples from a behaviour policy mu = pi + noise, when the configuration's own settings make
  later updates use stale samples (``Preset.updates_per_rollout`` > 1); with one update per rollout the row is the
  on-policy one. A loss function is always evaluated off-policy too.

The nearest unbiased configuration is found by breadth-first search over the preset's ``search_keys`` (one
changed key, then two, then three), each candidate (with its companion keys) evaluated exactly on the fixed-length
toy on-policy; candidates that need no critic are preferred, and a suggestion that needs one says so.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..core.recipes import Recipe
from ..core.verdict import exact_verdict
from ..engines.exact import ExactEngine, ExactResult, config_dtype, enumerate_complete
from ..engines.toy import TabularAR
from ..frameworks import get_preset
from ..frameworks.base import Preset, PresetError
from .userloss import DTYPES, UserLoss, UserLossError, precision_report

REWARDS = ("zero", "binary")
SCENARIOS = (
    ("on_policy", "on-policy, fixed length"),
    ("variable_length", "on-policy, variable length"),
    ("off_policy", "off-policy"),
)
CRITIC_NOTE = (
    "this configuration trains a critic: the audit took the critic as 0 (its verdict is for the KL credit "
    "assignment only)"
)


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


def _direction(r: ExactResult) -> str:
    if r.verdict == "no_kl":
        return "-"
    if r.all_matches:
        name, s = next(iter(r.all_matches.items()))
        return name if abs(s - 1) < 1e-6 else f"{name} (x{s:.4g})"
    if r.verdict == "zero":
        return "zero"
    return f"~{r.nearest} (cos {r.nearest_cos:.6f})"


def _row(r: ExactResult) -> dict:
    return {
        "recipe": r.recipe.describe(),
        "verdict": r.verdict,
        "direction": _direction(r),
        "matches": dict(r.all_matches),
        "nearest": r.nearest,
        "nearest_cos": r.nearest_cos,
        "rel_bias": r.rel_bias,
        "scale": r.scale,
        "variance": r.variance,
    }


@dataclass
class Engines:
    """The three engines of an audit (fixed / variable length on-policy, fixed length off-policy)."""

    fixed: ExactEngine
    varlen: ExactEngine
    offpolicy: ExactEngine
    group: int
    rewards: str = "zero"


def task_rewards(n: int, seed: int) -> torch.Tensor:
    """(n,) seeded 0/1 task rewards, one per enumerated complete response."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).to(torch.float64)


def _one_of(name: str, value: object, allowed, error: type[ValueError] = PresetError) -> None:
    if value not in allowed:
        raise error(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def build_engines(toy: AuditToy, group: int, rewards: str = "zero") -> Engines:
    """Engines for the three scenarios; ``rewards="binary"`` gives every response a seeded 0/1 task reward."""
    _one_of("rewards", rewards, REWARDS)
    policy, ref, behaviour = toy.models()
    g = max(1, min(group, toy.max_group))

    def reward(eos: int | None):
        if rewards == "zero":
            return None
        return task_rewards(enumerate_complete(toy.vocab, toy.length, eos)[0].shape[0], toy.seed)

    return Engines(
        fixed=ExactEngine(policy, ref, group_size=g, task_reward=reward(None)),
        varlen=ExactEngine(policy, ref, eos=toy.eos, group_size=g, task_reward=reward(toy.eos)),
        offpolicy=ExactEngine(policy, ref, behaviour=behaviour, group_size=g, task_reward=reward(None)),
        group=g,
        rewards=rewards,
    )


def evaluate_scenarios(
    rule, eng: Engines, toy: AuditToy, lag: int = 1, progress: bool | None = None, whole_beta: float | None = None
) -> dict:
    """{"verdict", "on_policy", "variable_length", "off_policy"} rows of one update rule.

    ``lag`` is the number of updates a rollout feeds: 1 means every update is on-policy, and the off-policy
    row is then the on-policy one (labelled so); above 1 the later updates use samples from a stale policy,
    modelled by mu = pi + ``toy.behaviour_shift`` noise. ``whole_beta``: judge the whole update against
    grad(E[R] - beta KL) (``evaluate_whole_update``) instead of its KL part.
    """
    jobs = [("on_policy", eng.fixed), ("variable_length", eng.varlen)]
    if lag > 1:
        jobs.append(("off_policy", eng.offpolicy))
    out: dict = {}
    with _progress(len(jobs), progress) as bar:
        for key, engine in jobs:
            try:
                res = engine.evaluate(rule) if whole_beta is None else evaluate_whole_update(rule, engine, whole_beta)
            except ValueError as exc:  # name the scenario (UserLossError is a ValueError)
                raise type(exc)(f"{dict(SCENARIOS)[key]}: {exc}") from exc
            out[key] = _row(res)
            bar.update(1)
    if lag > 1:
        out["off_policy"]["behaviour"] = f"mu = pi + {toy.behaviour_shift} noise"
    else:
        out["off_policy"] = {**out["on_policy"], "behaviour": "on-policy: one update per rollout"}
    out["off_policy"]["updates_per_rollout"] = lag
    out["verdict"] = out["on_policy"]["verdict"]
    return out


class _WholeUpdate:
    """A rule seen without ``without_kl``: the engine then evaluates the whole update (task part included)."""

    def __init__(self, rule) -> None:
        self._rule = rule

    def __getattr__(self, name: str):
        if name == "without_kl":
            raise AttributeError(name)
        return getattr(self._rule, name)


def evaluate_whole_update(rule, engine, beta: float):
    """Exact verdict of the whole update against the regularised objective: E[g] = nominal * d with
    d = grad KL(pi || pi_ref) - grad E_pi[R] / beta (the core verdict rule ``biaslab.core.verdict.exact_verdict`` with
    the
    named directions shifted the same way: "reverse_kl" is then grad(beta KL - E[R]) / beta, etc.)."""
    truths = engine.truths()
    task = engine.task_grad() / beta  # (P,)
    mean, second, wstd = engine.moments(_WholeUpdate(rule))
    variance = max(second - float(mean @ mean), 0.0)
    nominal = rule.nominal_scale(engine.B, engine.T, wstd)
    directions = {k: v - task for k, v in truths.directions.items() if k != "zero"}
    info = exact_verdict(mean, directions, nominal, math.sqrt(max(second, 0.0)), truths.undefined, config_dtype(rule))
    return ExactResult(rule, mean.detach(), variance, nominal, info)


class AuditReport(dict):
    """One audit (a JSON-ready dict) with ``to_frame()``: one typed row per scenario."""

    def to_frame(self):
        return rows_frame(dict(self))


class AuditTable(list):
    """Several audits (``--defaults``) with ``to_frame()``: one typed row per framework and scenario."""

    def to_frame(self):
        return rows_frame(list(self))


def _progress(total: int, progress: bool | None, unit: str = "scenario"):
    """A tqdm bar on stderr once the work has run 3 s (``progress`` True), or a disabled one (False / None)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="biaslab audit", unit=unit, delay=3.0, leave=False, disable=not progress)


@dataclass
class Candidate:
    changes: dict[str, object]
    recipe: Recipe
    fixed: ExactResult
    varlen: ExactResult | None = None


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
    fixed = ExactEngine(policy, ref, group_size=g)
    varlen = ExactEngine(policy, ref, eos=toy.eos, group_size=g)
    cache: dict[Recipe, tuple[ExactResult, ExactResult | None]] = {}
    best: Candidate | None = None
    best_all: Candidate | None = None
    evaluated = 0
    options = [(k, v) for k in preset.search_keys for v in preset.search_values(k, cfg)]
    for depth in range(1, toy.max_depth + 1):
        found_here: list[Candidate] = []
        for combo in itertools.combinations(options, depth):
            if len({k for k, _ in combo}) < depth:
                continue
            changes = dict(combo)
            changes.update(preset.companions(changes, cfg))
            try:
                recipe = preset.recipe(preset.config({**cfg, **changes}))
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

        def critic(c: Candidate) -> bool:
            return preset.needs_critic({**cfg, **c.changes})

        if found_here and best is None:
            best = min(found_here, key=lambda c: (critic(c), c.varlen.verdict != "unbiased", c.fixed.variance))
        all_ok = [c for c in found_here if c.varlen.verdict == "unbiased"]
        if all_ok and best_all is None:
            best_all = min(all_ok, key=lambda c: (critic(c), c.fixed.variance))
        if (best is not None and best_all is not None) or evaluated >= toy.max_evals:
            break
    notes = [] if evaluated < toy.max_evals else [f"search stopped after {toy.max_evals} evaluations"]
    return SearchResult(best, best_all, evaluated, notes)


def fmt_value(x: object) -> str:
    """A config value as the framework's YAML/CLI would spell it (true/false/null)."""
    return "true" if x is True else "false" if x is False else "null" if x is None else str(x)


def _toy_json(toy: AuditToy, eng: Engines, requested: int) -> dict:
    return {
        "model": "tabular",
        "vocab": toy.vocab,
        "length": toy.length,
        "eos": toy.eos,
        "seed": toy.seed,
        "kl_scale": toy.kl_scale,
        "behaviour_shift": toy.behaviour_shift,
        "group_size": eng.group,
        "group_size_requested": requested,
        "rewards": eng.rewards,
    }


def _suggestion(preset: Preset, cfg: Mapping[str, object], cand: Candidate) -> dict:
    critic = preset.needs_critic({**cfg, **cand.changes})
    return {
        "changes": cand.changes,
        "set": " ".join(f"--set {k}={fmt_value(x)}" for k, x in cand.changes.items()),
        "recipe": cand.recipe.describe(),
        "variance": cand.fixed.variance,
        "variable_length_verdict": cand.varlen.verdict if cand.varlen else None,
        "notes": [CRITIC_NOTE] if critic else [],
    }


def audit(
    framework: str,
    settings: Mapping[str, object] | None = None,
    toy: AuditToy | None = None,
    enable_kl: bool = False,
    search: bool = True,
    engines: Engines | None = None,
    lenient: bool = False,
    progress: bool | None = False,
    dtype: str | None = None,
) -> dict:
    """Audit one configuration; returns a JSON-ready dict (see module docstring).

    ``lenient=True`` (a whole config file): keys the preset does not read are listed under ``ignored`` instead
    of refused; values it cannot model are still refused.
    """
    if dtype is not None:
        _one_of("dtype", dtype, DTYPES)
    toy = toy or AuditToy()
    preset = get_preset(framework)
    cfg, read, ignored = preset.read_config(settings, lenient=lenient)
    changed: dict[str, object] = {}
    if enable_kl and not preset.kl_enabled(cfg):
        cfg, changed = preset.enable_kl(cfg)
    recipe = preset.recipe(cfg)
    requested = preset.group_size(cfg)
    eng = engines or build_engines(toy, requested)
    lag = preset.updates_per_rollout(cfg)
    out = AuditReport(
        {
            "framework": preset.name,
            "title": preset.title,
            "version": preset.version,
            "functions": preset.functions,
            "sources": preset.sources,
            "settings": dict(settings or {}) if not lenient else read,
            "read": read,
            "ignored": ignored,
            "kl_enabled_by_audit": dict(changed),
            "recipe": recipe.describe(),
            "toy": _toy_json(toy, eng, requested),
            "updates_per_rollout": lag,
            "notes": preset.notes(cfg),
        }
    )
    if eng.group != requested:
        out["notes"].append(f"exact enumeration uses groups of {eng.group} (the configuration has {requested})")
    if not (recipe.has_reward_kl or recipe.has_loss_kl):
        out.update(verdict="no_kl", on_policy={"verdict": "no_kl"}, variable_length=None, off_policy=None)
        out["notes"].append(
            preset.no_kl_reason(cfg) or "KL is disabled in this configuration: nothing to audit (pass --enable-kl)"
        )
        out["nearest_unbiased"] = None
        return out
    rows = evaluate_scenarios(recipe, eng, toy, lag, progress)
    out.update(rows)
    if dtype is not None:
        out["precision"] = precision_report(recipe, dtype, group_size=eng.group)
    if lag > 1:
        out["notes"].append(
            f"{lag} updates per rollout ({preset.lag_reason(cfg)}): the off-policy row models the stale samples "
            f"of the later updates by mu = pi + {toy.behaviour_shift} noise"
        )
    out["nearest_unbiased"] = None
    out["nearest_unbiased_all_lengths"] = None
    if search and rows["verdict"] == "unbiased":
        out["nearest_unbiased"] = {"changes": {}, "set": "", "variance": rows["on_policy"]["variance"]}
    elif search:
        sr = nearest_unbiased(preset, cfg, toy, requested)
        out["search_evaluations"] = sr.evaluated
        out["notes"].extend(sr.notes)
        if sr.nearest is not None:
            out["nearest_unbiased"] = _suggestion(preset, cfg, sr.nearest)
        if sr.nearest_all_lengths is not None:
            out["nearest_unbiased_all_lengths"] = _suggestion(preset, cfg, sr.nearest_all_lengths)
    return out


def audit_defaults(toy: AuditToy | None = None, progress: bool | None = False) -> AuditTable:
    """One audit per framework default (KL switched on where the default has it off), without the search."""
    from ..frameworks import PRESETS

    toy = toy or AuditToy()
    cache: dict[int, Engines] = {}
    rows = AuditTable()
    with _progress(len(PRESETS), progress, unit="framework") as bar:
        for name, preset in PRESETS.items():
            g = max(1, min(preset.group_size(preset.config({})), toy.max_group))
            if g not in cache:
                cache[g] = build_engines(toy, g)
            rows.append(audit(name, {}, toy, enable_kl=True, search=False, engines=cache[g]))
            bar.update(1)
    return rows


def audit_loss(
    fn,
    beta: float = 1.0,
    group_size: int = 2,
    rewards: str = "zero",
    agg: str = "seq-mean-token-sum",
    toy: AuditToy | None = None,
    dtype: str | None = None,
    name: str | None = None,
    vectorize: str = "auto",
    progress: bool | None = False,
    compute_dtype: str | None = None,
) -> dict:
    """Audit a trainer's own loss function ``fn(batch) -> scalar`` (contract: ``biaslab.workflows.userloss``).

    Same scenarios, rows and JSON layout as a preset audit; the top-level ``verdict`` is the on-policy
    fixed-length one. ``dtype`` adds a ``precision`` report (value and gradient error against float64).
    """
    toy = toy or AuditToy()
    if not (isinstance(group_size, int) and group_size >= 1):
        raise UserLossError(f"group_size must be a positive integer, got {group_size!r}")
    if compute_dtype is not None:
        _one_of("compute_dtype", compute_dtype, ("float64", *DTYPES), UserLossError)
    if dtype is not None:
        _one_of("dtype", dtype, DTYPES, UserLossError)
    _one_of("rewards", rewards, REWARDS, UserLossError)
    cdt = None if compute_dtype is None else DTYPES.get(compute_dtype, torch.float64)
    rule = UserLoss(fn, beta=beta, agg=agg, name=name, vectorize=vectorize, compute_dtype=cdt)
    if group_size > toy.max_group:
        raise UserLossError(
            f"group_size {group_size} is above the exact enumeration limit of the audit toy ({toy.max_group})"
        )
    t0 = time.perf_counter()
    eng = build_engines(toy, group_size, rewards)
    try:
        whole = beta if rewards == "binary" else None
        rows = evaluate_scenarios(rule, eng, toy, lag=2, progress=progress, whole_beta=whole)
    except ValueError as exc:
        if isinstance(exc, UserLossError):
            raise
        raise UserLossError(f"{rule.describe()}: {exc}") from exc
    out = AuditReport(
        {
            "framework": "loss",
            "title": f"user loss {rule.name}",
            "version": "",
            "functions": rule.name,
            "sources": "",
            "settings": {"beta": beta, "group_size": group_size, "rewards": rewards, "agg": agg},
            "read": {},
            "ignored": {},
            "kl_enabled_by_audit": {},
            "recipe": rule.describe(),
            "toy": _toy_json(toy, eng, group_size),
            "vectorized": rule.mode_note,
            "notes": [
                f"nominal scale = beta * B * (weight of one token under {agg}); a loss that aggregates otherwise is "
                "reported 'rescaled' (pass --agg)",
                f"evaluated with {rule.mode_note}",
            ],
            "nearest_unbiased": None,
            "nearest_unbiased_all_lengths": None,
            "seconds": None,
        }
    )
    if rewards == "binary":
        out["notes"].append(
            "rewards=binary: the whole update is judged against nominal * grad(KL - E[R] / beta), i.e. "
            "grad(E[R] - beta KL) up to the positive scale of the aggregation; directions name the KL inside it"
        )
    out.update(rows)
    if dtype is not None:
        out["precision"] = precision_report(rule, dtype, group_size=group_size)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


NUMBERS = ("rel_bias", "scale", "variance", "nearest_cos")
COLUMNS = ("framework", "scenario", "verdict", "direction", *NUMBERS, "recipe")


def records(report: dict | list[dict]) -> list[dict]:
    """One flat record per (audit, scenario): the rows of ``--format csv|md`` and of ``rows_frame``."""
    reports = report if isinstance(report, list) else [report]
    records = []
    for r in reports:
        for key, label in SCENARIOS:
            row = r.get(key)
            if not row:
                continue
            numbers = {c: row.get(c, float("nan")) for c in NUMBERS}
            records.append(
                {
                    "framework": r["framework"],
                    "scenario": label,
                    "verdict": row.get("verdict"),
                    "direction": row.get("direction", "-"),
                    **numbers,
                    "recipe": r["recipe"],
                }
            )
    return records


def rows_frame(report: dict | list[dict]):
    """pandas DataFrame (one row per audit and scenario) with typed columns; pandas is imported lazily."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        raise ImportError("rows_frame / to_frame need pandas (pip install pandas)") from None
    df = pd.DataFrame.from_records(records(report), columns=list(COLUMNS))
    for col in NUMBERS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in set(COLUMNS) - set(NUMBERS):
        df[col] = df[col].astype("string")
    return df


__all__ = [
    "AuditReport",
    "AuditTable",
    "AuditToy",
    "Engines",
    "audit",
    "audit_defaults",
    "audit_loss",
    "build_engines",
    "evaluate_scenarios",
    "fmt_value",
    "nearest_unbiased",
    "records",
    "rows_frame",
]

"""``biaslab audit``: verdicts for a framework configuration written in that framework's own keys, or for any
trainer's own loss function.

    biaslab audit --framework verl --set actor_rollout_ref.actor.use_kl_loss=true [--config FILE.yaml] [--format json]
    biaslab audit --defaults
    biaslab audit --loss my_trainer.py:loss --beta 0.05 [--group-size 2] [--rewards zero|binary] [--dtype bfloat16]

Exit status: 0 when the configuration (or loss) is unbiased on-policy (fixed-length toy), 1 otherwise (biased,
rescaled, zero, or KL disabled; with --defaults: when any default is), 2 for usage errors (unknown framework, key
or value; a loss function that cannot be loaded, raises or returns no usable loss).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..aggregation import AGG_MODES
from ..io import to_json
from ..recipes import RecipeError
from ..userloss import DTYPES, UserLossError, load_loss
from . import PRESETS, get_preset
from .audit import COLUMNS, REWARDS, SCENARIOS, AuditToy, audit, audit_defaults, audit_loss, fmt_value, records
from .base import PresetError


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings -> dotted keys (``{"algorithm": {"use_kl_in_reward": true}}`` -> algorithm.use_kl_in_reward)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def load_config_file(path: str) -> dict[str, object]:
    """Settings from a YAML (or JSON) file, nested or with dotted keys."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetError(f"{path}: not valid JSON ({exc})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise PresetError("reading YAML needs PyYAML (pip install pyyaml); or pass a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PresetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return _flatten(data)


def parse_sets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise PresetError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _num(x: object) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)  # nan prints as "nan"


def _text(report: dict) -> str:
    if report["framework"] == "loss":
        lines = [f"{report['title']} [{report.get('vectorized', '')}]"]
    else:
        lines = [f"{report['title']} {report['version']} ({report['functions']})"]
    if report.get("sources"):
        lines.append(f"follows: {report['sources']}")
    if report.get("read"):
        lines.append("read: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in report["read"].items()))
    if report.get("ignored"):
        lines.append(
            f"ignored as irrelevant to the KL gradient: {len(report['ignored'])} keys "
            f"({', '.join(list(report['ignored'])[:6])}{', ...' if len(report['ignored']) > 6 else ''})"
        )
    if report["kl_enabled_by_audit"]:
        sets = ", ".join(f"{k}={fmt_value(v)}" for k, v in report["kl_enabled_by_audit"].items())
        lines.append(f"KL is off in this configuration; the audit switched it on: {sets}")
    lines.append(f"recipe: {report['recipe']}")
    t = report["toy"]
    lines.append(
        f"toy: tabular V={t['vocab']} T={t['length']} (token {t['eos']} ends variable-length responses), "
        f"seed {t['seed']}, groups of {t['group_size']}"
    )
    if report["verdict"] == "no_kl":
        lines.append("verdict: no KL term (nothing to audit)")
    else:
        lines.append(f"{'':34s}{'verdict':10s}{'direction':38s}{'rel_bias':>11s}{'scale':>11s}{'variance':>11s}")
        off = report["off_policy"] or {}
        off_label = (
            "off-policy (one update/rollout)"
            if off.get("updates_per_rollout", 2) <= 1
            else (f"off-policy (mu = pi + {t['behaviour_shift']} noise)")
        )
        for key, label in (*SCENARIOS[:2], ("off_policy", off_label)):
            r = report[key]
            lines.append(
                f"{label:34s}{r['verdict']:10s}{r['direction']:38s} {_num(r['rel_bias']):>10s}"
                f" {_num(r['scale']):>10s} {_num(r['variance']):>10s}"
            )
        near = report.get("nearest_unbiased")
        if report["verdict"] == "unbiased":
            lines.append("this configuration is unbiased on-policy")
        elif near:
            lines.append(f"nearest unbiased configuration: {near['set']}")
            lines.append(f"  -> {near['recipe']} (with variable lengths: {near['variable_length_verdict']})")
            for n in near.get("notes", []):
                lines.append(f"  caveat: {n}")
        elif report["framework"] == "loss":
            lines.append(
                f"the update follows {report['on_policy']['direction']} on-policy (no configuration to search)"
            )
        else:
            lines.append("no unbiased configuration within the searched changes")
        near_all = report.get("nearest_unbiased_all_lengths")
        if near_all and (not near or near_all["set"] != near.get("set")):
            lines.append(f"nearest unbiased with variable lengths too: {near_all['set']}")
    prec = report.get("precision")
    if prec:
        lines.append(f"precision of the loss in {prec['dtype']} against float64 (relative errors, max / median):")
        for regime in ("near_reference", "far"):
            p = prec[regime]
            lines.append(
                f"  {regime:15s} value {_num(p['value_rel_error_max'])} / {_num(p['value_rel_error_median'])}  "
                f"gradient {_num(p['grad_rel_error_max'])} / {_num(p['grad_rel_error_median'])}  "
                f"non-finite groups {p['non_finite_groups']}"
            )
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _table(report: dict | list[dict], fmt: str) -> str:
    """csv or markdown: one row per (audit, scenario)."""
    rows = records(report)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
        return buf.getvalue().rstrip("\n")
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(_num(r[c]) if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(out)


def _emit(report, fmt: str, text) -> None:
    if fmt == "json":
        print(to_json(report, default=str))
    elif fmt in ("csv", "md"):
        print(_table(report, fmt))
    else:
        print(text(report))


def _defaults_text(rows: list[dict]) -> str:
    head = f"{'framework':11s}{'verdict':10s}{'direction':38s}{'var. length':12s}{'off-policy':11s}recipe"
    lines = [head]
    for r in rows:
        d = r["on_policy"].get("direction", "-") if r["on_policy"] else "-"
        vl = r["variable_length"]["verdict"] if r["variable_length"] else "-"
        op = r["off_policy"]["verdict"] if r["off_policy"] else "-"
        lines.append(f"{r['framework']:11s}{r['verdict']:10s}{d:38s}{vl:12s}{op:11s}{r['recipe']}")
        if r["kl_enabled_by_audit"]:
            sets = ", ".join(f"{k}={fmt_value(v)}" for k, v in r["kl_enabled_by_audit"].items())
            lines.append(f"{'':10s}(KL off by default; enabled with {sets})")
    return "\n".join(lines)


def _audit(args: argparse.Namespace) -> int:
    from ..cli import DEFAULT_ALPHA

    toy = AuditToy(seed=args.seed)
    progress = bool(getattr(args, "progress", False))  # main resolves the default (stderr is a terminal)
    alpha = getattr(args, "alpha", DEFAULT_ALPHA)
    loss_only = [
        f"--{n.replace('_', '-')}"
        for n in ("beta", "group_size", "rewards", "agg", "compute_dtype")
        if getattr(args, n) is not None
    ]
    if args.loss:
        if args.framework or args.set or args.config or args.defaults:
            raise PresetError("--loss takes no --framework, --set, --config or --defaults")
        report = audit_loss(
            load_loss(args.loss),
            beta=1.0 if args.beta is None else args.beta,
            group_size=2 if args.group_size is None else args.group_size,
            rewards=args.rewards or "zero",
            agg=args.agg or "seq-mean-token-sum",
            toy=toy,
            dtype=args.dtype,
            name=args.loss,
            progress=progress,
            compute_dtype=args.compute_dtype,
        )
    elif loss_only:
        raise PresetError(f"{', '.join(loss_only)} go with --loss FILE:FUNC")
    elif args.defaults:
        if args.framework or args.set or args.config:
            raise PresetError("--defaults takes no --framework, --set or --config")
        if args.dtype:
            raise PresetError("--dtype goes with --framework or --loss, not --defaults")
        rows = audit_defaults(toy, progress=progress)
        _emit(rows, args.format, _defaults_text)
        return 0 if all(r["verdict"] == "unbiased" for r in rows) else 1
    elif not args.framework:
        raise PresetError("give --framework NAME, --loss FILE:FUNC or --defaults")
    else:
        preset = get_preset(args.framework)
        file_settings: dict[str, object] = load_config_file(args.config) if args.config else {}
        sets = parse_sets(args.set or [])
        for k in sets:  # --set keys are strict: a typo is an error, not an ignored key
            preset.key(preset.normalize_name(k))
        report = audit(
            args.framework,
            {**file_settings, **sets},
            toy,
            enable_kl=args.enable_kl,
            search=not args.no_search,
            lenient=bool(args.config),
            progress=progress,
            dtype=args.dtype,
        )
    if alpha != DEFAULT_ALPHA:
        report["notes"].append(
            f"--alpha {alpha} is not applicable: the audit's verdicts are exact (no statistical test)"
        )
    _emit(report, args.format, _text)
    return 0 if report["verdict"] == "unbiased" else 1


def _run(args: argparse.Namespace) -> int:
    try:
        return _audit(args)
    except (PresetError, FileNotFoundError, UserLossError, RecipeError) as exc:
        print(f"biaslab audit: error: {exc}", file=sys.stderr)
        return 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``biaslab audit``."""
    from ..cli import add_common_flags

    p = subparsers.add_parser(
        "audit",
        help="exact KL-gradient verdict for a training framework's configuration",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--framework", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config key in the framework's own name")
    p.add_argument("--config", help="YAML or JSON file of config keys (nested or dotted)")
    p.add_argument("--defaults", action="store_true", help="one row per framework default")
    p.add_argument("--enable-kl", action="store_true", help="switch KL on if the configuration has it off")
    p.add_argument("--no-search", action="store_true", help="skip the nearest-unbiased search")
    add_common_flags(p, formats=("text", "json", "csv", "md"), seed=True, alpha=True)
    for action in p._actions:
        if "--alpha" in action.option_strings:
            action.help = "accepted as on the other subcommands; not applicable: the audit's verdicts are exact"
    g = p.add_argument_group("auditing your own loss function")
    g.add_argument("--loss", metavar="FILE:FUNC", help="FUNC(batch) -> scalar loss of one group (biaslab.userloss)")
    g.add_argument("--beta", type=float, default=None, help="the KL coefficient inside the function (default 1)")
    g.add_argument("--group-size", type=int, default=None, help="responses per group B (default 2, at most 3)")
    g.add_argument("--rewards", choices=REWARDS, default=None, help="task rewards (default zero)")
    g.add_argument(
        "--agg",
        default=None,
        choices=list(AGG_MODES),
        help="how the function aggregates tokens, for the nominal scale (default seq-mean-token-sum)",
    )
    g.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="also evaluate the loss (or the preset's recipe) in this dtype: value and gradient error vs float64",
    )
    g.add_argument(
        "--compute-dtype",
        choices=["float64", "float32"],
        default=None,
        help="precision the function computes in internally (sets the verdict tolerance)",
    )
    p.set_defaults(func=_run)


__all__ = ["add_commands", "load_config_file", "parse_sets"]

"""``biaslab audit``: verdicts for a framework configuration written in that framework's own keys.

    biaslab audit --framework verl --set actor_rollout_ref.actor.use_kl_loss=true [--config FILE.yaml] [--format json]
    biaslab audit --defaults

Exit status: 0 when the configuration is unbiased on-policy (fixed-length toy), 1 otherwise (biased, rescaled,
zero, or KL disabled; with --defaults: when any default is), 2 for usage errors (unknown framework, key or value).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .audit import fmt_value
from .base import PresetError


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings -> dotted keys (``{"algorithm": {"use_kl_in_reward": true}}`` -> algorithm.use_kl_in_reward)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
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


def _clean(obj: object) -> object:
    """JSON-safe: NaN/inf floats become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json(obj: object) -> str:
    return json.dumps(_clean(obj), indent=2, default=str, allow_nan=False)


def _num(x: object) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _text(report: dict) -> str:
    lines = [f"{report['title']} {report['version']} ({report['functions']})"]
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
        lines.append(f"{'':34s}{'verdict':10s}{'direction':38s}{'rel_bias':>10s}{'scale':>9s}{'variance':>11s}")
        for label, key in (
            ("on-policy, fixed length", "on_policy"),
            ("on-policy, variable length", "variable_length"),
            (f"off-policy (mu = pi + {t['behaviour_shift']} noise)", "off_policy"),
        ):
            r = report[key]
            lines.append(
                f"{label:34s}{r['verdict']:10s}{r['direction']:38s}{_num(r['rel_bias']):>10s}"
                f"{_num(r['scale']):>9s}{_num(r['variance']):>11s}"
            )
        near = report.get("nearest_unbiased")
        if report["verdict"] == "unbiased":
            lines.append("this configuration is unbiased on-policy")
        elif near:
            lines.append(f"nearest unbiased configuration: {near['set']}")
            lines.append(f"  -> {near['recipe']} (with variable lengths: {near['variable_length_verdict']})")
        else:
            lines.append("no unbiased configuration within the searched changes")
        near_all = report.get("nearest_unbiased_all_lengths")
        if near_all and (not near or near_all["set"] != near.get("set")):
            lines.append(f"nearest unbiased with variable lengths too: {near_all['set']}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _defaults_text(rows: list[dict]) -> str:
    head = f"{'framework':10s}{'verdict':10s}{'direction':36s}{'var. length':12s}{'off-policy':11s}recipe"
    lines = [head]
    for r in rows:
        d = r["on_policy"].get("direction", "-") if r["on_policy"] else "-"
        vl = r["variable_length"]["verdict"] if r["variable_length"] else "-"
        op = r["off_policy"]["verdict"] if r["off_policy"] else "-"
        lines.append(f"{r['framework']:10s}{r['verdict']:10s}{d:36s}{vl:12s}{op:11s}{r['recipe']}")
        if r["kl_enabled_by_audit"]:
            sets = ", ".join(f"{k}={fmt_value(v)}" for k, v in r["kl_enabled_by_audit"].items())
            lines.append(f"{'':10s}(KL off by default; enabled with {sets})")
    return "\n".join(lines)


def _audit(args: argparse.Namespace) -> int:
    from .audit import AuditToy, audit, audit_defaults

    toy = AuditToy(seed=args.seed)
    if args.defaults:
        if args.framework or args.set or args.config:
            raise PresetError("--defaults takes no --framework, --set or --config")
        rows = audit_defaults(toy)
        print(_json(rows) if args.format == "json" else _defaults_text(rows))
        return 0 if all(r["verdict"] == "unbiased" for r in rows) else 1
    if not args.framework:
        raise PresetError("give --framework NAME (or --defaults)")
    settings: dict[str, object] = {}
    if args.config:
        settings.update(load_config_file(args.config))
    settings.update(parse_sets(args.set or []))
    report = audit(args.framework, settings, toy, enable_kl=args.enable_kl, search=not args.no_search)
    print(_json(report) if args.format == "json" else _text(report))
    return 0 if report["verdict"] == "unbiased" else 1


def _run(args: argparse.Namespace) -> int:
    try:
        return _audit(args)
    except (PresetError, FileNotFoundError) as exc:
        print(f"biaslab audit: error: {exc}", file=sys.stderr)
        return 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``biaslab audit``."""
    from . import PRESETS

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
    p.add_argument("--seed", type=int, default=0, help="seed of the default toy")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_run)


__all__ = ["add_commands", "load_config_file", "parse_sets"]

"""An audit report (``workflows.audit``) as text, CSV or markdown: one line per scenario, the nearest unbiased
configuration, notes; ``format_defaults`` for the one-line-per-framework summary of ``audit --defaults``."""

from __future__ import annotations

import math

from .audit import COLUMNS, SCENARIOS, fmt_value, records


def _num(x: object) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)  # nan prints as "nan"


def format_text(report: dict) -> str:
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


def format_table(report: dict | list[dict], fmt: str) -> str:
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


def format_defaults(rows: list[dict]) -> str:
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

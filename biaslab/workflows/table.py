"""The exact bias/variance table: one row per configuration, rendered as markdown, CSV or JSON."""

from __future__ import annotations

from ..core.io import csv_text
from ..core.io import to_json as _json_text
from ..core.placements import all_configs
from ..core.verdict import DIRECTIONS, STANDARD
from ..engines.exact import ExactEngine, ExactResult
from ..engines.toy import AutoregressiveModel

FIELDS = [
    *("estimator", "placement", "level", "credit", "rel_bias", "cos_reverse", "cos_forward", "variance"),
    *("verdict", "matches", "factor", "nearest", "nearest_cos", "dtype"),
]


class Results(list):
    """A list of ``ExactResult`` with ``to_frame()``: one row per configuration as a pandas DataFrame."""

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(table_rows(self), columns=FIELDS)
        for col in ("rel_bias", "cos_reverse", "cos_forward", "variance", "factor", "nearest_cos"):
            frame[col] = frame[col].astype(float)
        return frame


def exact_table(
    policy: AutoregressiveModel,
    ref: AutoregressiveModel,
    estimators: tuple[str, ...] | list[str] = ("k1", "k2", "k3", "abs"),
    progress: bool = False,
) -> tuple[ExactEngine, list[ExactResult]]:
    """Evaluate every estimator x placement x level x credit configuration exactly."""
    engine = ExactEngine(policy, ref)
    return engine, Results(engine.evaluate_all(all_configs(estimators), progress=progress))


def table_rows(results: list[ExactResult]) -> list[dict]:
    return [r.as_dict(with_grad=False) for r in results]


def to_csv(results: list[ExactResult]) -> str:
    return csv_text(table_rows(results), FIELDS)


def to_markdown(results: list[ExactResult], engine: ExactEngine, title: str = "") -> str:
    tr = engine.truths()
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += [
        f"Exact over all {engine.n_sequences} sequences (V={engine.V}, T={engine.T}); "
        f"KL(pi||pi_ref) = {tr.kl_reverse:.6g}, KL(pi_ref||pi) = {tr.kl_forward:.6g}, "
        f"||grad KL|| = {float(tr.grad_reverse.norm()):.6g}.",
        "rel_bias = ||E[g] - grad KL(pi||pi_ref)|| / ||grad KL(pi||pi_ref)||; variance = E||g - E[g]||^2; "
        "cos_* = cosine of E[g] with the reverse / forward KL gradient.",
        "",
        "| estimator | placement | level | credit | rel. bias | cos reverse | cos forward | variance | verdict "
        "| E[g] equals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r.as_dict(with_grad=False)
        lines.append(
            f"| {d['estimator']} | {d['placement']} | {d['level']} | {d['credit'] or '-'} | {_r(d['rel_bias'])} | "
            f"{_c(d['cos_reverse'])} | {_c(d['cos_forward'])} | {_r(d['variance'], 4)} | {r.info.describe()} | "
            f"{d['matches']} |"
        )
    lines += ["", "Directions:", ""]
    shown = (*STANDARD, "expected_value", "zero")  # the directions a table row is matched against
    lines += [f"- `{k}`: {DIRECTIONS[k]}" for k in shown] + ["- `none`: none of the above", ""]
    if tr.undefined:
        lines.insert(4 if title else 2, "**The policy equals the reference: the true gradient is zero and every "
                     "verdict is undefined.**")
    return "\n".join(lines)


def _r(x: float, digits: int = 3) -> str:
    """Round-off below 1e-12 prints as 0 (the engine is exact to ~1e-15); nan (undefined) as '-'."""
    return "-" if x != x else f"{round(x, 12) + 0.0:.{digits}g}"


def _c(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def to_json(results: list[ExactResult], engine: ExactEngine, with_grad: bool = False, meta: dict | None = None) -> str:
    tr = engine.truths()
    obj = {
        **(meta or {}),
        "vocab": engine.V,
        "length": engine.T,
        "kl_reverse": tr.kl_reverse,
        "kl_forward": tr.kl_forward,
    }
    if with_grad:
        obj["true_grad"] = tr.grad_reverse.tolist()
        obj["forward_grad"] = tr.grad_forward.tolist()
    obj["undefined"] = tr.undefined
    obj["rows"] = [r.as_dict(with_grad=with_grad) for r in results]
    return _json_text(obj)

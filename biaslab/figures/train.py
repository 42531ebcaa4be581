"""Figures of where KL-regularised training ends up (``biaslab figures``; objective E[R] - beta KL(pi || pi_ref)).

* ``train_paths``: exact expected-update flows of each configuration, reward against the reverse KL, with the
  closed-form end points marked (V=3, T=4 tabular toy, binary reward on 10 sequences, beta 0.3);
* ``train_entropy``: the entropy of pi over those flows;
* ``train_fixed_point_entropy``: H(token-level forward-KL fixed point) - H(pi*) on 60 random problems per beta
  (closed forms only);
* ``train_collapse_beta``: the fraction of Monte Carlo runs (RLOO, Adam) whose expected reward falls below 0.01,
  k3 in the reward against k1 in the reward, with Clopper-Pearson 95% intervals;
* ``train_lag_grid``: collapse fractions over async lag x configuration (PPO clip 0.2, Dr. GRPO mean baseline).

Every artifact is a PNG, the CSV it is drawn from and a JSON of its configuration, seeds and the biaslab version,
written atomically. ``quick`` shrinks steps and seeds for tests. ``write_train_artifacts`` writes the same kind of
files for one ``biaslab train --out DIR`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from .._version import __version__
from .artifact import Artifact, new_figure
from .registry import figure

PATH_PROBLEM = {"vocab": 3, "length": 4, "seed": 0, "kl_scale": 1.0, "reward": "binary:10", "beta": 0.3}
PATH_CONFIGS = "k1:reward,k3:both,k3:loss,k3:loss:sequence,k2:loss,k1:loss,k3:reward,none"
PATH_STEPS = {False: 10_000, True: 800}
COLLAPSE_BETAS = {False: [0.1, 0.3, 1.0, 2.0, 3.0], True: [0.3, 2.0]}
MC_SIZES = {False: {"seeds": 64, "steps": 300}, True: {"seeds": 8, "steps": 60}}
MC_FIXED = {"samples": 8, "lr": 0.1, "optimizer": "adam"}  # every Monte Carlo figure, seed 0
LAGS = {False: [0, 2, 5, 10], True: [0, 10]}
LAG_CONFIGS = "none,k1:reward,k1:loss,k3:loss,k3:reward"
ENTROPY_BETAS = {False: [0.1, 0.3, 1.0, 3.0], True: [0.1, 1.0]}
ENTROPY_PROBLEMS = {False: 60, True: 8}

TARGET_MARKERS = {
    "reverse_kl_optimum": ("*", "tab:blue"),
    "forward_kl_optimum": ("P", "tab:brown"),
    "forward_kl_token_fixed_point": ("X", "tab:orange"),
    "reverse_kl_token_fixed_point": ("^", "tab:green"),
}
CONFIG_COLORS = {
    "k1:reward": "tab:blue",
    "k3:both": "tab:purple",
    "k3:loss": "tab:orange",
    "k3:loss:sequence": "tab:brown",
    "k2:loss": "tab:green",
    "k1:loss": "tab:gray",
    "k3:reward": "tab:red",
    "none": "black",
}


def _write(out: Path, stem: str, rows: list[dict], fields: list[str], meta: dict, size: tuple[float, float]):
    """(the figure's ``Artifact`` holding its CSV and JSON, the rows parsed back from the CSV, a new figure of
    ``size`` inches); the caller draws, adds the PNG and commits the three files as one set."""

    art = Artifact(out, stem)
    parsed = art.add_csv(rows, fields)
    art.add_meta(meta, seed=meta.get("seed"))
    return art, parsed, new_figure(*size)


# ------------------------------------------------------------------------------------------ the exact paths


def _problem():
    """(start policy, reference, reward) of ``PATH_PROBLEM``."""
    from ..engines.toy import make_pair
    from ..workflows.train import parse_reward

    p = PATH_PROBLEM
    policy, ref = make_pair("tabular", p["vocab"], p["length"], seed=p["seed"], kl_scale=p["kl_scale"])
    return policy, ref, parse_reward(p["reward"], p["vocab"], p["length"], seed=p["seed"])


@lru_cache(maxsize=2)
def _path_result(quick: bool):
    from ..workflows.train import TrainSetup, parse_configs, train

    setup = TrainSetup(*_problem())
    return train(setup, parse_configs(PATH_CONFIGS), [PATH_PROBLEM["beta"]], steps=PATH_STEPS[quick])


def path_rows(result) -> list[dict]:
    """One row per recorded step of every run (``kind`` = run) and one per target (``kind`` = target)."""
    rows = []
    for run in result.runs:
        for r in run.trajectory:
            rows.append({"kind": "run", "config": run.config, "beta": run.beta, "verdict": run.verdict, **r})
    for beta, tg in result.targets.items():
        for name, t in tg.items():
            stats = {k: t[k] for k in ("reward", "reverse_kl", "forward_kl", "entropy")}
            rows.append({"kind": "target", "config": name, "beta": float(beta), "step": "", **stats})
    return rows


PATH_FIELDS = ["kind", "config", "beta", "step", "reward", "reverse_kl", "forward_kl", "entropy",
               *[f"l1_{name}" for name in TARGET_MARKERS], "verdict"]


def _by_run(rows: list[dict]):
    """(name, run rows, colour, line style, line width) per run: rows grouped by configuration (and beta, when there
    are several); k1 in the loss is drawn thick and dashed on top of "none", which it equals."""
    betas = {r["beta"] for r in rows if r["kind"] == "run"}
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "run":
            key = str(r["config"]) + (f" (beta {r['beta']:g})" if len(betas) > 1 else "")
            out.setdefault(key, []).append(r)
    for name, rs in out.items():
        ls, lw = ("--", 3.0) if name.startswith("k1:loss") else ("-", 1.2)
        yield name, rs, CONFIG_COLORS.get(name.split(" ")[0]), ls, lw


def plot_paths(ax, rows: list[dict]) -> None:
    """Reward against reverse KL along each run, the targets as large markers."""
    for name, rs, color, ls, lw in _by_run(rows):
        ax.plot([r["reverse_kl"] for r in rs], [r["reward"] for r in rs], ls, lw=lw, color=color, label=name)
        ax.plot(rs[-1]["reverse_kl"], rs[-1]["reward"], "o", ms=3, color=color)
    for r in rows:
        if r["kind"] == "target":
            marker, color = TARGET_MARKERS[str(r["config"])]
            ax.plot(r["reverse_kl"], r["reward"], marker, ms=13, mfc="none", mew=1.6, color=color,
                    label=f"target: {r['config']}")
    ax.set_xlabel("reverse KL(pi || pi_ref)")
    ax.set_ylabel("E_pi[R]")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_entropy(ax, rows: list[dict]) -> None:
    """Entropy of pi against the step (log x) for each run; target entropies as dotted lines."""
    for name, rs, color, ls, lw in _by_run(rows):
        ax.plot([r["step"] + 1 for r in rs], [r["entropy"] for r in rs], ls, lw=lw, color=color, label=name)
    for r in rows:
        if r["kind"] == "target":
            ax.axhline(r["entropy"], ls=":", lw=0.8, color=TARGET_MARKERS[str(r["config"])][1])
    ax.set_xscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("entropy of pi (nats); dotted: targets")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _path_figure(out: Path, quick: bool, stem: str, fields: list[str], height: float, plot, title: str) -> list[Path]:
    """One figure of the exact flows of ``PATH_PROBLEM``: ``plot(ax, rows)`` on the rows read back from its CSV."""
    meta = {**PATH_PROBLEM, "configs": PATH_CONFIGS, "steps": PATH_STEPS[quick], "mode": "exact", "quick": quick}
    art, parsed, fig = _write(out, stem, path_rows(_path_result(quick)), fields, meta, (8.0, height))
    ax = fig.add_subplot()
    plot(ax, parsed)
    ax.set_title(title, fontsize=9)
    art.add_png(fig)
    return art.commit()


def train_paths(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """Exact flows: reward against reverse KL, targets marked."""
    title = f"exact expected-update flows, V=3 T=4, {PATH_PROBLEM['reward']}, beta {PATH_PROBLEM['beta']}"
    return _path_figure(out, quick, "train_paths", PATH_FIELDS, 4.5, plot_paths, title)


def train_entropy(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """Exact flows: entropy over training per configuration."""
    fields = ["kind", "config", "beta", "step", "entropy", "reward", "verdict"]
    title = "entropy over training (k3 in reward collapses; k3 in loss ends above pi*)"
    return _path_figure(out, quick, "train_entropy", fields, 4.0, plot_entropy, title)


# ------------------------------------------------------------------------------------------ closed-form entropies


def entropy_problem(i: int) -> tuple[int, int, str]:
    """(V, T, reward spec) of random problem i: V, T in {3, 4}, binary or uniform rewards."""
    V, T = 3 + i % 2, 3 + (i // 2) % 2
    reward = "uniform" if (i // 4) % 2 else f"binary:{1 + (7 * i) % (V**T // 4)}"
    return V, T, reward


def fixed_point_entropy_rows(quick: bool) -> list[dict]:
    from ..engines.toy import TabularAR
    from ..workflows.fixedpoints import entropy, targets
    from ..workflows.train import parse_reward

    rows = []
    for i in range(ENTROPY_PROBLEMS[quick]):
        V, T, spec = entropy_problem(i)
        ref = TabularAR.random(V, T, seed=1000 + i)
        q_cond = ref.level_probs()
        reward = parse_reward(spec, V, T, seed=1000 + i)
        for beta in ENTROPY_BETAS[quick]:
            h = {k: float(entropy(v)) for k, v in targets(q_cond, reward, beta).items()}
            pi_star, fwd_token = h["reverse_kl_optimum"], h["forward_kl_token_fixed_point"]
            values = (i, V, T, spec, beta, pi_star, fwd_token, h["forward_kl_optimum"],
                      h["reverse_kl_token_fixed_point"], fwd_token - pi_star)
            rows.append(dict(zip(ENTROPY_FIELDS, values)))
    return rows


ENTROPY_FIELDS = ["problem", "vocab", "length", "reward", "beta", "h_pi_star", "h_forward_token", "h_forward_seq",
                  "h_reverse_token", "diff"]


def train_fixed_point_entropy(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """H(k3-in-loss fixed point) - H(pi*) on random problems, per beta (closed forms)."""
    rows = fixed_point_entropy_rows(quick)
    meta = {"problems": ENTROPY_PROBLEMS[quick], "betas": ENTROPY_BETAS[quick], "ref_seeds": "1000 + problem",
            "quick": quick}
    art, parsed, fig = _write(out, "train_fixed_point_entropy", rows, ENTROPY_FIELDS, meta, (6.5, 3.6))
    ax = fig.add_subplot()
    betas = sorted({r["beta"] for r in parsed})
    data = [[r["diff"] for r in parsed if r["beta"] == b] for b in betas]
    ax.boxplot(data, tick_labels=[f"{b:g}" for b in betas])
    for j, d in enumerate(data):
        frac = sum(x > 0 for x in d) / len(d)
        ax.text(j + 1, max(d), f"{100 * frac:.0f}% > 0", ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("beta")
    ax.set_ylabel("H(k3-in-loss fixed point) - H(pi*)  (nats)")
    ax.set_title(f"{len(data[0])} random problems per beta (V, T in {{3, 4}})", fontsize=9)
    art.add_png(fig)
    return art.commit()


# ------------------------------------------------------------------------------------------ Monte Carlo


def _mc(config: str, beta: float, quick: bool, **kw) -> dict:
    from ..workflows.train import MonteCarloTrainer, TabularProblem, parse_config

    policy, ref, reward = _problem()
    pb = TabularProblem(ref, reward)
    start = pb.stack([lvl.detach() for lvl in policy.levels])
    size = MC_SIZES[quick]
    trainer = MonteCarloTrainer(pb, parse_config(config), beta, seeds=size["seeds"], seed=0, **MC_FIXED, **kw)
    run = trainer.run(start, steps=size["steps"])
    mc = run.mc
    lo, hi = mc["collapse_ci95"]
    return {"config": config, "beta": beta, "collapsed": mc["collapsed"], "seeds": size["seeds"],
            "fraction": mc["collapse_fraction"], "ci_low": lo, "ci_high": hi,
            "final_reward": run.final["reward_mean_over_seeds"], "diverged": mc["diverged"]}


MC_FIELDS = ["config", "beta", "lag", "collapsed", "seeds", "fraction", "ci_low", "ci_high", "final_reward", "diverged"]


def _mc_meta(quick: bool, beta: object, **kw) -> dict:
    """The JSON record of a Monte Carlo figure: the problem, sizes and trainer settings (``kw``: the varying ones)."""
    return {**PATH_PROBLEM, "beta": beta, **MC_SIZES[quick], **MC_FIXED, **kw, "seed": 0, "collapse_reward": 0.01,
            "quick": quick}


def train_collapse_beta(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """Monte Carlo: collapse fraction (E[R] < 0.01) of k3 vs k1 in the reward against beta."""
    rows = [_mc(c, b, quick, baseline="rloo") for c in ("k3:reward", "k1:reward") for b in COLLAPSE_BETAS[quick]]
    meta = _mc_meta(quick, COLLAPSE_BETAS[quick], baseline="rloo")
    art, parsed, fig = _write(out, "train_collapse_beta", rows, MC_FIELDS, meta, (5.5, 3.6))
    ax = fig.add_subplot()
    for name in ("k3:reward", "k1:reward"):
        rs = [r for r in parsed if r["config"] == name]
        x = [r["beta"] for r in rs]
        y = [r["fraction"] for r in rs]
        err = [[r["fraction"] - r["ci_low"] for r in rs], [r["ci_high"] - r["fraction"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=CONFIG_COLORS[name], label=name)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("beta")
    ax.set_ylabel("fraction of seeds with E[R] < 0.01")
    size = MC_SIZES[quick]
    ax.set_title(f"RLOO, N=8, Adam 0.1, {size['steps']} steps, {size['seeds']} seeds (95% Clopper-Pearson)", fontsize=8)
    ax.legend(fontsize=8)
    art.add_png(fig)
    return art.commit()


def train_lag_grid(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """Monte Carlo: collapse fractions over async lag x configuration (PPO clip 0.2, mean baseline, beta 1)."""
    configs, lags = LAG_CONFIGS.split(","), LAGS[quick]
    rows = [{**_mc(c, 1.0, quick, baseline="mean", lag=lag, clip=0.2), "lag": lag} for lag in lags for c in configs]
    meta = _mc_meta(quick, 1.0, baseline="mean", clip=0.2, lags=lags)
    art, parsed, fig = _write(out, "train_lag_grid", rows, MC_FIELDS, meta, (6.0, 3.2))
    cell = {(r["lag"], r["config"]): r for r in parsed}
    ax = fig.add_subplot()
    grid = [[cell[lag, c]["fraction"] for c in configs] for lag in lags]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="Reds", aspect="auto")
    for i, lag in enumerate(lags):
        for j, c in enumerate(configs):
            r = cell[lag, c]
            ax.text(j, i, f"{int(r['collapsed'])}/{int(r['seeds'])}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(configs)), configs, fontsize=8)
    ax.set_yticks(range(len(lags)), [str(x) for x in lags])
    ax.set_ylabel("async lag (steps)")
    ax.set_title("collapse fraction (E[R] < 0.01): PPO clip 0.2, Dr. GRPO mean baseline, beta 1", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    art.add_png(fig)
    return art.commit()


TRAIN_FIGURES: dict[str, Callable[..., list[Path]]] = {
    "train_paths": train_paths,
    "train_entropy": train_entropy,
    "train_fixed_point_entropy": train_fixed_point_entropy,
    "train_collapse_beta": train_collapse_beta,
    "train_lag_grid": train_lag_grid,
}
for _name, _fn in TRAIN_FIGURES.items():  # registered with ``biaslab figures``, after the exact families
    figure(_name)(_fn)


# ------------------------------------------------------------------------------------------ biaslab train --out


def write_train_artifacts(result, meta: dict, out: str | Path) -> list[Path]:
    """``train.csv`` (every recorded step and target), ``train.json`` (meta + runs without trajectories) and
    ``train.png`` (reward against reverse KL, entropy over training) for one ``biaslab train`` call."""
    out = Path(out)
    from ..core.io import to_json

    art = Artifact(out, "train")
    parsed = art.add_csv(path_rows(result), PATH_FIELDS)
    art.add(".json", to_json({"biaslab_version": __version__, "meta": meta, **result.as_dict(with_trajectory=False)}))
    fig = new_figure(14, 4.5)
    a, b = fig.subplots(1, 2)
    plot_paths(a, parsed)
    plot_entropy(b, parsed)
    if any(math.isnan(r["reward"]) for r in parsed if isinstance(r.get("reward"), float)):
        a.set_title("(some values are not finite)")
    art.add_png(fig)
    return art.commit()

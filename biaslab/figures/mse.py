"""The MSE figure: E||mean of N gradients - grad KL||^2 against N, Monte Carlo rounds over the exact prediction
||b||^2 + tr Cov[g] / N."""

from __future__ import annotations

from pathlib import Path

from .artifact import Artifact, new_figure
from .registry import figure

MSE_MODEL = ("tabular", 3, 4, 0, 0.5)  # (model, V, T, seed, kl_scale)
MSE_CONFIGS = ("k1 in reward", "k3 in loss", "k3 in reward+loss", "k2 in loss")
MSE_SIZES = {"ns": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "rounds": 200, "seed": 1234}
MSE_SIZES_QUICK = {"ns": [1, 10, 100], "rounds": 40, "seed": 1234}
MSE_FIELDS = ["config", "n", "rounds", "mse_mc", "mse_se", "ci_low", "ci_high", "mse_exact", "bias_sq", "variance"]


@figure("mse")
def mse(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """(c) MSE of the N-sample mean gradient against N: Monte Carlo rounds with 95% confidence intervals over the
    exact prediction ||b||^2 + tr Cov[g] / N (b and tr Cov from the exact engine)."""
    import torch
    from tqdm.auto import tqdm

    from ..engines.exact import ExactEngine
    from ..engines.montecarlo import MonteCarloEngine
    from ..engines.stats import mean_ci, mse_prediction
    from ..engines.toy import make_pair
    from ..workflows.sweeps import evaluate_rows, fig_configs

    art = Artifact(out, "mse")
    sizes = MSE_SIZES_QUICK if quick else MSE_SIZES
    model, V, T, seed, scale = MSE_MODEL
    configs = [(label, cfg) for label, cfg in fig_configs() if label in MSE_CONFIGS]
    exact = {r["config"]: r for r in evaluate_rows(model, V, T, seed, scale, configs)}
    policy, ref = make_pair(model, V, T, seed=seed, kl_scale=scale)
    true_grad = ExactEngine(policy, ref).truths().grad_reverse  # (P,)
    mc = MonteCarloEngine(policy, ref)
    ns, n_max, rounds = sizes["ns"], max(sizes["ns"]), sizes["rounds"]
    counts = torch.arange(1, n_max + 1, dtype=torch.float64)[:, None]  # (n_max, 1)
    idx = torch.tensor(ns) - 1
    rows = []
    for c, (label, cfg) in enumerate(configs):
        gen = torch.Generator().manual_seed(sizes["seed"] + c)
        errors = torch.empty(rounds, len(ns), dtype=torch.float64)  # (R, len(ns)) ||mean_N - grad KL||^2
        for r in tqdm(range(rounds), desc=f"mse {label}", disable=not progress, leave=False):
            g = mc.sample_grads(cfg, n_max, gen)  # (n_max, P)
            running = g.cumsum(0)[idx] / counts[idx]  # (len(ns), P) mean of the first N samples
            errors[r] = ((running - true_grad) ** 2).sum(-1)
        e = exact[label]
        for j, n in enumerate(ns):
            mean, lo, hi = mean_ci(errors[:, j], alpha=0.05)
            se = float(errors[:, j].std()) / rounds**0.5
            values = (label, n, rounds, mean, se, lo, hi, mse_prediction(e["bias_sq"], e["variance"], n))
            rows.append(dict(zip(MSE_FIELDS, (*values, e["bias_sq"], e["variance"]))))
    rows = art.add_csv(rows, MSE_FIELDS)
    art.add_png(_mse_plot(rows, ns, MSE_MODEL, rounds))
    art.add_meta(
        {
            "what": "E||mean of N per-sample gradients - grad KL(pi||pi_ref)||^2 against N",
            "exact": "||b||^2 + tr Cov[g] / N with b = E[g] - grad KL and tr Cov[g] from "
                     "biaslab.engines.exact.ExactEngine",
            "monte_carlo": {
                "engine": "biaslab.engines.montecarlo.MonteCarloEngine.sample_grads",
                "rounds": rounds,
                "n_per_round": n_max,
                "nested": "the N-sample mean is the mean of the first N samples of each round",
                "seed": sizes["seed"],
                "generator": "torch.Generator, seed + config index",
                "ci": "95% normal interval of the mean over rounds (biaslab.engines.stats.mean_ci)",
            },
            "model": dict(zip(("model", "vocab", "length", "seed", "kl_scale"), MSE_MODEL)),
            "configs": list(MSE_CONFIGS),
            "quick": quick,
        },
        seed={"model": seed, "monte_carlo": sizes["seed"]},
    )
    return art.commit()


def _mse_plot(rows: list[dict], ns: list[int], model: tuple, rounds: int):
    """The MSE figure, drawn from the rows as written to the CSV."""
    import numpy as np

    from .plotting import style

    fig = new_figure(8, 6)
    ax = fig.subplots()
    grid = np.geomspace(min(ns), max(ns), 200)
    labels = list(dict.fromkeys(r["config"] for r in rows))
    for label in labels:
        e = next(r for r in rows if r["config"] == label)
        st = style(label)
        exact_label = f"{label}: exact $\\|b\\|^2$ + tr Cov / N"
        ax.plot(grid, e["bias_sq"] + e["variance"] / grid, color=st["color"], ls="-", lw=1.5, label=exact_label)
        rs = [r for r in rows if r["config"] == label]
        x = [r["n"] for r in rs]
        y = [r["mse_mc"] for r in rs]
        low = [min(r["mse_mc"] - r["ci_low"], 0.95 * r["mse_mc"]) for r in rs]  # a log axis has no zero
        err = [low, [r["ci_high"] - r["mse_mc"] for r in rs]]
        ax.errorbar(x, y, yerr=err, ls="none", marker=st["marker"], color=st["color"], mfc="white", ms=6, capsize=3,
                    label=f"{label}: Monte Carlo, 95% CI")
        if e["bias_sq"] > 0:
            ax.axhline(e["bias_sq"], color=st["color"], ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of samples N in the mean gradient")
    ax.set_ylabel(r"MSE  $E\|\bar g_N - \nabla KL(\pi\|\pi_{ref})\|^2$")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    name, V, T, seed, scale = model
    ax.set_title(
        f"MSE against N: biased configurations level off at $\\|b\\|^2$ (dotted)\n{name} toy V={V}, T={T}, "
        f"seed {seed}, kl_scale {scale}; Monte Carlo: {rounds} rounds per point",
        fontsize=10,
    )
    return fig

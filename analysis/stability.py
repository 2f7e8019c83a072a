"""Stability across seeds (the paper's Figure 6): FID along training, final-FID spread, statistics.

    python analysis/stability.py RESULTS_DIR      (a finished stability study, or any study)

Per method: FID over training steps (mean line, band = min..max over seeds), the final-FID
distribution, the number of diverged runs, mean, std, a bootstrap 95% interval of the mean,
and a two-sided Mann-Whitney U test of each method's final FIDs against kd's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from common import cli, load, plt, protocol_line, save_figure, save_table


def bootstrap_ci(values, *, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(axis=1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def statistics(summary: pd.DataFrame, reference: str = "kd") -> pd.DataFrame:
    """One row per method: n, diverged, mean, std, 95% CI, Mann-Whitney p against the reference."""
    rows = []
    ref = summary[(summary["variant"] == reference) & ~summary["diverged"]]["final_fid"].dropna()
    for variant, group in summary.groupby("variant", sort=False):
        fids = group[~group["diverged"]]["final_fid"].dropna()
        low, high = bootstrap_ci(fids)
        p = float("nan")
        if variant != reference and len(fids) and len(ref):
            p = mannwhitneyu(fids, ref, alternative="two-sided").pvalue
        rows.append({"method": variant, "runs": len(group), "diverged": int(group["diverged"].sum()),
                     "fid_mean": fids.mean(), "fid_std": fids.std(), "ci95_low": low, "ci95_high": high,
                     f"p_vs_{reference}": p})
    return pd.DataFrame(rows)


def make(folder):
    df, summary, info = load(folder)
    evals = df[df["fid"].notna()]
    # FID along training only where runs evaluated more than once (the stability study does).
    curves_shown = len(evals) and evals.groupby("run").size().max() > 1
    variants = list(summary["variant"].drop_duplicates())
    # The final-FID panel widens with the variants (compression has 18), so their names fit.
    width = max(4.0, 0.45 * len(variants))
    # Many variants (regime has 24): 20 distinct colours, and the legend goes under the curves
    # in two columns, the figure taller by its rows, instead of over them.
    many = len(variants) > 8
    height = 4 + (0.17 * -(-len(variants) // 2) if many and curves_shown else 0)
    color = (lambda i: plt.get_cmap("tab20")(i % 20)) if many else (lambda i: f"C{i}")
    if curves_shown:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(6 + width, height), gridspec_kw={"width_ratios": [6, width]})
    else:
        fig, ax2 = plt.subplots(figsize=(1 + width, height))
    finite = summary.loc[~summary["diverged"], "final_fid"].dropna()
    # FIDs spanning orders of magnitude (students that learn beside ones that do not): log axes.
    log = len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20
    for i, variant in enumerate(variants):
        curves = evals[evals["variant"] == variant].pivot_table(index="step", columns="run", values="fid")
        if curves_shown and not curves.empty:
            ax.plot(curves.index, curves.mean(axis=1), "-o", ms=3, color=color(i), label=f"{variant} ({curves.shape[1]} seeds)")
            ax.fill_between(curves.index, curves.min(axis=1), curves.max(axis=1), color=color(i), alpha=0.15)
        finals = summary[(summary["variant"] == variant) & ~summary["diverged"]]["final_fid"]
        ax2.scatter(np.full(len(finals), i) + np.linspace(-0.1, 0.1, len(finals)), finals, color=color(i), s=18)
        ax2.boxplot([finals.dropna()], positions=[i], widths=0.4, showfliers=False)
    if curves_shown:
        ax.set_xlabel("training step")
        ax.set_ylabel("FID of the EMA student (lower is better)")
        ax.set_title(f"{info['name']}: FID along training (mean, band = min..max)", fontsize=10)
        if many:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=8)
        if log:
            ax.set_yscale("log")
    if log:
        ax2.set_yscale("log")
        ax2.set_ylabel("final FID (log scale)")
    else:
        ax2.set_ylabel("final FID")
    ax2.set_xticks(range(len(variants)), variants, rotation=20 if len(variants) <= 6 else 60, ha="right", fontsize=8)
    ax2.set_title(f"{info['name']}: final FID per seed", fontsize=10)
    paths = save_figure(fig, folder, "stability", footer=protocol_line(summary))
    stats = statistics(summary)
    return paths + save_table(stats, folder, "stability", f"{info['name']}: final FID over seeds; 95% bootstrap "
                              "interval of the mean; two-sided Mann-Whitney U p-value against kd "
                              f"({protocol_line(summary)}).")


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

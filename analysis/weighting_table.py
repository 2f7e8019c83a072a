"""Weighting-schedule (and coarse-form) ablation table: FID mean +- std per variant.

    python analysis/weighting_table.py RESULTS_DIR      (a finished ablate_weighting study)
"""

from __future__ import annotations

from common import cli, fid_by_variant, load, plt, protocol_line, save_figure, save_table, seeds_note


def make(folder):
    _, summary, info = load(folder)
    table = fid_by_variant(summary)
    order = [v for v in info["variants"] if v in table.index]
    table = table.loc[order].reset_index()
    paths = save_table(table, folder, "weighting", f"{info['name']}: final FID per variant, {seeds_note(summary)} seeds "
                       f"({protocol_line(summary)}). Bold: best.", bold={"fid_mean": "min"})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(table)), table["fid_mean"], yerr=table["fid_std"].fillna(0), color="C0", alpha=0.7, capsize=3)
    for i, variant in enumerate(table["variant"]):
        seeds = summary[(summary["variant"] == variant) & ~summary["diverged"]]["final_fid"]
        ax.scatter([i] * len(seeds), seeds, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(table)), table["variant"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final FID (lower is better)")
    ax.set_title(f"{info['name']}: mean +- std, dots = seeds ({seeds_note(summary)} per variant)", fontsize=10)
    return paths + save_figure(fig, folder, "weighting")


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

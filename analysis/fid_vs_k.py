"""FID against PLACE's group size K: every seed as a point, the mean as a line, kd as a reference.

    python analysis/fid_vs_k.py RESULTS_DIR      (a finished ablate_k study)

K is the number of elements per group: lift is one group per channel (K = H*W, of the
denoiser's input: a latent teacher's latents), place num_groups G is K = H*W / G. Lower FID is better.
"""

from __future__ import annotations

import numpy as np

from common import cli, fid_by_variant, load, plt, protocol_line, save_figure, save_table, seeds_note


def group_size(row) -> float:
    name = row["config/objective/name"]
    # elements per channel, the default group domain: the denoiser's side squared (a latent
    # teacher's latents are smaller than the images; rows from before latents have no such column)
    side = row.get("denoiser_size")
    n = (row["config/data/resolution"] if side is None or np.isnan(side) else side) ** 2
    if name == "lift":
        return n
    if name == "place":
        g = row.get("config/objective/num_groups")
        if g is not None and not np.isnan(g):
            return n / g
        k = row.get("config/objective/group_size")
        return 16 if k is None or np.isnan(k) else k
    return np.nan


def make(folder):
    _, summary, info = load(folder)
    summary["K"] = summary.apply(group_size, axis=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    grouped = summary[summary["K"].notna() & ~summary["diverged"]]
    if grouped.empty:
        raise ValueError("no finished LIFT or PLACE run to place on the K axis")
    means = grouped.groupby("K")["final_fid"].mean().sort_index()
    ax.plot(means.index, means.values, "-o", color="C0", label="LIFT / PLACE, mean")
    ax.scatter(grouped["K"], grouped["final_fid"], color="C0", alpha=0.4, s=18, label="one seed")
    for _, row in grouped.drop_duplicates("variant").iterrows():
        ax.annotate(row["variant"], (row["K"], means[row["K"]]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    refs = summary[(summary["config/objective/name"] == "kd") & ~summary["diverged"]]["final_fid"]
    if len(refs):
        ax.axhline(refs.mean(), color="C3", ls="--", label=f"kd, mean of {len(refs)}")
        ax.axhspan(refs.min(), refs.max(), color="C3", alpha=0.1, label="kd, min-max")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("group size K (elements per group; LIFT = one group per channel)")
    ax.set_ylabel("final FID (lower is better)")
    ax.set_title(f"{info['name']}: FID against group size ({seeds_note(summary)} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    paths = save_figure(fig, folder, "fid_vs_k", footer=protocol_line(summary))
    table = fid_by_variant(summary).reset_index()
    paths += save_table(table, folder, "fid_vs_k", f"Final FID by variant ({protocol_line(summary)}).",
                        bold={"fid_mean": "min"})
    return paths


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

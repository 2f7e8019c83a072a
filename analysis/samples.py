"""Sample grids per method: each variant's final EMA-student samples beside its teacher's.

    python analysis/samples.py RESULTS_DIR

Uses the samples.png that every run writes into its final checkpoint (same noise for student
and teacher: in each row, four student samples then four teacher samples), first seed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg

from common import cli, load, plt, save_figure


def make(folder):
    _, summary, info = load(folder)
    firsts = summary.sort_values("seed").drop_duplicates("variant")
    grids = [(row["variant"], Path(row["final_checkpoint"]) / "samples.png") for _, row in firsts.iterrows()
             if isinstance(row.get("final_checkpoint"), str) and (Path(row["final_checkpoint"]) / "samples.png").is_file()]
    if not grids:
        raise FileNotFoundError(f"no samples.png in any trial's final checkpoint under {folder}")
    cols = min(4, len(grids))
    rows = (len(grids) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (variant, path) in zip(axes.flat, grids):
        ax.imshow(mpimg.imread(path), cmap="gray")
        ax.set_title(f"{variant}\nstudent (left 4) | teacher (right 4)", fontsize=8)
    fig.suptitle(f"{info['name']}: samples, seed 0", fontsize=10)
    return save_figure(fig, folder, "samples")


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

"""Where each setting of a study sits against the paper's regime: task / kd against kd / teacher.

    python analysis/regime_map.py RESULTS_DIR      (a study whose settings each have task and kd)

Figure ``regime_map``: for each setting (pruning ratio, teacher, student structure, data: where
variants differ in more than the objective), x = FID(task) / FID(kd) and y = FID(kd) /
FID(teacher), log-log, with their 95% intervals as bars (``premise.gate``); the premise gate's
region (x >= 3 and y >= 5) shaded with its edges drawn, and the paper's 90% row (4.0, 8.5)
marked. A setting whose FID did not converge, or whose convergence was not measured, is drawn
hollow. Table ``regime_map``: the same numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from common import cli, load, plt, protocol_line, save_figure, save_table
from premise import MAX_CHANGE, MIN_KD_TEACHER, MIN_TASK_KD, PAPER_KD_TEACHER, PAPER_TASK_KD, gate

# tab10 without its green (the gate's colour) and grey (the reference lines').
COLORS = [f"C{i}" for i in (0, 1, 3, 4, 5, 6, 8, 9)]
MAX_NAMED = 6  # settings named beside their points; beyond, numbered with a key
TICKS = (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def name(row) -> str:
    """A setting's label: its name, and its convergence where it is not shown converged."""
    suffix = "" if row.convergence == "converged" else f" ({row.convergence})"
    if not (np.isfinite(row.task_kd) and np.isfinite(row.kd_teacher)):
        suffix = " (not drawn: a ratio not measured)"
    return (row.setting or "(one setting)") + suffix


def limits(values: list[float], edge: float, paper: float) -> tuple[float, float]:
    """Log-axis limits holding the values, their intervals, the gate's edge, the paper's point and
    1 (where task = kd, or kd = the teacher), with a margin."""
    finite = [v for v in [*values, edge, paper, 1.0] if np.isfinite(v) and v > 0]
    return min(finite) / 1.6, max(finite) * 1.6


def bars(table: pd.DataFrame, name: str) -> np.ndarray:
    """Asymmetric error bars (2 x settings) of a ratio column; 0 where there is no interval."""
    point = table[name].to_numpy(dtype=float)
    low, high = table[f"{name}_low"].to_numpy(dtype=float), table[f"{name}_high"].to_numpy(dtype=float)
    return np.nan_to_num(np.vstack([point - low, high - point]), nan=0.0)


def draw(ax, table: pd.DataFrame) -> None:
    """The gate's region and edges, the paper's point and every setting (filled: converged)."""
    values = [*table["task_kd"], *table["task_kd_low"], *table["task_kd_high"]]
    xlim = limits(values, MIN_TASK_KD, PAPER_TASK_KD)
    ylim = limits([*table["kd_teacher"], *table["kd_teacher_low"], *table["kd_teacher_high"]], MIN_KD_TEACHER,
                  PAPER_KD_TEACHER)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.fill_between([MIN_TASK_KD, xlim[1]], MIN_KD_TEACHER, ylim[1], color="tab:green", alpha=0.12, lw=0,
                    label=f"premise gate: task >= {MIN_TASK_KD:g}x kd and kd >= {MIN_KD_TEACHER:g}x teacher")
    ax.plot([MIN_TASK_KD, MIN_TASK_KD, xlim[1]], [ylim[1], MIN_KD_TEACHER, MIN_KD_TEACHER], color="tab:green", lw=1.5)
    # Where task = kd (the student learns alone) and kd = the teacher (nothing left to distill).
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.plot(PAPER_TASK_KD, PAPER_KD_TEACHER, marker="*", ms=16, color="black", ls="none",
            label=f"the paper's 90% row ({PAPER_TASK_KD:.1f}x, {PAPER_KD_TEACHER:.1f}x)")
    ax.annotate("paper (90%)", (PAPER_TASK_KD, PAPER_KD_TEACHER), xytext=(9, 4), textcoords="offset points",
                fontsize=8, fontweight="bold")
    numbered = len(table) > MAX_NAMED
    for i, row in enumerate(table.itertuples()):
        if not (np.isfinite(row.task_kd) and np.isfinite(row.kd_teacher)):
            continue  # not measured (no finished run, or no teacher FID): in the table only
        color = COLORS[i % len(COLORS)]
        filled = row.convergence == "converged"
        ax.errorbar(row.task_kd, row.kd_teacher, xerr=bars(table.iloc[[i]], "task_kd"),
                    yerr=bars(table.iloc[[i]], "kd_teacher"), fmt="o", ms=8, color=color, capsize=3, lw=1.2,
                    mfc=color if filled else "white", mec=color, mew=1.8, zorder=3)
        # Beyond a few settings, names run into each other: the points get numbers, keyed beside the axes.
        label = str(i + 1) if numbered else name(row)
        # Alternate above and below, so that labels of nearby settings do not sit on each other.
        ax.annotate(label, (row.task_kd, row.kd_teacher), xytext=(8, 7 if i % 2 == 0 else -13),
                    textcoords="offset points", fontsize=8, color=color,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
    if numbered:
        key = "\n".join(f"{i + 1}. {name(row)}" for i, row in enumerate(table.itertuples()))
        ax.text(1.03, 1.0, key, transform=ax.transAxes, va="top", ha="left", fontsize=7.5)
    ax.plot([], [], "o", color="gray", ms=7, label="setting, converged (bars: 95% CI)")
    ax.plot([], [], "o", color="gray", mfc="white", mew=1.8, ms=7,
            label=f"setting, not converged (FID moved >= {MAX_CHANGE:.0%}) or not measured")
    ax.text(xlim[1] / 1.05, ylim[1] / 1.05, f"premise gate\ntask >= {MIN_TASK_KD:g}x kd, kd >= {MIN_KD_TEACHER:g}x teacher",
            ha="right", va="top", fontsize=8, color="darkgreen")
    ax.text(1.0, ylim[0] * 1.05, " task = kd", fontsize=7, color="gray", va="bottom")
    ax.text(xlim[0] * 1.05, 1.0, "kd = teacher", fontsize=7, color="gray", va="bottom")
    for axis, (low, high) in ((ax.xaxis, xlim), (ax.yaxis, ylim)):
        # Ratios read as "3x", not as powers of ten.
        axis.set_major_locator(FixedLocator([t for t in TICKS if low <= t <= high]))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("FID(task) / FID(kd): how much worse the student is alone than with kd")
    ax.set_ylabel("FID(kd) / FID(teacher): how far kd stays from the teacher")
    ax.grid(True, which="major", lw=0.3, alpha=0.5)


def number_table(table: pd.DataFrame) -> pd.DataFrame:
    """The figure's numbers, one row per setting."""
    shown = table[["setting", "task_seeds", "kd_seeds", "task_kd", "task_kd_low", "task_kd_high", "kd_teacher",
                   "kd_teacher_low", "kd_teacher_high", "kd_change", "checked", "checked_change", "convergence"]].copy()
    shown["premise"] = np.where(table["passes"], "passes", "fails")
    return shown


def make(folder):
    df, summary, info = load(folder)
    table = gate(summary, df, list(info.get("variants", {})))
    if table.empty:
        raise ValueError(f"{folder}: no setting has both a task and a kd variant; the regime map needs them")
    fig, ax = plt.subplots(figsize=(7.5 + (3.5 if len(table) > MAX_NAMED else 0), 6))
    draw(ax, table)
    ax.set_title(f"{info['name']}: where each setting sits against the paper's regime", fontsize=10)
    # Under the axes: inside, the legend would hide settings.
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    paths = save_figure(fig, folder, "regime_map", footer=protocol_line(summary))
    caption = (f"{info['name']}: per setting, FID(task) / FID(kd) and FID(kd) / FID(teacher) (geometric means over "
               f"seeds, 95% intervals; the paper's 90% row: {PAPER_TASK_KD:.1f}x and {PAPER_KD_TEACHER:.1f}x), and the "
               f"relative change of the mean FID between the last two evaluations of kd and of the variant checked "
               f"beside it (converged below {MAX_CHANGE:.0%}). {protocol_line(summary)}.")
    return paths + save_table(number_table(table), folder, "regime_map", caption)


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

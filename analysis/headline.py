"""The headline: kd against the best LIFT/PLACE variant, every seed, the teacher, and the test.

    python analysis/headline.py RESULTS_DIR

Figure ``headline``: final FID of every run of kd and of the LIFT/PLACE variant with the lowest
mean final FID (every seed a point, the mean a bar), with the teacher's FID as a dashed line
under the same protocol; beside it, sample grids of kd's and the best variant's seed-0 students
and the teacher, all from the same noise. Table ``versus_kd``: for every variant, the difference
of its mean final FID from kd's (negative: better than kd) with a Welch 95% confidence interval,
the ratio of means, Welch's t-test p-value and Holm's correction over the variants, and a plain
verdict (with fewer than 3 seeds on either side the study is too small to tell). The sentence
(``headline.txt``, REPORT.md's "Result") ends with what the premise gate (``premise.py``) says of
it: only a setting that passes the gate is said to test the paper's claim.

Each variant is compared with the kd run of its own setting: where variants differ in more than
the objective (``teacher_scale``: the teacher; ``compression``: the pruning ratio), "place
unet-l" is compared with "kd unet-l", not with another teacher's kd, and the teacher line is the
best variant's teacher.
"""

from __future__ import annotations

import textwrap

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd

from common import OURS, cli, load, plt, protocol_line, save_figure, save_table
# Which run is compared with which, and the tests: the library's (a --seeds auto study decides
# with the same); re-exported here for the other analysis scripts.
from liftplace import verdicts
from liftplace.verdicts import (ALPHA, MARGIN, MIN_SEEDS, finals, holm, references,  # noqa: F401
                                setting_columns, setting_keys, welch_power)

REFERENCE = "kd"


def versus(summary: pd.DataFrame, reference: str = REFERENCE, margin: float = MARGIN, alpha: float = ALPHA) -> pd.DataFrame:
    """``liftplace.verdicts.table`` (one row per variant against its kd run: the Welch
    difference and interval, the equivalence test, both Holm-adjusted), with the power these seeds
    had to find a difference of ``margin`` x kd's mean at Holm's strictest level and the
    verdict in words. ``alpha``: the level (a --seeds auto study's last look tests at the alpha
    it spent, less than 0.05)."""
    table = verdicts.table(summary, reference, margin, alpha)
    if table.empty:
        return table
    level = alpha / max(1, int(table["p"].notna().sum()))  # Holm's strictest step
    table["power"] = [welch_power(int(r["seeds"]), int(r[f"{reference}_seeds"]), r["fid_std"], r[f"{reference}_std"],
                                  r["margin"], level)
                      if min(r["seeds"], r[f"{reference}_seeds"]) >= 2 else np.nan for _, r in table.iterrows()]
    table["verdict"] = [verdict(r, r["word"], reference, margin) for _, r in table.iterrows()]
    return table.drop(columns="word")


def verdict(row, word: str, reference: str, margin: float = MARGIN) -> str:
    """The verdict in words: better/worse than kd, equivalent within the margin, inconclusive
    (with the power this many seeds had), or too few seeds."""
    against = row.get("reference") or reference
    power = (f"power at this n to detect a {margin:.0%} difference: {row['power']:.2f}"
             if not np.isnan(row.get("power", np.nan)) else "power unknown")
    if word == "too few seeds":
        return f"too few seeds to tell (need {MIN_SEEDS} a side; {power})"
    if word in ("better", "worse"):
        return f"{word} than {against} (p_holm {row['p_holm']:.2g})"
    if word == "equivalent":
        return (f"equivalent to {against} within ±{row['margin']:.2f} FID ({margin:.0%} of its mean; "
                f"TOST p_holm {row['p_equivalent_holm']:.2g})")
    return (f"inconclusive: neither a difference (p_holm {row['p_holm']:.2g}) nor an equivalence within "
            f"±{row['margin']:.2f} FID (TOST p_holm {row['p_equivalent_holm']:.2g}) shown; {power}")


def is_ours(summary: pd.DataFrame, variant: str) -> bool:
    """Whether a variant trains with LIFT or PLACE (by its objective's config column, or, in a
    summary without config columns, by the first word of its name)."""
    column = "config/objective/name"
    if column in summary:
        return summary.loc[summary["variant"] == variant, column].iloc[0] in OURS
    return variant.split()[0] in OURS


def best_variant(summary: pd.DataFrame, reference: str = REFERENCE, *, alone: bool = False) -> str | None:
    """The LIFT/PLACE variant with the lowest mean final FID (diverged runs excluded) and a
    reference to be compared with (``alone``: with or without one). A study with baselines
    beside kd (``compression``: task, feat, kd+feat) headlines its best LIFT/PLACE variant,
    not a better baseline; a study without LIFT/PLACE variants, its best variant other than kd."""
    means = {v: finals(summary, v).mean() for v, against in references(summary, reference).items()
             if (alone or against is not None) and len(finals(summary, v))}
    ours = {v: m for v, m in means.items() if is_ours(summary, v)}
    pool = ours or means
    return min(pool, key=pool.get) if pool else None


def teacher_fid(summary: pd.DataFrame, variant: str | None) -> float | None:
    """The teacher FID of a variant's runs (studies over teachers have several)."""
    if variant is None or "teacher_fid" not in summary:
        return None
    values = summary[summary["variant"] == variant]["teacher_fid"].dropna()
    return float(values.iloc[0]) if len(values) else None


def sentence(summary: pd.DataFrame, table: pd.DataFrame, reference: str = REFERENCE,
             gate: pd.DataFrame | None = None, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """The result in one paragraph, for REPORT.md after the premise gate, and ending with what
    the gate says of it: only a setting that passes is said to test the paper's claim.
    ``gate``: ``premise.gate``'s table (None: computed from the summary alone, which holds no
    evaluations along training, so convergence is "not measured")."""
    import premise  # here, not at the top: premise builds on this module's matching

    best = best_variant(summary, reference)
    against = references(summary, reference).get(best) if best is not None else None
    ref = finals(summary, against) if against is not None else np.array([])
    teacher = teacher_fid(summary, best)
    teacher_text = f"; teacher {teacher:.2f}" if teacher is not None else ""
    framing = premise.statement(premise.gate(summary, None) if gate is None else gate, summary, focus=against, best=best)
    if best is None or not len(ref):
        return (f"No comparison with {reference}: the study has no finished {reference} run or no other variant. "
                + framing)
    row = table[table["variant"] == best].iloc[0]
    x = finals(summary, best)
    label = "Best LIFT/PLACE variant" if is_ours(summary, best) else f"Best variant other than {reference}"
    parts = [f"{label}: **{best}**, final FID {x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0:.2f} "
             f"over {len(x)} seeds, against {against} {ref.mean():.2f} ± {ref.std(ddof=1) if len(ref) > 1 else 0:.2f} "
             f"over {len(ref)}{teacher_text} (mean ± std)."]
    if not np.isnan(row["ci95_low"]):
        parts.append(f"Difference {row['difference']:+.2f} FID (95% CI {row['ci95_low']:+.2f} to {row['ci95_high']:+.2f}, "
                     f"Welch p = {row['p']:.2g}, Holm-adjusted over {len(table)} variants {row['p_holm']:.2g}): "
                     f"{row['verdict']}.")
    else:
        parts.append(f"Difference {row['difference']:+.2f} FID: {row['verdict']}.")
    words = table["verdict"].str.split().str[0]
    others = table[words.isin(["better", "worse"])]
    if len(others):
        parts.append("Differing from " + reference + f" at p_holm < {alpha:.2g}: "
                     + ", ".join(f"{r.variant} ({r.verdict.split(' ')[0]}, {r.difference:+.2f})" for r in others.itertuples()) + ".")
    if words.eq("too").all():
        # p_holm may still fall under 0.05 by chance with 2 seeds a side; no verdict is drawn from it.
        parts.append(f"No variant is called better, worse or equivalent to {reference}: every one has fewer than "
                     f"{MIN_SEEDS} seeds a side.")
    else:
        equivalent = table[words.eq("equivalent")]["variant"].tolist()
        undecided = table[words.eq("inconclusive")]["variant"].tolist()
        if equivalent:
            parts.append(f"Equivalent to {reference} within ±{margin:.0%} of its mean (two one-sided tests, Holm): "
                         + ", ".join(equivalent) + ".")
        if undecided:
            parts.append("Inconclusive (neither a difference nor an equivalence shown; more seeds would tell, "
                         "`liftplace plan-seeds` says how many): " + ", ".join(undecided) + ".")
    parts.append(framing)
    return " ".join(parts)


def sample_panels(summary: pd.DataFrame, variants: list[str]) -> list[tuple[str, np.ndarray]]:
    """(title, image) for each variant's seed-0 student samples, then the teacher's, cut from
    the samples.png grids (each row: four student samples, then four teacher samples from the
    same noise; every run's grid uses the same noise, so the teacher half is shared)."""
    panels, teacher = [], None
    for variant in variants:
        runs = summary[(summary["variant"] == variant) & ~summary["diverged"]].sort_values("seed")
        for _, run in runs.iterrows():
            path = Path(str(run.get("final_checkpoint"))) / "samples.png"
            if path.is_file():
                grid = mpimg.imread(path)
                half = grid.shape[1] // 2
                panels.append((f"{variant} (seed {int(run['seed'])})", grid[:, :half]))
                teacher = grid[:, half:]
                break
    if teacher is not None:
        panels.append(("teacher", teacher))
    return panels


def make(folder):
    import premise

    df, summary, info = load(folder)
    margin = float(info.get("margin") or MARGIN)  # the study's equivalence margin (--margin)
    # A --seeds auto study decides at its last look's level: the alpha that look spent.
    alpha = float(info["looks"][-1]["level"]) if info.get("looks") else ALPHA
    table = versus(summary, margin=margin, alpha=alpha)
    # Where no variant has a kd to be compared with (a search), its best one, alone.
    best = best_variant(summary) or best_variant(summary, alone=True)
    against = (references(summary).get(best) or REFERENCE) if best is not None else REFERENCE
    shown = [v for v in (against, best) if v is not None and v in set(summary["variant"])]
    panels = sample_panels(summary, shown)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.6 + 2.4 * len(panels), 4.2),
                             gridspec_kw={"width_ratios": [1.5] + [1] * len(panels)}, squeeze=False)
    ax = axes[0, 0]
    for i, variant in enumerate(shown):
        x = finals(summary, variant)
        ax.scatter(np.full(len(x), i) + np.linspace(-0.08, 0.08, len(x)), x, color=f"C{i}", s=30, zorder=3,
                   label=f"{variant}: {len(x)} seeds")
        if len(x):
            ax.hlines(x.mean(), i - 0.25, i + 0.25, color=f"C{i}", lw=2)
    teacher = teacher_fid(summary, best if best is not None else against)
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.2f}")
    ax.set_xticks(range(len(shown)), shown, fontsize=9)
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("final FID (lower is better)")
    # A study without the reference (a search over place alone) shows its best variant only.
    which = "the best LIFT/PLACE variant" if best is not None and is_ours(summary, best) else "the best variant"
    ax.set_title(f"{info['name']}: {against} vs {which}" if against in shown
                 else f"{info['name']}: the best variant (no {against} run)", fontsize=10)
    # Under the axes: inside, a legend can hide a seed's point.
    if ax.get_legend_handles_labels()[0]:  # (a partial study may have nothing to plot yet)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3 if panels else 1, frameon=False)
    for panel_ax, (title, image) in zip(axes[0, 1:], panels):
        panel_ax.imshow(image, cmap="gray")
        # Long variant names (a search's sampled values) are wrapped, so that titles do not run together.
        panel_ax.set_title(textwrap.fill(title, 28), fontsize=8)
        panel_ax.axis("off")
    paths = save_figure(fig, folder, "headline", footer=protocol_line(summary) + "; samples: same noise in every grid")
    caption = (f"{info['name']}: each variant's mean final FID against its {REFERENCE} run's (column reference; "
               f"difference < 0: better than {REFERENCE}), Welch's 95% interval of the difference and p-value, Holm-adjusted over the variants; "
               f"the equivalence test's p (two one-sided tests, ±{margin:.0%} of {REFERENCE}'s mean), Holm-adjusted; the power these "
               f"seeds had to find a {margin:.0%} difference at Holm's strictest level ({protocol_line(summary)}).")
    if not table.empty:
        paths += save_table(table, folder, "versus_kd", caption)
    text = Path(folder) / "analysis" / "headline.txt"
    gate = premise.gate(summary, df, list(info.get("variants", {})))
    text.write_text(sentence(summary, table, gate=gate, margin=margin, alpha=alpha) + "\n")
    return paths + [text]


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

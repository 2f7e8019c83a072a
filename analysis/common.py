"""What every analysis script shares: loading a study, saving figures and tables, the protocol."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from liftplace import storage  # noqa: E402
from liftplace.results import final_checkpoints, load_study, read_study_info, study_seeds, summarize  # noqa: E402

# This method's objectives. The figures that single out one student beside kd's pick the best of
# these, not a better baseline (compression also trains task, feat and kd+feat).
OURS = ("lift", "place", "place+feat")


def kd_and_best_ours(summary: pd.DataFrame) -> list[str]:
    """Among variants with a student to load (not diverged, a final checkpoint): kd's variant
    with the best mean final FID and the best LIFT/PLACE variant (the best other variant where
    there is none), in that order."""
    ok = summary[~summary["diverged"] & summary["final_checkpoint"].notna()]
    means = ok.groupby("variant")["final_fid"].mean().sort_values()
    kind = ok.drop_duplicates("variant").set_index("variant")["config/objective/name"]
    kd = [v for v in means.index if kind[v] == "kd"]
    others = [v for v in means.index if v not in kd]
    ours = [v for v in others if kind[v] in OURS]
    return kd[:1] + (ours or others)[:1]


def load(folder):
    """(rows, per-run summary, study info) of a study, finished or not.

    The rows are every run's (a partial run's too: curves along training can use them). The
    summary holds the runs of a grid study that finished (trained every step and evaluated, or
    diverged); ``summary.attrs["missing"]`` lists, one line each, the planned runs that did
    not: stopped part way (with the step they reached) or never started. A search study's runs
    are all kept: its scheduler stops trials on purpose."""
    df = load_study(folder, allow_unfinished=True)
    info = read_study_info(folder)
    summary = summarize(df)
    missing = []
    if not info.get("space"):
        # A run's planned steps (its config's); where a row lacks them, its own last step.
        planned = summary["config/train/steps"].fillna(summary["steps"]) if "config/train/steps" in summary \
            else summary["steps"]
        done = summary["diverged"] | ((summary["steps"] >= planned) & summary["final_fid"].notna())
        for row in summary[~done].itertuples():
            missing.append(f"{row.variant} seed {row.seed}: stopped at step {row.steps} of {int(planned[row.Index])}"
                           + ("" if row.steps < planned[row.Index] else " before its final evaluation"))
        present = set(zip(summary["variant"], summary["seed"]))
        for variant in info.get("variants", {}):
            for seed in study_seeds(info):
                if (variant, seed) not in present:
                    missing.append(f"{variant} seed {seed}: no rows (never started)")
        summary = summary[done].reset_index(drop=True)
    summary.attrs["missing"] = missing
    return df, summary, info


def protocol_line(summary: pd.DataFrame) -> str:
    """The FID protocol, stated once: extractor, image count, sampler steps (from a summary or,
    when no run finished, the rows)."""
    if summary.empty:
        return "FID protocol unknown (no run has finished)"
    first = summary.iloc[0]
    generated = int(first.get("eval_num_images"))
    reference = first.get("eval_reference_images")  # fewer when the validation split is smaller
    reference = generated if reference is None or pd.isna(reference) else int(reference)
    return (f"FID/KID/precision/recall: {first.get('eval_extractor')} features, {generated} "
            f"generated vs {reference} validation images, "
            f"{int(first.get('eval_sampler_steps'))} sampler steps (EMA student)")


def out_dir(folder) -> Path:
    out = Path(folder) / "analysis"
    out.mkdir(exist_ok=True)
    return out


def save_figure(fig, folder, name: str, footer: str | None = None) -> list[Path]:
    """PNG and PDF of a figure; footer (the FID protocol) goes under the plot in small grey."""
    paths = [out_dir(folder) / f"{name}.png", out_dir(folder) / f"{name}.pdf"]
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=6, color="gray", wrap=True)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def save_table(table: pd.DataFrame, folder, name: str, caption: str, bold: dict | None = None) -> list[Path]:
    """Markdown and LaTeX versions of a table; bold = {column: "min" | "max"} per group."""
    shown = table.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}")
    if bold:
        for col, how in bold.items():
            values = pd.to_numeric(table[col], errors="coerce")
            if values.notna().any():
                best = values.idxmin() if how == "min" else values.idxmax()
                shown.loc[best, col] = f"**{shown.loc[best, col]}**"
    md = out_dir(folder) / f"{name}.md"
    md.write_text(f"{caption}\n\n{shown.to_markdown(index=False)}\n")
    tex = out_dir(folder) / f"{name}.tex"
    latex = shown.copy()
    for col in latex.columns:
        latex[col] = latex[col].astype(str).str.replace(r"\*\*(.*)\*\*", r"\\textbf{\1}", regex=True)
        # LaTeX reads % as a comment and _ as a subscript: "50%" and "fid_mean" must be escaped.
        latex[col] = latex[col].str.replace("%", r"\%").str.replace("_", r"\_")
    latex.columns = [str(c).replace("%", r"\%").replace("_", r"\_") for c in latex.columns]
    tex.write_text(latex.to_latex(index=False, escape=False, caption=caption.replace("%", r"\%")))
    return [md, tex]


def seeds_note(summary: pd.DataFrame) -> str:
    counts = summary.groupby("variant").size()
    return f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"


def fid_by_variant(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of final FID per variant, plus precision/recall and divergences."""
    ok = summary[~summary["diverged"]]
    agg = ok.groupby("variant").agg(fid_mean=("final_fid", "mean"), fid_std=("final_fid", "std"),
                                    precision=("final_precision", "mean"), recall=("final_recall", "mean"),
                                    seeds=("final_fid", "size"))
    agg["diverged"] = summary.groupby("variant")["diverged"].sum().reindex(agg.index).fillna(0).astype(int)
    missing = set(summary["variant"]) - set(agg.index)
    for variant in missing:  # every seed diverged
        agg.loc[variant] = [float("nan")] * 4 + [0, int(summary[summary["variant"] == variant]["diverged"].sum())]
    for column in ("text_alignment", "clip_score"):  # a text-to-image study's
        if f"final_{column}" in ok and ok[f"final_{column}"].notna().any():
            agg[column] = ok.groupby("variant")[f"final_{column}"].mean().reindex(agg.index)
    return agg


def cli(make, description: str, *, list_paths: bool = True):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("results_dir", help="a finished study's folder (<storage>/<study>), or its URI on a store "
                                            "(s3://..., gs://...: read from a local copy, the outputs put back there)")
    args = parser.parse_args()
    try:
        # A study on a store: its rows and each run's final checkpoint (the samples and the
        # students the figures run) copied here first; what is built goes back under <study>/analysis.
        folder = storage.local_copy(args.results_dir, checkpoints=final_checkpoints, purpose="analysis")
        paths = make(folder)
        if storage.is_uri(args.results_dir):
            store = storage.Store(args.results_dir)
            storage.put_tree(out_dir(folder), store, "analysis")
            print(f"{Path(sys.argv[0]).name}: put into {storage.shown(store.uri_of('analysis'))}")
    except (ValueError, FileNotFoundError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # a store that stopped answering, a disk that filled
        print(f"{Path(sys.argv[0]).name}: error: {storage.shown(' '.join(str(err).split()))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Run by a study's driver (which says it in its own line), quietly; alone, in one line.
        if not os.environ.get("LIFTPLACE_REPORT_OF_STUDY"):
            print(f"{Path(sys.argv[0]).name}: interrupted; run it again to build the report", file=sys.stderr)
        raise SystemExit(130) from None
    if list_paths:
        for path in paths:
            print(path)
    else:
        figures = sum(p.suffix == ".png" for p in paths)
        tables = sum(p.suffix == ".md" and p.name != "REPORT.md" for p in paths)
        print(f"{Path(sys.argv[0]).name}: {figures} figures (PNG and PDF), {tables} tables (Markdown and LaTeX) "
              f"in {out_dir(folder)}")

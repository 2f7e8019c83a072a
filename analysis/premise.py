"""The premise gate: whether a study's own numbers put it where the paper's claim applies.

    python analysis/premise.py RESULTS_DIR

The paper (LIFT and PLACE, CVPR 2026) claims its objectives help where a tiny student cannot
learn alone and plain KD guides it too little. In its 90% row, w/o KD (``task`` here) has FID
223.6, OutKD (``kd``) 55.4 and the teacher 6.48: task is 4.0x kd, kd 8.5x the teacher. A study
tests that claim only where its own numbers show the same, setting by setting (where variants
differ in more than the objective, as ``headline.references`` matches them: a setting's task
against the kd of the same setting):

- task / kd: ratio of the geometric means of final FID over seeds, with the 95% interval of
  Welch's t on the difference of mean log FIDs (seeds are the unit), at least ``MIN_TASK_KD``;
- kd / teacher: geometric mean of kd's final FIDs over the teacher's FID, with a t interval on
  kd's mean log FID, at least ``MIN_KD_TEACHER``;
- convergence: the mean FID over seeds at the last two evaluations changed by less than
  ``MAX_CHANGE``, for kd and for the setting's best LIFT/PLACE variant (task where there is
  none). A run evaluated once cannot show it: convergence is "not measured" and the gate fails.

Writes ``premise.md``: the gate per setting beside the paper's numbers, and a statement of which
settings test the paper's claim and what question the others answer. REPORT.md opens with it,
and the headline sentence (``headline.sentence``) follows it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from common import cli, load, out_dir
from headline import REFERENCE, best_variant, finals, is_ours, references, setting_columns, setting_keys, teacher_fid

# The paper's 90% row (Table 1, DDPM): w/o KD FID 223.6, OutKD 55.4, teacher 6.48.
PAPER_TASK_FID, PAPER_KD_FID, PAPER_TEACHER_FID = 223.6, 55.4, 6.48
PAPER_TASK_KD = PAPER_TASK_FID / PAPER_KD_FID  # 4.04: the student alone is 4x worse than with KD
PAPER_KD_TEACHER = PAPER_KD_FID / PAPER_TEACHER_FID  # 8.55: KD leaves the student far from its teacher
# The gate, below the paper's 4.0x and 8.5x so that a study near its regime passes and one whose
# student learns alone (task ~ kd) or whose kd nearly matches the teacher does not.
MIN_TASK_KD = 3.0
MIN_KD_TEACHER = 5.0
MAX_CHANGE = 0.15  # |last - previous| / previous of the mean FID over seeds: "converged" below it
TASK = "task"
LEVEL = 0.95

# What a setting's numbers answer instead of the paper's question, by the condition that failed.
QUESTIONS = {
    "task_kd": "the student learns alone nearly as well as with kd, so this asks whether LIFT/PLACE beat kd "
               "where KD is not needed, not the paper's question",
    "kd_teacher": "kd already nearly matches the teacher, so this asks whether LIFT/PLACE close a gap that kd "
                  "has nearly closed, not the paper's question",
    "not converged": "the numbers compare objectives at a fixed budget, before convergence",
    "not measured": "the numbers compare objectives at a fixed budget, perhaps before convergence (set "
                    "train.eval_every so that a run evaluates at least twice)",
    "unknown": "without finished task and kd runs and the teacher's FID the premise is unknown",
}


def objective(summary: pd.DataFrame, variant: str) -> str:
    """A variant's objective: its config column, or the first word of its name without one."""
    column = "config/objective/name"
    if column in summary:
        return str(summary.loc[summary["variant"] == variant, column].iloc[0])
    return variant.split()[0]


def ratio_of_geomeans(a, b, level: float = LEVEL) -> tuple[float, float, float]:
    """(geomean(a) / geomean(b), low, high): the interval is exp of Welch's t interval on
    mean(log a) - mean(log b); NaN bounds with fewer than 2 values a side."""
    la, lb = np.log(np.asarray(a, dtype=float)), np.log(np.asarray(b, dtype=float))
    if not len(la) or not len(lb):
        return (np.nan, np.nan, np.nan)
    point = float(np.exp(la.mean() - lb.mean()))
    if len(la) < 2 or len(lb) < 2:
        return (point, np.nan, np.nan)
    interval = stats.ttest_ind(la, lb, equal_var=False).confidence_interval(level)
    return (point, float(np.exp(interval.low)), float(np.exp(interval.high)))


def ratio_to(a, value: float | None, level: float = LEVEL) -> tuple[float, float, float]:
    """(geomean(a) / value, low, high): the interval is exp of the t interval on mean(log a),
    less log(value) (one number, no spread of its own)."""
    la = np.log(np.asarray(a, dtype=float))
    if not len(la) or value is None or not value > 0:
        return (np.nan, np.nan, np.nan)
    point = float(np.exp(la.mean()) / value)
    if len(la) < 2:
        return (point, np.nan, np.nan)
    half = stats.t.ppf(0.5 + level / 2, len(la) - 1) * la.std(ddof=1) / np.sqrt(len(la))
    return (point, float(np.exp(la.mean() - half) / value), float(np.exp(la.mean() + half) / value))


def last_change(evals: pd.DataFrame, variant: str) -> tuple[float, int]:
    """(relative change of the mean FID over seeds between the variant's last two evaluation
    steps, the number of evaluation steps); NaN change with fewer than two. ``evals``: rows with
    ``variant``, ``step``, ``fid`` (rows without a FID are not evaluations)."""
    rows = evals[(evals["variant"] == variant) & evals["fid"].notna()]
    means = rows.groupby("step")["fid"].mean().sort_index()
    if len(means) < 2:
        return (np.nan, len(means))
    previous, last = means.iloc[-2], means.iloc[-1]
    return (float((last - previous) / previous), len(means))


def setting_label(summary: pd.DataFrame, kd: str) -> str:
    """A setting's name: its kd variant's name without the objective ("kd 90%" -> "90%"), else
    its setting columns' values; "" where variants differ in the objective alone."""
    rest = kd.split(" ", 1)[1] if kd.startswith(REFERENCE + " ") else ""
    if rest:
        return rest
    columns = setting_columns(summary)
    first = summary[summary["variant"] == kd].iloc[0]
    return ", ".join(f"{c.rsplit('/', 1)[-1]}={first[c]}" for c in columns)


def checked_variant(summary: pd.DataFrame, task: str, kd: str) -> str:
    """The variant whose convergence is checked beside kd's: the best LIFT/PLACE variant of the
    setting (``best_variant`` on the setting's runs), task where the setting has none."""
    keys = setting_keys(summary)
    same = summary[[keys[v] == keys[kd] for v in summary["variant"]]]
    best = best_variant(same)
    return best if best is not None and is_ours(same, best) else task


def finished_evals(summary: pd.DataFrame, evals: pd.DataFrame | None) -> pd.DataFrame:
    """The evaluation rows of the summary's runs that did not diverge (all rows where either
    lacks a ``run`` column: hand-built tables)."""
    if evals is None:
        return pd.DataFrame(columns=["variant", "step", "fid"])
    evals = evals[evals["fid"].notna()] if "fid" in evals else evals.assign(fid=np.nan)
    if "run" in evals and "run" in summary:
        evals = evals[evals["run"].isin(summary.loc[~summary["diverged"], "run"])]
    return evals


def gate(summary: pd.DataFrame, evals: pd.DataFrame | None, order: list[str] | None = None) -> pd.DataFrame:
    """One row per setting with a task and a kd variant (in ``order`` of the task variants, else
    the summary's).

    summary: one row per run (``variant``, ``final_fid``, ``diverged``, ``teacher_fid``, and the
    ``config/...`` columns that tell settings apart). evals: one row per run and evaluation
    (``variant``, ``step``, ``fid``; ``run`` to keep the summary's runs only), or None.
    Columns: setting, task, kd, checked (the variant checked for convergence beside kd),
    task_seeds, kd_seeds, teacher_fid, task_kd (+ _low, _high: 95% interval), kd_teacher (+ _low,
    _high), evaluations (fewest evaluation steps of kd and checked), kd_change, checked_change,
    convergence ("converged", "not converged", "not measured"), task_kd_ok, kd_teacher_ok,
    converged_ok, passes.
    """
    evals = finished_evals(summary, evals)
    keys = setting_keys(summary)
    pairs = references(summary)
    tasks = [v for v in summary["variant"].drop_duplicates() if objective(summary, v) == TASK
             and pairs.get(v) is not None and keys[pairs[v]] == keys[v]]
    if order:
        tasks.sort(key=lambda v: order.index(v) if v in order else len(order))
    rows = [gate_row(summary, evals, task, pairs[task]) for task in tasks]
    return pd.DataFrame(rows, columns=None if rows else ["setting", "task", "kd", "passes"])


def gate_row(summary: pd.DataFrame, evals: pd.DataFrame, task: str, kd: str) -> dict:
    """The gate of one setting: its task variant against its kd variant (see ``gate``)."""
    t, k = finals(summary, task), finals(summary, kd)
    teacher = teacher_fid(summary, kd)
    checked = checked_variant(summary, task, kd)
    kd_change, kd_evals = last_change(evals, kd)
    checked_change, checked_evals = last_change(evals, checked)
    changes = (kd_change, checked_change)
    if min(kd_evals, checked_evals) < 2:
        convergence = "not measured"
    else:
        convergence = "converged" if all(abs(c) < MAX_CHANGE for c in changes) else "not converged"
    row = {"setting": setting_label(summary, kd), "task": task, "kd": kd, "checked": checked,
           "task_seeds": len(t), "kd_seeds": len(k), "teacher_fid": np.nan if teacher is None else teacher}
    row.update(zip(("task_kd", "task_kd_low", "task_kd_high"), ratio_of_geomeans(t, k)))
    row.update(zip(("kd_teacher", "kd_teacher_low", "kd_teacher_high"), ratio_to(k, teacher)))
    row.update(evaluations=min(kd_evals, checked_evals), kd_change=kd_change, checked_change=checked_change,
               convergence=convergence)
    # NaN >= x is False: a ratio that could not be measured fails its condition.
    row.update(task_kd_ok=bool(row["task_kd"] >= MIN_TASK_KD), kd_teacher_ok=bool(row["kd_teacher"] >= MIN_KD_TEACHER),
               converged_ok=convergence == "converged")
    row["passes"] = row["task_kd_ok"] and row["kd_teacher_ok"] and row["converged_ok"]
    return row


def unmeasured(summary: pd.DataFrame) -> str:
    """Why a study has no gate row: no task variant, or none with a kd of its own setting."""
    if not any(objective(summary, v) == TASK for v in summary["variant"].drop_duplicates()):
        return "no task variant"
    return "no task variant with a kd variant of the same setting"


# --- words -----------------------------------------------------------------------------------

def interval(point: float, low: float, high: float, seeds: str) -> str:
    """A ratio with its 95% interval, as the gate's table shows it."""
    if np.isnan(point):
        return "not measured"
    if np.isnan(low):
        return f"{point:.2f}x ({seeds}: no interval)"
    return f"{point:.2f}x (95% CI {low:.2f}-{high:.2f})"


def failures(row) -> list[tuple[str, str]]:
    """(kind, what failed) for each condition a gate row fails; kind keys ``QUESTIONS``."""
    out = []
    if np.isnan(row["task_kd"]) or np.isnan(row["kd_teacher"]):
        out.append(("unknown", "task/kd or kd/teacher not measured (no finished run, or no teacher FID)"))
    if not row["task_kd_ok"] and not np.isnan(row["task_kd"]):
        out.append(("task_kd", f"task only {row['task_kd']:.2f}x kd, under {MIN_TASK_KD:g}x"))
    if not row["kd_teacher_ok"] and not np.isnan(row["kd_teacher"]):
        out.append(("kd_teacher", f"kd only {row['kd_teacher']:.2f}x the teacher, under {MIN_KD_TEACHER:g}x"))
    if row["convergence"] == "not measured":
        out.append(("not measured", f"convergence not measured: {row['evaluations']} evaluation"
                    f"{'' if row['evaluations'] == 1 else 's'} per run"))
    elif row["convergence"] == "not converged":
        moved = [f"{name} {change:+.0%}" for name, change in ((row["kd"], row["kd_change"]),
                                                               (row["checked"], row["checked_change"]))
                 if abs(change) >= MAX_CHANGE]
        out.append(("not converged", "not converged: FID moved " + ", ".join(dict.fromkeys(moved))
                    + " between the last two evaluations"))
    return out


def convergence_cell(row) -> str:
    """Each checked variant's change between the last two evaluations, and the condition's outcome."""
    if row["convergence"] == "not measured":
        return f"not measured ({row['evaluations']} evaluation{'' if row['evaluations'] == 1 else 's'} per run): fail"
    changes = dict.fromkeys([f"{row['kd']} {row['kd_change']:+.0%}", f"{row['checked']} {row['checked_change']:+.0%}"])
    return f"{', '.join(changes)}: {'pass' if row['converged_ok'] else 'fail'}"


def why(row) -> str:
    """What a failing setting's numbers answer instead, one clause per failed condition."""
    return "; and ".join(dict.fromkeys(QUESTIONS[kind] for kind, _ in failures(row)))


def named(labels: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def statement(table: pd.DataFrame, summary: pd.DataFrame, focus: str | None = None, best: str | None = None) -> str:
    """Which settings test the paper's claim and what the others answer, in words. ``focus``: the
    kd variant of the headline's comparison (``best`` against it), whose setting a last sentence
    names where the study has several."""
    if table.empty:
        return (f"The premise was not measured ({unmeasured(summary)}): without a student trained on the data "
                "alone beside kd, the numbers cannot show the setting the paper's claim is about, so this study "
                "does not test that claim.")
    kds = [v for v in summary["variant"].drop_duplicates() if objective(summary, v) == REFERENCE]
    untested = [setting_label(summary, k) or k for k in kds if k not in set(table["kd"])]
    if len(table) == 1 and not untested and not table.iloc[0]["setting"]:
        return one_setting(table.iloc[0])
    return settings_text(table, untested) + headline_setting(table, focus, best)


def one_setting(row) -> str:
    """The statement of a study whose variants differ in the objective alone."""
    if row["passes"]:
        return (f"The premise gate passes (task {row['task_kd']:.2f}x kd, kd {row['kd_teacher']:.2f}x the teacher, "
                "converged): this study tests the paper's claim.")
    return (f"The premise gate fails ({'; '.join(text for _, text in failures(row))}): this study does not "
            f"test the paper's claim; {why(row)}.")


def settings_text(table: pd.DataFrame, untested: list[str]) -> str:
    """The statement of a study of several settings: which pass, which fail (and why), and which
    have no task variant (``untested``)."""
    passing = list(table.loc[table["passes"], "setting"])
    failing = [f"{r['setting']} ({'; '.join(text for _, text in failures(r))})" for _, r in table.iterrows()
               if not r["passes"]]
    if passing and not failing and not untested:
        text = f"The premise gate passes in every setting ({named(passing)}): this study tests the paper's claim."
    elif not passing:
        text = (f"The premise gate fails in {'every setting with a task variant' if untested else 'every setting'}, "
                f"{named(failing)}: this study does not test the paper's claim.")
    else:
        text = f"The premise gate passes in {named(passing)} only: there the numbers test the paper's claim."
        if failing:
            text += f" It fails in {named(failing)}: those settings do not test it."
    if untested:
        text += f" In {named(untested)} it was not measured (no task variant of that setting)."
    return text


def headline_setting(table: pd.DataFrame, focus: str | None, best: str | None) -> str:
    """Where the headline's comparison (``best`` against ``focus``, a kd variant) stands, with
    what it answers where its setting fails; "" without a headline."""
    if focus is None:
        return ""
    compared = f"{best} against {focus}" if best else f"against {focus}"
    row = table[table["kd"] == focus]
    if not len(row):
        return f" The headline comparison ({compared}) is in a setting without a task variant: its premise was not measured."
    row = row.iloc[0]
    if row["passes"]:
        return f" The headline comparison ({compared}) is in {row['setting']}, which passes."
    return f" The headline comparison ({compared}) is in {row['setting']}, which fails: {why(row)}."


def markdown(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The gate as REPORT.md's opening section: the paper's numbers, the table, the statement."""
    lines = ["## Premise: does this study test the paper's claim?", "",
             f"The paper's claim is about a tiny student that cannot learn alone and that plain KD guides too little: "
             f"in its 90% row, w/o KD (`task`) has FID {PAPER_TASK_FID}, {PAPER_TASK_KD:.1f}x OutKD (`kd`, "
             f"{PAPER_KD_FID}), and kd is {PAPER_KD_TEACHER:.1f}x the teacher ({PAPER_TEACHER_FID}). A setting tests "
             f"that claim only where its own numbers show the same: final FID of task at least {MIN_TASK_KD:g}x kd's "
             f"and kd's at least {MIN_KD_TEACHER:g}x the teacher's (geometric means over seeds; 95% intervals from "
             f"t on log FID, seeds the unit), and the mean FID of kd and of the best LIFT/PLACE variant (task where "
             f"there is none) changed by less than {MAX_CHANGE:.0%} between the last two evaluations.", ""]
    if not table.empty:
        shown = pd.DataFrame({
            "setting": [s or "(one setting)" for s in table["setting"]],
            f"task / kd (paper {PAPER_TASK_KD:.1f}x; gate >= {MIN_TASK_KD:g}x)": [
                f"{interval(r.task_kd, r.task_kd_low, r.task_kd_high, f'{min(r.task_seeds, r.kd_seeds)} seed')}: "
                f"{'pass' if r.task_kd_ok else 'fail'}" for r in table.itertuples()],
            f"kd / teacher (paper {PAPER_KD_TEACHER:.1f}x; gate >= {MIN_KD_TEACHER:g}x)": [
                f"{interval(r.kd_teacher, r.kd_teacher_low, r.kd_teacher_high, f'{r.kd_seeds} seed')}: "
                f"{'pass' if r.kd_teacher_ok else 'fail'}" for r in table.itertuples()],
            f"convergence (last two evaluations, < {MAX_CHANGE:.0%})": [convergence_cell(r) for _, r in table.iterrows()],
            "premise": ["**passes**" if p else "fails" for p in table["passes"]],
        })
        lines += [shown.to_markdown(index=False), ""]
        if (table["convergence"] == "not measured").any():
            lines += ["Convergence is not measured where a run evaluated FID once (at its end): set train.eval_every "
                      "so that a run evaluates at least twice.", ""]
    lines += [f"**{statement(table, summary)}**", ""]
    return "\n".join(lines)


def make(folder):
    df, summary, info = load(folder)
    table = gate(summary, df, list(info.get("variants", {})))
    path = out_dir(folder) / "premise.md"
    path.write_text(markdown(table, summary))
    return [path]


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

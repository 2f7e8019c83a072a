"""Teacher scale (the paper's Figure 1): student FID against teacher parameters, kd vs place.

    python analysis/teacher_scale.py RESULTS_DIR      (a finished teacher_scale study)
"""

from __future__ import annotations

from common import cli, load, plt, protocol_line, save_figure, save_table, seeds_note


def make(folder):
    _, summary, info = load(folder)
    summary["method"] = summary["config/objective/name"]
    ok = summary[~summary["diverged"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, group) in enumerate(ok.groupby("method")):
        mean = group.groupby("teacher_params")["final_fid"].mean()
        ax.plot(mean.index, mean.values, "-o", color=f"C{i}", label=f"{method}, mean")
        ax.scatter(group["teacher_params"], group["final_fid"], color=f"C{i}", alpha=0.35, s=16)
    teachers = summary.groupby("teacher_params")["teacher_fid"].first()
    ax.plot(teachers.index, teachers.values, ":", color="gray", label="the teacher itself")
    ax.set_xscale("log")
    for name, row in summary.groupby("config/teacher/name")[["teacher_params"]].first().iterrows():
        ax.annotate(name, (row["teacher_params"], 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=7, color="gray")
    values = [*ok["final_fid"].dropna(), *teachers.dropna()]
    if values and min(values) > 0:
        # FIDs from ~1 (teachers) to ~1,000 (students that did not learn): on a linear axis the
        # converged students' differences vanish.
        ax.set_yscale("log")
    ax.set_xlabel("teacher parameters")
    ax.set_ylabel("student FID (lower is better)")
    ax.set_title(f"{info['name']}: one pruned student per teacher ({seeds_note(summary)} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    paths = save_figure(fig, folder, "teacher_scale", footer=protocol_line(summary))
    table = ok.groupby(["config/teacher/name", "method"]).agg(
        teacher_params=("teacher_params", "first"), student_params=("student_params", "first"),
        teacher_fid=("teacher_fid", "first"), fid_mean=("final_fid", "mean"), fid_std=("final_fid", "std"),
        seeds=("final_fid", "size")).reset_index().rename(columns={"config/teacher/name": "teacher"})
    table = table.sort_values(["teacher_params", "method"])
    return paths + save_table(table, folder, "teacher_scale", f"Student FID by teacher ({protocol_line(summary)}).")


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

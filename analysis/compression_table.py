"""The paper's main table: pruning ratio, iterations, MACs, params, method, FID, precision, recall.

    python analysis/compression_table.py RESULTS_DIR      (a finished compression study)

Best FID (lowest), precision and recall (highest) in bold within each pruning ratio.
"""

from __future__ import annotations

import pandas as pd

from common import cli, load, protocol_line, save_table, seeds_note


def make(folder):
    _, summary, info = load(folder)
    ok = summary[~summary["diverged"]].copy()
    # A transformer student may also be depth-pruned: its blocks kept join the ratio in the label.
    ok["pruning"] = (ok["config/student/prune_ratio"] * 100).round().astype(int).astype(str) + "%"
    if "config/student/depth" in ok and ok["config/student/depth"].notna().any():
        depth = ok["config/student/depth"]
        ok["pruning"] += depth.map(lambda d: "" if pd.isna(d) else f", {int(d)} blocks")
    table = ok.groupby(["pruning", "config/objective/name"], sort=False).agg(
        iterations=("steps", "max"), macs=("student_macs", "first"), params=("student_params", "first"),
        fid=("final_fid", "mean"), fid_std=("final_fid", "std"), precision=("final_precision", "mean"),
        recall=("final_recall", "mean"), seeds=("final_fid", "size")).reset_index()
    table = table.rename(columns={"config/objective/name": "method"})
    table["macs"] = (table["macs"] / 1e6).round(2).astype(str) + "M"
    table["params"] = (table["params"] / 1e3).round(1).astype(str) + "K"
    caption = (f"{info['name']}: students pruned from the teacher, mean over {seeds_note(summary)} seeds "
               f"({protocol_line(summary)}); bold: best per pruning ratio")
    shown = table.copy()
    for col in ("fid", "fid_std", "precision", "recall"):
        shown[col] = table[col].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}")
    for col, how in (("fid", "min"), ("precision", "max"), ("recall", "max")):
        for _, block in table.groupby("pruning", sort=False):
            values = pd.to_numeric(block[col], errors="coerce")
            if values.notna().any():
                best = values.idxmin() if how == "min" else values.idxmax()
                shown.loc[best, col] = f"**{shown.loc[best, col]}**"
    return save_table(shown, folder, "compression", caption)


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

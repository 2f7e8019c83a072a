"""Every figure and table that applies to a study, and a REPORT.md that embeds them.

    python analysis/make_all.py RESULTS_DIR
"""

from __future__ import annotations

import compression_table
import error_maps
import fid_vs_k
import linear_correction
import samples
import stability
import teacher_scale
import weighting_table
from common import cli, fid_by_variant, load, out_dir, protocol_line

BY_STUDY = {
    "ablate_k": [fid_vs_k],
    "ablate_weighting": [weighting_table],
    "teacher_scale": [teacher_scale],
    "compression": [compression_table],
    "stability": [stability],
}


def make(folder):
    df, summary, info = load(folder)
    scripts = BY_STUDY.get(info["name"], []) + [stability, linear_correction, error_maps, samples]
    paths = []
    for script in dict.fromkeys(scripts):
        paths += script.make(folder)
    lines = [f"# {info['name']}", "", info.get("description", "").strip().split("\n\n")[0], "",
             f"**Protocol.** {protocol_line(summary)}. Preset `{info['preset']}`, {info['seeds']} seeds per variant, "
             f"runner `{info['runner']}`, {len(summary)} trials ({int(summary['diverged'].sum())} diverged).", ""]
    table = fid_by_variant(summary).reset_index()
    lines += ["## Final FID by variant", "", table.to_markdown(index=False, floatfmt=".3g"), ""]
    for path in paths:
        if path.suffix == ".png":  # REPORT.md sits beside the figures
            lines += [f"![{path.stem}]({path.name})", ""]
        elif path.suffix == ".md":
            lines += [path.read_text(), ""]
    report = out_dir(folder) / "REPORT.md"
    report.write_text("\n".join(lines))
    return paths + [report]


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])

"""FID against training steps for a few objectives on one stream: how long a student needs.

    python benchmarks/fid_curve.py [--preset cpu] [--variants kd,lift,place] [--steps 4000]
                                   [--eval-every 500] [--threads 1] [--out curve.csv] [--set key=value ...]

In one process, without Ray: the variants (objective names; ``place`` is K = 16) train as one
cohort on one teacher forward per step. A variant may carry its own settings of the keys a
cohort's students may differ in (learning rate, EMA decay, objective, student), after colons:
``--variants kd,kd:train.lr=2e-3,place:train.ema_decay=0`` compares three students on one
stream. Every student is evaluated every ``--eval-every`` steps under the preset's protocol
(the teacher's card is measured under the same one). Prints one line per evaluation and
writes every evaluated row (variant, step, FID, KID, precision, recall, loss, elapsed seconds)
to ``--out`` as CSV, so that curves for several settings can be compared (this is how the `cpu` preset's regime was chosen; docs/teachers-and-fid.md, "Choosing the cpu preset").
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pandas as pd
import torch

from liftplace import distill
from liftplace.config import resolve

OBJECTIVES = {
    "kd": {"objective.name": "kd"},
    "lift": {"objective.name": "lift"},
    "place": {"objective.name": "place", "objective.group_size": 16},
}
COLUMNS = ["variant", "step", "fid", "kid", "precision", "recall", "loss", "elapsed_s"]


def own_settings(variant: str) -> list[str]:
    """``place:train.lr=2e-3`` -> the objective's settings, then that variant's own."""
    objective, *extra = variant.split(":")
    return [*(f"{k}={x}" for k, x in OBJECTIVES[objective].items()), *extra]


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--variants", default="kd,lift,place", help=f"comma-separated, of {', '.join(OBJECTIVES)}")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="fid_curve.csv")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v.split(":")[0] not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}, each optionally "
                     "followed by :key=value settings")
    if len(set(variants)) < len(variants):
        parser.error("a variant is named twice")
    torch.set_num_threads(args.threads)
    common = [*args.set, f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
              f"train.checkpoint_every={args.steps}"]
    try:
        members = {v: resolve(args.preset, [*common, *own_settings(v)]) for v in variants}
        distill.check_cohort(members)
    except ValueError as error:  # a malformed setting, or one the students must share
        parser.error(str(error))
    rows: list[dict] = []
    start = time.perf_counter()

    def report(step_rows: dict, checkpoint) -> None:
        for variant, row in step_rows.items():
            if not math.isnan(row["fid"]):
                rows.append({**{c: row.get(c) for c in COLUMNS}, "variant": variant,
                             "elapsed_s": time.perf_counter() - start,
                             "student_params": row["student_params"], "teacher_params": row["teacher_params"],
                             "teacher_fid": row["teacher_fid"]})
                print(f"{variant:>6} step {row['step']:>6}: FID {row['fid']:8.2f}  precision {row['precision']:.3f}  "
                      f"recall {row['recall']:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
                pd.DataFrame(rows).to_csv(args.out, index=False)

    base = next(iter(members.values()))
    print(f"{args.preset} {' '.join(args.set)}: teacher {base.teacher.name}, student prune {base.student.prune_ratio}, "
          f"batch {base.train.batch}, lr {base.train.lr}, {args.steps} steps, {torch.get_num_threads()} thread(s)",
          flush=True)
    distill.run_cohort(members, report, log=lambda line: None)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        first = frame.iloc[0]
        print(f"student {int(first.student_params):,} params = {first.student_params / first.teacher_params:.2%} "
              f"of the teacher's {int(first.teacher_params):,}; teacher FID {first.teacher_fid:.2f}; "
              f"{time.perf_counter() - start:.0f} s; rows in {args.out}")
    return frame


if __name__ == "__main__":
    main(sys.argv[1:])

"""Compression: the paper's main table, pruning 50/70/90% x task, kd, feat, kd+feat, lift, place.

Question: how much does each objective recover at each pruning ratio? task is training the
pruned student on the data alone (w/o KD); kd matches the teacher's output; feat its block
outputs (through 1x1 adapters); lift and place are this method.
Held fixed: the preset's teacher, steps, batch, lr, seeds. Reported: FID, precision, recall,
parameters and MACs of each student.
Cost: `cpu` preset (teacher unet-m), 18 variants x 2 seeds as 2 cohort trials of 18 students,
**3 h 54 min measured** in three resumed pieces at load 2-11 (tests beside it): 21 min 55 s for
steps 0-200 of 2,000 per trial, 2 h 23 min for 200-1,600, and 1 h 08 min 50 s for 1,600-2,000,
the final FIDs of 36 students (~35 min of it) and the report (plus a 9.5-minute restart whose
steps were lost). A cohort step of 18 students costs ~6 s per trial; the 50% students cost ~25x
the 90% ones. Result (final FID, mean of 2 seeds; teacher 2.98): kd is best at every ratio
(50/70/90%: 3.68 / 4.23 / 11.7); training on the data alone (task) 4.04 / 5.58 / 12.9, kd+feat
5.06 / 4.92 / 15.9, feat 6.14 / 6.35 / 24.6, place K=16 10.6 / 13.2 / 24.1, lift 25.7 / 42.5 /
52.6. LIFT and PLACE trail kd and even task at every ratio; with 2 seeds no difference is
tested. `paper`: 36 GPU runs of 100k steps on the user's DDPM (the paper's table uses one seed).

    python studies/compression.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.cli import study_main
from liftplace.study import Study

METHODS = {
    "task": {"objective.name": "task"},
    "kd": {"objective.name": "kd"},
    "feat": {"objective.name": "feat"},
    "kd+feat": {"objective.name": "kd+feat"},
    "lift": {"objective.name": "lift"},
    "place": {"objective.name": "place", "objective.group_size": 16},
}
STUDY = Study(
    name="compression",
    description=__doc__,
    variants={f"{m} {int(r * 100)}%": {**opts, "student.prune_ratio": r}
              for r in (0.5, 0.7, 0.9) for m, opts in METHODS.items()},
    seeds=2,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

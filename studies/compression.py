"""Compression: the paper's main table, pruning 50/70/90% x task, kd, feat, kd+feat, lift, place.

Question: how much does each objective recover at each pruning ratio? task is training the
pruned student on the data alone (w/o KD); kd matches the teacher's output; feat its block
outputs (through 1x1 adapters); lift and place are this method.
Held fixed: the preset's teacher, steps, batch, lr, seeds. Reported: FID, precision, recall,
parameters and MACs of each student.
Cost: `cpu` preset (teacher unet-m), 18 variants x 2 seeds as 2 cohort trials of 18 students,
not finished. Run in three pieces at load 2-11 (tests beside it): 21 min 55 s for steps 0-200
of 2,000 per trial, a 9.5-minute restart whose steps were lost, then 2 h 23 min from step 200
to the checkpoint at 1,600 (6.1 s per 18-student cohort step in each trial; the 50% students
cost ~25x the 90% ones). The whole study at that load: ~3.5-4 h, extrapolated (the ~2 h
estimated from step costs was too low); `--resume` finishes it. `paper`, 36 GPU runs of 100k
steps on the user's DDPM (the paper's table uses one seed).

    python studies/compression.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.study import Study, study_main

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

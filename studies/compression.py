"""Compression: the paper's main table, pruning 50/70/90% x task, kd, feat, kd+feat, lift, place.

Question: how much does each objective recover at each pruning ratio? task is training the
pruned student on the data alone (w/o KD); kd matches the teacher's output; feat its block
outputs (through 1x1 adapters); lift and place are this method.
Held fixed: the preset's teacher, steps, batch, lr, seeds. Reported: FID, precision, recall,
parameters and MACs of each student.
Cost: `cpu` preset (teacher unet-m), 18 variants x 2 seeds as 2 cohort trials of 18 students,
about 2 hours on a 2-core laptop (estimated from measured step costs: the 50% students are 25x
the 90% ones); started once at load 5-11, it made 400 of its 4,000 steps in 22 minutes (~3.3 h
at that load, extrapolated) and was stopped at a checkpoint; not finished yet. `paper`,
36 GPU runs of 100k steps on the user's DDPM (the paper's table uses one seed).

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

"""Stability: many seeds of kd, lift and place, with FID along training.

Question (the paper's Figure 6): is PLACE not only better on average but more stable across
seeds than plain KD? Each run evaluates FID four times during training and once at the end; the analysis reports
mean, std, a bootstrap 95% interval, the number of diverged runs and a Mann-Whitney test of
place against kd.
Held fixed: the preset's teacher and pruned student (`cpu`: 50%, `paper`: 90%), steps, batch,
lr. Varied: seeds 0..N-1.
Cost: `cpu` preset, 3 methods x 5 seeds with 5 evaluations each, about 45 minutes (estimated) on a 2-core
laptop; `paper`, 15 GPU runs of 100k steps.

    python studies/stability.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.study import Study, study_main

STUDY = Study(
    name="stability",
    description=__doc__,
    variants={"kd": {"objective.name": "kd"}, "lift": {"objective.name": "lift"},
              "place": {"objective.name": "place", "objective.group_size": 16}},
    evals=4,
    seeds=5,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

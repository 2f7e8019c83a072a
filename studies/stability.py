"""Stability: many seeds of kd, lift and place, with FID along training.

Question (the paper's Figure 6): is PLACE not only better on average but more stable across
seeds than plain KD? Each run evaluates FID four times during training and once at the end; the analysis reports
mean, std, a bootstrap 95% interval, the number of diverged runs and a Mann-Whitney test of
place against kd.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters),
steps, batch, lr. Varied: seeds 0..N-1.
Six seeds: on two cores five cohort trials take three rounds, as six do.
Cost: `cpu` preset, 3 methods x 6 seeds as 6 cohort trials with 5 evaluations each, COST_CPU;
`paper`, 6 cohort trials of 100k steps (README, GPU-hours).
Result at `cpu`: RESULT_CPU

    python studies/stability.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.study import Study, study_main

STUDY = Study(
    name="stability",
    description=__doc__,
    variants={"kd": {"objective.name": "kd"}, "lift": {"objective.name": "lift"},
              "place": {"objective.name": "place", "objective.group_size": 16}},
    evals=4,
    seeds=6,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

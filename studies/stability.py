"""Stability: many seeds of kd, lift and place, with FID along training.

Question (the paper's Figure 6): is PLACE not only better on average but more stable across
seeds than plain KD? Each run evaluates FID four times during training and once at the end; the analysis reports
mean, std, a bootstrap 95% interval, the number of diverged runs and a Mann-Whitney test of
place against kd.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters),
steps, batch, lr. Varied: seeds 0..N-1.
Six seeds: on two cores five cohort trials take three rounds, as six do.
Cost: `cpu` preset, 3 methods x 6 seeds as 6 cohort trials with 5 evaluations each: about
55 minutes on a quiet 2-core laptop (estimated: three rounds of ~18 min), over the 45 aimed
for; not yet measured whole (a first run was stopped after 2 of 6 trials, 33 min under the
load of the test suite); `paper`, 6 cohort trials of 100k steps (README, GPU-hours).
Result at `cpu` (partial, seeds 0 and 1; FID at steps 400 / 800 / 1,200 / 1,600 / 2,000):
kd 208 / 122 / 49 / 19.5 / 11.0 and 254 / 117 / 42 / 20.3 / 12.4; lift 313 / 115 / 93 / 62 /
54.7 and 258 / 129 / 84 / 63 / 50.6; place 225 / 106 / 60 / 29 / 15.6 and 262 / 135 / 76 /
47 / 32.7. Final FIDs equal ablate_k's for the same seeds (evaluating along the way changes
nothing).

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

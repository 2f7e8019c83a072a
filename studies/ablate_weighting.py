"""Ablation of LIFT/PLACE's weighting of the fine term, and of the coarse term's form.

Question: does the adaptive weight w = 1 - min(1, |beta0| + |beta1 - 1|) matter, or would any
schedule (constant, linear, cosine, step over the first half of training) do? And does the
coarse term's form (l1, l2, or "moments", which with w = 1 is exactly KD) matter?
Held fixed: PLACE with K = 16, the preset's teacher and 90%-pruned student (`cpu`: unet-m,
10,801 parameters), steps, seeds.
Cost: `cpu` preset, 9 variants x 2 seeds as 2 cohort trials, about 40 minutes on a 2-core laptop
(estimated from the default study's measured step cost, not run at this preset yet); `paper`,
18 GPU runs of 100k steps.

    python studies/ablate_weighting.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.study import Study, study_main

PLACE = {"objective.name": "place", "objective.group_size": 16}
STUDY = Study(
    name="ablate_weighting",
    description=__doc__,
    variants={
        "kd": {"objective.name": "kd"},
        "adaptive": PLACE,
        "constant w=1": {**PLACE, "objective.weighting": "constant", "objective.w0": 1.0},
        "linear": {**PLACE, "objective.weighting": "linear"},
        "cosine": {**PLACE, "objective.weighting": "cosine"},
        "step": {**PLACE, "objective.weighting": "step"},
        "learnable": {**PLACE, "objective.weighting": "learnable", "objective.w0": 0.5},
        "coarse l2": {**PLACE, "objective.coarse": "l2"},
        "coarse moments": {**PLACE, "objective.coarse": "moments"},
    },
    seeds=2,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

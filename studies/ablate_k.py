"""Ablation of PLACE's group size K against kd, on the paper's tiny students.

Question: does cutting each channel into groups of elements ranked by error (PLACE) beat one
line per channel (LIFT), and does either beat plain KD, for a student of ~1% of its teacher?
LIFT is one group per channel (K = 256 at 16x16); the paper's K = 16; K = 4 is the finest.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters =
0.97% of the teacher), steps, batch, lr, seeds 0..N-1 (the variants of a seed train as one
cohort trial on one teacher forward per step).
Cost: `cpu` preset, 4 variants x 4 seeds as 4 cohort trials, COST_CPU; `paper` preset, 4
cohort trials of 100k steps of the user's DDPM and four 90% students each (README, GPU-hours).
Result at `cpu`: RESULT_CPU

    python studies/ablate_k.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--storage DIR] [--cohort auto|off]
                               [--address auto] [--resume] [--verbose] [--set key=value ...]
"""

from liftplace.study import Study, study_main

STUDY = Study(
    name="ablate_k",
    description=__doc__,
    variants={
        "kd": {"objective.name": "kd"},
        "lift": {"objective.name": "lift"},
        **{f"place K={k}": {"objective.name": "place", "objective.group_size": k} for k in (16, 4)},
    },
    seeds=4,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

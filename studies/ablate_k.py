"""Ablation of PLACE's group size K, from LIFT (one group per channel) to groups of 4, against kd.

Question: does cutting each channel into groups of elements ranked by error (PLACE) beat one
line per channel (LIFT), and at which group size? The paper's K = 16 is a group size of 16.
Held fixed: the preset's teacher and pruned student (`cpu`: 50%, `paper`: 90%), steps, batch,
lr, seeds 0..N-1;
num_groups variants give the same cut by group count (at 16x16, G = 8 is K = 32).
Cost: `cpu` preset, 6 variants x 2 seeds as 2 cohort trials (one per seed), measured 25 min
on a 2-core laptop including the report (1,401 s of trials); `paper` preset, 2 cohort trials of
100k steps of the user's DDPM and six 90% students each, about 16 A10G GPU-hours (README).

    python studies/ablate_k.py [--preset smoke|cpu|paper] [--seeds N] [--storage DIR] [--cohort auto|off]
                               [--address auto] [--resume] [--set key=value ...]
"""

from liftplace.study import Study, study_main

STUDY = Study(
    name="ablate_k",
    description=__doc__,
    variants={
        "kd": {"objective.name": "kd"},
        "lift": {"objective.name": "lift"},
        **{f"place K={k}": {"objective.name": "place", "objective.group_size": k} for k in (64, 16, 4)},
        "place G=8": {"objective.name": "place", "objective.num_groups": 8},
    },
    seeds=2,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

"""Teacher scale: does plain KD get worse as the teacher grows, while PLACE does not?

Question (the paper's Figure 1): distilling into one tiny student, conventional KD degrades as
the teacher gets larger; PLACE is meant to hold up. The student is the preset's pruned version
(90%: ~1% of each teacher) of each teacher, so students grow with their teachers: the table
reports both sizes. Every student keeps at least 3 channels per GroupNorm group
(student.min_group_channels=3): pruned 90% with the default (1), the students of unet-xs and
unet-s are left with one channel per group and did not learn; unet-m's student is the same
either way (it keeps 3 per group), so its runs match the default study's.
Held fixed: objective options, steps, batch, lr, seeds. Varied: the shipped teachers unet-xs,
unet-s, unet-m, unet-l (0.28M to 2.5M parameters) x {kd, place K=16}.
Cost: `cpu` preset, 8 variants x 2 seeds as 8 cohort trials (one per teacher and seed), about
55 minutes on a 2-core laptop quiet (estimated from measured step costs); one run at load 5-6
had finished 4 of the 8 trials after an hour (unet-l's trials are the longest; README table
for the results so far); at `paper`,
pass your own teachers with --set (one run per teacher directory).

    python studies/teacher_scale.py [--preset smoke|cpu] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.study import Study, study_main

METHODS = {"kd": {"objective.name": "kd"}, "place": {"objective.name": "place", "objective.group_size": 16}}
STUDENT = {"student.min_group_channels": 3}  # see the docstring
STUDY = Study(
    name="teacher_scale",
    description=__doc__,
    variants={f"{m} unet-{size}": {**opts, **STUDENT, "teacher.name": f"unet-{size}"}
              for size in ("xs", "s", "m", "l") for m, opts in METHODS.items()},
    seeds=2,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

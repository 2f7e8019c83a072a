"""Teacher scale: does plain KD get worse as the teacher grows, while PLACE does not?

Question (the paper's Figure 1): distilling into one tiny student, conventional KD degrades as
the teacher gets larger; PLACE is meant to hold up. The student is the preset's pruned version
(90%: ~1% of each teacher) of each teacher, so students grow with their teachers: the table
reports both sizes. Every student keeps at least 3 channels per GroupNorm group
(student.min_group_channels=3): pruned 90% with the default (1), the students of unet-xs and
unet-s are left with one channel per group and did not learn; unet-m's student is the same
either way (it keeps 3 per group), so its runs match the default study's.
Held fixed: objective options, steps, batch, lr, seeds. Varied: the shipped teachers unet-xs,
unet-s, unet-m, unet-l (0.28M to 2.5M parameters) x {task, kd, place K=16}; task (each teacher's
pruned student trained on the data alone, w/o KD) is there for the report's premise gate, which
compares it with the kd of the same teacher.
Cost: `cpu` preset, 12 variants x 2 seeds as 8 cohort trials (one per teacher and seed). The task
variants were added after the measurement that follows, made with 8 variants (kd and place): measured
in three pieces, not one uninterrupted run (the first was stopped at a session's end, the second
by a `ray stop` of another job), at load 5-20: 1 h 26 min + 22.5 min + 8 min of trials, each
resume repeating the steps since its trial's last checkpoint, then the report; about 55 minutes
quiet (estimated from measured step costs). unet-l's trials are the longest (42-45 min each at
load 5-6). Result (final FID, 2 seeds, kd / place K=16; the teachers' own: 11.2, 3.9, 3.0, 1.5):
unet-xs 1,633 / 1,633 (its 2,713-parameter student does not learn), unet-s 579 / 463 (neither
near converged), unet-m 11.7 / 24.1, unet-l 13.0 / 56.9. KD does not get worse from unet-m to
unet-l (11.0-12.4 and 12.5-13.5); PLACE does (15.6-32.7 and 35.9-77.9): the opposite of the
paper's Figure 1 here, with too few seeds for a test; at `paper`,
pass your own teachers with --set (one run per teacher directory).

    python studies/teacher_scale.py [--preset smoke|cpu] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.cli import study_main
from liftplace.study import Study

METHODS = {"task": {"objective.name": "task"}, "kd": {"objective.name": "kd"},
           "place": {"objective.name": "place", "objective.group_size": 16}}
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

"""Stability: many seeds of task, kd, lift and place, with FID along training.

Question (the paper's Figure 6): is PLACE not only better on average but more stable across
seeds than plain KD? Each run evaluates FID four times during training and once at the end; the analysis reports
mean, std, a bootstrap 95% interval, the number of diverged runs and a Mann-Whitney test of
place against kd.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters),
steps, batch, lr. Varied: seeds 0..N-1. task (the student trained on the data alone, w/o KD) is
there for the report's premise gate, which compares it with kd.
Six seeds: on two cores five cohort trials take three rounds, as six do.
Cost: `cpu` preset, 4 methods x 6 seeds as 6 cohort trials with 5 evaluations each. The task
variant was added after the measurement that follows, made with 3 methods: measured
1 h 52 min 47 s on this 2-core machine under heavy load (load average 5-10: a test suite and
other benchmarks ran beside it at a higher priority; its trials took 22-48 min each), so over
the 45 minutes aimed for; quiet, three rounds of ~18 min make ~55 min, still over: five or six
seeds on two cores are three rounds of two-at-a-time trials, and each trial is ~1,000 s of one
core (2,000 steps of 0.44 s plus 15 FID evaluations of ~13 s). Four seeds would fit in two
rounds (~37 min). `paper`: 6 cohort trials of 100k steps (docs/performance.md, "GPU-hours").
Result at `cpu` (6 seeds; mean FID at steps 400 / 800 / 1,200 / 1,600 / 2,000):
kd 223 / 116 / 47 / 19.6 / 12.0; lift 299 / 144 / 102 / 74 / 62.3; place K=16 260 / 166 / 93 /
57.5 / 35.7. Final FID: kd 12.00 +- 0.60 (95% bootstrap CI 11.6-12.4), place 35.7 +- 21.7
(21.0-52.6), lift 62.3 +- 32.3 (46.3-89.4); both differ from kd (Mann-Whitney p 0.002; Welch,
Holm-adjusted: place p 0.044, +23.7 FID, CI +0.9..+46.5). KD is better here and far more
stable across seeds (place's finals range 13.8-72.5, kd's 11.0-12.8). Seeds 0-3 equal
ablate_k's for the same seeds (evaluating along the way changes nothing).

    python studies/stability.py [--preset smoke|cpu|cpu-50|paper] [--seeds N] [--cohort auto|off] [--set key=value ...]
"""

from liftplace.cli import study_main
from liftplace.study import Study

STUDY = Study(
    name="stability",
    description=__doc__,
    variants={"task": {"objective.name": "task"}, "kd": {"objective.name": "kd"}, "lift": {"objective.name": "lift"},
              "place": {"objective.name": "place", "objective.group_size": 16}},
    evals=4,
    seeds=6,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

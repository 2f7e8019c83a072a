"""Hyperparameter search for PLACE: learning rate and the method's options, by Optuna with ASHA.

Question: how much of PLACE's result depends on its knobs, and what is a good setting for a
new teacher? Optuna (Ray Tune's OptunaSearch) samples the learning rate, group size, weighting
and coarse form; ASHA stops trials whose FID lags at an intermediate evaluation.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters),
steps, batch, seed 0.
Cost: `cpu` preset, 12 sampled trials (ASHA stopped three early, at 666 or 1,332 of 2,000
steps; searches never run as cohorts), about 40 minutes on a 2-core laptop quiet (estimated
from the default study's measured step cost); measured in two pieces at load 5-20 (a test suite
and other studies beside it): 1 h 32 min of trials, then, resumed, 41 min 39 s of trials and a
14-minute report (55 min 37 s).
Result (seed 0, one run per setting): the learning rate decides most of it. Best FID 8.03
(coarse l2, K=16, cosine w, lr 2.8e-3), then 12.3 (the same at lr 8.0e-4), 13.1 (l1, K=16,
constant, lr 1.4e-3), 15.6 (l2, K=4, adaptive, lr 2.5e-3), 23.9; every trial at lr 4.1e-4 or
lower ended at FID 51-1,070. kd is not in this search and its learning rate was not tuned (the default
study's kd, lr 1e-3, is at 11.8 over 4 seeds), so this does not show that place beats kd.
`paper`: up to 12 GPU runs of 100k steps.

    python studies/tune_hparams.py [--preset smoke|cpu|cpu-50|paper] [--storage DIR] [--set key=value ...]
"""

from ray import tune

from liftplace.cli import study_main
from liftplace.study import Study

STUDY = Study(
    name="tune_hparams",
    description=__doc__,
    variants={"place": {"objective.name": "place"}},
    evals=2,
    space={
        "train.lr": tune.loguniform(1e-4, 3e-3),
        "objective.group_size": tune.choice([4, 16, 64]),
        "objective.weighting": tune.choice(["adaptive", "constant", "cosine"]),
        "objective.coarse": tune.choice(["l1", "l2"]),
    },
    num_samples=12,
    seeds=1,
)

if __name__ == "__main__":
    study_main(STUDY)  # ends with analysis/make_all.py: the figures and REPORT.md

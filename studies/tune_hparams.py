"""Hyperparameter search for PLACE: learning rate and the method's options, by Optuna with ASHA.

Question: how much of PLACE's result depends on its knobs, and what is a good setting for a
new teacher? Optuna (Ray Tune's OptunaSearch) samples the learning rate, group size, weighting
and coarse form; ASHA stops trials whose FID lags at an intermediate evaluation.
Held fixed: the preset's teacher and 90%-pruned student (`cpu`: unet-m, 10,801 parameters),
steps, batch, seed 0.
Cost: `cpu` preset, 12 sampled trials (ASHA stops some at a third of the steps; searches never
run as cohorts), about 40 minutes on a 2-core laptop quiet (estimated from the default study's
measured step cost); started once at load 5-20 (a test suite beside it), it had finished 5 of
12 trials after 1 h 20 min (~25 min per full trial at that load); a sixth then reached FID 12.3, the
best so far (coarse l2, K=16, cosine w, lr 8.0e-4; kd's is 11.7 in the default study); not
finished yet. `paper`: up to 12 GPU runs of 100k steps.

    python studies/tune_hparams.py [--preset smoke|cpu|cpu-50|paper] [--storage DIR] [--set key=value ...]
"""

from ray import tune

from liftplace.study import Study, study_main

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

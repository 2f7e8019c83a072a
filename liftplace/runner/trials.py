"""A study's Tune trials: the trainables (direct or through Ray Train), the search, and the trials' names.

``tune_direct`` trains a trial's run or cohort in the trial's own process; ``tune_train``
drives a Ray Train run from it (``runner.train``). ``_trainable`` picks one with its resources;
``_search_tuner`` builds a search's Tuner (Optuna that sees the evaluations only, ASHA);
``_trial_name`` and ``_trial_dirname`` name a trial <variant>-seed<k>. Tune pickles these by
reference into a study's folder (``runner.study`` restores folders written under their old
module, ``liftplace.sweep``).
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext

from ray.tune.search.optuna import OptunaSearch

from liftplace import results
from liftplace.config import RunConfig, from_dict
from liftplace.runner.train import _quiet, make_trainer, run_payload
from liftplace.study import Study


def _trial_payload(params: dict) -> tuple[RunConfig, dict, dict]:
    """(the trial's first config, for its scaling; what it trains; columns every row gets)."""
    run = params["run"]
    if "members" in run:
        return from_dict(run["members"][0]["config"], check_paths=False), {"members": run["members"]}, {}
    chosen = params.get("search", {})  # a search trial: Optuna's choices on top of the base config
    config = from_dict(run["config"], chosen, check_paths=False)
    variant = run["variant"] + "".join(f" {k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f" {k.split('.')[-1]}={v}"
                                       for k, v in sorted(chosen.items()))
    return config, {"config": config.to_dict()}, {"variant": variant}


def tune_direct(params: dict) -> None:
    """A Tune trial that trains its run or cohort in-process (one worker)."""
    import ray.tune
    import torch

    config, payload, extra = _trial_payload(params)
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    _quiet_ray_logs(params)

    def send(metrics, checkpoint_dir):
        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
        run_payload(payload, {**extra, "runner": "direct"}, send, directory, curves=_trial_curves(params),
                    log=print if params["run"].get("verbose", True) else _quiet)


def _quiet_ray_logs(params: dict) -> None:
    """In a trial of a study without --verbose: Ray's INFO line for every checkpoint saved
    ("Checkpoint successfully created at ...") stays in the worker's log file. In every trial:
    when a stopped study's trial is ended by Ray (SIGTERM), Ray's handler raises SystemExit,
    and if that lands in a weakref callback Python prints "Exception ignored in ..." with a
    traceback, which reached the driver's console: that one case is not printed."""
    if not params["run"].get("verbose", True):
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if sys.unraisablehook is not _unraisable:  # once per process: Tune reuses a trial's actor
        _unraisable.previous = sys.unraisablehook
        sys.unraisablehook = _unraisable


def _unraisable(unraisable) -> None:
    if not isinstance(unraisable.exc_value, SystemExit):
        _unraisable.previous(unraisable)


def _trial_curves(params: dict) -> dict | None:
    """Where a trial writes its event files (None: the study writes none), and the name of a
    single run's folder there: the trial's name, <variant>-seed<k>."""
    import ray.tune

    root = params["run"].get("curves")
    return {"root": root, "name": ray.tune.get_context().get_trial_name()} if root else None


def tune_train(params: dict) -> None:
    """A Tune trial that drives a Ray Train run and forwards its rows to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config, payload, extra = _trial_payload(params)
    _quiet_ray_logs(params)
    trial_id = ray.tune.get_context().get_trial_id()
    # Named after the trial: a restarted trial re-opens the same Train run and resumes it.
    trainer = make_trainer(config, storage=params["run"]["train_storage"], name=f"train-{trial_id}",
                           callbacks=[TuneReportCallback()], max_failures=params["run"]["worker_failures"],
                           extra=extra, payload=payload, curves=_trial_curves(params),
                           verbose=params["run"].get("verbose", True), ray_logs=params["run"].get("verbose", True))
    result = trainer.fit()
    if result.error:
        raise result.error


def _trainable(runner: str, config: RunConfig):
    from ray import tune

    if runner == "direct":
        sc = config.scaling
        return tune.with_resources(tune_direct, {"cpu": sc.cpus_per_worker, "gpu": sc.gpus_per_worker if sc.use_gpu else 0})
    # The driver itself needs no CPU: its workers hold the run's resources. (A zero request is
    # refused by Ray, hence the token memory.)
    return tune.with_resources(tune_train, {"cpu": 0, "memory": 64 * 2**20})


class EvalOnlyOptuna(OptunaSearch):
    """Optuna sees the rows that carry the metric (the evaluations), not the rows between."""

    def on_trial_result(self, trial_id, result):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def _search_tuner(study: Study, trials: list[dict], base: RunConfig, trainable, storage, max_concurrent, max_failures,
                  callbacks, verbose: int, sync=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if len(trials) != 1:
        raise ValueError(f"a search has one base variant and one seed, got {len(trials)} trials")
    evals = max(1, base.train.steps // base.train.eval_every) if base.train.eval_every else 1
    return tune.Tuner(
        trainable,
        param_space={"run": trials[0], "search": study.space},
        tune_config=tune.TuneConfig(
            metric=study.metric, mode=study.mode, num_samples=study.num_samples, max_concurrent_trials=max_concurrent,
            search_alg=EvalOnlyOptuna(seed=0),
            scheduler=ASHAScheduler(time_attr="step", max_t=base.train.steps,
                                    grace_period=base.train.eval_every or base.train.steps,
                                    reduction_factor=2 if evals > 1 else 4),
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name),
        run_config=tune.RunConfig(name=study.name, storage_path=str(storage), verbose=verbose, callbacks=callbacks,
                                  sync_config=sync,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


def _trial_name(trial) -> str:
    """What Ray's console and dashboard call a trial: <variant>-seed<k>; a cohort is named after
    its first variant and how many more it trains (kd+5-seed0)."""
    run = trial.config["run"]
    variants = [variant for variant, _ in results.trial_members(run)]
    name = f"{variants[0]}+{len(variants) - 1}" if "members" in run else variants[0]
    # Sampled trials of a search share variant and seed: their id tells them apart.
    return results.run_label(name, run["seed"]) + (f"-{trial.trial_id}" if "search" in trial.config else "")


def _trial_dirname(trial) -> str:
    name = _trial_name(trial)
    return (name if trial.trial_id in name else f"{name}-{trial.trial_id}")[:120]

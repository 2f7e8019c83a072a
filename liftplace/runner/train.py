"""A run or a cohort in Ray Train workers: the TorchTrainer, its worker loop, and how a failure is said.

``run_payload`` trains what a trial holds (``distill.run`` or ``distill.run_cohort``) and
sends each row to Ray; ``train_loop`` is the worker loop of the ``TorchTrainer`` that
``make_trainer`` builds (``liftplace distill``, and a study's ``train`` runner); ``failure_cause``
says in one line what failed inside Ray (``RunFailed``).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

from liftplace import distill, results
from liftplace.config import RunConfig, from_dict
from liftplace.results import RunFolder


def run_payload(payload: dict, extra: dict, send, checkpoint, *, curves: dict | None = None, log=print) -> None:
    """Train what a trial holds -- one run ({"config"}) or a cohort ({"members"}) -- sending
    each report to Ray as send(metrics, checkpoint_dir). A cohort's report is one Ray row
    {"step", "members": {variant: row}}: every student's row of the schema, with its variant.
    With ``curves`` ({"root", "name"}), rank 0 also writes every row to TensorBoard event files
    (results.Curves): a cohort member under <variant>-seed<k>, a single run under ``name``."""
    writer = results.Curves(curves["root"]) if curves and distill.rank_and_world()[0] == 0 else None
    try:
        if "members" in payload:
            members = {m["variant"]: from_dict(m["config"], check_paths=False) for m in payload["members"]}
            seed = next(iter(members.values())).train.seed

            def report(rows, checkpoint_dir):
                step = next(iter(rows.values()))["step"]
                if writer:
                    for variant, row in rows.items():
                        writer.add(results.run_label(variant, seed), row)
                send({"step": step, "members": {v: {**row, **extra, "variant": v} for v, row in rows.items()}},
                     checkpoint_dir)

            distill.run_cohort(members, report, checkpoint=checkpoint, log=log)
        else:
            config = from_dict(payload["config"], check_paths=False)

            def report(row, checkpoint_dir):
                if writer:
                    writer.add(curves["name"], row)
                send(_tune_row({**row, **extra}), checkpoint_dir)

            distill.run(config, report, checkpoint=checkpoint, log=log)
    finally:
        if writer:
            writer.close()


def _tune_row(row: dict) -> dict:
    """Evaluation metrics are left out of rows that have none, so that a scheduler that
    compares FID (ASHA) acts at evaluations only; analysis reads the missing value as NaN."""
    return {k: v for k, v in row.items() if not (k in results.EVAL_COLUMNS and isinstance(v, float) and math.isnan(v))}


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker loop: the trial's run or cohort in every worker, resuming from
    Train's checkpoint."""
    import ray.train

    from ray.train.v2._internal.execution import context

    if not loop_config.get("ray_logs"):
        # Ray Train logs every report at INFO, a screenful per row (from a logger named after
        # its source file, outside "ray.train"), and an error's traceback in every worker: the
        # progress lines suffice, and the driver says a failure in one line (the traceback goes
        # to the run's error.txt, or the trial's).
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)

    def send(metrics, checkpoint_dir):
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("start_from"):  # see run_single: Ray's record was cut short
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["start_from"])
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
        run_payload(loop_config["payload"], {"runner": "train", **loop_config.get("extra", {})}, send, directory,
                    curves=loop_config.get("curves"), log=print if loop_config.get("verbose", True) else _quiet)


def _quiet(line: str) -> None:
    """A study's trials keep their per-step progress lines off the console (--verbose shows them)."""


def _row_log_callback(folder: RunFolder):
    import ray.train

    class RowLog(ray.train.UserCallback):
        """In the Train controller: write rank 0's row of every report to the run folder's
        metrics.jsonl (Ray keeps only the rows that came with a checkpoint), after the
        checkpoint it came with, which Ray has stored by now, into its checkpoints/."""

        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            row["checkpoint_path"] = checkpoint.path if checkpoint else None
            folder.append(row, checkpoint.path if checkpoint else None)

    return RowLog()


def _trainer_class():
    """TorchTrainer without the Ctrl-C handler Ray Train installs when fit() runs in the main
    thread (it aborts the run and exits with status 0, saying nothing): `liftplace distill`
    handles Ctrl-C and SIGTERM itself (see _fit_interruptibly)."""
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_register_sigint_handler"):
        raise RuntimeError("this Ray Train has no TorchTrainer._register_sigint_handler (Ray 2.60 has it); "
                           "liftplace's Ctrl-C handling needs updating for it")

    class Trainer(TorchTrainer):
        controller = None

        def _register_sigint_handler(self, controller):
            self.controller = controller  # kept, so that an interrupted fit can abort the run

    return Trainer


def make_trainer(config: RunConfig, *, storage: str, name: str, callbacks=(), max_failures: int = 0, extra=None,
                 payload: dict | None = None, curves: dict | None = None, verbose: bool = True,
                 ray_logs: bool = False, start_from: str | None = None):
    """A TorchTrainer for config's scaling that trains payload (default: config's one run);
    curves: where rank 0 writes TensorBoard event files (run_payload); verbose: progress lines;
    ray_logs: Ray Train's own INFO and WARNING lines on the console (every report, resource
    requests, and under a loaded CPU a "safe to ignore" warning with a traceback); without,
    only its errors (its log files keep everything); start_from: a checkpoint folder to begin
    from when Ray Train holds none of its own."""
    import ray.train

    sc = config.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return _trainer_class()(
        train_loop,
        train_loop_config={"payload": payload or {"config": config.to_dict()}, "extra": extra or {}, "curves": curves,
                           "verbose": verbose, "ray_logs": ray_logs, "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       logging_config=ray.train.LoggingConfig(log_level="INFO" if ray_logs else "ERROR")),
    )


class RunFailed(Exception):
    """A run or study that failed inside a worker, said in one line (cause, step, log file)."""


def failure_cause(error: BaseException) -> str:
    """One line for what failed inside Ray: the original exception of the first failed worker
    (Ray wraps it, with its traceback, in its own errors), as "Type: first line"."""
    failures = getattr(error, "worker_failures", None)
    exc = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    exc = getattr(exc, "cause", None) or exc  # ray.exceptions.RayTaskError keeps the original here
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__

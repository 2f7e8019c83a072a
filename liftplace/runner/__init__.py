"""The one place that imports Ray: starting Ray, Train workers, Tune trials, the console, the run folders a study writes.

Two ways to run one distillation (``distill.run``) inside Ray:

- ``train``: a Ray Train ``TorchTrainer`` (Train V2): one or many workers, CPU or GPU,
  DistributedDataParallel, worker restarts from the last checkpoint. Inside a Tune study the
  trial is a small driver function that builds the trainer and forwards rank 0's reports to
  Tune (``TuneReportCallback``) -- the pattern Ray 2.60 documents (``Tuner(trainer)`` is gone).
- ``direct``: the Tune trial calls ``distill.run`` itself. Launching a TorchTrainer costs
  ~20 s per trial on a 2-core machine; a direct trial costs ~1 s. ``auto`` picks direct for
  single-worker trials and train otherwise. Every row records which was used (``runner``).

A study (``liftplace.study``: variants x seeds, expanded and validated before Ray starts) runs
as one Tune grid under ``<storage>/<study>``. One module per job:

- ``cluster``: joining or starting Ray, what the cluster can give, every worker's log setup;
- ``train``: a run or cohort in Ray Train workers (the trainer, the worker loop, failures);
- ``single``: ``liftplace distill``, one run on Ray Train into its folder;
- ``trials``: the Tune trainables, the search (Optuna, ASHA) and the trials' names;
- ``study``: a study's driver (its parts, its lock, --seeds auto, Ctrl-C and SIGTERM);
- ``console``: what a study prints while it runs, and its heartbeat;
- ``runs``: the driver's writer of a study's run folders (runs/<run>/).

The checks before Ray starts are ``liftplace.preflight``'s (Ray-free). This package's
``__init__`` imports nothing: every Ray worker process imports ``cluster`` (its setup hook).
"""

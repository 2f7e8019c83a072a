"""A study's driver on Ray Tune: its parts, one driver per folder, --seeds auto, and Ctrl-C or SIGTERM in one line.

``run_study`` checks a planned study (``liftplace.study.plan``; ``liftplace.preflight``)
before Ray starts, claims its folder, and runs (or resumes) each part as its own Tune
experiment (``_run_part``: the first seeds, then each addition); ``--seeds auto`` looks at the
verdicts after each round (``_look``). A failure is ``runner.train.RunFailed``, a stop
``StudyInterrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

from liftplace import distill, files, results, storage
from liftplace.config import RunConfig, from_dict, set_value, validate
from liftplace.preflight import check_inputs, check_memory, check_resources
from liftplace.runner.cluster import (RAY_SESSION, _Swallow, capacity_now, check_reachable, cluster_capacity,
                                      ensure_ray, node_memory)
from liftplace.runner.console import _TRIAL_FAILED, Heartbeat, StudyConsole, _duration
from liftplace.runner.runs import RunFolders
from liftplace.runner.train import RunFailed, failure_cause, train_loop
from liftplace.runner.trials import (EvalOnlyOptuna, _search_tuner, _trainable, _trial_dirname, _trial_name, tune_direct,
                                     tune_train)
from liftplace.study import Study, Trial, plan
from liftplace.trackers import make_tracker, send_runs

# Ray Tune pickles, by reference, what a study's Tuner holds into the study's folder: the
# trials' name and folder creators and the callbacks (tuner.pkl, experiment_state-*.json), a
# search's algorithm (its searcher state); the trainables are named there. Folders written
# before liftplace.sweep was split into this package name them liftplace.sweep.<name>, a module
# that no longer exists: such a folder still resumes, through a stand-in module registered only
# while Tune restores it.
SWEEP_NAMES = {f.__name__: f for f in (tune_direct, tune_train, EvalOnlyOptuna, _trial_name, _trial_dirname,
                                         StudyConsole, Heartbeat, train_loop)}


@contextmanager
def _sweep_stand_in():
    """Within: the module ``liftplace.sweep`` is a stand-in holding the names of
    ``SWEEP_NAMES``, for Tune to unpickle an old study folder's state."""
    if "liftplace.sweep" in sys.modules:  # nested: the outer one removes it
        yield sys.modules["liftplace.sweep"]
        return
    stand_in = types.ModuleType("liftplace.sweep", "A stand-in, while an old study folder is restored.")
    stand_in.__dict__.update(SWEEP_NAMES)
    sys.modules["liftplace.sweep"] = stand_in
    try:
        yield stand_in
    finally:
        sys.modules.pop("liftplace.sweep", None)


STATE_SYNC_S = 30  # a study on a store: how often Tune puts its experiment state there


def _check_space(study: Study, base: dict) -> None:
    """Refuse a search dimension whose values a run cannot use, before Ray starts."""
    from ray.tune.search.sample import Categorical

    for key, domain in study.space.items():
        values = domain.categories if isinstance(domain, Categorical) else [domain.lower, domain.upper]
        for value in values:
            config = from_dict(base, check_paths=False)
            set_value(config, key, value)
            validate(config, check_paths=False)


def _trials_by_cpus(config: RunConfig, cpus: float) -> int:
    """Trials at once that ``cpus`` CPUs hold: 2 CPUs / 0.6 per trial: 3 at a time."""
    return max(1, int(cpus / (config.scaling.num_workers * config.scaling.cpus_per_worker) + 1e-6))


def run_study(study: Study, *, preset: str = "cpu", overrides=(), seeds: int | None = None,
              storage: str | Path = "results", address: str | None = None, resume: bool = False,
              runner: str = "auto", max_concurrent: int | None = None, max_failures: int = 1,
              cohort: str = "auto", verbose: bool = False, add_seeds: int = 0,
              sequential: dict | None = None, margin: float | None = None, tracker: str | None = None,
              tracker_uri: str | None = None, log=print) -> Path:
    """Run (or resume) a study; returns its experiment folder ``<storage>/<study name>``.

    ``add_seeds``: grow a study that exists (finished or interrupted) by this many seeds, as
    new trials in a part of their own (``<folder>/seeds-<first>-<last>``, its own Tune
    experiment), leaving every file of the earlier parts as it is; study.json records the
    addition. ``sequential`` ({"max_seeds", "round", "margin", "alpha"}: ``--seeds auto``):
    after the study's seeds, look at every comparison with kd and add rounds of seeds until
    each is decided or max_seeds is reached (``liftplace.verdicts``: alpha spent look by look).
    A resume (or an addition) first finishes every unfinished part. ``margin``: the verdicts'
    equivalence margin (a fraction of kd's mean final FID), recorded in study.json.
    ``tracker``/``tracker_uri``: also log every run to an experiment tracker (``liftplace.trackers``).
    """
    from ray import tune

    if add_seeds < 0:
        raise ValueError(f"--add-seeds must be >= 1, got {add_seeds}")
    if (add_seeds or sequential) and study.space:
        raise ValueError("a search samples its trials: --add-seeds and --seeds auto are for grid studies")
    p = plan(study, preset=preset, overrides=overrides, seeds=seeds, storage=storage, runner=runner, cohort=cohort)
    trials, configs, chosen, folder, store = p.trials, p.configs, p.runner, p.folder, p.store
    store.check()  # a store: its bucket there and readable with the credentials at hand, before any other check
    if margin is not None and not 0 < margin < 10:
        raise ValueError(f"--margin must be a fraction of kd's mean FID in (0, 10), e.g. 0.2, got {margin}")
    if sequential:
        from liftplace.verdicts import ALPHA, MARGIN

        sequential = {"margin": margin if margin is not None else MARGIN, "alpha": ALPHA, **sequential}
        _check_sequential(sequential, p.info["seeds"])
    if add_seeds and not ((folder / results.STUDY_FILE).is_file() if store.local else store.exists(results.STUDY_FILE)):
        raise FileNotFoundError(f"--add-seeds: no study to grow at {store.shown}; run it first")
    if study.space:
        _check_space(study, trials[0].runs[0][1].to_dict())
    distill._pause_point("study checks")
    check_inputs(configs, log=log)
    check_resources(configs, capacity_now(), address)
    # As many trials at once as this machine's CPUs allow (the default below), within the memory.
    members = max((len(t.runs) for t in trials), default=1)
    memory_fits = check_memory(configs, address, node_memory=node_memory(), members=members, log=log,
                               wanted=min(len(trials), _trials_by_cpus(configs[0], os.cpu_count() or 1)),
                               max_concurrent=None if max_concurrent is None else min(max_concurrent, len(trials)))
    check_reachable(address or os.environ.get("RAY_ADDRESS"))  # before anything is written: a dead cluster is refused in seconds
    tracking = make_tracker(tracker, tracker_uri, study.name, folder)
    if tracking is not None and store.local and (folder / results.STUDY_FILE).is_file() \
            and results.read_study_info(folder).get("layout") != results.RUNS:
        raise ValueError(f"--tracker: {folder} was begun before studies kept run folders, which the tracker is "
                         "fed from; resume it without --tracker")
    with _claimed(store, folder, p.info, resume or bool(add_seeds)):
        action = "start" if not (resume or add_seeds) else "resume"
        if add_seeds:
            action += f", add {add_seeds} seed{'s' if add_seeds > 1 else ''}"
        if sequential:
            action += f", seeds auto up to {sequential['max_seeds']}"
            results.record(folder, "sequential", sequential)
        if margin is not None:
            results.record(folder, "margin", margin)
        results.record(folder, "history", {"action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "provenance": results.provenance()})
        distill._pause_point("study claimed")
        ray = ensure_ray(address, show_dashboard=False)
        check_resources(configs, capacity_now())
        check_memory(configs, address, node_memory=node_memory(), members=members,
                     log=log)  # a joined cluster's nodes, now known
        if max_concurrent is None:
            # GPU trials: an autoscaling cluster's ceiling (GPU workers start from zero); CPU
            # trials: the CPUs up now, so that queued CPU trials never make the autoscaler start
            # GPU machines for them.
            cpus = (min(cluster_capacity()["CPU"], 1024) if any(c.scaling.use_gpu for c in configs)
                    else ray.cluster_resources().get("CPU", 1))
            max_concurrent = _trials_by_cpus(configs[0], cpus)
            if memory_fits is not None and memory_fits < min(max_concurrent, len(trials)):
                log(f"memory: {memory_fits} trial{'s' if memory_fits > 1 else ''} at a time fit in memory "
                    f"({max_concurrent} would by CPUs)")
                max_concurrent = memory_fits
        if tracking is not None:  # what the study has already, finished runs too
            have = results.run_folders(folder)
            send_runs(have, tracking)
            log(f"tracker: {tracking.where()}" + (f"; sent the {len(have)} run folders the study had" if have else ""))
        part = dict(study=study, chosen=chosen, configs=configs, folder=folder, store=store, max_concurrent=max_concurrent,
                    max_failures=max_failures, verbose=verbose, log=log, tune=tune, tracker=tracking)
        start = time.time()
        finished = 0

        def grow(count: int) -> None:
            info = results.read_study_info(folder)
            have = results.study_seeds(info)
            new = list(range(max(have) + 1, max(have) + 1 + count))
            name = f"seeds-{new[0]}-{new[-1]}"
            results.record(folder, "additions", {"seeds": new, "folder": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            log(f"study {study.name}: adding seed{'s' if count > 1 else ''} {', '.join(map(str, new))} -> {folder / name}")

        def run_parts() -> None:
            nonlocal finished
            info = results.read_study_info(folder)
            parts = [(None, None)] + [(a["folder"], a["seeds"]) for a in info.get("additions", [])]
            for name, seed_list in parts:
                if name is None:
                    part_trials = trials
                else:
                    part_trials = plan(study, preset=preset, overrides=overrides, seeds=seeds, storage=storage,
                                       runner=runner, cohort=cohort, seed_list=seed_list).trials
                finished += _run_part(part_trials, name, **part)

        if add_seeds:
            run_parts()  # what an earlier driver left unfinished, first
            grow(add_seeds)
        run_parts()
        while sequential:
            info = results.read_study_info(folder)
            if not _look(folder, info, sequential, log):
                break
            grow(min(sequential["round"], sequential["max_seeds"] - len(results.study_seeds(info))))
            run_parts()
        log(f"study {study.name}: {finished} trials finished in {_duration(time.time() - start)}\nresults: "
            + (str(folder) if store.local else store.shown))
        return folder


@contextmanager
def _claimed(store, folder: Path, info: dict, resume: bool):
    """Within: this driver holds the study (``results.claim_study``; one driver per study).

    A local study: its folder's lock (``_driver_lock``); a refused study leaves its folder as
    it was, byte for byte. A study on a store: the lock of its local mirror (one driver per
    machine), the store's heartbeat (no other machine's driver at work on it), then the mirror
    made to hold what the store holds of the study, and kept open (``storage.Mirror``) while
    the driver runs: what it writes reaches the store."""
    if store.local:
        had_lock_file = (folder / "driver.lock").exists()
        lock = _driver_lock(folder) if (folder / results.STUDY_FILE).is_file() else None
        try:
            results.claim_study(folder, info, resume)
        except BaseException:
            if lock is not None:
                lock.release()
                if not had_lock_file:
                    (folder / "driver.lock").unlink(missing_ok=True)
            raise
        lock = lock or _driver_lock(folder)
        try:
            yield
        finally:
            lock.release()
        return
    if not store.exists(results.STUDY_FILE) and store.listing():
        raise FileExistsError(f"{store.shown} is not empty and holds no study: choose another --storage")
    folder.mkdir(parents=True, exist_ok=True)
    lock = _driver_lock(folder)
    try:
        _no_other_driver(store)
        mirror = storage.Mirror(store, folder)
        mirror.pull()
        with mirror:
            results.claim_study(folder, info, resume)
            mirror.flush()
            yield
    finally:
        lock.release()


def _no_other_driver(store) -> None:
    """Refuse a study on a store whose heartbeat says a driver elsewhere is at work on it."""
    try:
        beat = json.loads(store.read_bytes(results.DRIVER_FILE))
    except (OSError, ValueError):
        return
    if results.beat_state(beat) == "running":
        raise FileExistsError(f"{store.shown} is being run by another driver (pid {beat.get('pid')} on "
                              f"{beat.get('host')}, heartbeat {time.time() - beat.get('updated', 0):.0f} s ago): wait "
                              "for it to end, or stop it (Ctrl-C) and continue with --resume")


def _driver_lock(folder: Path):
    """One driver per study folder: an OS lock on ``<folder>/driver.lock``, held while the
    driver runs (the OS releases it when the process dies, so a killed driver's lock is taken
    over by the next). A second driver is refused in one line naming the first (from its
    heartbeat), before it writes anything: two drivers on one study once interleaved their
    trials' rows in result.json and lost the first's."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / "driver.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            beat = json.loads((folder / results.DRIVER_FILE).read_text())
            who = f"pid {beat.get('pid')} on {beat.get('host')}, heartbeat {time.time() - beat.get('updated', 0):.0f} s ago"
        except (OSError, ValueError):
            who = "its heartbeat unreadable"
        raise FileExistsError(f"{folder} is being run by another driver ({who}): wait for it to end, or stop it "
                              "(Ctrl-C) and continue with --resume") from None
    return lock


def _check_sequential(rule: dict, seeds: int) -> None:
    from liftplace.verdicts import MIN_SEEDS

    if rule["max_seeds"] < max(seeds, MIN_SEEDS):
        raise ValueError(f"--max-seeds {rule['max_seeds']}: must be at least the study's first seeds ({seeds}) "
                         f"and {MIN_SEEDS} (the fewest a verdict is drawn from)")
    if seeds < MIN_SEEDS:
        raise ValueError(f"--seeds auto starts from the study's {seeds} seeds; a verdict needs {MIN_SEEDS} a side")
    if rule["round"] < 1:
        raise ValueError(f"--round must be >= 1, got {rule['round']}")


def _look(folder: Path, info: dict, rule: dict, log) -> bool:
    """One look of a --seeds auto study at its finished runs: every comparison with kd at the
    alpha this look spends; recorded in study.json. True: grow another round."""
    import pandas as pd

    from liftplace import verdicts

    seeds = len(results.study_seeds(info))
    looks = info.get("looks", [])
    previous = looks[-1]["seeds"] if looks else 0
    if looks and previous == seeds:  # this many seeds were looked at already (a resumed driver)
        return not looks[-1].get("stop")
    level = verdicts.look_alpha(seeds, previous, rule["max_seeds"], rule["alpha"])
    table = verdicts.table(results.finished_runs(folder), margin=rule["margin"], alpha=level)
    words = dict(zip(table["variant"], table["word"])) if not table.empty else {}
    stop = None
    if words and all(w in verdicts.DECIDED for w in words.values()):
        stop = "every comparison with kd is decided"
    elif seeds >= rule["max_seeds"]:
        stop = f"the most seeds allowed ({rule['max_seeds']}) reached with comparisons undecided"
    elif not words:
        stop = "no comparison with kd to decide"
    results.record(folder, "looks", {"seeds": seeds, "level": level, "verdicts": words, "stop": stop})
    counts = pd.Series(list(words.values()), dtype=object).value_counts().to_dict()
    log(f"look at {seeds} seeds (level {level:.3g}): " + ", ".join(f"{n} {w}" for w, n in counts.items())
        + (f"; stop: {stop}" if stop else "; growing by another round"))
    return stop is None


def _run_part(trials: list[Trial], name: str | None, *, study: Study, chosen: str, configs, folder: Path, store,
              max_concurrent: int, max_failures: int, verbose: bool, log, tune, tracker=None) -> int:
    """Run (or resume) one part of a study as its own Tune experiment: the study's first seeds
    in the study's folder itself (name None), an addition in ``<study>/<name>``. A part whose
    every run ended is skipped. Returns how many trials this call finished. ``folder``: where
    the driver writes the study's own files; ``store``: where the study is (the same folder,
    or the store that folder mirrors), handed to Ray as a URI (``storage.Store.uri_of``)."""
    where, tune_parent = (store.uri, store.parent_uri()) if name is None else (store.uri_of(name), store.uri)
    experiment = store.shown if name is None else storage.shown(where)
    table, _ = results.study_status(folder)
    seeds = {t.seed for t in trials}
    mine = table[table["seed"].isin(seeds)] if not study.space else table
    if not study.space and len(mine) and mine["state"].isin(["done", "diverged"]).all() and store.exists(name or ""):
        return 0
    curves = results.tensorboard_available()
    # The trials as Tune gets them (the configs as dicts from here on), with where a trial
    # writes, how often its Ray Train run may fail, and whether it prints its progress lines.
    payloads = [{**t.payload(), "train_storage": store.uri_of("_train"), "worker_failures": max_failures,
                 "verbose": verbose, **({"curves": store.uri_of(results.TENSORBOARD)} if curves else {})}
                for t in trials]
    trainable = _trainable(chosen, configs[0])
    runs = f"{len(trials) if study.space else sum(len(t.runs) for t in trials)} runs " \
           f"({len(study.variants)} variants x {len(seeds)} seeds" + (f": {', '.join(map(str, sorted(seeds)))}" if name else "") + ")"
    cohorts = sum(t.cohort for t in trials)
    if cohorts:
        runs += f" in {len(trials)} trials ({cohorts} cohorts: one teacher forward per step for each)"
    count = f"{study.num_samples} sampled trials" if study.space else runs
    dashboard = f"; dashboard {RAY_SESSION['dashboard']}" if RAY_SESSION["dashboard"] else ""
    log(f"study {study.name}: {count}, runner {chosen}, up to {max_concurrent} at a time -> {experiment}{dashboard}")
    log((f"curves: tensorboard --logdir {folder}" if store.local else
         f"curves: TensorBoard event files in {storage.shown(store.uri_of(results.TENSORBOARD))}, put there at each "
         "evaluation") if curves else
        "curves: none (pip install -e '.[watch]' for TensorBoard event files)")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Tune's JSON and CSV rows (result.json: what results.load_study reads in a study begun before run folders); not its own
    # TensorBoard logger, whose flattened cohort rows would sit beside the readable curves above.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    console = [JsonLoggerCallback(), CSVLoggerCallback(), Heartbeat(folder)]
    if results.read_study_info(folder).get("layout") == results.RUNS:  # a study begun before run folders: none
        console.append(RunFolders(folder, tracker))
    if not verbose:
        console.append(StudyConsole(study.num_samples if study.space else len(trials), log=log))
    tune_verbose = 1 if verbose else 0
    if not verbose:
        # Tune's newer console prints a configuration box and a TensorBoard path into Ray's
        # temporary session folder even at verbose=0; its classic console is silent at 0. Its INFO
        # lines ("Wrote the latest version of all result files ...") are kept for --verbose.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        # Optuna's own INFO line ("A new study created in memory with name: optuna") too.
        logging.getLogger("optuna").setLevel(logging.WARNING)
        # A failed trial is said by the console (one line, its error file) and, at the end, by
        # the study; Tune's own ERROR record repeats it with the worker's traceback.
        controller = logging.getLogger("ray.tune.execution.tune_controller")
        if _TRIAL_FAILED not in controller.filters:
            controller.addFilter(_TRIAL_FAILED)
    if study.space:
        # A search's rows without FID are expected (FID comes at evaluations only), in a resumed
        # search too (its first row after the restore has none).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # On a store, Tune puts its experiment state there every sync_period (300 s by default):
    # what a resume after a killed driver restores. A study keeps it within STATE_SYNC_S.
    sync = tune.SyncConfig(sync_period=STATE_SYNC_S if not store.local else 300)
    # A restore copies the study folder's top-level .json files (study.json) and puts that copy
    # back while it runs: the store must hold this driver's study.json first.
    storage.settle(folder)
    restoring = tune.Tuner.can_restore(where)
    if restoring:
        with _sweep_stand_in(), _unfetched_trials_unsaid():
            tuner = tune.Tuner.restore(where, trainable=trainable, resume_errored=True)
        # The restored tuner brings back the console of the first attempt (Tune pickles its
        # RunConfig, callbacks included); this attempt's console and verbosity replace it.
        # Tuner.restore takes no RunConfig in Ray 2.60, hence the private attribute.
        restored = tuner._local_tuner.get_run_config()
        restored.callbacks, restored.verbose, restored.sync_config = console, tune_verbose, sync
    elif study.space:
        tuner = _search_tuner(study, payloads, configs[0], trainable, tune_parent, max_concurrent, max_failures,
                              console, tune_verbose, sync)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search(payloads)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=chosen == "direct",
                                        trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name),
            run_config=tune.RunConfig(name=name or store.name, storage_path=tune_parent,
                                      verbose=tune_verbose, sync_config=sync,
                                      callbacks=console, failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
    results.write_heartbeat(folder, "running")
    planned = study.num_samples if study.space else len(trials)

    def interrupted(sig) -> StudyInterrupted:
        results.write_heartbeat(folder, "interrupted")
        return StudyInterrupted(results.trials_finished(_part_status(folder, seeds, study)), planned, sig)

    # A restored tuner's fit() reads the rest of the folder's state first (its trials, the search's).
    with _sweep_stand_in() if restoring else nullcontext(), _sigterm_as_sigint() as received:
        try:
            grid = tuner.fit()  # Ctrl-C (or SIGTERM, made one): Tune saves its state and returns
        except KeyboardInterrupt:  # a second Ctrl-C while Tune was stopping
            raise interrupted(received.get("signal", signal.SIGINT)) from None
        finally:
            files.written(folder / results.STUDY_FILE)  # on a store: put again, over Tune's copy of it
    failed = [r for r in grid if r.error]
    results.write_heartbeat(folder, "finished")
    table = _part_status(folder, seeds, study)
    if received:
        raise interrupted(received["signal"])
    if failed:  # one line (the first failure's cause, step and error file); no report
        first = failed[0]
        step = (first.metrics or {}).get("step", 0)
        raise RunFailed(f"{len(failed)} of {len(grid)} trials failed; the first, {Path(first.path).name}, after step "
                        f"{step}: {failure_cause(first.error)}; its error: {Path(first.path) / 'error.txt'}")
    if table["state"].isin(["pending", "interrupted"]).any():  # stopped before the end
        raise interrupted(signal.SIGINT)
    return len(grid)


def _part_status(folder: Path, seeds: set, study: Study):
    """The status table of a part's runs (its seeds; a search's every run)."""
    table, _ = results.study_status(folder)
    return table if study.space else table[table["seed"].isin(seeds)]


class StudyInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a study: how many of its trials had finished, and the signal
    (the exit status is 128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, finished: int, planned: int, sig: int):
        super().__init__(f"interrupted: {finished} of {planned} trials finished")
        self.finished, self.planned, self.signal = finished, planned, int(sig)


@contextmanager
def _sigterm_as_sigint():
    """Within: SIGTERM does what a first Ctrl-C does (Tune stops the trials, saves its state and
    returns), and Tune's own two warnings about it (with a Tuner.restore hint that does not
    apply to a study) are dropped: the study says it in one line. Yields what was received."""
    received: dict = {}

    def on_term(sig, frame):
        received["signal"] = signal.SIGTERM
        signal.raise_signal(signal.SIGINT)

    def on_int(sig, frame):  # only until Tune installs its own handler at the start of fit()
        received["signal"] = signal.SIGINT
        raise KeyboardInterrupt

    notices = _Swallow(("Stop signal received", "Experiment has been interrupted"))
    # (And Tune's "Trials did not complete: [...]": a failed study says which, with the cause.)
    incomplete = _Swallow("Trials did not complete")
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(notices)
    tune_logger.addFilter(incomplete)
    previous = signal.signal(signal.SIGTERM, on_term), signal.getsignal(signal.SIGINT)
    try:
        with _unfetched_trials_unsaid():
            yield received
    finally:
        if notices.seen:
            received.setdefault("signal", signal.SIGINT)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        tune_logger.removeFilter(notices)
        tune_logger.removeFilter(incomplete)


@contextmanager
def _unfetched_trials_unsaid():
    """Within: Tune's warning about a trial folder without rows ("Failed to fetch metrics ...:
    both result.json and progress.csv were not found") is dropped: a trial stopped before its
    first row, or on a store one whose rows Tune had not put there when its driver was killed.
    The study's own lines say what finished, from the run folders."""
    unfetched = _Swallow("Failed to fetch metrics")
    analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_logger.addFilter(unfetched)
    try:
        yield
    finally:
        analysis_logger.removeFilter(unfetched)

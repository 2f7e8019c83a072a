"""Ray's side (liftplace/runner/): Ray Train runs and Ray Tune studies end to end on the local
machine (smoke sizes), the cluster's capacity, the study console, every worker's setup hook, and
old study folders (written under liftplace.sweep) that must still resume."""

import json
import logging
import math
import pickle
import sys
from pathlib import Path

import pandas as pd
import pytest

from liftplace.config import resolve
from liftplace.preflight import check_resources
from liftplace.results import load_study, summarize
from liftplace.runner import cluster
from liftplace.runner.cluster import autoscaling_ceiling
from liftplace.runner.single import run_single
from liftplace.runner.study import run_study
from liftplace.study import Study


def smoke(teacher, **overrides):
    base = {"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32,
            "eval.sampler_steps": 2, "train.steps": 10, "train.checkpoint_every": 5}
    return resolve("smoke", {**base, **overrides})


@pytest.mark.parametrize("workers", [1, 2])
def test_one_run_on_ray_train(ray_session, tiny_teacher_dir, tmp_path, workers):
    out = tmp_path / "run"
    last = run_single(smoke(tiny_teacher_dir, **{"scaling.num_workers": workers}), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(r["world_size"] == workers and r["runner"] == "train" for r in rows)
    assert math.isfinite(last["fid"]) and (out / "samples.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["scaling"]["num_workers"] == workers
    with pytest.raises(FileExistsError, match="--resume"):
        run_single(smoke(tiny_teacher_dir), out)


def test_gpus_the_cluster_lacks_are_refused_up_front(ray_session, tiny_teacher_dir):
    with pytest.raises(ValueError, match="asks for 2 GPUs.*the Ray cluster has 0"):
        check_resources([smoke(tiny_teacher_dir, **{"scaling.use_gpu": True, "scaling.num_workers": 2})],
                        cluster.capacity_now())


def tiny_study(teacher, name="tiny"):
    return Study(
        name=name,
        base={"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32,
              "eval.sampler_steps": 2, "train.steps": 10},
        variants={"kd": {"objective.name": "kd"}, "place K=16": {"objective.name": "place", "objective.group_size": 16},
                  "diverges": {"objective.name": "kd", "train.lr": 1e6, "train.grad_clip": 1e9, "train.loss_bound": 20.0}},
        seeds=2,
    )


def test_a_study_runs_every_variant_and_seed_once(ray_session, tiny_teacher_dir, tmp_path):
    folder = run_study(tiny_study(tiny_teacher_dir), preset="smoke", storage=tmp_path, log=lambda *_: None)
    # One cohort trial per seed, all three variants in it (the diverging one stops alone).
    assert len(list(folder.glob("*/params.json"))) == 2
    df = load_study(folder)
    summary = summarize(df)
    assert len(summary) == 6
    assert sorted(summary["variant"]) == sorted(["kd", "kd", "place K=16", "place K=16", "diverges", "diverges"])
    assert sorted(summary["seed"]) == [0, 0, 0, 1, 1, 1]
    ok = summary[summary["variant"] != "diverges"]
    assert not ok["diverged"].any() and (ok["final_fid"] > 0).all() and (ok["steps"] == 10).all()
    bad = summary[summary["variant"] == "diverges"]
    assert bad["diverged"].all() and (bad["steps"] < 10).all()
    assert set(df["runner"]) == {"direct"}
    assert (df.groupby("run")["step"].apply(lambda s: s.is_unique)).all()
    assert df["config/objective/group_size"].dropna().eq(16).all()
    # The same storage refuses to run the study again, and refuses a different one.
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(tiny_study(tiny_teacher_dir), preset="smoke", storage=tmp_path, log=lambda *_: None)
    other = tiny_study(tiny_teacher_dir)
    other.seeds = 3
    with pytest.raises(FileExistsError, match="different study"):
        run_study(other, preset="smoke", storage=tmp_path, log=lambda *_: None)

    # --cohort off: one trial per variant and seed, and every run's rows are the cohort's.
    alone = run_study(tiny_study(tiny_teacher_dir), preset="smoke", storage=tmp_path / "off", cohort="off",
                      log=lambda *_: None)
    assert len(list(alone.glob("*/params.json"))) == 6
    off = load_study(alone)
    columns = ["variant", "config/train/seed", "step", "loss", "loss_coarse", "w", "beta1", "grad_norm", "fid"]
    key = ["variant", "config/train/seed", "step"]
    together = df[columns].sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(together, off[columns].sort_values(key, ignore_index=True))


def test_a_study_through_ray_train(ray_session, tiny_teacher_dir, tmp_path):
    # Two DDP workers, each holding both students of the cohort.
    study = Study(name="via-train", base={"teacher.name": str(tiny_teacher_dir), "student.prune_ratio": 0.5,
                                          "eval.num_images": 32, "eval.sampler_steps": 2, "train.steps": 10,
                                          "scaling.num_workers": 2},
                  variants={"lift": {"objective.name": "lift"}, "kd": {"objective.name": "kd"}}, seeds=1)
    folder = run_study(study, preset="smoke", storage=tmp_path, runner="train", log=lambda *_: None)
    df = load_study(folder)  # one cohort trial, through a TorchTrainer
    assert len(list(folder.glob("*/params.json"))) == 1
    for variant in ("lift", "kd"):
        rows = df[df["variant"] == variant]
        assert list(rows["step"]) == [5, 10] and set(rows["runner"]) == {"train"} and set(rows["world_size"]) == {2}
        assert math.isfinite(rows["fid"].iloc[-1])
    assert summarize(df)["final_checkpoint"].map(lambda p: (Path(p) / "student.safetensors").is_file()).all()


def test_bad_study_input_is_refused_before_ray(tiny_teacher_dir, tmp_path):
    study = tiny_study(tiny_teacher_dir)
    with pytest.raises(ValueError, match="variant 'place K=16'.*group_size 24"):
        run_study(study, preset="smoke", overrides=["objective.group_size=24"], storage=tmp_path)
    with pytest.raises(FileNotFoundError, match="no study to resume"):
        run_study(study, preset="smoke", storage=tmp_path / "new", resume=True)
    assert not (tmp_path / "tiny").exists()


def test_the_study_console_counts_trials_and_steps_and_gives_an_eta(monkeypatch):
    from types import SimpleNamespace

    from liftplace.runner import console as study_console

    clock = [1000.0]
    monkeypatch.setattr(study_console.time, "time", lambda: clock[0])
    lines = []
    console = study_console.StudyConsole(3, every=30, log=lines.append)

    def trial(i, status="RUNNING"):
        members = [{"variant": "kd", "config": {"train": {"steps": 100, "log_every": 10}}},
                   {"variant": "place", "config": {"train": {"steps": 100, "log_every": 10}}}]
        return SimpleNamespace(trial_id=str(i), status=status, config={"run": {"members": members}},
                               last_result={})

    a, b = trial(0), trial(1)
    trials = [a, b]  # a third trial planned, not created yet
    console.on_trial_start(0, trials, a)
    console.on_trial_start(0, trials, b)
    assert len(lines) == 2 and lines[0].endswith(": kd, place")
    console.on_trial_result(0, trials, a, {"step": 10})  # the rate is measured from here
    clock[0] += 10
    console.on_trial_result(0, trials, a, {"step": 20})
    console.on_trial_result(0, trials, b, {"step": 10})
    clock[0] += 25
    console.on_step_end(0, trials)  # 35 s since the last line: a progress line
    # a: 10 steps in the 10 s between its rows, 1 step/s; b (one row yet) counts at that mean:
    # 2 steps/s for the 270 steps left -> 135 s
    assert lines[-1] == "[0m35s] trials: 0 done, 2 running, 1 pending; steps 30/300 (10%); ETA 2m15s"
    console.on_step_end(0, trials)  # no second line within 30 s
    assert len(lines) == 3
    clock[0] += 60  # no row for a minute: the estimate stays (it once grew with the wait)
    console.on_step_end(0, trials)
    assert lines[-1].endswith("steps 30/300 (10%); ETA 2m15s")
    console.on_trial_result(0, trials, b, {"step": 40})  # b: 30 steps in the 85 s since its first row
    clock[0] += 30
    console.on_step_end(0, trials)
    assert lines[-1].endswith("steps 60/300 (20%); ETA 2m57s")  # 240 steps / (1 + 30/85) steps/s
    a.status, a.last_result = "TERMINATED", {"members": {"kd": {"fid": 12.345}, "place": {"diverged": True}}}
    console.on_trial_complete(0, trials, a)
    assert lines[-1].endswith("in 2m05s: kd FID 12.35 | place diverged")
    assert "final evaluation" not in " ".join(lines)
    console.on_trial_result(0, trials, b, {"step": 90})  # b's last row before the final one
    clock[0] += 300
    console.on_step_end(0, trials)  # b samples its students now: the line says so
    assert lines[-1].endswith("steps 190/300 (63%); ETA 2m38s + the final evaluation (1 of 1 running trials in it)")


def test_the_autoscaling_ceiling_reads_the_launchers_file(tmp_path):
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text("head_node_type: head\navailable_node_types:\n"
                         "  head: {max_workers: 0, resources: {CPU: 8}}\n"
                         "  gpu: {max_workers: 4, resources: {CPU: 8, GPU: 1}}\n"
                         "  spot: {max_workers: 2}\n")
    have = {"CPU": 8, "GPU": 0}
    ceiling = autoscaling_ceiling(have, bootstrap)
    assert ceiling["CPU"] == float("inf")  # a type that declares no resources: unknown, so unbounded
    bootstrap.write_text(bootstrap.read_text().replace("  spot: {max_workers: 2}\n", ""))
    assert autoscaling_ceiling(have, bootstrap) == {"CPU": 8 + 4 * 8, "GPU": 4}
    assert autoscaling_ceiling(have, tmp_path / "absent.yaml") == have


def test_old_study_folders_unpickle_through_the_sweep_stand_in():
    """Tune pickled a study's trial-name functions, callbacks and trainables by reference under
    the module they lived in, liftplace.sweep: resolved through the stand-in while a folder is
    restored, and only then (no liftplace/sweep.py)."""
    from liftplace.runner import console, study, trials

    old_function = b"cliftplace.sweep\ntune_direct\n."  # what a pickle naming liftplace.sweep.tune_direct holds
    callback = pickle.dumps(console.Heartbeat(Path("/tmp/a-study")), protocol=0)
    assert b"cliftplace.runner.console\nHeartbeat\n" in callback
    old_callback = callback.replace(b"cliftplace.runner.console\nHeartbeat\n", b"cliftplace.sweep\nHeartbeat\n")
    old_name = pickle.dumps(trials._trial_name, protocol=0).replace(b"liftplace.runner.trials", b"liftplace.sweep")
    assert b"liftplace.sweep" in old_name
    with pytest.raises(ModuleNotFoundError, match="liftplace.sweep"):
        pickle.loads(old_function)
    with study._sweep_stand_in():
        assert pickle.loads(old_function) is trials.tune_direct
        assert pickle.loads(old_name) is trials._trial_name
        beat = pickle.loads(old_callback)
        assert type(beat) is console.Heartbeat and beat.folder == Path("/tmp/a-study")
        with study._sweep_stand_in():  # nested: the outer one removes it
            pass
        assert "liftplace.sweep" in sys.modules
    assert "liftplace.sweep" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(old_function)
    # every name the old module lent Tune, each the object that does that job now
    assert set(study.SWEEP_NAMES) >= {"tune_direct", "tune_train", "EvalOnlyOptuna", "_trial_name", "_trial_dirname",
                                      "StudyConsole", "Heartbeat"}
    assert all(getattr(value, "__name__", None) == name for name, value in study.SWEEP_NAMES.items())


def test_every_worker_drops_the_controllers_copy_of_a_file_system_error_only():
    """The worker setup hook (cluster.WORKER_SETUP, Ray's worker_process_setup_hook) names a
    function that exists, and filters the controller's logged OSError, nothing else."""
    import importlib

    module, _, name = cluster.WORKER_SETUP.rpartition(".")
    setup = getattr(importlib.import_module(module), name)
    assert setup is cluster.worker_setup
    logger = logging.getLogger(cluster.CONTROLLER_LOGGER)
    before = list(logger.filters)
    try:
        setup()
        setup()  # once per process, however often it runs
        added = [f for f in logger.filters if f not in before]
        assert len(added) == 1

        def record(exc, message="Error in control loop iteration 3"):
            return logging.LogRecord(cluster.CONTROLLER_LOGGER, logging.ERROR, __file__, 1, message, None,
                                     (type(exc), exc, None))

        assert not added[0].filter(record(OSError(28, "No space left on device")))
        assert added[0].filter(record(ValueError("a bug")))
        assert added[0].filter(record(OSError(28, "No space left"), message="something else"))
    finally:
        for f in [f for f in logger.filters if f not in before]:
            logger.removeFilter(f)

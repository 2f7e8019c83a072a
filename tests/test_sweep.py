"""Ray Train runs and Ray Tune studies, end to end on the local machine (smoke sizes)."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from liftplace.config import resolve
from liftplace.results import load_study, summarize
from liftplace.study import Study
from liftplace.sweep import check_resources, run_single, run_study


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
    with pytest.raises(ValueError, match="asks for 2 GPUs.*has 0"):
        check_resources([smoke(tiny_teacher_dir, **{"scaling.use_gpu": True, "scaling.num_workers": 2})])


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


def test_a_step_that_cannot_fit_in_memory_is_refused(tiny_teacher_dir, monkeypatch):
    """check_memory holds a step's estimate (models.step_memory times the margin, plus a worker
    process) against the available memory: first with the teacher standing in for the student
    (a bound), then, only where the bound does not fit, with the pruned student itself."""
    import psutil
    import ray

    from liftplace import models, sweep
    from liftplace.teachers import load_teacher

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as before Ray starts, whatever ran before
    monkeypatch.setattr(sweep, "_STEPS", {})  # estimates are kept per process
    config = smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9})
    teacher = load_teacher(str(tiny_teacher_dir))[0]
    shape = (1000, 1, 16, 16)
    bound = models.step_memory(teacher, shape) * sweep.STEP_MARGIN
    student = models.build_student(teacher, config.student, seed=0, example_shape=(2, 1, 16, 16))
    exact = models.step_memory(teacher, shape, student) * sweep.STEP_MARGIN
    assert 0 < exact < bound  # the 90%-pruned student keeps far fewer activations than the teacher would
    worker = sweep.WORKER_BASE_BYTES
    real = psutil.virtual_memory

    def available(nbytes):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=int(nbytes + sweep.RAY_BASE_BYTES)))

    built = []
    monkeypatch.setattr(models, "build_student", lambda *a, **k: built.append(1) or student)
    available(3.5 * (worker + bound))
    assert sweep.check_memory([config], wanted=3) == 3 and not built  # the bound was enough
    available(worker + (exact + bound) / 2)
    assert sweep.check_memory([config]) == 1 and built  # the bound did not fit, the student did
    available(worker + 0.9 * exact)
    with pytest.raises(ValueError, match=r"^train\.batch: 1000 needs about .* GiB per worker"):
        sweep.check_memory([config])
    available(2.5 * (worker + exact))
    with pytest.raises(ValueError, match=r"^--max-concurrent: 3 trials at a time do not fit .* at most 2 fit"):
        sweep.check_memory([config], max_concurrent=3)
    # Two workers of one run need two worker processes and two steps.
    available(1.5 * (worker + exact))
    with pytest.raises(ValueError, match="2 workers with their processes and Ray's own need .* or scaling.num_workers"):
        sweep.check_memory([smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9,
                                                        "scaling.num_workers": 2})])
    # A GPU run: the step against each GPU's free memory (asked in a subprocess, patched here).
    gpu = smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9})
    gpu.scaling.use_gpu = True
    monkeypatch.setattr(sweep, "_gpu_free_bytes", lambda: [int(0.5 * exact)] * 8)
    with pytest.raises(ValueError, match="of GPU memory per worker.*GPUs have"):
        sweep.check_memory([gpu])
    monkeypatch.setattr(sweep, "_gpu_free_bytes", lambda: [int(1.5 * exact)] * 8)
    assert sweep.check_memory([gpu], wanted=8) == 8  # one trial per GPU, each GPU fits it
    gpu.scaling.gpus_per_worker = 0.25  # four workers could share a GPU, but memory holds one
    assert sweep.check_memory([gpu], wanted=8) == 8
    monkeypatch.setattr(sweep, "_gpu_free_bytes", lambda: [int(2.5 * exact)] * 8)
    assert sweep.check_memory([gpu], wanted=16) == 16  # two per GPU
    # A cohort trial holds its other students' weights, gradients, Adam moments and EMA too.
    available(worker + exact + 1)
    assert sweep.check_memory([config]) == 1
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    available(worker + exact + 9 * 5 * weights - 1)
    with pytest.raises(ValueError, match="train.batch"):
        sweep.check_memory([config], members=10)
    # A cluster still to join: nothing known, nothing estimated.
    assert sweep.check_memory([config], "ray://head:10001") is None


def test_bad_study_input_is_refused_before_ray(tiny_teacher_dir, tmp_path):
    study = tiny_study(tiny_teacher_dir)
    with pytest.raises(ValueError, match="variant 'place K=16'.*group_size 24"):
        run_study(study, preset="smoke", overrides=["objective.group_size=24"], storage=tmp_path)
    with pytest.raises(FileNotFoundError, match="no study to resume"):
        run_study(study, preset="smoke", storage=tmp_path / "new", resume=True)
    assert not (tmp_path / "tiny").exists()


def test_the_study_console_counts_trials_and_steps_and_gives_an_eta(monkeypatch):
    from types import SimpleNamespace

    from liftplace import sweep

    clock = [1000.0]
    monkeypatch.setattr(sweep.time, "time", lambda: clock[0])
    lines = []
    console = sweep.StudyConsole(3, every=30, log=lines.append)

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


def test_configs_saved_before_a_key_was_added_still_resume():
    """A config.json or checkpoint digest written before student.min_group_channels existed
    matches a config that leaves it at 1 (what those runs built), and only such a config."""
    from liftplace.checkpoints import config_digest
    from liftplace.config import comparable, from_dict

    new = resolve("smoke").to_dict()
    old = json.loads(json.dumps(new))
    del old["student"]["min_group_channels"]
    assert from_dict(old, check_paths=False).to_dict() == new
    assert comparable(old) == comparable(new) and config_digest(old) == config_digest(new)
    wide = resolve("smoke", {"student.min_group_channels": 3}).to_dict()
    assert comparable(wide) != comparable(old) and config_digest(wide) != config_digest(old)
    assert "min_group_channels" in new["student"]  # comparable copies; the config keeps its key


@pytest.mark.parametrize("name", ["feat", "kd+feat", "place", "kd"])
def test_configs_saved_when_feat_weight_defaulted_to_one_still_resume(name):
    """objective.feat_weight was 1.0 in every saved config before it became None ("the
    objective's own default", 1.0 for feat and kd+feat, ignored by the others), and the other
    feature options did not exist: such a config.json and checkpoint digest still match a fresh
    config of the same run, and comparable hashes exactly the objective section the old code did."""
    from liftplace.checkpoints import config_digest
    from liftplace.config import comparable, from_dict

    new = resolve("smoke", {"objective.name": name}).to_dict()
    assert new["objective"]["feat_weight"] is None
    old = json.loads(json.dumps(new))
    old["objective"]["feat_weight"] = 1.0
    for key in ("feat_reduction", "feat_bias", "feat_init", "feat_init_scale"):
        del old["objective"][key]
    assert comparable(old) == comparable(new) and config_digest(old) == config_digest(new)
    assert comparable(new)["objective"] == old["objective"]  # what the old code hashed
    assert new["objective"]["feat_weight"] is None  # comparable copies; the config keeps its None
    assert from_dict(old, check_paths=False).objective_options().get("feat_weight", 1.0) == 1.0
    # a config that runs differently still differs
    for changed in ({"objective.feat_weight": 0.5}, {"objective.feat_reduction": "sum"},
                    {"objective.feat_bias": False}, {"objective.feat_init": "uniform"},
                    {"objective.feat_init_scale": 0.01}):
        other = resolve("smoke", {"objective.name": name, **changed}).to_dict()
        assert comparable(other) != comparable(old) and config_digest(other) != config_digest(old)


def test_place_feat_keeps_its_own_feature_weight_default_apart_from_one():
    """place+feat's None is the authors' 1e-6: it must not compare equal to an explicit 1.0."""
    from liftplace.checkpoints import config_digest
    from liftplace.config import comparable

    default = resolve("smoke", {"objective.name": "place+feat"}).to_dict()
    one = resolve("smoke", {"objective.name": "place+feat", "objective.feat_weight": 1.0}).to_dict()
    assert comparable(default)["objective"]["feat_weight"] is None
    assert comparable(default) != comparable(one) and config_digest(default) != config_digest(one)

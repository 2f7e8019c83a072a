"""One distillation run, in-process (no Ray): schema, checkpoints, exact resume, divergence."""

import math
import shutil

import pytest
import torch

from liftplace import checkpoints, distill
from liftplace.config import resolve

SCHEMA = {
    "step", "loss", "loss_coarse", "loss_fine", "w", "beta0", "beta1", "grad_norm", "diverged", "fid", "kid",
    "precision", "recall", "student_params", "teacher_params", "compression", "images_per_s", "eval_extractor",
    "eval_num_images", "eval_sampler_steps",
}


def smoke(teacher, **overrides):
    base = {"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32, "eval.sampler_steps": 2}
    return resolve("smoke", {**base, **overrides})


class Recorder:
    def __init__(self, keep_checkpoints_in=None, stop_after=None):
        self.rows, self.checkpoints = [], []
        self.keep, self.stop_after = keep_checkpoints_in, stop_after

    def __call__(self, row, checkpoint):
        self.rows.append(row)
        if checkpoint is not None:
            self.checkpoints.append(sorted(p.name for p in checkpoint.iterdir()))
            if self.keep is not None:
                dest = self.keep / f"step{row['step']}"
                shutil.copytree(checkpoint, dest)
        if self.stop_after is not None and row["step"] >= self.stop_after:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("name", ["place", "kd"])
def test_smoke_run_reports_the_schema(tiny_teacher_dir, name):
    rec = Recorder()
    last = distill.run(smoke(tiny_teacher_dir, **{"objective.name": name}), rec, log=lambda *_: None)
    assert [r["step"] for r in rec.rows] == [5, 10, 15, 20]
    assert all(SCHEMA <= set(r) for r in rec.rows)
    assert not any(r["diverged"] for r in rec.rows)
    assert math.isnan(rec.rows[0]["fid"]) and math.isfinite(last["fid"]) and last["fid"] > 0
    assert 0.2 < last["compression"] < 0.35  # a 50% channel prune keeps about a quarter of the weights
    # checkpoints at 10 and 20 (the end), the last with the sample grid
    assert len(rec.checkpoints) == 2 and "samples.png" in rec.checkpoints[-1]
    assert {"student.safetensors", "ema.safetensors", "optimizer.pt", "state.json", "rng_rank0.pt"} <= set(rec.checkpoints[0])
    if name == "place":
        assert 0 <= last["w"] <= 1 and math.isfinite(last["loss_coarse"])
    else:
        assert math.isnan(last["w"]) and math.isfinite(last["beta1"])


def test_resume_gives_the_same_losses(tiny_teacher_dir, tmp_path):
    config = smoke(tiny_teacher_dir, **{"train.log_every": 1, "train.checkpoint_every": 8, "train.steps": 14,
                                        "objective.weighting": "learnable"})
    full = Recorder()
    distill.run(config, full, log=lambda *_: None)
    crashed = Recorder(keep_checkpoints_in=tmp_path, stop_after=11)
    with pytest.raises(KeyboardInterrupt):
        distill.run(config, crashed, log=lambda *_: None)
    resumed = Recorder()
    distill.run(config, resumed, checkpoint=tmp_path / "step8", log=lambda *_: None)
    assert [r["step"] for r in resumed.rows] == list(range(9, 15))
    for a, b in zip(full.rows[8:], resumed.rows):
        assert a["step"] == b["step"]
        assert a["loss"] == b["loss"] and a["w"] == b["w"] and a["grad_norm"] == b["grad_norm"]
    assert full.rows[-1]["fid"] == resumed.rows[-1]["fid"]


def test_a_failing_final_evaluation_keeps_the_training_and_a_resume_only_evaluates(tiny_teacher_dir, tmp_path,
                                                                                   monkeypatch):
    config = smoke(tiny_teacher_dir, **{"train.steps": 12, "train.checkpoint_every": 100})
    full = Recorder()
    distill.run(config, full, log=lambda *_: None)
    evaluate = distill.evaluate_student

    def broken(*args, **kwargs):
        raise MemoryError("simulated: out of memory while sampling")

    monkeypatch.setattr(distill, "evaluate_student", broken)
    failed = Recorder(keep_checkpoints_in=tmp_path)
    with pytest.raises(MemoryError):
        distill.run(config, failed, log=lambda *_: None)
    # The final checkpoint (the only one) was reported before the error, with the row.
    assert [r["step"] for r in failed.rows] == [5, 10, 12] and math.isnan(failed.rows[-1]["fid"])
    assert failed.rows[-1]["loss"] == full.rows[-1]["loss"]
    assert "samples.png" in failed.checkpoints[-1] and distill.FINAL_ROWS in failed.checkpoints[-1]
    monkeypatch.setattr(distill, "evaluate_student", evaluate)
    calls = []

    def counted(row, checkpoint):
        calls.append(row)

    distill.run(config, counted, checkpoint=tmp_path / "step12", log=lambda *_: None)
    # No training step again: one row, the final one, now with its metrics.
    assert [r["step"] for r in calls] == [12]
    assert calls[0]["loss"] == full.rows[-1]["loss"] and calls[0]["fid"] == full.rows[-1]["fid"]


def test_a_diverging_run_is_recorded_not_raised(tiny_teacher_dir):
    rec = Recorder()
    last = distill.run(smoke(tiny_teacher_dir, **{"train.lr": 1e6, "train.grad_clip": 1e9, "train.loss_bound": 50.0,
                                                  "train.log_every": 1, "objective.name": "kd"}), rec, log=lambda *_: None)
    assert last["diverged"] is True
    assert last["step"] < 20 and [r["diverged"] for r in rec.rows].count(True) == 1
    assert math.isnan(last["fid"])


@pytest.mark.parametrize("overrides", [
    {"objective.name": "kd+feat"},
    {"objective.name": "task"},
    {"objective.name": "place", "objective.num_groups": 4, "objective.coarse": "moments"},
    {"student.prune_ratio": None, "student.param_ratio": 0.3, "objective.name": "lift"},
])
def test_other_objectives_and_students_train(tiny_teacher_dir, overrides):
    rec = Recorder()
    last = distill.run(smoke(tiny_teacher_dir, **{"train.steps": 6, "train.log_every": 3, **overrides}), rec,
                       log=lambda *_: None)
    assert last["step"] == 6 and not last["diverged"] and math.isfinite(last["loss"])


def test_a_corrupt_checkpoint_is_refused(tiny_teacher_dir, tmp_path):
    rec = Recorder(keep_checkpoints_in=tmp_path)
    config = smoke(tiny_teacher_dir, **{"train.steps": 10})
    distill.run(config, rec, log=lambda *_: None)
    (tmp_path / "step10" / "student.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        distill.run(config, Recorder(), checkpoint=tmp_path / "step10", log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="not a liftplace checkpoint"):
        distill.run(config, Recorder(), checkpoint=tmp_path, log=lambda *_: None)


def test_load_student_gives_the_runs_ema_student(tiny_teacher_dir, tmp_path):
    from safetensors.torch import load_file

    config = smoke(tiny_teacher_dir, **{"train.steps": 10, "train.checkpoint_every": 10})
    rec = Recorder(keep_checkpoints_in=tmp_path)
    distill.run(config, rec, log=lambda *_: None)
    ckpt = tmp_path / "step10"
    student, teacher, process = checkpoints.load_student(ckpt, config)
    shadow = load_file(str(ckpt / "ema.safetensors"))
    params = list(student.parameters())
    assert len(params) == len(shadow) and all(torch.equal(p, shadow[f"p{i}"]) for i, p in enumerate(params))
    live, _, _ = checkpoints.load_student(ckpt, config, ema=False)
    assert not all(torch.equal(a, b) for a, b in zip(live.parameters(), params))  # EMA differs from live weights
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    assert process.prediction == config.teacher.prediction
    with pytest.raises(FileNotFoundError, match="not a liftplace checkpoint"):
        checkpoints.load_student(tmp_path, config)

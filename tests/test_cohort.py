"""Cohorts: students trained in lock step on one teacher forward per step.

Each student of a cohort must report exactly the rows it reports alone (bitwise on CPU: the
same batches, timesteps and noise from the stream's own generator, the same teacher output,
its own optimizer, EMA and global RNG stream), whatever its cohort mates do, including
diverging; and a cohort resumed from a checkpoint must go on as if never stopped.
"""

import math
import shutil

import pytest

from liftplace import checkpoints, distill
from liftplace.config import resolve

# Timing columns differ between any two runs; every other column must be equal.
TIMING = {"images_per_s", "elapsed_s"}


def smoke(teacher, **overrides):
    base = {"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32,
            "eval.sampler_steps": 2, "train.steps": 8, "train.log_every": 2, "train.checkpoint_every": 4}
    return resolve("smoke", {**base, **overrides})


def same(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - TIMING - {"variant", "member"}
    return all(a.get(k) == b.get(k) or (isinstance(a.get(k), float) and math.isnan(a[k]) and math.isnan(b[k]))
               for k in keys)


class CohortRecorder:
    def __init__(self, keep_in=None, stop_after=None):
        self.rows, self.keep, self.stop_after = [], keep_in, stop_after

    def __call__(self, rows, checkpoint):
        self.rows.append(rows)
        step = next(iter(rows.values()))["step"]
        if checkpoint is not None and self.keep is not None:
            shutil.copytree(checkpoint, self.keep / f"step{step}")
        if self.stop_after is not None and step >= self.stop_after:
            raise KeyboardInterrupt("simulated crash")

    def of(self, variant):
        return [rows[variant] for rows in self.rows if variant in rows]


def alone(config):
    rows = []
    distill.run(config, lambda row, ckpt: rows.append(row), log=lambda *_: None)
    return rows


VARIANTS = {
    "kd": {"objective.name": "kd"},
    "lift": {"objective.name": "lift"},
    "place K=16": {"objective.name": "place", "objective.group_size": 16},
    "place learnable": {"objective.name": "place", "objective.weighting": "learnable", "objective.w0": 0.5},
    "feat": {"objective.name": "feat"},  # adapters initialised from torch's global RNG
    "kd 70% lr 3e-3": {"objective.name": "kd", "student.prune_ratio": 0.7, "train.lr": 3e-3},
    "fresh": {"objective.name": "kd", "student.prune_ratio": None, "student.param_ratio": 0.3},
}


def test_every_student_of_a_cohort_reports_the_rows_it_reports_alone(tiny_teacher_dir):
    configs = {label: smoke(tiny_teacher_dir, **o) for label, o in VARIANTS.items()}
    rec = CohortRecorder()
    last = distill.run_cohort(configs, rec, log=lambda *_: None)
    assert set(last) == set(VARIANTS)
    for label, config in configs.items():
        together, single = rec.of(label), alone(config)
        assert [r["step"] for r in together] == [r["step"] for r in single] == [2, 4, 6, 8]
        assert all(r["variant"] == label for r in together)
        for a, b in zip(together, single):
            assert same(a, b), (label, a["step"], {k: (a[k], b.get(k)) for k in a if k in b and a[k] != b[k]})
        assert math.isfinite(together[-1]["fid"]) and together[-1]["fid"] == single[-1]["fid"]
    # Students differ: otherwise the test above could not fail.
    losses = {label: rec.of(label)[-1]["loss"] for label in VARIANTS}
    assert len(set(losses.values())) == len(losses)


def test_a_diverging_student_stops_alone_and_leaves_its_mates_rows_unchanged(tiny_teacher_dir):
    blowup = {"objective.name": "kd", "train.lr": 1e6, "train.grad_clip": 1e9, "train.loss_bound": 50.0}
    configs = {"kd": smoke(tiny_teacher_dir, **{"objective.name": "kd"}), "bad": smoke(tiny_teacher_dir, **blowup)}
    rec = CohortRecorder()
    distill.run_cohort(configs, rec, log=lambda *_: None)
    bad = rec.of("bad")
    assert bad[-1]["diverged"] and bad[-1]["step"] < 8 and all(not r["diverged"] for r in bad[:-1])
    assert all(math.isnan(r["fid"]) for r in bad)
    kd = rec.of("kd")
    assert [r["step"] for r in kd] == [2, 4, 6, 8]
    assert all(same(a, b) for a, b in zip(kd, alone(configs["kd"])))


def test_a_cohort_resumed_after_a_crash_reports_the_rows_of_an_uninterrupted_one(tiny_teacher_dir, tmp_path):
    configs = {label: smoke(tiny_teacher_dir, **VARIANTS[label]) for label in ("kd", "place learnable", "feat")}
    full = CohortRecorder()
    distill.run_cohort(configs, full, log=lambda *_: None)
    crashed = CohortRecorder(keep_in=tmp_path, stop_after=6)
    with pytest.raises(KeyboardInterrupt):
        distill.run_cohort(configs, crashed, log=lambda *_: None)
    assert checkpoints.check(tmp_path / "step4") == 4
    resumed = CohortRecorder()
    distill.run_cohort(configs, resumed, checkpoint=tmp_path / "step4", log=lambda *_: None)
    for label in configs:
        assert [r["step"] for r in resumed.of(label)] == [6, 8]
        assert all(same(a, b) for a, b in zip(resumed.of(label), full.of(label)[2:]))
    # A checkpoint of another cohort is refused in one line.
    other = {"kd": configs["kd"], "lift": smoke(tiny_teacher_dir, **VARIANTS["lift"])}
    with pytest.raises(ValueError, match="holds the cohort"):
        distill.run_cohort(other, CohortRecorder(), checkpoint=tmp_path / "step4", log=lambda *_: None)


def test_students_that_cannot_share_a_stream_are_refused(tiny_teacher_dir):
    configs = {"a": smoke(tiny_teacher_dir), "b": smoke(tiny_teacher_dir, **{"train.batch": 8})}
    with pytest.raises(ValueError, match="train.batch differs"):
        distill.run_cohort(configs, CohortRecorder(), log=lambda *_: None)
    assert distill.cohort_key(smoke(tiny_teacher_dir, **{"train.lr": 1.0, "objective.name": "kd"})) == \
        distill.cohort_key(smoke(tiny_teacher_dir))
    assert distill.cohort_key(smoke(tiny_teacher_dir, **{"train.seed": 1})) != distill.cohort_key(smoke(tiny_teacher_dir))


def test_the_fid_curve_benchmark_gives_each_variant_its_own_settings_on_one_stream(tiny_teacher_dir, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "fid_curve.py"
    spec = importlib.util.spec_from_file_location("fid_curve", path)
    fid_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid_curve)
    common = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "curve.csv"),
              "--set", f"teacher.name={tiny_teacher_dir}", "--set", "student.prune_ratio=0.5",
              "--set", "eval.num_images=32", "--set", "eval.sampler_steps=2"]
    frame = fid_curve.main([*common, "--variants", "kd,kd:train.ema_decay=0,kd:train.lr=3e-3"]).set_index("variant")
    assert list(frame.index) == ["kd", "kd:train.ema_decay=0", "kd:train.lr=3e-3"]
    # The EMA decay changes only the weights that are evaluated: same training loss, another FID.
    assert frame.loc["kd", "loss"] == frame.loc["kd:train.ema_decay=0", "loss"]
    assert frame.loc["kd", "fid"] != frame.loc["kd:train.ema_decay=0", "fid"]
    # The learning rate changes the first update, so the loss at step 2.
    assert frame.loc["kd", "loss"] != frame.loc["kd:train.lr=3e-3", "loss"]
    # A setting the students must share, a malformed one, or a repeated variant: refused (exit 2).
    for variants in ("kd,kd:train.batch=8", "kd,kd:lr", "kd,kd", "mse"):
        with pytest.raises(SystemExit) as refused:
            fid_curve.main([*common, "--variants", variants])
        assert refused.value.code == 2

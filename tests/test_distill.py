"""One distillation run, in-process (no Ray): schema, checkpoints, exact resume, divergence."""

import json
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


# --- the authors' recipe as options: antithetic timesteps, flips, a constant-decay EMA -----------


class Seen:
    """A noise process that keeps the clean batches the stream hands it."""

    def __init__(self, process):
        self.process, self.x0 = process, []

    def training_pair(self, x0, generator=None, **options):
        self.x0.append(x0.clone())
        return self.process.training_pair(x0, generator, **options)


IMAGES = torch.rand((12, 1, 4, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1  # none is symmetric


def _stream(process, batch=6, seed=3, **options):
    return distill.Stream(IMAGES, torch.zeros(12, dtype=torch.long), 0, process, batch, torch.device("cpu"),
                          torch.Generator().manual_seed(seed), **options)


def _batches(stream, steps=3):
    return [stream.next() for _ in range(steps)]


def _equal(a, b):
    return all(torch.equal(x.x_t, y.x_t) and torch.equal(x.timesteps, y.timesteps) and torch.equal(x.target, y.target)
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_a_stream_with_the_defaults_draws_what_it_drew_before_the_options(prediction):
    """The old stream, written out: indices, levels, noise, from its generator in that order."""
    from diffusers import DDPMScheduler

    from liftplace.diffusion import make_process

    process = make_process(prediction)
    old_sig = _batches(_stream(process))  # constructed as before the options existed
    explicit = _batches(_stream(process, antithetic=False, flip=False))
    generator = torch.Generator().manual_seed(3)
    reference = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    for batch in old_sig:
        idx = torch.randint(0, 12, (6,), generator=generator)
        x0 = IMAGES[idx]
        if prediction == "flow":
            sigma = torch.rand(6, generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            s = sigma.view(-1, 1, 1, 1)
            x_t, t, target = (1 - s) * x0 + s * noise, sigma * 1000, noise - x0
        else:
            t = torch.randint(0, 1000, (6,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t, target = reference.add_noise(x0, noise, t), noise
        assert torch.equal(batch.timesteps, t) and torch.equal(batch.x_t, x_t) and torch.equal(batch.target, target)
    assert _equal(old_sig, explicit)


def test_antithetic_stream_timesteps_pair_t_with_T_minus_1_minus_t_and_are_deterministic():
    from liftplace.diffusion import make_process

    for batch in (6, 7):
        runs = [_batches(_stream(make_process("epsilon"), batch=batch, antithetic=True), 4) for _ in range(2)]
        assert _equal(*runs)
        drawn, pairs = (batch + 1) // 2, batch // 2
        for b in runs[0]:
            assert torch.equal(b.timesteps[drawn:], 999 - b.timesteps[:pairs])
        assert len({tuple(b.timesteps.tolist()) for b in runs[0]}) == 4  # a new draw every step
    flow = _batches(_stream(make_process("flow"), antithetic=True), 2)
    for b in flow:
        torch.testing.assert_close(b.timesteps[3:], 1000 - b.timesteps[:3])
    # another seed, other timesteps: they come from the stream's generator
    other = _batches(_stream(make_process("epsilon"), seed=4, antithetic=True), 1)
    assert not torch.equal(other[0].timesteps, runs[0][0].timesteps[:6])


def _flipped(x0: torch.Tensor) -> torch.Tensor:
    """Which rows of x0 are mirrored training images (each row is one, as drawn or mirrored)."""
    plain = (x0[:, None] == IMAGES[None]).flatten(2).all(-1).any(-1)
    mirrored = (x0[:, None] == IMAGES.flip(-1)[None]).flatten(2).all(-1).any(-1)
    assert bool((plain ^ mirrored).all())
    return mirrored


def test_flips_mirror_about_half_the_images_deterministically_from_the_streams_generator():
    from liftplace.diffusion import make_process

    seen = [Seen(make_process("epsilon")) for _ in range(3)]
    runs = [_batches(_stream(s, batch=64, flip=True), 10) for s in seen[:2]]
    assert _equal(*runs)
    flips = torch.cat([_flipped(x0) for x0 in seen[0].x0])
    assert torch.equal(flips, torch.cat([_flipped(x0) for x0 in seen[1].x0]))
    assert 0.42 < flips.float().mean().item() < 0.58  # 640 draws at p = 0.5
    # the same indices as without flips (drawn first), then the flips: only the mirroring differs
    plain = Seen(make_process("epsilon"))
    _batches(_stream(plain, batch=64), 1)
    assert not _flipped(plain.x0[0]).any()
    assert torch.equal(torch.where(_flipped(seen[0].x0[0])[:, None, None, None], seen[0].x0[0].flip(-1),
                                   seen[0].x0[0]), plain.x0[0])


def test_what_a_cohort_shares_with_the_options_on_depends_only_on_the_streams_generator():
    """A cohort's students share one stream: its batches must not depend on torch's global RNG
    (which each student draws from), and a resumed stream (its generator state restored, as a
    checkpoint does) goes on with the same batches."""
    from liftplace.diffusion import make_process

    options = dict(antithetic=True, flip=True)
    quiet = _batches(_stream(make_process("v"), **options), 4)
    noisy_stream = _stream(make_process("v"), **options)
    noisy = []
    for i in range(4):
        torch.manual_seed(100 + i)
        torch.randn(7)  # a student's dropout, an adapter's init
        noisy.append(noisy_stream.next())
    assert _equal(quiet, noisy)
    first = _stream(make_process("v"), **options)
    _batches(first, 2)
    state = first.generator.get_state()
    resumed = _stream(make_process("v"), seed=99, **options)
    resumed.generator.set_state(state)
    assert _equal(_batches(resumed, 2), quiet[2:])


def _train(**overrides):
    return resolve("smoke", overrides, check_paths=False).train


def test_ema_warmup_false_decays_at_the_constant_rate_from_the_first_update():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = distill.make_ema([param], _train(**{"train.ema_decay": 0.9999, "train.ema_warmup": False}))
    shadow = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 101):
        param.data.fill_(float(step))
        ema.step([param])
        shadow = 0.9999 * shadow + (1 - 0.9999) * step
        if step in (1, 100):
            assert ema.cur_decay_value == 0.9999 == ema.get_decay(ema.optimization_step)
    torch.testing.assert_close(ema.shadow_params[0].double(), shadow, rtol=1e-5, atol=1e-6)
    # The default: diffusers' EMAModel itself, warmed up: a copy at the first update, then
    # min(decay, (1 + n) / (10 + n)) after n updates.
    warm = distill.make_ema([param], _train(**{"train.ema_decay": 0.9999}))
    assert type(warm) is distill.EMAModel
    decays = []
    for _ in range(100):
        warm.step([param])
        decays.append(warm.cur_decay_value)
    assert decays[0] == 0.0 and decays[99] == pytest.approx(100 / 109)


def test_the_new_keys_round_trip_are_checked_and_leave_old_configs_comparable():
    from liftplace.checkpoints import config_digest
    from liftplace.config import comparable, from_dict, validate

    on = resolve("smoke", {"train.antithetic": "true", "data.flip": "yes", "train.ema_warmup": "false"},
                 check_paths=False)
    assert (on.train.antithetic, on.data.flip, on.train.ema_warmup) == (True, True, False)
    saved = json.loads(json.dumps(on.to_dict()))
    assert from_dict(saved, check_paths=False).to_dict() == on.to_dict()
    default = resolve("smoke", check_paths=False)
    assert (default.train.antithetic, default.data.flip, default.train.ema_warmup) == (False, False, True)
    for key in ("train.antithetic", "data.flip", "train.ema_warmup"):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            resolve("smoke", {key: "maybe"}, check_paths=False)
    default.train.antithetic = 1  # set by hand, past the parser
    with pytest.raises(ValueError, match="train.antithetic: must be true or false"):
        validate(default, check_paths=False)
    # A config saved before the keys existed compares equal to one that leaves them at the old
    # behaviour (resume, checkpoint digests), and to no other.
    new = resolve("smoke", check_paths=False).to_dict()
    old = json.loads(json.dumps(new))
    del old["train"]["antithetic"], old["train"]["ema_warmup"], old["data"]["flip"]
    assert comparable(old) == comparable(new) and config_digest(old) == config_digest(new)
    for key, value in (("train.antithetic", True), ("data.flip", True), ("train.ema_warmup", False)):
        changed = resolve("smoke", {key: value}, check_paths=False).to_dict()
        assert comparable(changed) != comparable(old) and config_digest(changed) != config_digest(old)
    # Students of one cohort may differ in their EMA, not in the stream they share.
    base = distill.cohort_key(resolve("smoke", check_paths=False))
    assert distill.cohort_key(resolve("smoke", {"train.ema_warmup": False}, check_paths=False)) == base
    for key in ("train.antithetic", "data.flip"):
        assert distill.cohort_key(resolve("smoke", {key: True}, check_paths=False)) != base


def test_the_paper_preset_follows_the_authors_recipe():
    config = resolve("paper", check_paths=False)
    tr, e = config.train, config.eval
    assert (tr.steps, tr.batch, tr.lr, tr.grad_clip, tr.ema_decay) == (500_000, 96, 2e-4, 1.0, 0.9999)
    assert tr.ema_warmup is False and tr.antithetic is True and config.data.flip is True
    assert (e.sampler_steps, e.num_images) == (100, 50_000)
    assert tr.steps % tr.eval_every == 0 and tr.eval_every % tr.checkpoint_every == 0
    s, o = config.student, config.objective
    assert o.name == "place+feat" and (s.groups, s.importance, s.dropout) == ("teacher", "taylor", 0.1)


def test_a_paper_config_saved_before_the_recipe_options_rebuilds_as_it_ran():
    """from_dict gives a key missing from a saved config its old behaviour, not what the preset
    sets now: a paper run saved before antithetic timesteps and flips existed ran without them."""
    from liftplace.config import comparable, from_dict

    saved = resolve("paper", {"teacher.name": "x", "data.spec": "mnist"}, check_paths=False).to_dict()
    for section, key in (("train", "antithetic"), ("data", "flip"), ("train", "ema_warmup")):
        del saved[section][key]
    rebuilt = from_dict(saved, check_paths=False)
    assert (rebuilt.train.antithetic, rebuilt.data.flip, rebuilt.train.ema_warmup) == (False, False, True)
    assert comparable(rebuilt.to_dict()) == comparable(saved)
    fresh = resolve("paper", {"teacher.name": "x", "data.spec": "mnist"}, check_paths=False)
    assert from_dict(fresh.to_dict(), check_paths=False).to_dict() == fresh.to_dict()  # a key present is kept


def test_build_gives_the_stream_and_the_ema_the_configs_options(tiny_teacher_dir):
    """The options reach what trains (the stream's draws and the EMA are tested above)."""
    options = {"train.antithetic": True, "data.flip": True, "train.ema_warmup": False}
    run = distill.build({"a": smoke(tiny_teacher_dir, **options),
                         "b": smoke(tiny_teacher_dir, **{**options, "train.ema_warmup": True})})
    assert run.stream.antithetic and run.stream.flip
    assert [type(t.ema) for t in run.trainees] == [distill.ConstantDecayEMA, distill.EMAModel]
    assert run.trainees[0].ema.decay == run.trainees[1].ema.decay == 0.999
    batch = run.stream.next()
    assert torch.equal(batch.timesteps[8:], 999 - batch.timesteps[:8])  # smoke: batch 16
    plain = distill.build({None: smoke(tiny_teacher_dir)})
    assert not plain.stream.antithetic and not plain.stream.flip and type(plain.trainees[0].ema) is distill.EMAModel

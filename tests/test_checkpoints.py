"""The checkpoint folder (liftplace/checkpoints.py), in-process on tiny modules: a restore puts
back every state a run continues from, a checkpoint of another config or teacher is refused,
damage is one clear error, and a failed write leaves the checkpoint that was there whole."""

import errno
import json

import pytest
import torch
from diffusers.training_utils import EMAModel

from liftplace import checkpoints
from liftplace.config import RunConfig, comparable


def parts(seed: int):
    """A student, its EMA, an optimizer with state, an objective with a parameter, a generator."""
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    objective = torch.nn.Linear(2, 2, bias=False)
    opt = torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-2)
    ema = EMAModel(student.parameters(), decay=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):  # a few real steps, so that Adam's moments and the EMA differ from their start
        x = torch.randn(5, 4, generator=gen)
        loss = objective(student(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(student.parameters())
    return student, ema, opt, objective, gen


def test_a_restore_puts_back_every_state_a_run_continues_from(tmp_path):
    student, ema, opt, objective, gen = parts(0)
    torch.manual_seed(123)
    checkpoints.save(tmp_path / "c", 30, student, ema, opt, objective, gen, rank=0, world=1, digest="d" * 64)
    expected_draw = torch.randn(3, generator=gen)
    expected_global = torch.randn(3)

    fresh = parts(1)  # other weights, other moments, another generator state
    assert not torch.equal(fresh[0][0].weight, student[0].weight)
    torch.manual_seed(999)
    step = checkpoints.restore(tmp_path / "c", *fresh, rank=0, digest="d" * 64)
    f_student, f_ema, f_opt, f_objective, f_gen = fresh

    assert step == 30 and checkpoints.check(tmp_path / "c") == 30
    for a, b in zip(f_student.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(f_ema.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)
    assert f_ema.optimization_step == ema.optimization_step == 3
    assert torch.equal(f_objective.weight, objective.weight)
    for a, b in zip(f_opt.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(torch.randn(3, generator=f_gen), expected_draw)  # the data/noise stream goes on
    assert torch.equal(torch.randn(3), expected_global)  # and torch's global one


def test_a_checkpoint_of_another_config_or_teacher_is_refused(tmp_path):
    student, ema, opt, objective, gen = parts(0)
    checkpoints.save(tmp_path / "c", 10, student, ema, opt, objective, gen, rank=0, world=1,
                     digest="a" * 64, teacher="t" * 64)
    with pytest.raises(ValueError, match="different config"):
        checkpoints.check(tmp_path / "c", digest="b" * 64)
    with pytest.raises(ValueError, match="different config"):
        checkpoints.restore(tmp_path / "c", *parts(1), rank=0, digest="b" * 64)
    with pytest.raises(ValueError, match="other teacher files"):
        checkpoints.check(tmp_path / "c", digest="a" * 64, teacher="u" * 64)
    assert checkpoints.check(tmp_path / "c", digest="a" * 64, teacher="t" * 64) == 10
    assert checkpoints.check(tmp_path / "c") == 10  # nothing given: nothing compared


def test_the_digest_counts_added_keys_only_where_they_change_what_runs():
    config = RunConfig().to_dict()
    old = json.loads(json.dumps(config))
    del old["student"]["dropout"], old["train"]["antithetic"]  # saved before these keys existed
    assert checkpoints.config_digest(old) == checkpoints.config_digest(config)
    assert comparable(old) == comparable(config)
    changed = json.loads(json.dumps(config))
    changed["train"]["antithetic"] = True  # not the old behaviour: another run
    assert checkpoints.config_digest(changed) != checkpoints.config_digest(config)


def test_damage_is_one_clear_error(tmp_path):
    student, ema, opt, objective, gen = parts(0)
    checkpoints.save(tmp_path / "c", 10, student, ema, opt, objective, gen, rank=0, world=1)
    weights = tmp_path / "c" / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut short
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*c: "):
        checkpoints.check(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a liftplace checkpoint"):
        checkpoints.check(tmp_path)


def test_a_failed_write_leaves_the_checkpoint_that_was_there_whole(tmp_path, monkeypatch):
    student, ema, opt, objective, gen = parts(0)
    checkpoints.save(tmp_path / "c", 10, student, ema, opt, objective, gen, rank=0, world=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    newer = parts(1)

    real = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and "param_groups" in obj:  # the optimizer's file (staged under a temporary name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        checkpoints.save(tmp_path / "c", 20, *newer, rank=0, world=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    assert checkpoints.check(tmp_path / "c") == 10


def test_a_cohort_checkpoint_checks_its_live_members_only(tmp_path):
    for folder, seed in (("m0", 0), ("m1", 1)):
        checkpoints.save(tmp_path / "c" / folder, 40, *parts(seed), rank=0, world=1)
    (tmp_path / "c" / "m1" / "state.json").unlink()  # a diverged member's folder is not kept whole
    checkpoints.save_manifest(tmp_path / "c", 40, [("kd", "m0", None), ("place", "m1", 25)])
    assert checkpoints.check(tmp_path / "c") == 40
    manifest = checkpoints.read_manifest(tmp_path / "c")
    assert [m["variant"] for m in manifest["members"]] == ["kd", "place"] and manifest["members"][1]["diverged_at"] == 25
    checkpoints.save_manifest(tmp_path / "c", 40, [("kd", "m0", None), ("place", "m1", None)])
    with pytest.raises(FileNotFoundError, match="m1"):  # a live member's folder must be whole
        checkpoints.check(tmp_path / "c")

"""The run config (liftplace/config.py), in-process: presets and overrides parse to each field's
type, every bad value is refused naming its key, a saved config comes back as the same run, and
a config saved before a key existed still reads as the run it was."""

import json
import os

import pytest

from liftplace.config import ADDED_KEYS, PRESETS, RunConfig, comparable, from_dict, parse_override, resolve


def test_a_preset_then_the_overrides_each_parsed_to_its_fields_type():
    config = resolve("smoke", ["train.steps=1_000", "train.lr=3e-4", "train.antithetic=yes",
                               "objective.feat_weight=none", "objective.name=place"])
    assert config.preset == "smoke" and config.teacher.name == PRESETS["smoke"]["teacher.name"]
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.train.lr == 3e-4 and config.train.antithetic is True
    assert config.objective.feat_weight is None and config.objective.name == "place"
    assert config.train.batch == PRESETS["smoke"]["train.batch"]  # the preset's, not the dataclass default
    assert resolve("smoke", {"train.steps": 7}).train.steps == 7  # a dict of Python values, as studies pass


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], r"unknown config key 'train.stepz': train has steps, batch"),
    (["train=3"], r"config key 'train' is a section"),
    (["train.steps=3.5"], r"config key 'train.steps' expects int, got '3.5'"),
    (["train.antithetic=maybe"], r"expects bool"),
    (["objective.feat_weight=heavy"], r"expects float or none"),
    (["student.prune_ratio=1.0"], r"^student.prune_ratio: must be in \[0, 1\)"),
    (["student.param_ratio=0.5"], r"^student: set exactly one of"),
    (["train.seed=4294967296"], r"^train.seed: must be in \[0, 2\*\*32\)"),
    (["train.lr=nan"], r"^train.lr: must be a finite number > 0"),
    (["train.ema_decay=1"], r"^train.ema_decay: must be in \[0, 1\)"),
    (["objective.name=distill"], r"^objective.name: unknown objective 'distill'; choose one of"),
    (["eval.sampler_steps=0"], r"^eval.sampler_steps: must be >= 1"),
    (["student.groups=teacher", "student.min_group_channels=3"], r"^student.min_group_channels: applies to"),
])
def test_every_bad_value_is_refused_naming_its_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("smoke", overrides, check_paths=False)


def test_a_bad_preset_or_override_form_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'fast'; choose one of smoke, cpu, cpu-50, paper"):
        resolve("fast")
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_override("train.steps")
    assert parse_override(" train.steps = 5 ") == ("train.steps", "5")


def test_the_paper_preset_asks_for_the_users_teacher_and_data():
    with pytest.raises(ValueError, match="^teacher.name: the paper preset needs your teacher"):
        resolve("paper")
    resolve("paper", check_paths=False)  # validated on one machine, run on another


def test_a_saved_config_comes_back_as_the_same_run():
    config = resolve("smoke", ["objective.name=place", "objective.group_size=4", "train.seed=3"])
    again = from_dict(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()
    assert from_dict(config.to_dict(), {"objective.group_size": 8}).objective.group_size == 8  # a search trial's values on top


def test_a_config_saved_before_a_key_existed_reads_as_the_run_it_was():
    # The paper preset turned antithetic timesteps and flips on after configs were saved without
    # those keys: such a config ran with them off, and reads back so.
    saved = resolve("paper", check_paths=False).to_dict()
    del saved["train"]["antithetic"], saved["data"]["flip"]
    old = from_dict(saved, check_paths=False)
    assert old.train.antithetic is False and old.data.flip is False
    assert resolve("paper", check_paths=False).train.antithetic is True
    # and compares equal to a fresh config holding the keys' old values (smoke holds them all)
    fresh = resolve("smoke").to_dict()
    assert all(fresh[section][key] == value for (section, key), value in ADDED_KEYS.items())
    trimmed = {s: dict(v) if isinstance(v, dict) else v for s, v in fresh.items()}
    for section, key in ADDED_KEYS:
        trimmed[section].pop(key)
    assert comparable(trimmed) == comparable(fresh)


def test_none_reads_as_the_objectives_old_default_only_where_it_runs_alike():
    kd = RunConfig().to_dict()
    kd["objective"]["name"] = "kd"
    explicit = {**kd, "objective": {**kd["objective"], "feat_weight": 1.0}}
    assert kd["objective"]["feat_weight"] is None and comparable(kd) == comparable(explicit)
    feat = resolve("smoke", ["objective.name=place+feat"], check_paths=False).to_dict()
    one = {**feat, "objective": {**feat["objective"], "feat_weight": 1.0}}
    assert comparable(feat) != comparable(one)  # place+feat's own default is 1e-6, not 1.0


def test_relative_paths_are_made_absolute_where_they_exist(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    config = resolve("smoke", ["data.spec=folder:images", "eval.extractor_weights=missing.pth"], check_paths=False)
    assert config.data.spec == f"folder:{tmp_path / 'images'}" and os.path.isabs(config.data.spec[7:])
    assert config.eval.extractor_weights == "missing.pth"  # left as given: validation names it in the user's words


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

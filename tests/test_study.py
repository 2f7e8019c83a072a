"""A study without Ray (liftplace/study.py), in-process: a study expands into validated configs
with the study's seeds, variants that share a teacher and stream train as one cohort, a bad
study is refused naming its variant, and what study.json records is the same in every process."""

import subprocess
import sys

import pytest

from liftplace.cli import resume_command
from liftplace.study import Study, describe_domain, expand, pick_runner, plan


def small(**kw) -> Study:
    variants = {"kd": {"objective.name": "kd"}, "place": {"objective.name": "place", "objective.group_size": 4}}
    return Study(name="small", variants=kw.pop("variants", variants), **kw)


def test_a_study_expands_into_validated_configs_with_its_seeds():
    trials = expand(small(evals=3), "smoke", ["train.steps=40"], seeds=2)
    assert [(t.variant, t.seed) for t in trials] == [("kd", 0), ("kd", 1), ("place", 0), ("place", 1)]
    for t in trials:
        (variant, config), = t.runs
        assert variant == t.variant and not t.cohort
        assert config.train.seed == t.seed and config.train.steps == 40
        assert config.train.eval_every == 40 // (3 + 1)  # evals spread evenly, then the final one
        # what Tune gets: the config as a dict, typed until then
        assert t.payload() == {"variant": t.variant, "seed": t.seed, "config": config.to_dict()}
    assert trials[2].runs[0][1].objective.group_size == 4
    assert expand(small(), "smoke", [], seeds=2, seed_list=[5])[0].seed == 5  # an addition's seeds


@pytest.mark.parametrize("seeds, overrides, message", [
    (0, [], "--seeds must be >= 1, got 0"),
    (1001, [], "at most 1000 seeds per variant"),
    (1, ["train.seed=4"], "--set train.seed: a study's runs take its seeds"),
    (1, ["objective.group_size=3"], r"study small, variant 'place': objective"),
])
def test_a_bad_study_is_refused_naming_what_is_wrong(seeds, overrides, message):
    with pytest.raises(ValueError, match=message):
        expand(small(), "smoke", overrides, seeds)


def test_variants_that_would_share_a_run_folder_are_refused():
    variants = {"place K=16": {"objective.name": "place"}, "Place K-16": {"objective.name": "place"}}
    with pytest.raises(ValueError, match=r"variants 'place K=16' and 'Place K-16' would share one run folder "
                                         r"\(runs/Place-K-16-seed<k>\): rename one"):
        expand(small(variants=variants), "smoke", [], seeds=1)


def test_variants_of_one_seed_and_teacher_train_as_one_cohort():
    variants = {"kd": {"objective.name": "kd"}, "place": {"objective.name": "place"},
                "kd batch 8": {"objective.name": "kd", "train.batch": 8}}
    grid = plan(small(variants=variants, seeds=2), preset="smoke")
    cohorts = [t for t in grid.trials if t.cohort]
    alone = [t for t in grid.trials if not t.cohort]
    # kd and place share the teacher, the data and the stream of batches; another batch size does not
    assert sorted((t.seed, [v for v, _ in t.runs]) for t in cohorts) == [(0, ["kd", "place"]), (1, ["kd", "place"])]
    assert sorted((t.seed, t.variant) for t in alone) == [(0, "kd batch 8"), (1, "kd batch 8")]
    payload = cohorts[0].payload()
    assert payload["variant"] == "kd, place" and [m["variant"] for m in payload["members"]] == ["kd", "place"]
    assert payload["members"][1]["config"] == cohorts[0].runs[1][1].to_dict() and "config" not in payload
    assert grid.info["runs"] == 6 and grid.info["trials"] == 4 and len(grid.configs) == 6
    assert len(plan(small(variants=variants, seeds=2), preset="smoke", cohort="off").trials) == 6


def test_the_runner_and_the_storage_are_checked_before_ray():
    config = plan(small(seeds=1), preset="smoke").configs[0]
    assert pick_runner(config, "auto") == "direct"
    with pytest.raises(ValueError, match="unknown runner 'fast'"):
        pick_runner(config, "fast")
    on_store = plan(small(seeds=1), preset="smoke", storage="s3://bucket/x?region=eu-west-1")  # read nothing yet
    assert on_store.store.uri == "s3://bucket/x/small?region=eu-west-1" and on_store.store._fs is None
    assert on_store.folder.name == "small" and on_store.folder.parent.name == "driver"  # its driver's local mirror
    with pytest.raises(ValueError, match="--cohort 'on'"):
        plan(small(seeds=1), preset="smoke", cohort="on")


def test_a_search_dimension_is_described_the_same_in_every_process():
    code = ("from ray import tune; from liftplace.study import describe_domain as d; "
            "print(d(tune.loguniform(1e-4, 3e-3)), d(tune.choice([4, 16])), d(tune.qrandint(1, 10, 2)), sep='|')")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1 and "0x" not in runs.pop()
    from ray import tune

    assert describe_domain(tune.choice([4, 16])) == "choice([4, 16])"
    assert describe_domain(tune.loguniform(1e-4, 3e-3)).startswith("Float(0.0001, 0.003, LogUniform")


def test_the_resume_command_is_the_same_command_without_a_second_addition(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["studies/ablate_k.py"])
    assert resume_command(["--seeds", "3", "--add-seeds", "2", "--set", "train.lr=1e-3"]) == \
        "python studies/ablate_k.py --seeds 3 --set train.lr=1e-3 --resume"
    assert resume_command(["--resume", "--add-seeds=2"]) == "python studies/ablate_k.py --resume"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/liftplace-study"])
    assert resume_command(["--set", "data.spec=folder:my images"]) == \
        "python '<study script>' --set 'data.spec=folder:my images' --resume"

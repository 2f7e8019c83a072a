"""Analysis: statistics against hand computations, results loading, clear errors on bad folders."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

import stability  # noqa: E402

from liftplace.results import NotAStudy, load_study, summarize  # noqa: E402


def fixed_summary():
    return pd.DataFrame({
        "variant": ["kd"] * 4 + ["place"] * 4 + ["lift"] * 2,
        "final_fid": [30.0, 34.0, 32.0, 36.0, 20.0, 22.0, 21.0, np.nan, 25.0, 27.0],
        "diverged": [False] * 7 + [True] + [False] * 2,
    })


def exact_mann_whitney_p(a, b):
    """Two-sided exact p by enumerating every way to split the pooled values."""
    pooled = list(a) + list(b)
    u_obs = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    center = len(a) * len(b) / 2
    count = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        aa = [pooled[i] for i in idx]
        bb = [pooled[i] for i in range(len(pooled)) if i not in idx]
        u = sum((x > y) + 0.5 * (x == y) for x in aa for y in bb)
        total += 1
        count += abs(u - center) >= abs(u_obs - center)
    return count / total


def test_statistics_match_hand_computation():
    stats = stability.statistics(fixed_summary()).set_index("method")
    kd, place = stats.loc["kd"], stats.loc["place"]
    assert kd["fid_mean"] == pytest.approx(33.0)
    assert kd["fid_std"] == pytest.approx(np.sqrt(((30 - 33) ** 2 + 1 + 1 + 9) / 3))  # sample std
    assert place["runs"] == 4 and place["diverged"] == 1 and place["fid_mean"] == pytest.approx(21.0)
    assert place["p_vs_kd"] == pytest.approx(exact_mann_whitney_p([20, 22, 21], [30, 34, 32, 36]))
    assert np.isnan(kd["p_vs_kd"])
    # the bootstrap interval of the mean lies inside the data's range and around the mean
    assert 30 <= kd["ci95_low"] < 33 < kd["ci95_high"] <= 36


def test_bootstrap_interval_is_deterministic_and_degenerate_for_one_value():
    assert stability.bootstrap_ci([1.0, 2.0, 3.0]) == stability.bootstrap_ci([1.0, 2.0, 3.0])
    assert all(np.isnan(stability.bootstrap_ci([5.0])))


def write_trial(folder, name, rows, config):
    trial = folder / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"run": {"variant": name, "seed": 0, "config": config}}))
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_study_flattens_config_and_keeps_one_row_per_step(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"name": "hand"}))
    config = {"objective": {"name": "kd"}, "train": {"seed": 0}}
    rows = [{"step": 5, "loss": 1.0, "fid": None, "diverged": False}, {"step": 10, "loss": 0.9, "diverged": False},
            {"step": 10, "loss": 0.8, "fid": 42.0, "diverged": False}]  # step 10 re-reported after a resume
    write_trial(tmp_path, "kd", rows, config)
    df = load_study(tmp_path)
    assert list(df["step"]) == [5, 10] and df["loss"].iloc[-1] == 0.8
    assert (df["config/objective/name"] == "kd").all() and df["study"].iloc[0] == "hand"
    summary = summarize(df)
    assert summary["final_fid"].iloc[0] == 42.0 and summary["steps"].iloc[0] == 10


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(NotAStudy, match="is not a directory"):
        load_study(tmp_path / "missing")
    with pytest.raises(NotAStudy, match="no study.json"):
        load_study(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(NotAStudy, match="no trial folders"):
        load_study(tmp_path)
    write_trial(tmp_path, "t1", [], {"objective": {"name": "kd"}})
    with pytest.raises(NotAStudy, match="t1 has no reported rows.*--resume"):
        load_study(tmp_path)
    (tmp_path / "t1" / "result.json").write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(NotAStudy, match="line 2 is not JSON"):
        load_study(tmp_path)
    (tmp_path / "t1" / "result.json").write_text('{"step": 1, "diverged": false}\n{"step": 2, "los')  # cut short by a crash
    assert list(load_study(tmp_path)["step"]) == [1]


def test_analysis_cli_prints_one_line_on_a_bad_folder(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "analysis" / "make_all.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no study.json" in proc.stderr


def test_a_restored_trials_second_folder_joins_the_first(tmp_path):
    # Ray gives a restored trial a new folder "<old>_<4 hex>" when the old one exists.
    (tmp_path / "study.json").write_text(json.dumps({"name": "twins"}))
    config = {"objective": {"name": "kd"}, "train": {"seed": 0}}
    write_trial(tmp_path, "kd-seed0-abc_00001", [{"step": 5, "diverged": False}], config)
    write_trial(tmp_path, "kd-seed0-abc_00001_7ca7", [{"step": 10, "fid": 3.0, "diverged": False}], config)
    write_trial(tmp_path, "place-seed0-abc_00002", [], config)  # started, then the driver died ...
    write_trial(tmp_path, "place-seed0-abc_00002_1f2e", [{"step": 5, "diverged": False}, {"step": 10, "fid": 2.0,
                                                          "diverged": False}], config)  # ... and it ran here
    summary = summarize(load_study(tmp_path))
    assert len(summary) == 2 and list(summary["steps"]) == [10, 10]
    assert sorted(summary["final_fid"]) == [2.0, 3.0]

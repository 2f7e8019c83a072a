"""Growing a study: --add-seeds keeps every earlier file and adds up to what one run with all
seeds gives; --seeds auto looks, grows and stops; plan-seeds and export read a finished study."""

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from liftplace.cli import export_study, main, plan_seeds_text, resume_command, study_main
from liftplace.results import DRIVER_FILE, STUDY_FILE, load_study, study_status, summarize
from liftplace.study import Study

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))
FAST = ["--preset", "smoke", "--set", "eval.num_images=32", "--set", "eval.sampler_steps=2",
        "--set", "train.steps=10", "--cohort", "off"]
STUDY = Study(name="grown", variants={"kd": {"objective.name": "kd"}, "place": {"objective.name": "place"}}, seeds=2)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's bytes (as a hash) but the driver's own: study.json records additions, the
    heartbeat says what the driver does, analysis/ is the report rebuilt."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and p.name not in (STUDY_FILE, DRIVER_FILE) and "analysis" not in p.relative_to(folder).parts}


def finals(folder: Path) -> pd.Series:
    summary = summarize(load_study(folder))
    return summary.set_index(["variant", "seed"])["final_fid"].sort_index()


def test_add_seeds_keeps_every_earlier_file_and_equals_one_run_with_all_seeds(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    grown = tmp_path / "grown"
    study_main(STUDY, [*FAST, "--seeds", "1", "--storage", str(grown), "--address", address], report=False)
    before = snapshot(grown / "grown")
    with pytest.raises(SystemExit) as refused:  # another --seeds is another study; the error says how to grow it
        study_main(STUDY, [*FAST, "--seeds", "2", "--storage", str(grown), "--address", address, "--resume"], report=False)
    assert refused.value.code == 2
    folder = study_main(STUDY, [*FAST, "--seeds", "1", "--storage", str(grown), "--address", address, "--add-seeds", "1"])
    after = snapshot(folder)
    assert {k: after.get(k) for k in before} == before  # byte for byte
    assert any(k.startswith("seeds-1-1/") for k in after)
    info = json.loads((folder / STUDY_FILE).read_text())
    assert info["seeds"] == 1 and [a["seeds"] for a in info["additions"]] == [[1]]
    assert [h["action"] for h in info["history"]] == ["start", "resume, add 1 seed"]
    assert info["history"][0]["provenance"]["versions"]["torch"] and "cpu" in info["history"][0]["provenance"]
    table, driver = study_status(folder)
    assert driver == "finished" and sorted(zip(table["variant"], table["seed"])) == [("kd", 0), ("kd", 1), ("place", 0), ("place", 1)]
    assert (table["state"] == "done").all()
    report = (folder / "analysis" / "REPORT.md").read_text()
    assert "2 seeds per variant (1 planned, 1 added in 1 addition)" in report and "**Provenance.** start" in report
    # one run with both seeds from the start: the same runs, the same numbers
    whole = study_main(STUDY, [*FAST, "--seeds", "2", "--storage", str(tmp_path / "whole"), "--address", address],
                       report=False)
    pd.testing.assert_series_equal(finals(folder), finals(whole))
    # plan-seeds and export read the grown study as any other
    assert "seeds per variant for power 0.8" in plan_seeds_text(str(folder))
    rows, runs = export_study(str(folder), "parquet")
    assert len(pd.read_parquet(runs)) == 4 and len(pd.read_parquet(rows)) == len(load_study(folder))


def test_seeds_auto_looks_grows_and_says_why_it_stopped(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    folder = study_main(STUDY, [*FAST, "--seeds", "auto", "--max-seeds", "4", "--round", "1", "--storage", str(tmp_path),
                                "--address", address])
    info = json.loads((folder / STUDY_FILE).read_text())
    looks = info["looks"]
    assert info["seeds"] == 3 and info["sequential"]["max_seeds"] == 4 and looks[0]["seeds"] == 3
    assert all(look["stop"] is None for look in looks[:-1]) and looks[-1]["stop"]
    assert len(looks) == 1 + len(info.get("additions", []))
    assert sum(look["level"] for look in looks) <= 0.05 + 1e-12  # alpha spent over the looks
    seeds = 3 + sum(len(a["seeds"]) for a in info.get("additions", []))
    assert seeds == looks[-1]["seeds"] and seeds <= 4
    report = (folder / "analysis" / "REPORT.md").read_text()
    assert "## Seeds: grown until decided" in report and f"Stopped: {looks[-1]['stop']}." in report


def test_seed_options_are_checked_before_anything_runs(tmp_path, capsys):
    for argv, message in ((["--seeds", "many"], "--seeds must be a number or auto"),
                          (["--add-seeds", "-1"], "--add-seeds must be >= 1"),
                          (["--seeds", "auto", "--add-seeds", "2"], "--seeds auto grows the study itself"),
                          (["--seeds", "auto", "--max-seeds", "2"], "--max-seeds 2: must be at least"),
                          (["--margin", "0"], "--margin must be a fraction"),
                          (["--add-seeds", "2"], "--add-seeds: no study to grow"),
                          (["--seeds", "100000"], "at most 1000 seeds per variant"),
                          (["--set", "train.seed=7"], "--set train.seed: a study's runs take its seeds")):
        with pytest.raises(SystemExit) as stop:
            study_main(STUDY, [*FAST, "--storage", str(tmp_path), *argv], report=False)
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    assert not any(tmp_path.iterdir())  # nothing written
    # an interrupted addition is resumed, not added again
    assert resume_command(["--preset", "smoke", "--add-seeds", "2", "--storage", "x"]).endswith(
        "--preset smoke --storage x --resume")


def test_plan_seeds_and_export_refuse_bad_input(tmp_path, capsys):
    assert main(["plan-seeds", str(tmp_path)]) == 2 and "not a study" in capsys.readouterr().err
    assert main(["plan-seeds", str(tmp_path), "--power", "1.5"]) == 2 and "--power must be in (0, 1)" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2 and "not a study" in capsys.readouterr().err


def test_a_second_driver_on_a_running_study_is_refused_before_it_writes(ray_session, tmp_path):
    """Two drivers on one study once interleaved their rows in result.json and lost the first's."""
    import signal
    import subprocess
    import time

    address = ray_session.get_runtime_context().gcs_address
    args = [*FAST, "--seeds", "1", "--storage", str(tmp_path), "--address", address, "--set", "train.steps=400"]
    script = ("import sys; from liftplace.cli import study_main; from liftplace.study import Study; "
              "study_main(Study(name='grown', variants={'kd': {'objective.name': 'kd'}}, seeds=2), sys.argv[1:], report=False)")
    first = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        for line in first.stdout:  # its trial has started
            if line.startswith("start  "):
                break
        folder = tmp_path / "grown"
        second = subprocess.run([sys.executable, "-c", script, *args, "--resume"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert "is being run by another driver (pid " in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert json.loads((folder / STUDY_FILE).read_text())["history"][-1]["action"] == "start"  # nothing recorded
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=180)
    # the first driver gone, its lock is free: --resume continues the study
    done = subprocess.run([sys.executable, "-c", script, *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (study_status(tmp_path / "grown")[0]["state"] == "done").all()


def test_a_dead_address_is_refused_in_seconds_before_anything_is_written(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.time()
    with pytest.raises(SystemExit) as stop:
        study_main(STUDY, [*FAST, "--storage", str(tmp_path), "--address", f"127.0.0.1:{port}"], report=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and f"nothing answers at 127.0.0.1:{port}" in err[0]
    assert time.time() - start < 30 and not any(tmp_path.iterdir())

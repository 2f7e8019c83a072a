"""Every study at --preset smoke: one trial per variant x seed, a loadable experiment, its
figure; an interrupted study resumed with --resume ends with every trial exactly once."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pandas import testing as pandas_testing

from liftplace.results import load_study, study_status, summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))
FAST = ["--set", "eval.num_images=32", "--set", "eval.sampler_steps=2", "--set", "train.steps=10"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"study_{name}", ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,figure", [
    ("ablate_k", "fid_vs_k.png"), ("ablate_weighting", "weighting.png"), ("compression", "compression.md"),
    ("stability", "stability.png"), ("teacher_scale", "teacher_scale.png"), ("regime", "regime_map.png"),
])
def test_each_study_runs_at_smoke(ray_session, tmp_path, name, figure, capfd):
    module = load_script(name)
    make = importlib.import_module("make_all").make
    # The study builds its report itself, by running analysis/make_all.py on its folder.
    folder = module.study_main(module.STUDY, ["--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path), *FAST])
    console = capfd.readouterr().out.splitlines()
    # A concise console: no Ray Tune tables or configuration box; a line per trial start and end.
    assert not [line for line in console if "Trial status" in line or "Configuration for experiment" in line]
    trials = json.loads((folder / "study.json").read_text())["trials"]
    assert sum(line.startswith("start  ") for line in console) == trials
    assert sum(line.startswith("done   ") for line in console) == trials
    assert len(console) < 20 + 2 * trials, console
    summary = summarize(load_study(folder))
    assert sorted(summary["variant"]) == sorted(module.STUDY.variants)
    assert not summary["diverged"].any() and (summary["final_fid"] > 0).all()
    out = folder / "analysis"
    assert (out / figure).stat().st_size > 0 and (out / "REPORT.md").stat().st_size > 0
    if name in ("teacher_scale", "compression"):  # each variant against the kd of its own teacher / ratio
        headline = importlib.import_module("headline")
        pairs = headline.references(summary)
        assert pairs and all(ref == "kd " + variant.split(" ", 1)[1] for variant, ref in pairs.items()), pairs
    if name == "ablate_k":  # a paper study copied off its cluster: figures from the rows, the rest said
        copy = tmp_path / "copied" / name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint_*", "checkpoints", "analysis"))
        info = json.loads((copy / "study.json").read_text())
        (copy / "study.json").write_text(json.dumps({**info, "preset": "paper"}))
        make(copy)
        report = (copy / "analysis" / "REPORT.md").read_text()
        assert "## Not built" in report and (copy / "analysis" / "fid_vs_k.png").is_file()
        assert all(f"`{s}` skipped" in report for s in ("linear_correction", "error_maps", "samples"))
    if name == "ablate_k":  # live curves: one TensorBoard run per variant and seed, readable names
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert sorted(p.name for p in (folder / "tensorboard").iterdir()) == sorted(
            f"{v.replace(' ', '-').replace('=', '-')}-seed0" for v in module.STUDY.variants)
        events = EventAccumulator(str(folder / "tensorboard" / "place-K-16-seed0")).Reload()
        # smoke: a row every 5 steps, and one at each evaluation (evals=3: every 10 // 4 = 2 steps)
        assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 5, 6, 8, 10]
        assert [e.step for e in events.Scalars("eval/fid")] == [2, 4, 6, 8, 10]  # evals=3: every 10 // 4 steps
        fid = summarize(load_study(folder)).set_index("variant").loc["place K=16", "final_fid"]
        assert events.Scalars("eval/fid")[-1].value == pytest.approx(fid, rel=1e-6)
    if name == "stability":  # FID along training: evaluations before the end
        evals = load_study(folder).dropna(subset=["fid"])
        assert evals.groupby("run").size().min() >= 3


def assert_run_folders_hold_the_trials_rows(folder, df):
    """A study's run folders (written by its driver, across a kill and a resume) give the rows
    that Tune's trial folders give, value for value."""
    from liftplace import results

    assert results.read_study_info(folder)["layout"] == results.RUNS and len(results.run_folders(folder)) == df["run"].nunique()
    trials = results._load_trials(folder, results.read_study_info(folder), allow_unfinished=False)
    assert sorted(df.columns) == sorted(trials.columns)
    columns = sorted(set(df.columns) - {"final_checkpoint"})
    pandas_testing.assert_frame_equal(df[columns], trials[columns])
    # Each run's last checkpoint is its own folder's copy of the one Ray keeps: the same files.
    for own, ray in set(zip(df["final_checkpoint"], trials["final_checkpoint"])):
        assert Path(own).parent.name == results.CHECKPOINTS and Path(own).parents[2] == folder / results.RUNS
        names = sorted(p.name for p in Path(ray).iterdir() if p.is_file())
        assert "student.safetensors" in names and names == sorted(p.name for p in Path(own).iterdir() if p.is_file())
        assert all((Path(own) / n).stat().st_ino == (Path(ray) / n).stat().st_ino for n in names)


def test_an_interrupted_study_resumes_with_every_trial_once(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    # One trial per variant (--cohort off, as before cohorts), long enough to kill the driver
    # between trials.
    # 120 steps: ablate_k has 4 variants, and with 40 the last two trials could end before the
    # kill once Tune's state file showed two finished.
    slower = [*FAST, "--set", "train.steps=120", "--cohort", "off"]
    cmd = [sys.executable, str(ROOT / "studies" / "ablate_k.py"), "--preset", "smoke", "--seeds", "1",
           "--storage", str(tmp_path), "--address", address, "--max-concurrent", "1", *slower]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "ablate_k"
    deadline = time.time() + 600  # under load (load average 5+) 300 s was seen to pass first

    def terminated():
        """Trials Tune's own experiment state records as finished (what a restore keeps)."""
        states = [json.loads(p.read_text()) for p in folder.glob("experiment_state-*.json")]
        return [json.loads(t[0])["trial_id"] for s in states for t in s["trial_data"]
                if json.loads(t[0]).get("status") == "TERMINATED"]

    while len(terminated()) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    running, driver_then = study_status(folder)  # `liftplace status` on a running study
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = terminated()
    variants = len(load_script("ablate_k").STUDY.variants)
    assert 2 <= len(done) < variants, f"the driver should die mid-study ({len(done)} of {variants} trials done)"
    assert driver_then == "running" and len(running) == variants
    assert set(running["state"]) <= {"done", "running", "pending"} and (running["state"] == "done").sum() >= 2
    stopped, driver_now = study_status(folder)  # ... and once its driver was killed
    assert driver_now == "interrupted"
    assert (stopped["state"] == "done").sum() >= len(done) and "running" not in set(stopped["state"])
    assert set(stopped["state"]) <= {"done", "interrupted", "pending"}
    before = {p.parent.name: p.read_text() for p in folder.glob("*/result.json") if p.parent.name.endswith(tuple(done))}
    module = load_script("ablate_k")
    module.study_main(module.STUDY, ["--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path), "--resume",
                                     *slower], report=False)
    df = load_study(folder)
    summary = summarize(df)
    assert sorted(summary["variant"]) == sorted(module.STUDY.variants)  # every trial, once
    assert_run_folders_hold_the_trials_rows(folder, df)
    assert (summary["steps"] == 120).all()
    for name, text in before.items():  # finished trials were not rerun
        assert (folder / name / "result.json").read_text() == text
    finished, driver_end = study_status(folder)
    assert driver_end == "finished" and (finished["state"] == "done").all()
    # Tune's restore copies the folder's top-level .json and .pkl files and syncs them back over
    # it while the resumed study runs: a heartbeat of such a name was reset to the restore's.
    from liftplace.results import DRIVER_FILE

    assert not DRIVER_FILE.endswith((".json", ".pkl")) and (folder / DRIVER_FILE).is_file()
    copy = tmp_path / "elsewhere" / "ablate_k"  # a copy reads the same
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoint_*"))
    assert study_status(copy)[0].equals(finished)
    text = subprocess.run([sys.executable, "-m", "liftplace.cli", "status", str(copy)], capture_output=True, text=True)
    assert text.returncode == 0 and f"driver finished; {variants} runs: {variants} done" in text.stdout


def test_the_hyperparameter_search_runs_at_smoke(ray_session, tmp_path):
    module = load_script("tune_hparams")
    folder = module.study_main(module.STUDY, ["--preset", "smoke", "--samples", "3", "--storage", str(tmp_path),
                                              *FAST, "--set", "train.steps=12"])
    assert (folder / "analysis" / "REPORT.md").stat().st_size > 0 and (folder / "analysis" / "error_maps.png").is_file()
    protocol = (folder / "analysis" / "REPORT.md").read_text()
    assert "3 runs (0 diverged), each a trial of an Optuna search." in protocol and "cohort trials" not in protocol
    df = load_study(folder)
    summary = summarize(df)
    assert len(summary) == 3 and summary["final_fid"].notna().all()
    # every trial ran the config Optuna chose, within the declared space
    assert set(summary["config/objective/group_size"]) <= {4, 16, 64}
    assert ((summary["config/train/lr"] >= 1e-4) & (summary["config/train/lr"] <= 3e-3)).all()
    # ASHA stops trials only at evaluations: each trial's last row carries a FID
    assert (df.groupby("run").tail(1)["fid"].notna()).all()
    # --resume compares study.json with the plan a new process makes: the search space must
    # read the same there (it once held each Ray domain's memory address, so no search resumed)
    code = ("import dataclasses, json, sys; sys.path.insert(0, 'studies'); import tune_hparams as m; "
            "from liftplace.study import plan; study = dataclasses.replace(m.STUDY, num_samples=3); "
            f"print(json.dumps(plan(study, preset='smoke', overrides={FAST[1::2] + ['train.steps=12']!r}, "
            f"storage={str(tmp_path)!r}).info))")
    fresh = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                      check=True).stdout)
    saved = json.loads((folder / "study.json").read_text())
    recorded = saved.pop("history")  # what the driver records as it goes (results.RECORDS), beside the plan
    assert [h["action"] for h in recorded] == ["start"] and saved.pop("layout") == "runs"
    assert fresh == saved and saved["space"]["objective.group_size"] == "choice([4, 16, 64])"
    assert saved["space"]["train.lr"] == "Float(0.0001, 0.003, LogUniform)"


def test_a_search_killed_mid_trial_resumes_from_its_checkpoint(ray_session, tmp_path):
    """A search resumed in another process: its study.json matches (the space once read as
    memory addresses) and a trial restored from a checkpoint may report rows without FID (Tune's
    strict metric check once failed the resumed study on its first such row)."""
    address = ray_session.get_runtime_context().gcs_address
    args = ["--preset", "smoke", "--samples", "2", "--max-concurrent", "1", "--storage", str(tmp_path),
            *FAST, "--set", "train.steps=200", "--set", "train.eval_every=100"]
    driver = subprocess.Popen([sys.executable, str(ROOT / "studies" / "tune_hparams.py"), *args, "--address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "tune_hparams"
    deadline = time.time() + 600

    def steps():
        rows = [json.loads(line) for p in folder.glob("*/result.json") for line in p.read_text().splitlines() if line]
        return max((r.get("step", 0) for r in rows), default=0)

    # The event to kill on: the first trial's first checkpoint folder (every 10 smoke steps).
    while not any(folder.glob("*/checkpoint_*")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert any(folder.glob("*/checkpoint_*")) and steps() < 200, \
        "the driver should die inside the first trial, after its first checkpoint"
    module = load_script("tune_hparams")
    module.study_main(module.STUDY, [*args, "--resume"], report=False)
    df = load_study(folder)
    summary = summarize(df)
    assert len(summary) == 2 and summary["final_fid"].notna().all()
    assert_run_folders_hold_the_trials_rows(folder, df)
    assert study_status(folder)[1] == "finished"


def test_a_study_json_from_before_stable_space_names_is_upgraded_on_resume(tmp_path):
    from liftplace.results import claim_study

    info = {"name": "s", "space": {"train.lr": "Float(0.0001, 0.003, LogUniform)",
                                   "objective.coarse": "choice(['l1', 'l2'])"}, "trials": 3}
    old = {**info, "space": {"train.lr": "<ray.tune.search.sample.Float object at 0x7f59c8058550>",
                             "objective.coarse": "<ray.tune.search.sample.Categorical object at 0x7f5ab4916910>"}}
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(old))
    # another kind of domain, or any other field changed, is still a different study
    for other in ({**old, "trials": 4},
                  {**old, "space": {**old["space"], "train.lr": "<ray.tune.search.sample.Integer object at 0x1>"}}):
        (folder / "study.json").write_text(json.dumps(other))
        with pytest.raises(FileExistsError, match="different study"):
            claim_study(folder, info, resume=True)
    (folder / "study.json").write_text(json.dumps(old))
    claim_study(folder, info, resume=True)
    assert json.loads((folder / "study.json").read_text()) == info  # rewritten in the stable form
    with pytest.raises(FileExistsError, match="different study"):
        claim_study(folder, {**info, "space": {**info["space"], "train.lr": "Float(0.0001, 0.01, LogUniform)"}},
                    resume=True)


def test_a_study_whose_docstring_was_edited_resumes_and_any_other_change_is_refused(tmp_path):
    from liftplace.results import claim_study

    info = {"name": "s", "description": "Cost: not measured yet.", "seeds": 2, "trials": 2}
    folder = tmp_path / "s"
    claim_study(folder, info, resume=False)
    measured = {**info, "description": "Cost: 2 h 10 min, measured."}
    with pytest.raises(FileExistsError, match="already holds this study"):
        claim_study(folder, measured, resume=False)  # a docstring edit is still the same study
    claim_study(folder, measured, resume=True)
    assert json.loads((folder / "study.json").read_text()) == {**measured, "layout": "runs"}  # a record: kept
    with pytest.raises(FileExistsError, match="different study"):
        claim_study(folder, {**measured, "seeds": 3}, resume=True)
    assert json.loads((folder / "study.json").read_text()) == {**measured, "layout": "runs"}


@pytest.mark.parametrize("phase,sig,status", [("study checks", signal.SIGINT, 130),
                                               ("study claimed", signal.SIGTERM, 143)])
def test_a_stop_before_the_trials_ends_a_study_with_one_line(ray_session, tmp_path, pause_point, phase, sig, status):
    """Ctrl-C during the checks: nothing written, one line; SIGTERM once study.json is written
    (before Ray and the trials): one line with the resume command."""
    address = ray_session.get_runtime_context().gcs_address
    args = ["--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path), "--address", address, *FAST]
    armed = pause_point(phase)
    driver = subprocess.Popen([sys.executable, str(ROOT / "studies" / "ablate_k.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not Path(f"{armed}.paused").exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert Path(f"{armed}.paused").exists(), driver.communicate()
    driver.send_signal(sig)
    try:
        _, err = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise
    lines = err.strip().splitlines()
    assert driver.returncode == status and len(lines) == 1, err
    folder = tmp_path / "ablate_k"
    if phase == "study checks":
        assert lines[0] == f"ablate_k.py: interrupted before the study started; nothing was written to {folder}"
        assert not folder.exists() or not any(folder.iterdir())
    else:
        assert lines[0].startswith("ablate_k.py: interrupted before its trials started; continue it with: python ")
        assert lines[0].endswith(" --resume") and (folder / "study.json").is_file()


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_a_study_with_one_line_and_the_resume_command(ray_session, tmp_path, sig, status):
    address = ray_session.get_runtime_context().gcs_address
    args = ["--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path), "--address", address,
            "--max-concurrent", "1", "--cohort", "off", *FAST, "--set", "train.steps=200"]
    driver = subprocess.Popen([sys.executable, str(ROOT / "studies" / "ablate_k.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in driver.stdout:  # the first trial has started: interrupt it mid-run
        if line.startswith("start  "):
            break
    time.sleep(3)
    driver.send_signal(sig)
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == status, err
    lines = err.strip().splitlines()
    trials = len(load_script("ablate_k").STUDY.variants)  # --cohort off: one trial per variant
    assert len(lines) == 1 and f"interrupted: 0 of {trials} trials finished; continue it with: python " in lines[0], err
    assert lines[0].endswith(" --resume") and "ablate_k.py --preset smoke" in lines[0]
    folder = tmp_path / "ablate_k"
    assert not (folder / "analysis").exists()  # no report on a partial study
    table, driver_state = study_status(folder)
    assert driver_state == "interrupted" and set(table["state"]) <= {"interrupted", "pending"}

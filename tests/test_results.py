"""The results schema's readers and writers (liftplace/results.py), in-process: study.json refuses
another study and keeps what drivers recorded, a driver's heartbeat tells running from gone, and
names and checkpoints are read from rows. (metrics.jsonl's cut-short and re-reported rows, and
study.json under failed writes: tests/test_faults.py.)"""

import json
import os
import shutil
import socket
import time

import pytest
from pandas import testing as pandas_testing

from liftplace import results


def test_study_json_refuses_another_study_and_keeps_what_drivers_recorded(tmp_path):
    folder = tmp_path / "s"
    info = {"name": "s", "description": "v1", "seeds": 2, "variants": {"kd": {}}, "trials": 2, "runs": 2}
    with pytest.raises(FileNotFoundError, match="no study to resume"):
        results.claim_study(folder, info, resume=True)
    results.claim_study(folder, info, resume=False)
    results.record(folder, "history", {"what": "ran"})
    with pytest.raises(FileExistsError, match="already holds this study: pass --resume"):
        results.claim_study(folder, info, resume=False)
    with pytest.raises(FileExistsError, match="holds this study with 2 seeds.*--add-seeds"):
        results.claim_study(folder, {**info, "seeds": 3, "trials": 3, "runs": 3}, resume=True)
    with pytest.raises(FileExistsError, match="holds a different study"):
        results.claim_study(folder, {**info, "variants": {"place": {}}}, resume=True)
    results.claim_study(folder, {**info, "description": "v2"}, resume=True)  # prose may change
    saved = json.loads((folder / results.STUDY_FILE).read_text())
    assert saved["description"] == "v2" and saved["history"] == [{"what": "ran"}]
    with pytest.raises(ValueError, match="not 'notes'"):
        results.record(folder, "notes", "x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty and holds no study"):
        results.claim_study(tmp_path / "other", info, resume=False)


def test_seeds_of_a_grown_study():
    info = {"seeds": 3, "additions": [{"seeds": [3, 4]}, {"seeds": [5]}]}
    assert results.study_seeds(info) == [0, 1, 2, 3, 4, 5]


def test_the_heartbeat_tells_a_running_driver_from_a_gone_one(tmp_path):
    assert results.driver_state(tmp_path) == "unknown"  # a study from before heartbeats
    beat = {"host": socket.gethostname(), "pid": os.getpid(), "updated": 1000.0, "state": "finished"}
    (tmp_path / results.LEGACY_DRIVER_FILE).write_text(json.dumps(beat))
    assert results.driver_state(tmp_path) == "finished"  # a study from before the rename
    results.write_heartbeat(tmp_path, "running")  # this process: alive, fresh
    assert results.driver_state(tmp_path) == "running"
    written = json.loads((tmp_path / results.DRIVER_FILE).read_text())
    assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
    updated = written["updated"]
    assert results.driver_state(tmp_path, now=updated + results.STALE_S + 1) == "interrupted"  # no beat for too long
    gone = {**beat, "state": "running", "pid": 2**22 + 12345, "updated": updated}  # above Linux's pid_max
    (tmp_path / results.DRIVER_FILE).write_text(json.dumps(gone))
    assert results.driver_state(tmp_path, now=updated) == "interrupted"  # on this host, its process is gone
    (tmp_path / results.DRIVER_FILE).write_text(json.dumps({**gone, "host": "elsewhere"}))
    assert results.driver_state(tmp_path, now=updated) == "running"  # another host's process: only its age tells
    results.write_heartbeat(tmp_path, "finished")
    assert results.driver_state(tmp_path, now=time.time() + 10 * results.STALE_S) == "finished"


def test_names_and_checkpoints_read_from_rows(tmp_path):
    assert results.run_label("place K=4 (w/ warmup)", 2) == "place-K-4--w--warmup-seed2"
    assert results.run_label("kd+feat", 0) == "kd+feat-seed0"
    rows = [{"step": 10, "checkpoint_dir_name": "checkpoint_000000"}, {"step": 20}]
    assert results.last_checkpoint(rows, tmp_path) == str(tmp_path / "checkpoint_000000")
    assert results.last_checkpoint(rows) is None
    assert results.last_checkpoint([*rows, {"step": 30, "checkpoint_path": "/x/ckpt"}]) == "/x/ckpt"
    assert dict(results.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3})) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert results.config_columns({"train": {"lr": 0.1}}) == {"config/train/lr": 0.1}
    assert results.read_jsonl(tmp_path / "absent.jsonl") == []


def test_a_run_folder_reads_as_a_study_of_one(tmp_path):
    """A `liftplace distill --out` folder (config.json, metrics.jsonl) is read by the study readers
    as one run: its rows with config columns, its seed as the study's, its state from its rows."""
    from liftplace.config import resolve

    out = tmp_path / "my-run"
    out.mkdir()
    config = resolve("smoke", ["objective.name=place", "train.seed=7", "train.steps=20"], check_paths=False)
    config.save(out / "config.json")
    nan = float("nan")
    rows = [{"step": 5, "loss": 1.0, "fid": nan}, {"step": 10, "loss": 0.9, "fid": nan, "checkpoint_path": "/c/10"},
            {"step": 10, "loss": 0.8, "fid": nan, "checkpoint_path": "/c/10b"}]  # a restart re-reported step 10
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.is_run_folder(out) and not results.is_run_folder(tmp_path)
    info = results.read_study_info(out)
    assert info["name"] == "my-run" and info["variants"] == {"place": {}} and results.study_seeds(info) == [7]
    df = results.load_study(out)
    assert list(df["step"]) == [5, 10] and list(df["loss"]) == [1.0, 0.8]  # the last report of a step
    assert set(df["run"]) == {"my-run"} and set(df["variant"]) == {"place"} and set(df["study"]) == {"my-run"}
    assert (df["config/train/seed"] == 7).all() and (df["config/objective/name"] == "place").all()
    assert set(df["final_checkpoint"]) == {"/c/10b"}
    summary = results.summarize(df)
    assert len(summary) == 1 and summary.loc[0, "seed"] == 7 and summary.loc[0, "steps"] == 10
    table, driver = results.study_status(out)
    assert driver == "unknown" and list(table["state"]) == ["unfinished"] and list(table["step"]) == [10]
    (out / "error.txt").write_text("Traceback ...\n")
    assert list(results.study_status(out)[0]["state"]) == ["errored"]
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "loss": 0.7, "fid": 12.5}) + "\n")
    table, _ = results.study_status(out)
    assert list(table["state"]) == ["done"] and table.loc[0, "fid"] == 12.5
    assert results.finished_runs(out)["final_fid"].tolist() == [12.5]
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(results.NotAStudy, match="has no rows yet"):
        results.load_study(out)
    (out / "config.json").write_text("{}")
    with pytest.raises(results.NotAStudy, match="not a run's config"):
        results.read_study_info(out)


def _fake_study(folder, runs: bool):
    """A study folder as a driver writes it: a cohort trial (kd, place; seed 1) and a search
    trial (kd with a sampled lr), their Tune rows in result.json, and with ``runs`` the run
    folders the driver writes from the same rows (trial_runs, trial_rows, RunFolder)."""
    from liftplace.config import resolve

    base = resolve("smoke", check_paths=False).to_dict()
    place = json.loads(json.dumps(base))
    place["objective"]["name"] = "place"
    info = {"name": "fake", "seeds": 2, "variants": {"kd": {}, "place": {}}, "trials": 2}
    results.claim_study(folder, info, resume=False)
    written = json.loads((folder / results.STUDY_FILE).read_text())
    assert written.pop("layout") == results.RUNS  # a study begun now keeps run folders
    if not runs:  # one begun before them
        (folder / results.STUDY_FILE).write_text(json.dumps(written))
    cohort = {"run": {"variant": "kd+1", "seed": 1, "members": [{"variant": "kd", "config": base},
                                                                  {"variant": "place", "config": place}]}}
    search = {"run": {"variant": "kd", "seed": 0, "config": base}, "search": {"train.lr": 0.003}}
    nan = float("nan")
    tune_rows = {
        "cohort-a": (cohort, [{"step": s, "trial_id": "a", "checkpoint_dir_name": f"checkpoint_{s:06d}",
                               "members": {v: {"step": s, "loss": 1.0 / s + i, "fid": 10.0 * i if s == 20 else nan,
                                               "variant": v, "member": f"m{i}"} for i, v in enumerate(("kd", "place"))}}
                              for s in (10, 20, 20)]),
        "search-b": (search, [{"step": s, "trial_id": "b", "loss": 2.0 / s, "fid": 3.0 if s == 20 else nan,
                               "variant": "kd lr=0.003", "time_this_iter_s": 0.5, "config": {"run": "x"}}
                              for s in (10, 20)]),
    }
    for trial, (params, rows) in tune_rows.items():
        (folder / trial).mkdir()
        (folder / trial / "params.json").write_text(json.dumps(params))
        (folder / trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:  # Ray's checkpoints: a cohort's, one sub-folder per member
            if row.get("checkpoint_dir_name"):
                for member in ("m0", "m1"):
                    (folder / trial / row["checkpoint_dir_name"] / member).mkdir(parents=True, exist_ok=True)
                    (folder / trial / row["checkpoint_dir_name"] / member / "student.safetensors").write_text(
                        f"{member} at {row['step']}")
        if runs:
            writers = {}
            for name, who, config in results.trial_runs(trial, params):
                writers[name] = results.RunFolder(folder / results.RUNS / name)
                writers[name].start(config, who)
            for row in rows:
                for name, run_row in results.trial_rows(trial, params, row):
                    writers[name].append(run_row, results.row_checkpoint(run_row, folder))
    return folder


def test_a_run_folder_keeps_each_checkpoint_whole(tmp_path, monkeypatch):
    """RunFolder.append(row, checkpoint): the checkpoint lands in checkpoints/step-<k>/ before the
    row names it, as hard links, or copies where links fail; a failed keep leaves nothing half
    there; a step kept again replaces the first."""
    ray = tmp_path / "ray" / "checkpoint_000001"
    (ray / "sub").mkdir(parents=True)
    (ray / "state.json").write_text('{"step": 5}')
    (ray / "sub" / "samples.png").write_bytes(b"png")
    from liftplace.config import resolve

    folder = results.RunFolder(tmp_path / "run")
    folder.start(resolve("smoke", check_paths=False).to_dict())
    folder.append({"step": 5, "loss": 1.0, "checkpoint_path": str(ray)}, ray)
    own = tmp_path / "run" / results.CHECKPOINTS / "step-0000005"
    assert (own / "state.json").stat().st_ino == (ray / "state.json").stat().st_ino
    assert (own / "sub" / "samples.png").read_bytes() == b"png"
    assert results.load_study(tmp_path / "run")["final_checkpoint"].tolist() == [str(own)]

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(results.os, "link", no_links)
    (ray / "state.json").write_text('{"step": 5, "again": true}')  # a resumed run re-reached step 5
    folder.append({"step": 5, "loss": 0.9, "checkpoint_path": str(ray)}, ray)
    assert (own / "state.json").read_text() == '{"step": 5, "again": true}'
    assert (own / "state.json").stat().st_ino != (ray / "state.json").stat().st_ino  # copied

    def full_disk(src, dst):
        if src.endswith("samples.png"):
            raise OSError(28, "No space left on device")
        shutil.copy2(src, dst)

    monkeypatch.setattr(results, "_link_or_copy", full_disk)
    with pytest.raises(OSError, match="No space left"):
        folder.append({"step": 10, "loss": 0.8, "checkpoint_path": str(ray)}, ray)
    kept = sorted(p.name for p in (tmp_path / "run" / results.CHECKPOINTS).iterdir())
    assert kept == ["step-0000005"]  # no half-kept step 10, no temporary folder
    assert [r["step"] for r in results.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [5]  # nor its row


def test_run_folders_give_the_rows_trial_folders_give(tmp_path):
    """A study's run folders (one per run, a cohort member's too) read into the same frame as
    the Tune trial folders they were written from; status reads them the same way."""
    old = results.load_study(_fake_study(tmp_path / "old", runs=False))
    new = results.load_study(_fake_study(tmp_path / "new", runs=True))
    assert sorted(p.name for p in (tmp_path / "new" / results.RUNS).iterdir()) == ["kd-seed1", "place-seed1", "search-b"]
    assert sorted(new.columns) == sorted(old.columns)
    columns = sorted(set(new.columns) - {"final_checkpoint"})
    pandas_testing.assert_frame_equal(new[columns], old[columns])
    assert list(new["run"]) == ["cohort-a/kd", "cohort-a/kd", "cohort-a/place", "cohort-a/place", "search-b", "search-b"]
    assert new.loc[new["run"] == "search-b", "config/train/lr"].tolist() == [0.003, 0.003]
    # The old study's runs point into Ray's cohort checkpoint; the new one's into their own folders,
    # which hold their own member's files (hard links: the same file, no second copy).
    place, old_place = (df[df["run"] == "cohort-a/place"].iloc[-1] for df in (new, old))
    ray_copy = tmp_path / "old" / "cohort-a" / "checkpoint_000020" / "m1"
    assert old_place["final_checkpoint"] == str(ray_copy)
    own = tmp_path / "new" / results.RUNS / "place-seed1" / results.CHECKPOINTS / "step-0000020"
    assert place["final_checkpoint"] == str(own)
    assert (own / "student.safetensors").read_text() == "m1 at 20"
    ray_new = tmp_path / "new" / "cohort-a" / "checkpoint_000020" / "m1" / "student.safetensors"
    assert (own / "student.safetensors").stat().st_ino == ray_new.stat().st_ino
    kept = tmp_path / "new" / results.RUNS / "kd-seed1" / results.CHECKPOINTS
    assert sorted(p.name for p in kept.iterdir()) == ["step-0000010", "step-0000020"]  # step 20 kept twice: replaced
    assert (kept / "step-0000010" / "student.safetensors").read_text() == "m0 at 10"
    assert not (tmp_path / "new" / results.RUNS / "search-b" / results.CHECKPOINTS).exists()  # its rows name none
    assert place["fid"] == 10.0 and place["trial_id"] == "a"
    old_status, _ = results.study_status(tmp_path / "old")
    new_status, _ = results.study_status(tmp_path / "new")
    assert new_status.equals(old_status) and len(new_status) == 5  # 3 runs, 2 planned runs never started
    (tmp_path / "new" / results.RUNS / "kd-seed1" / results.RUN_METRICS).write_text("")
    with pytest.raises(results.NotAStudy, match="run kd-seed1 has no reported rows"):
        results.load_study(tmp_path / "new")


def test_a_tracker_that_fails_mid_run_is_said_once_and_the_run_folder_goes_on(tmp_path, capsys):
    """A tracker that raises (its server gone) costs the run nothing: one line on stderr, no
    more sends from that run's writer, every row still in metrics.jsonl."""
    from liftplace.config import resolve

    class Flaky:
        kind = "flaky"

        def __init__(self):
            self.sent = []

        def start(self, folder, config, who):
            self.sent.append("start")

        def log(self, folder, row, checkpoint, final):
            if row["step"] == 10:
                raise ConnectionError("server went away\nsecond line")
            self.sent.append(row["step"])

        def end(self, folder, status):
            self.sent.append(status)

    tracker = Flaky()
    folder = results.RunFolder(tmp_path / "run", tracker=tracker)
    folder.start(resolve("smoke", check_paths=False).to_dict())
    for step in (5, 10, 15):
        folder.append({"step": step, "loss": 1.0})
    folder.fail("boom")
    assert tracker.sent == ["start", 5]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracker: flaky failed for run (ConnectionError: server went away second line)")
    assert [r["step"] for r in results.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [5, 10, 15]

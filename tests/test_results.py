"""The results schema's readers and writers (liftplace/results.py), in-process: a crash's cut-short
last line is dropped and damage before it refused, a re-reported step replaces the old one,
study.json refuses another study, and a driver's heartbeat tells running from gone."""

import json
import os
import socket
import time

import pytest

from liftplace import results


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_a_cut_short_last_line_is_dropped_and_a_bad_line_before_it_is_damage(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_lines(path, '{"step": 1}', '{"step": 2}', '{"step": 3, "lo')
    assert results.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    write_lines(path, '{"step": 1}', '{"st', '{"step": 3}')
    with pytest.raises(results.DamagedFile, match="line 2 is not JSON"):
        results.read_jsonl(path)
    assert results.read_jsonl(tmp_path / "absent.jsonl") == []


def test_a_re_reported_step_replaces_the_rows_from_it_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = results.MetricsFile(path)
    for step in (5, 10, 15, 20):
        first.append({"step": step, "loss": float(step)})
    with open(path, "a") as f:
        f.write('{"step": 25, "lo')  # the crash
    resumed = results.MetricsFile(path)  # a new process, resumed from the checkpoint at step 10
    resumed.append({"step": 15, "loss": -15.0})
    resumed.append({"step": 20, "loss": -20.0})
    assert [(r["step"], r["loss"]) for r in results.read_jsonl(path)] == [(5, 5.0), (10, 10.0), (15, -15.0), (20, -20.0)]
    assert path.read_text().endswith("\n") and os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


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
    results.write_heartbeat(tmp_path, "running")
    assert results.driver_state(tmp_path) == "running"
    assert results.driver_state(tmp_path, now=time.time() + results.STALE_S + 1) == "interrupted"
    beat = json.loads((tmp_path / results.DRIVER_FILE).read_text())
    assert beat["pid"] == os.getpid() and beat["host"] == socket.gethostname()
    dead = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000  # no such process
    (tmp_path / results.DRIVER_FILE).write_text(json.dumps({**beat, "pid": dead}))
    assert results.driver_state(tmp_path) == "interrupted"  # killed on this machine
    (tmp_path / results.DRIVER_FILE).write_text(json.dumps({**beat, "pid": dead, "host": "elsewhere"}))
    assert results.driver_state(tmp_path) == "running"  # another host's process: only its age tells
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

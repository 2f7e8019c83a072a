"""The results schema's readers and writers (liftplace/results.py), in-process: study.json refuses
another study and keeps what drivers recorded, a driver's heartbeat tells running from gone, and
names and checkpoints are read from rows. (metrics.jsonl's cut-short and re-reported rows, and
study.json under failed writes: tests/test_faults.py.)"""

import json
import os
import socket
import time

import pytest

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

"""Faults: a Ray Train worker killed mid-run, and writes that fail half way.

A killed worker is restarted by Ray Train (FailureConfig max_failures=1) from the last
checkpoint Ray kept, and reports the steps after it again; metrics.jsonl must still hold one
row per step. A checkpoint or result file whose write fails must leave the previous file whole
and no temporary file that could pass for a result.
"""

import json
import os
import pathlib
import signal
import threading
import time

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from liftplace import checkpoints, files
from liftplace.config import resolve
from liftplace.results import MetricsFile, claim_study, read_metrics
from liftplace.runner.single import run_single


def smoke(teacher, **overrides):
    base = {"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32,
            "eval.sampler_steps": 2, "train.steps": 10, "train.checkpoint_every": 5}
    return resolve("smoke", {**base, **overrides})


# --- a worker process killed mid-run ------------------------------------------------------


def _train_workers(address):
    """Every Ray Train worker actor the cluster has known: {actor_id: ActorState}."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)
    return {a.actor_id: a for a in actors}


def test_a_killed_worker_resumes_from_its_checkpoint_with_one_row_per_step(ray_session, tiny_teacher_dir, tmp_path,
                                                                           pause_point):
    steps = 30
    config = smoke(tiny_teacher_dir, **{"train.steps": steps, "train.checkpoint_every": 5, "train.log_every": 1})
    out = tmp_path / "run"
    # The session's cluster, named: another Ray on the machine would make "auto" ambiguous.
    address = ray_session.get_runtime_context().gcs_address
    before = set(_train_workers(address))
    outcome = {}

    def run():
        try:
            outcome["last"] = run_single(config, out, max_failures=1)
        except BaseException as err:  # reported by the assertions below
            outcome["error"] = err

    # The worker stops right after reporting step 12 (a checkpoint was saved at 10): it is
    # killed there, and steps 11 and 12 are lost and reported again by its replacement.
    armed = pause_point(12)
    paused = pathlib.Path(f"{armed}.paused")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 180
    while thread.is_alive() and not paused.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert paused.exists(), "the worker never reached its pause point"
    victim_pid = int(paused.read_text())
    while read_metrics(out / "metrics.jsonl")[-1]["step"] < 12 and time.time() < deadline:
        time.sleep(0.05)  # the controller writes the row of step 12 a moment after the report
    os.kill(victim_pid, signal.SIGKILL)
    armed.unlink()  # the replacement passes step 12
    checkpoint_step = 10
    thread.join(timeout=max(1.0, deadline - time.time()))
    assert not thread.is_alive(), "the run did not finish after its worker was killed"
    assert "error" not in outcome, f"the run failed after one worker kill: {outcome.get('error')}"

    # One row per step, no gap, no duplicate, ending at the last step with its FID.
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert outcome["last"]["step"] == steps and rows[-1]["fid"] > 0

    # A second worker process replaced the killed one...
    workers = {i: a for i, a in _train_workers(address).items() if i not in before}
    assert len(workers) == 2
    (victim,) = [a for a in workers.values() if a.pid == victim_pid]
    (replacement,) = [a for a in workers.values() if a.pid != victim_pid]
    assert victim.state == "DEAD"
    # ...and resumed from a checkpoint of the first one, not from step 0: the replacement's
    # clock starts again, so the rows' elapsed time drops once, right after the step it resumed
    # from, which must be a step with a checkpoint, not before the first one. (Read from the
    # rows, not the worker's log through Ray's state API, which fails when another Ray runs on
    # the machine: "Agent for node id ... doesn't exist".)
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    drops = [s for s in range(1, steps) if elapsed[s + 1] < elapsed[s]]
    assert len(drops) == 1, elapsed
    resumed = drops[0]
    assert resumed == checkpoint_step and rows[resumed - 1]["checkpoint_path"]


# --- metrics.jsonl -------------------------------------------------------------------------


def test_re_reported_steps_replace_the_lost_attempts_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsFile(path)
    for step in range(1, 8):
        log.append({"step": step, "attempt": 1})
    for step in range(6, 11):  # a restarted worker, resumed from the checkpoint at step 5
        log.append({"step": step, "attempt": 2})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["attempt"] for r in rows] == [1] * 5 + [2] * 5
    # A new process (a restarted controller, or --resume) that resumes from step 5 again.
    again = MetricsFile(path)
    again.append({"step": 6, "attempt": 3})
    assert [(r["step"], r["attempt"]) for r in read_metrics(path)][-2:] == [(5, 1), (6, 3)]
    assert not list(tmp_path.glob(".*"))


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_not_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    MetricsFile(path).append({"step": 3})
    assert path.read_text() == "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")  # damage, not a crash
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metrics(path)


def test_a_failed_metrics_rewrite_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsFile(path)
    for step in (1, 2, 3):
        log.append({"step": step})
    before = path.read_text()
    fail_renames(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        log.append({"step": 2})  # a step that goes back: the file is rewritten
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# --- checkpoints ---------------------------------------------------------------------------


class Parts:
    """The pieces checkpoints.save takes, small, with optimizer state; values depend on seed."""

    def __init__(self, seed):
        torch.manual_seed(seed)
        self.student = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
        self.objective = nn.Linear(2, 1)  # e.g. a learnable weight
        self.ema = EMAModel(self.student.parameters(), decay=0.9)
        self.opt = torch.optim.Adam([*self.student.parameters(), *self.objective.parameters()], lr=1e-2)
        self.gen = torch.Generator().manual_seed(seed)
        loss = self.student(torch.randn(3, 4)).square().mean() + self.objective(torch.randn(3, 2)).mean()
        loss.backward()
        self.opt.step()
        self.ema.step(self.student.parameters())

    def save(self, directory, step):
        checkpoints.save(directory, step, self.student, self.ema, self.opt, self.objective, self.gen, 0, 1)

    def load(self, directory):
        return checkpoints.restore(directory, self.student, self.ema, self.opt, self.objective, self.gen, 0)

    def weights(self):
        return {k: v.clone() for k, v in self.student.state_dict().items()}


def half_write_then_fail(real):
    """A writer that leaves half a file behind and raises, as a full disk would."""

    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        raise OSError(28, "No space left on device (simulated)")

    return write


def fail_renames(monkeypatch):
    """Every rename of a temporary file into place fails."""

    def replace(self, target):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(pathlib.Path, "replace", replace)


def fail_text_writes(monkeypatch):
    def write_text(self, *args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("failing", ["student.safetensors", "optimizer.pt", "rng_rank0.pt", "state.json"])
def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    directory = tmp_path / "checkpoint"
    old = Parts(seed=0)
    old.save(directory, step=5)
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}

    new = Parts(seed=1)
    if failing == "student.safetensors":
        monkeypatch.setattr(checkpoints, "save_file", half_write_then_fail(checkpoints.save_file))
    elif failing == "state.json":
        fail_text_writes(monkeypatch)
    else:  # optimizer.pt, then rng_rank0.pt: both written by torch.save
        real, calls = torch.save, []

        def save(obj, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == (1 if failing == "optimizer.pt" else 2):
                return half_write_then_fail(real)(obj, path, *args, **kwargs)
            return real(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="simulated"):
        new.save(directory, step=10)
    monkeypatch.undo()

    # Every file is the old checkpoint's, byte for byte; no temporary file is left.
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == saved
    assert checkpoints.check(directory) == 5
    restored = Parts(seed=2)
    assert restored.load(directory) == 5
    assert all(torch.equal(restored.weights()[k], v) for k, v in old.weights().items())


def test_temporary_files_left_by_a_hard_crash_are_not_taken_as_a_checkpoint(tmp_path):
    # A SIGKILL mid-write leaves a temporary file; cleanup never ran.
    directory = tmp_path / "checkpoint"
    old = Parts(seed=0)
    old.save(directory, step=5)
    for name in ("student.safetensors", "state.json"):
        files.temp_path(directory / name).write_bytes(b"half a file")
    assert Parts(seed=1).load(directory) == 5 and checkpoints.check(directory) == 5
    # A checkpoint directory holding only debris is not a checkpoint.
    debris = tmp_path / "debris"
    debris.mkdir()
    files.temp_path(debris / "state.json").write_text('{"step": 7}')
    with pytest.raises(FileNotFoundError, match="not a liftplace checkpoint"):
        checkpoints.check(debris)
    with pytest.raises(FileNotFoundError, match="not a liftplace checkpoint"):
        Parts(seed=1).load(debris)


def test_a_truncated_checkpoint_is_refused_by_check_checkpoint(tmp_path):
    directory = tmp_path / "checkpoint"
    Parts(seed=0).save(directory, step=5)
    optimizer = directory / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^corrupt checkpoint {directory}: ") as info:
        checkpoints.check(directory)
    assert "\n" not in str(info.value)


# --- other result files --------------------------------------------------------------------


def test_a_config_write_that_fails_leaves_the_previous_config(tiny_teacher_dir, tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    smoke(tiny_teacher_dir).save(path)
    before = path.read_text()
    fail_renames(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        smoke(tiny_teacher_dir, **{"train.steps": 99}).save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_study_file_write_that_fails_leaves_the_folder_reusable(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    info = {"name": "study", "trials": 2}
    with monkeypatch.context() as m:
        fail_renames(m)
        with pytest.raises(OSError, match="simulated"):
            claim_study(folder, info, resume=False)
    assert list(folder.iterdir()) == []  # no study.json, no temporary file
    claim_study(folder, info, resume=False)  # so the same storage can be used again
    assert json.loads((folder / "study.json").read_text()) == {**info, "layout": "runs"}  # a study begun now keeps run folders
    with pytest.raises(FileExistsError, match="different study"):
        claim_study(folder, {**info, "trials": 3}, resume=True)
    assert json.loads((folder / "study.json").read_text()) == {**info, "layout": "runs"}

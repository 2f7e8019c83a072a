"""Trackers: what a run folder's writer sends to MLflow, read back from a SQLite store."""

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liftplace import results, trackers
from liftplace.config import resolve

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "smoke", "--set", "eval.num_images=32", "--set", "eval.sampler_steps=2", "--set", "train.steps=10"]

mlflow = pytest.importorskip("mlflow")  # the test extra installs it; a bare install runs the rest


def _checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    (path / "samples.png").write_bytes(b"\x89PNG fake grid")
    return path


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_run_folder_logs_one_mlflow_run_that_a_resume_continues(tmp_path):
    """Config as parameters, curves at the run's own steps, the sample grid of each checkpoint,
    final metrics and FINISHED at the last row; a resumed run (a new writer, a new tracker, as
    after a driver restart) goes on in the same tracker run without logging a step twice."""
    config = resolve("smoke", ["train.steps=20", "objective.name=place"], check_paths=False).to_dict()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    who = {"variant": "place K=4", "seed": 3}
    nan = float("nan")
    folder = results.RunFolder(tmp_path / "study" / "runs" / "place-K-4-seed3", tracker=trackers.make_tracker(
        "mlflow", uri, "my-study", tmp_path / "study"))
    folder.start(config, who)
    folder.append({"step": 5, "loss": 1.5, "grad_norm": 2.0, "fid": nan, "diverged": False})
    ckpt = _checkpoint(tmp_path / "ray" / "c10", 10)
    folder.append({"step": 10, "loss": 1.25, "fid": 40.0, "diverged": False}, ckpt)

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("my-study")
    assert experiment is not None and experiment.artifact_location.startswith((tmp_path / "store").as_uri())
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "place-K-4-seed3" and run.info.status == "RUNNING"
    assert run.data.tags["liftplace.variant"] == "place K=4" and run.data.tags["liftplace.seed"] == "3"
    assert run.data.params["train.steps"] == "20" and run.data.params["objective.name"] == "place"
    saved = json.loads((folder.path / trackers.TRACKER_FILE).read_text())
    assert saved == {"mlflow": {"uri": uri, "run_id": run.info.run_id, "last_step": 10, "last_eval": 10, "ended": False}}

    # The driver restarts: a new writer and tracker (unpickled: no memory of the run) resume it,
    # and the run re-reports step 10 from its checkpoint at 5 (not logged again), then ends.
    again = results.RunFolder(folder.path, tracker=trackers.make_tracker("mlflow", uri, "my-study", tmp_path / "study"))
    again.start(config, who)
    again.append({"step": 10, "loss": 9.0, "fid": 41.0, "diverged": False})
    ckpt = _checkpoint(tmp_path / "ray" / "c20", 20)
    again.append({"step": 20, "loss": 1.0, "fid": 30.0, "kid": 0.01, "precision": nan, "diverged": False}, ckpt)

    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss/total") == [(5, 1.5), (10, 1.25), (20, 1.0)]
    assert _history(client, run.info.run_id, "eval/fid") == [(10, 40.0), (20, 30.0)]
    assert _history(client, run.info.run_id, "train/grad_norm") == [(5, 2.0)]
    assert run.data.metrics["final_fid"] == 30.0 and run.data.metrics["final_kid"] == 0.01
    assert "final_precision" not in run.data.metrics  # NaN is not logged
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == ["samples/step-0000010", "samples/step-0000020"]
    local = client.download_artifacts(run.info.run_id, "samples/step-0000020/samples.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"\x89PNG fake grid"
    assert not (tmp_path / "mlruns").exists()  # nothing where the store was not named

    # The study resumed again with the tracker (it sends every run folder first): nothing new.
    trackers.send_runs([folder.path], trackers.make_tracker("mlflow", uri, "my-study", tmp_path / "study"))
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "final_fid")) == 1
    assert _history(client, run.info.run_id, "loss/total") == [(5, 1.5), (10, 1.25), (20, 1.0)]


def test_a_stopped_run_ends_killed_and_its_last_step_gets_its_evaluation_on_resume(tmp_path):
    """A trial stopped early ends its tracker run KILLED; resumed, the run trains again (RUNNING);
    its last step, first reported unevaluated (an evaluation that failed), then evaluated,
    sends its FID once and its final metrics once."""
    config = resolve("smoke", ["train.steps=10"], check_paths=False).to_dict()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    folder = results.RunFolder(tmp_path / "run", tracker=trackers.make_tracker("mlflow", uri, "e", tmp_path))
    folder.start(config)
    folder.append({"step": 5, "loss": 2.0, "fid": float("nan")})
    folder.close()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "KILLED"
    again = results.RunFolder(tmp_path / "run", tracker=trackers.make_tracker("mlflow", uri, "e", tmp_path))
    again.start(config)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    again.append({"step": 10, "loss": 1.0, "fid": float("nan")})  # the evaluation failed
    again.append({"step": 10, "loss": 1.0, "fid": 12.0})  # the resume evaluated it
    again.close()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and _history(client, run.info.run_id, "eval/fid") == [(10, 12.0)]
    assert _history(client, run.info.run_id, "loss/total") == [(5, 2.0), (10, 1.0)]
    assert _history(client, run.info.run_id, "final_fid") == [(10, 12.0)]


def test_a_diverged_cohort_member_has_no_checkpoint_to_keep(tmp_path):
    """A cohort's checkpoint holds no folder for a member that diverged; its row still names
    the cohort's checkpoint, and its run folder keeps none (the study goes on)."""
    folder = results.RunFolder(tmp_path / "run")
    folder.start(resolve("smoke", check_paths=False).to_dict())
    folder.append({"step": 10, "loss": float("nan"), "diverged": True}, tmp_path / "cohort-ckpt" / "m1")
    assert not (tmp_path / "run" / results.CHECKPOINTS).exists()
    with pytest.raises(FileNotFoundError):  # a missing checkpoint of a run that did not diverge is an error
        folder.append({"step": 20, "loss": 1.0, "diverged": False}, tmp_path / "cohort-ckpt" / "m0")


def test_a_failed_run_ends_its_tracker_run_failed(tmp_path):
    config = resolve("smoke", check_paths=False).to_dict()
    tracker = trackers.make_tracker("mlflow", None, "failing", tmp_path)  # the default store: in the study folder
    assert tracker.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    folder = results.RunFolder(tmp_path / "runs" / "kd-seed0", tracker=tracker)
    folder.start(config, {"variant": "kd", "seed": 0})
    folder.append({"step": 5, "loss": 1.0})
    folder.fail("Traceback ...\nRuntimeError: boom")
    client = mlflow.MlflowClient(tracking_uri=tracker.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    experiment = client.get_experiment_by_name("failing")
    assert run.info.status == "FAILED" and experiment.artifact_location == (tmp_path / "mlflow-artifacts").resolve().as_uri()


def test_a_tracker_it_cannot_use_is_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--tracker 'neptune': choose one of mlflow, wandb"):
        trackers.make_tracker("neptune", None, "x", tmp_path)
    with monkeypatch.context() as m:  # as on a machine without the extra
        find_spec = trackers.importlib.util.find_spec
        m.setattr(trackers.importlib.util, "find_spec", lambda name: None if name in ("mlflow", "wandb") else find_spec(name))
        for kind, extra in (("mlflow", "MLflow is not installed .*'.\\[mlflow\\]'"), ("wandb", "W&B is not installed")):
            with pytest.raises(ValueError, match=f"--tracker {kind}: {extra}"):
                trackers.make_tracker(kind, None, "x", tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(ValueError, match=rf"--tracker-uri http://me:\*\*\*@127.0.0.1:{port}: MLflow cannot use it: ") as err:
        trackers.make_tracker("mlflow", f"http://me:secret@127.0.0.1:{port}", "x", tmp_path)
    assert "\n" not in str(err.value) and "secret" not in str(err.value) and time.monotonic() - began < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick check's settings are not kept
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--tracker-uri .*cannot be written"):
        trackers.make_tracker("mlflow", f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}", "x", tmp_path)
    with pytest.raises(ValueError, match="--tracker-uri nosuch://x: MLflow cannot use it: "):
        trackers.make_tracker("mlflow", "nosuch://x", "x", tmp_path)
    trackers.make_tracker("mlflow", None, "x", tmp_path)  # accepted, and nothing written until a run starts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_run_resumed_with_a_tracker_gives_it_the_rows_it_had(tmp_path):
    """A run begun without a tracker and resumed with one: its earlier rows reach the tracker
    when its writer starts."""
    config = resolve("smoke", ["train.steps=10"], check_paths=False).to_dict()
    folder = results.RunFolder(tmp_path / "run")
    folder.start(config)
    folder.append({"step": 5, "loss": 2.0, "fid": float("nan")})
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    again = results.RunFolder(tmp_path / "run", tracker=trackers.make_tracker("mlflow", uri, "later", tmp_path))
    again.start(config)
    again.append({"step": 10, "loss": 1.0, "fid": 20.0})
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert _history(client, run.info.run_id, "loss/total") == [(5, 2.0), (10, 1.0)]
    assert run.info.status == "FINISHED" and run.data.metrics["final_fid"] == 20.0


def test_a_study_and_a_distill_run_log_their_runs_to_trackers(ray_session, tiny_teacher_dir, tmp_path):
    """--tracker mlflow: a study (one cohort trial of two variants) logs one MLflow run per
    variant and seed, in an experiment named after the study, whose curves and final FID are
    the study's rows; `liftplace distill` (its rows written in Ray Train's controller) one run,
    to MLflow and to W&B."""
    from liftplace.cli import study_main
    from liftplace.study import Study

    address = ray_session.get_runtime_context().gcs_address
    study = Study(name="tracked", variants={"kd": {"objective.name": "kd"}, "place": {"objective.name": "place"}}, seeds=1)
    folder = study_main(study, [*FAST, "--storage", str(tmp_path), "--address", address, "--tracker", "mlflow"],
                        report=False)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tracked").experiment_id])}
    assert sorted(runs) == ["kd-seed0", "place-seed0"]
    summary = results.summarize(results.load_study(folder)).set_index("variant")
    frame = results.load_study(folder)
    for variant in ("kd", "place"):
        run = runs[f"{variant}-seed0"]
        assert run.info.status == "FINISHED" and run.data.params["objective.name"] == variant
        assert run.data.metrics["final_fid"] == pytest.approx(summary.loc[variant, "final_fid"])
        steps = frame[frame["variant"] == variant]
        assert _history(client, run.info.run_id, "loss/total") == [(int(s), pytest.approx(v)) for s, v in
                                                                   zip(steps["step"], steps["loss"])]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-0000010"]

    out = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "liftplace.cli", "distill", *FAST, "--set",
                           f"teacher.name={tiny_teacher_dir}", "--out", str(out), "--address", address,
                           "--tracker", "mlflow"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"})
    assert proc.returncode == 0, proc.stderr
    assert f"tracker: mlflow at sqlite:///{out / 'mlflow.db'}" in proc.stdout and "INFO mlflow" not in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    rows = results.read_metrics(out / "metrics.jsonl")
    assert run.info.status == "FINISHED" and run.data.metrics["final_fid"] == pytest.approx(rows[-1]["fid"])
    assert [s for s, _ in _history(client, run.info.run_id, "loss/total")] == [r["step"] for r in rows]

    # W&B, offline, from Ray Train's controller: its service stopped cleanly (no traceback).
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "liftplace.cli", "distill", *FAST, "--set",
                           f"teacher.name={tiny_teacher_dir}", "--out", str(out), "--address", address,
                           "--tracker", "wandb"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "WANDB_MODE": "offline"})
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert f"runs under {out / 'wandb'}" in proc.stdout
    records = wandb_records(out)
    rows = results.read_metrics(out / "metrics.jsonl")
    history = [r["history"] for r in records if "history" in r and "loss/total" in r["history"]]
    assert [h["train/step"] for h in history] == [r["step"] for r in rows]
    summary = {k: v for r in records if "summary" in r for k, v in r["summary"].items()}
    assert summary["final_fid"] == pytest.approx(rows[-1]["fid"]) and [r["exit"] for r in records if "exit" in r] == [0]


@pytest.mark.parametrize("argv, said", [
    (["--tracker", "neptune"], "--tracker 'neptune': choose one of mlflow, wandb"),
    (["--tracker-uri", "sqlite:///x.db"], "--tracker-uri names a tracker's store: add --tracker mlflow"),
])
def test_a_study_refuses_a_bad_tracker_in_one_line_before_ray(tmp_path, capsys, argv, said):
    from liftplace.cli import study_main
    from liftplace.study import Study

    study = Study(name="untracked", variants={"kd": {"objective.name": "kd"}}, seeds=1)
    with pytest.raises(SystemExit) as refused:
        study_main(study, [*FAST, "--storage", str(tmp_path), *argv], report=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and said in err[0], err
    assert not (tmp_path / "untracked").exists() and not list(tmp_path.rglob("*.db"))


def wandb_records(folder: Path) -> list[dict]:
    """What W&B wrote offline under ``folder``: its .wandb files (LevelDB's log format of
    protobuf records, 32 KiB blocks of chunks with a 7-byte header: crc, length, type), as
    dicts: {"run": {...}}, {"history": {...}}, {"summary": {...}}, {"exit": code}, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    def chunks(data: bytes):
        pos, pending = 7, b""  # the file's own header: ":W&B", a magic number, a version
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:  # a block's zero padding
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 1:
                yield chunk
            elif kind == 2:
                pending = chunk
            elif kind == 3:
                pending += chunk
            elif kind == 4:
                yield pending + chunk

    def items(update):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}

    out = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for chunk in chunks(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(chunk)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out.append({"run": {"id": record.run.run_id, "name": record.run.display_name,
                                    "project": record.run.project, "config": items(record.run.config.update),
                                    "tags": list(record.run.tags)}})
            elif kind == "history":
                out.append({"history": items(record.history.item)})
            elif kind == "summary":
                out.append({"summary": items(record.summary.update)})
            elif kind == "exit":
                out.append({"exit": record.exit.exit_code})
    return out


def test_a_run_folder_logs_one_wandb_run_offline_that_a_resume_continues(tmp_path, monkeypatch):
    """W&B, offline under the study's folder: the config, the curves against the run's own step
    (train/step), each step once across a resume in another process, the sample grid, the
    final metrics in the summary, and the run's exit."""
    pytest.importorskip("wandb")
    from PIL import Image

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    config = resolve("smoke", ["train.steps=20"], check_paths=False).to_dict()
    study = tmp_path / "study"
    folder = results.RunFolder(study / "runs" / "kd-seed1", tracker=trackers.make_tracker("wandb", None, "my/study", study))
    folder.start(config, {"variant": "kd", "seed": 1})
    folder.append({"step": 5, "loss": 1.5, "fid": float("nan")})
    folder.append({"step": 10, "loss": 1.25, "fid": 40.0})
    run_id = json.loads((folder.path / trackers.TRACKER_FILE).read_text())["wandb"]["run_id"]
    import wandb

    wandb.teardown()  # the driver's process ends (interrupted), as at its exit
    # A new process (a restarted driver): the run re-reports step 10, then ends with a grid.
    again = results.RunFolder(folder.path, tracker=trackers.make_tracker("wandb", None, "my/study", study))
    again.start(config, {"variant": "kd", "seed": 1})
    again.append({"step": 10, "loss": 9.0, "fid": 41.0})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    Image.new("RGB", (8, 8), "white").save(ckpt / "samples.png")
    again.append({"step": 20, "loss": 1.0, "fid": 30.0, "kid": 0.5}, ckpt)

    records = wandb_records(study)
    runs = [r["run"] for r in records if "run" in r]
    assert {r["id"] for r in runs} == {run_id} and {r["name"] for r in runs} == {"kd-seed1"}
    assert {r["project"] for r in runs} == {"my-study"} and "variant=kd" in runs[0]["tags"]
    assert runs[0]["config"]["train.steps"] == 20 and runs[0]["config"]["objective.name"] == config["objective"]["name"]
    history = [r["history"] for r in records if "history" in r]
    assert [(h["train/step"], h["loss/total"]) for h in history if "loss/total" in h] == [(5, 1.5), (10, 1.25), (20, 1.0)]
    assert [(h["train/step"], h["eval/fid"]) for h in history if "eval/fid" in h] == [(10, 40.0), (20, 30.0)]
    grids = [h for h in history if h.get("samples/_type") == "image-file"]
    assert [h["train/step"] for h in grids] == [20] and (grids[0]["samples/width"], grids[0]["samples/height"]) == (8, 8)
    assert list(study.glob(f"wandb/offline-run-*/files/{grids[0]['samples/path']}"))  # the grid's file itself
    summary = {k: v for r in records if "summary" in r for k, v in r["summary"].items()}
    assert summary["final_fid"] == 30.0 and summary["final_kid"] == 0.5
    assert [r["exit"] for r in records if "exit" in r][-1] == 0
    assert not (tmp_path / "wandb").exists()  # nothing where the command ran


def test_wandb_refuses_what_it_cannot_do_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match="--tracker-uri is MLflow's store"):
        trackers.make_tracker("wandb", "sqlite:///x.db", "x", tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match="WANDB_MODE=online needs WANDB_API_KEY"):
        trackers.make_tracker("wandb", None, "x", tmp_path)
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ValueError, match="WANDB_MODE='sideways'; use offline"):
        trackers.make_tracker("wandb", None, "x", tmp_path)
    assert not list(tmp_path.iterdir())

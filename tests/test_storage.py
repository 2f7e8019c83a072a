"""Studies on an object store (--storage s3://...): liftplace.storage against moto's S3 server on
127.0.0.1, started by these tests (no network beyond this machine; credentials in the URI, so
that Ray's workers, which get the URI, reach the same server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from liftplace import files, results, storage

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "eval.num_images=32", "--set", "eval.sampler_steps=2"]


@pytest.fixture(scope="module")
def s3():
    """A fresh S3 server on a free port of 127.0.0.1; s3(path, bucket) gives the URI of
    ``path`` in ``bucket`` (created on first use)."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="key",
                          aws_secret_access_key="secret", region_name="us-east-1")
    made = set()

    def uri(path: str = "results", bucket: str = "bucket", create: bool = True) -> str:
        if create and bucket not in made:
            client.create_bucket(Bucket=bucket)
            made.add(bucket)
        return f"s3://key:secret@{bucket}/{path}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    uri.client, uri.port = client, port
    yield uri
    server.stop()


def keys(s3, bucket="bucket", prefix="") -> dict[str, bytes]:
    """Every object under ``prefix``: {key: bytes}."""
    found = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = s3.client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def test_a_store_names_its_folders_by_uri_and_never_shows_a_secret(s3, tmp_path):
    store = storage.Store(s3("results")).child("study")
    assert not store.local and store.root == "bucket/results/study" and store.name == "study"
    assert store.uri_of("runs/a") == s3("results/study/runs/a")  # the query options kept, after the path
    assert storage.Store(store.uri_of("runs")).root == "bucket/results/study/runs"
    assert store.parent_uri() == s3("results") and store.rel("bucket/results/study/x/y") == "x/y"
    assert "secret" not in store.shown and "key:***@bucket" in store.shown
    for secret in ("secret", "ab/cd+ef", "a@b"):  # a secret may hold '/', '+', '@'
        line = f"error: s3://AKIA:{secret}@bucket/x?endpoint_override=h:1 failed"
        assert storage.shown(line) == "error: s3://AKIA:***@bucket/x?endpoint_override=h:1 failed"
    local = storage.Store(tmp_path / "x").child("study")
    assert local.local and local.uri == str(tmp_path / "x" / "study") and local.parent_uri() == str(tmp_path / "x")
    store.write_bytes("a/b.json", b"{}")
    assert store.read_bytes("a/b.json") == b"{}" and list(store.listing()) == ["a/b.json"]
    assert keys(s3, prefix="results/study/") == {"results/study/a/b.json": b"{}"}


def test_a_mirror_puts_what_the_driver_wrote_into_the_store_whole(s3, tmp_path):
    store = storage.Store(s3("mirror")).child("study")
    local = tmp_path / "mirror"
    local.mkdir()
    with storage.Mirror(store, local) as mirror:
        files.write_text(local / "study.json", '{"name": "study"}\n')
        metrics = results.MetricsFile(local / "runs" / "r" / "metrics.jsonl")
        (local / "runs" / "r").mkdir(parents=True)
        metrics.append({"step": 1, "loss": 1.0})
        metrics.append({"step": 2, "loss": 0.5})  # a plain append: put again, whole
        assert storage.mirror_for(local / "runs" / "r") is mirror
        assert keys(s3, prefix="mirror/") == {}  # nothing until a flush
        results.write_heartbeat(local, "running")  # a heartbeat flushes
        mirror.wait()
        got = keys(s3, prefix="mirror/study/")
        assert set(got) == {"mirror/study/study.json", "mirror/study/runs/r/metrics.jsonl", f"mirror/study/{results.DRIVER_FILE}"}
        assert [json.loads(line)["step"] for line in got["mirror/study/runs/r/metrics.jsonl"].decode().splitlines()] == [1, 2]
        metrics.append({"step": 1, "loss": 2.0})  # a step that goes back: the file rewritten
    # closed: what was left is flushed, and nothing is reported to it any more
    assert keys(s3, prefix="mirror/study/runs/")["mirror/study/runs/r/metrics.jsonl"] == b'{"step": 1, "loss": 2.0}\n'
    assert storage.mirror_for(local) is None and not files.MIRRORS


def test_a_store_that_fails_mid_study_gets_nothing_more_and_the_next_driver_puts_it_first(s3, tmp_path, capsys):
    """After a put fails, nothing later is put (no row after a checkpoint it names that failed
    to be copied); one line says so; the files stay marked in the mirror, and the next
    driver's pull puts them into the store before it reads it."""
    store = storage.Store(s3("study", bucket="gone"))
    local = tmp_path / "mirror"
    local.mkdir()
    mirror = storage.Mirror(store, local)
    with pytest.raises(storage.StoreError, match="failed"):
        with mirror:
            files.write_text(local / "study.json", "{}")
            mirror.flush()
            mirror.wait()
            s3.client.delete_object(Bucket="gone", Key="study/study.json")
            s3.client.delete_bucket(Bucket="gone")  # the store goes away mid-study
            metrics = results.MetricsFile(local / "runs" / "r" / "metrics.jsonl")
            (local / "runs" / "r").mkdir(parents=True)
            metrics.append({"step": 10})
            mirror.keep("gone/study/trial/checkpoint_000000", "runs/r/checkpoints/step-0000010")
            mirror.flush()  # the row naming it: not put after the failed copy
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "putting files into" in said[0] and "secret" not in said[0], said
    assert (local / storage.UNSENT).is_file() and not files.MIRRORS
    s3.client.create_bucket(Bucket="gone")  # back: the next driver here puts what was left first
    storage.Mirror(store, local).pull()
    assert set(keys(s3, "gone")) == {"study/study.json", "study/runs/r/metrics.jsonl"}
    assert not (local / storage.UNSENT).exists() and (local / "runs" / "r" / "metrics.jsonl").is_file()


def test_a_kept_checkpoint_is_copied_inside_the_store(s3, tmp_path):
    store = storage.Store(s3("keep")).child("study")
    for name in ("student.safetensors", "state.json"):
        store.write_bytes(f"trial/checkpoint_000000/m1/{name}", name.encode())
    local = tmp_path / "keep"
    with storage.Mirror(store, local):
        folder = results.RunFolder(local / "runs" / "kd-seed0")
        folder.start({"train": {"steps": 10}}, {"variant": "kd", "seed": 0})
        folder.append({"step": 10, "loss": 1.0}, "bucket/keep/study/trial/checkpoint_000000/m1")
    got = keys(s3, prefix="keep/study/runs/kd-seed0/")
    assert got["keep/study/runs/kd-seed0/checkpoints/step-0000010/student.safetensors"] == b"student.safetensors"
    assert got["keep/study/runs/kd-seed0/checkpoints/step-0000010/state.json"] == b"state.json"
    assert b'"step": 10' in got["keep/study/runs/kd-seed0/metrics.jsonl"]
    assert not (local / "runs" / "kd-seed0" / "checkpoints").exists()  # not through the driver's disk


def test_a_readers_copy_holds_the_rows_and_fetches_only_what_changed(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    store = storage.Store(s3("read")).child("study")
    store.write_bytes("study.json", b'{"name": "study"}')
    store.write_bytes("runs/a/metrics.jsonl", b'{"step": 5, "checkpoint_dir_name": "c"}\n')
    store.write_bytes("runs/b/metrics.jsonl", b'{"step": 1}\n')
    store.write_bytes("runs/a/checkpoints/step-0000005/student.safetensors", b"w")
    store.write_bytes("runs/a/checkpoints/step-0000001/student.safetensors", b"old")
    store.write_bytes("trial_00000/result.json", b"{}")  # Ray's, not copied
    copy = storage.local_copy(store.uri)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "runs/a/metrics.jsonl", "runs/b/metrics.jsonl", "study.json"]
    unchanged = (copy / "runs" / "a" / "metrics.jsonl").stat().st_ino
    time.sleep(0.01)
    store.write_bytes("runs/b/metrics.jsonl", b'{"step": 1}\n{"step": 2}\n')
    copy = storage.local_copy(store.uri, checkpoints=results.final_checkpoints)  # the final checkpoint only
    assert (copy / "runs" / "a" / "metrics.jsonl").stat().st_ino == unchanged  # not fetched again
    assert (copy / "runs" / "b" / "metrics.jsonl").read_text().count("\n") == 2
    assert (copy / "runs" / "a" / "checkpoints" / "step-0000005" / "student.safetensors").read_bytes() == b"w"
    assert not (copy / "runs" / "a" / "checkpoints" / "step-0000001").exists()
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".study.") and p.is_dir()]  # no debris


def test_an_input_on_a_store_is_copied_once_per_machine(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    store = storage.Store(s3("inputs/teacher"))
    store.write_bytes("config.json", b"{}")
    store.write_bytes("sub/weights.bin", b"1234")
    first = storage.input_copy(store.uri, "teacher")
    assert first.name == "teacher" and (first / "sub" / "weights.bin").read_bytes() == b"1234"
    assert storage.input_copy(store.uri, "teacher") == first  # the same copy
    store.write_bytes("sub/weights.bin", b"12345")  # a changed input: a new copy
    second = storage.input_copy(store.uri, "teacher")
    assert second != first and (second / "sub" / "weights.bin").read_bytes() == b"12345"
    with pytest.raises(FileNotFoundError, match="nothing there"):
        storage.input_copy(s3("inputs/none"), "teacher")


def _refused(argv, capsys):
    from liftplace.cli import study_main
    from liftplace.study import Study

    study = Study(name="refused", variants={"kd": {"objective.name": "kd"}}, seeds=1)
    start = time.time()
    with pytest.raises(SystemExit) as refused:
        study_main(study, ["--preset", "smoke", *FAST, *argv], report=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1, err
    return err[0], time.time() - start


@pytest.mark.parametrize("case, said", [
    ("no bucket", "the bucket 'nobucket' does not exist"),
    ("no server", "cannot be read"),
    ("bad scheme", "not a store pyarrow can open"),
    ("not a study", "is not empty and holds no study"),
    ("resume nothing", "no study to resume at"),
])
def test_a_store_it_cannot_use_is_refused_in_one_line_before_ray(s3, tmp_path, capsys, monkeypatch, case, said):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    uri = {"no bucket": s3("r", bucket="nobucket", create=False),
           "no server": s3("r").replace(f":{s3.port}", ":1"),
           "bad scheme": "nosuch://bucket/r", "not a study": s3("taken"), "resume nothing": s3("empty")}[case]
    if case == "not a study":
        storage.Store(uri).write_bytes("refused/notes.txt", b"mine")
    before = keys(s3)
    line, took = _refused(["--storage", uri, *(["--resume"] if case == "resume nothing" else [])], capsys)
    assert said in line and "secret" not in line, line
    assert took < 60, took  # no retries without end
    assert keys(s3) == before  # nothing written to the store
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("study.json"))


STUDY_SCRIPT = """
import sys
from liftplace.cli import study_main
from liftplace.study import Study

STUDY = Study(name="roundtrip", description="Two variants, two seeds, on a store.",
              variants={"kd": {"objective.name": "kd"}, "place": {"objective.name": "place"}}, seeds=2)
if __name__ == "__main__":
    study_main(STUDY, report=False)
"""


def test_a_study_on_s3_is_killed_resumed_and_read_from_its_uri_as_from_a_folder(ray_session, s3, tmp_path, monkeypatch,
                                                                                 capfd):
    """The round trip: a smoke study to s3:// killed mid-study (its driver SIGKILLed), its status
    read from the URI, resumed from the URI; its rows equal the same study's on a local folder,
    and its report (built from the URI, put back into the store) says the same."""
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    address = ray_session.get_runtime_context().gcs_address
    script = tmp_path / "roundtrip.py"
    script.write_text(textwrap.dedent(STUDY_SCRIPT))
    args = ["--preset", "smoke", *FAST, "--set", "train.steps=30", "--cohort", "off", "--max-concurrent", "1",
            "--address", address]
    uri = s3("studies")
    study_uri = storage.Store(uri).child("roundtrip").uri
    driver = subprocess.Popen([sys.executable, str(script), *args, "--storage", uri], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "LIFTPLACE_CACHE": str(tmp_path / "cache")})

    def done_in_store() -> int:
        found = keys(s3, prefix="studies/roundtrip/runs/")
        return sum(1 for k, v in found.items() if k.endswith("metrics.jsonl")
                   and any(json.loads(line)["step"] == 30 and "fid" in json.loads(line) for line in v.decode().splitlines()))

    deadline = time.time() + 400
    while done_in_store() < 1 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    out = driver.communicate()[0]
    assert 1 <= done_in_store() < 4, out
    assert "secret" not in out and "study roundtrip: 4 runs" in out, out
    from liftplace.cli import status_text, study_main

    status = status_text(study_uri)  # `liftplace status URI` on the killed study
    assert status.startswith(storage.shown(study_uri)) and "driver interrupted" in status and "done" in status, status
    module = {}
    exec(compile(STUDY_SCRIPT.replace('if __name__ == "__main__"', "if False"), str(script), "exec"), module)
    study = module["STUDY"]
    capfd.readouterr()
    study_main(study, [*args, "--storage", uri, "--resume"], report=False)
    said = capfd.readouterr()
    assert "Failed to fetch" not in said.err and "secret" not in said.out + said.err, said.err
    local = study_main(study, [*args, "--storage", str(tmp_path / "local")], report=False)
    status = status_text(study_uri)
    assert "driver finished; 4 runs: 4 done" in status, status
    # study.json in the store is this driver's, not the copy Tune's restore took and put back
    info = json.loads(keys(s3, prefix="studies/roundtrip/study.json")["studies/roundtrip/study.json"])
    assert [h["action"] for h in info["history"]] == ["start", "resume"]
    with pytest.raises(ValueError, match="no study"):  # the storage root given for a study: one line
        status_text(uri)

    copy = storage.local_copy(study_uri)
    columns = ["variant", "config/train/seed", "step", "loss", "loss_task", "loss_distill", "fid", "kid"]
    on_store = results.load_study(copy).sort_values(columns[:3], ignore_index=True)
    on_disk = results.load_study(local).sort_values(columns[:3], ignore_index=True)
    assert on_store[columns].equals(on_disk[columns])
    stored = keys(s3, prefix="studies/roundtrip/runs/")
    for run in ("kd-seed0", "kd-seed1", "place-seed0", "place-seed1"):  # each run's final checkpoint, in the store
        assert f"studies/roundtrip/runs/{run}/checkpoints/step-0000030/student.safetensors" in stored
        steps = [(r["step"], r["loss"]) for r in map(json.loads, stored[f"studies/roundtrip/runs/{run}/metrics.jsonl"].splitlines())]
        assert steps == [(r["step"], r["loss"]) for r in results.read_jsonl(local / "runs" / run / "metrics.jsonl")]
    assert any(k.startswith("studies/roundtrip/tensorboard/kd-seed0/events.out.tfevents") for k in keys(s3, prefix="studies/roundtrip/tensorboard/"))
    from liftplace.checkpoints import load_student
    from liftplace.config import from_dict

    config = from_dict(json.loads((local / "runs" / "place-seed1" / "config.json").read_text()))
    student = load_student(storage.Store(study_uri).uri_of("runs/place-seed1/checkpoints/step-0000030"), config)[0]
    same = load_student(local / "runs" / "place-seed1" / "checkpoints" / "step-0000030", config)[0]
    assert all((a == b).all() for a, b in zip(student.state_dict().values(), same.state_dict().values()))

    built = {}
    for where in (study_uri, str(local)):
        made = subprocess.run([sys.executable, str(ROOT / "analysis" / "make_all.py"), where], capture_output=True, text=True,
                              env={**os.environ, "LIFTPLACE_CACHE": str(tmp_path / "cache")}, timeout=400)
        assert made.returncode == 0 and "secret" not in made.stdout + made.stderr, made.stderr
        folder = (storage.reader_copy(where, "analysis") if where == study_uri else Path(where)) / "analysis"
        built[where] = {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".md", ".tex", ".txt", ".csv")}
    stored = keys(s3, prefix="studies/roundtrip/analysis/")
    assert stored["studies/roundtrip/analysis/REPORT.md"].decode() == built[study_uri]["REPORT.md"]
    assert {k.rsplit("/", 1)[1] for k in stored} >= set(built[study_uri])  # every output put back into the store
    # The same report: every table and text, and REPORT.md but for who ran the study when (the
    # study on the store was started, then resumed).
    for report in built.values():
        report["REPORT.md"] = "\n".join(line for line in report["REPORT.md"].splitlines() if not line.startswith("**Provenance.**"))
    assert built[study_uri] == built[str(local)] and len(built[study_uri]) >= 8


def _put_folder(store: storage.Store, local: Path) -> None:
    storage.put_tree(local, store, "")


def test_a_teacher_and_a_data_folder_on_a_store_are_read_as_local_ones(s3, tiny_teacher_dir, tmp_path, monkeypatch):
    """teacher.name and data.spec=folder: may be URIs: validated before any run (a missing one
    refused naming its key), read from this machine's copy, the same teacher and images."""
    from PIL import Image

    from liftplace.config import resolve
    from liftplace.data import load_dataset
    from liftplace.teachers import teacher_fingerprint, teacher_space

    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.new("L", (16, 16), 20 * i).save(images / f"{i:02d}.png")
    teacher_uri, data_uri = s3("inputs/unet-tiny"), s3("inputs/images")
    _put_folder(storage.Store(teacher_uri), tiny_teacher_dir)
    _put_folder(storage.Store(data_uri), images)
    config = resolve("smoke", {"teacher.name": teacher_uri, "data.spec": f"folder:{data_uri}", "data.resolution": 16})
    assert config.teacher.name == teacher_uri  # the config keeps the URI (the same on every node)
    assert teacher_fingerprint(teacher_uri) == teacher_fingerprint(tiny_teacher_dir)
    assert teacher_space(teacher_uri) == teacher_space(tiny_teacher_dir)
    on_store, local = (load_dataset(spec, 16, "train", 1) for spec in (f"folder:{data_uri}", f"folder:{images}"))
    assert len(on_store) == len(local) and all((on_store[i][0] == local[i][0]).all() for i in range(len(local)))
    copies = [p for p in (tmp_path / "cache" / "inputs").iterdir() if p.is_dir()]
    assert len(copies) == 2  # one copy each, shared by every later read
    with pytest.raises(FileNotFoundError, match="teacher.name.*nothing there"):
        resolve("smoke", {"teacher.name": s3("inputs/none")})
    with pytest.raises(ValueError, match="data.spec.*does not exist"):
        resolve("smoke", {"data.spec": "folder:" + s3("x", bucket="nobucket", create=False)})


def test_processes_on_one_machine_share_one_copy_of_an_input(s3, tmp_path):
    store = storage.Store(s3("inputs/shared"))
    for i in range(20):
        store.write_bytes(f"part-{i}.bin", bytes(50_000))
    code = f"from liftplace import storage; print(storage.input_copy({store.uri!r}))"
    env = {**os.environ, "LIFTPLACE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(paths) == 1 and all(p.returncode == 0 for p in procs)
    inputs = tmp_path / "cache" / "inputs"
    assert [p.name for p in inputs.iterdir() if p.is_dir()] == [Path(paths.pop()).parent.name]  # one copy, no staging left
    assert len(list(inputs.rglob("part-*.bin"))) == 20


def test_a_single_run_refuses_a_uri_for_its_folder(tmp_path):
    said = subprocess.run([sys.executable, "-m", "liftplace.cli", "distill", "--preset", "smoke", "--out", "s3://k:s@b/run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert said.returncode == 2 and said.stderr.count("\n") == 1 and "a local folder" in said.stderr, said.stderr
    assert "k:s@" not in said.stderr and not list(tmp_path.iterdir())

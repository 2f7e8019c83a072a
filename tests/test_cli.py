"""Bad input at the real entry points (`liftplace distill`, `studies/ablate_k.py`): refused
before any training, with one line on stderr naming the bad value, a non-zero exit, no
traceback, and no run or study folder written (an existing one left byte for byte)."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.device_count() > 0  # the GPU refusals need a machine without one


def env():
    # The source tree first: the entry points must import this checkout's package.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def load_study_variants():
    """The default study's variants (studies/ablate_k.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate_k_study", ROOT / "studies" / "ablate_k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STUDY.variants


def liftplace(*args):
    return [sys.executable, "-m", "liftplace.cli", *args]


def ablate_k(*args):
    return [sys.executable, str(ROOT / "studies" / "ablate_k.py"), *args]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Case:
    def __init__(self, cmd, names, out, env=None):
        self.cmd, self.out = cmd, out  # out: a folder that must stay as it was (or stay absent)
        self.names = (names,) if isinstance(names, str) else names  # what the error line must say
        self.env = env or {}  # extra environment variables


def _small_memory(folder: Path, gib: float) -> dict:
    """Environment that makes psutil report ``gib`` GiB of available memory in the subprocess
    (a sitecustomize module ahead on its path), so that a batch is too large on any machine."""
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(
        "import psutil\n"
        "_real = psutil.virtual_memory\n"
        f"psutil.virtual_memory = lambda: _real()._replace(available={int(gib * 2**30)})\n")
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def cases(tiny_teacher_dir, tmp_path_factory):
    """Every bad input, as a subprocess, a few at a time: each spends ~6 s of CPU importing torch,
    diffusers and Ray, and well under a second refusing."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "empty").mkdir()
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "pickled.pth").write_bytes(_pickle_that_writes(tmp / "PWNED"))
    base = ["--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}"]

    def distill(name, *sets, names, env=None):
        out = tmp / name / "out"
        return Case(liftplace("distill", *base, *[a for s in sets for a in ("--set", s)], "--out", str(out)), names, out,
                    env)

    def study(name, *args, names, env=None):
        storage = tmp / name / "storage"
        return Case(ablate_k("--preset", "smoke", "--seeds", "1", "--storage", str(storage),
                             "--set", f"teacher.name={tiny_teacher_dir}", *args), names, storage, env)

    found = {
        "unknown key": distill("unknown-key", "train.stepz=5", names="'train.stepz'"),
        "wrong type": distill("wrong-type", "train.steps=abc", names="'abc'"),
        "group size": distill("group-size", "objective.name=place", "objective.group_size=24", names="group_size 24"),
        "prune ratio": distill("prune", "student.prune_ratio=1.0", names="student.prune_ratio"),
        "missing teacher": distill("teacher", "teacher.name=/nonexistent/teacher", names="/nonexistent/teacher"),
        "missing data folder": distill("data", "data.spec=folder:/nonexistent/images", names="/nonexistent/images"),
        "empty data folder": distill("empty", f"data.spec=folder:{tmp / 'empty'}", names=str(tmp / "empty")),
        "missing inception weights": distill("inception", "eval.extractor=inception-v3-compat",
                                             "eval.extractor_weights=/nonexistent/inception.pth",
                                             names="/nonexistent/inception.pth"),
        "pickled inception weights": distill("inception-pickle", "eval.extractor=inception-v3-compat",
                                             f"eval.extractor_weights={tmp / 'pickled.pth'}", names="pickled.pth"),
        "GPUs this machine lacks": distill("gpu", "scaling.use_gpu=true", names="scaling.use_gpu"),
        "corrupt checkpoint": _corrupt_run(tmp / "corrupt", tiny_teacher_dir, base),
        "checkpoint of another config": _other_config_run(tmp / "other-config", tiny_teacher_dir, base),
        "teacher weights that do not fit its config": distill(
            "teacher-shape", f"teacher.name={_teacher_copy(tmp / 'shape', tiny_teacher_dir, widen=True)}",
            names=("teacher.name", "size mismatch")),
        "teacher weights that lack a tensor of its config": distill(
            "teacher-drop", f"teacher.name={_teacher_copy(tmp / 'drop', tiny_teacher_dir, drop=True)}",
            names=("does not match its weights", "missing from the weights")),
        "a damaged teacher weights file": distill(
            "teacher-cut", f"teacher.name={_teacher_copy(tmp / 'cut', tiny_teacher_dir, cut=True)}",
            names=("teacher.name", "do not load")),
        "teacher weights that are not finite": distill(
            "teacher-nan", f"teacher.name={_teacher_copy(tmp / 'nan', tiny_teacher_dir, nan=True)}",
            names=("NaN or infinite",)),
        "colour images for a one-channel teacher": distill(
            "colour", f"data.spec=folder:{_images(tmp / 'colour', 'RGB')}", names=("colour", "1 channel")),
        "an image that does not decode": distill(
            "truncated", f"data.spec=folder:{_images(tmp / 'truncated', 'L', truncate='img03.png')}",
            names=("1 of the 12 images", "img03.png")),
        "a batch larger than the data": distill("batch", "train.batch=5000", names=("train.batch", "4000")),
        # 2.2 GiB available: a worker (1 GiB) and Ray's processes (1 GiB) leave ~0.2 GiB for a
        # step, which a batch of 16 fits (the preset's) and one of 4,000 does not (~0.7 GiB).
        "a batch larger than memory allows": distill("memory", "train.batch=4000", names=("train.batch", "4000", "GiB"),
                                                     env=_small_memory(tmp / "memory-2.2", 2.2)),
        "study: more trials at once than memory allows": study(
            "memory-study", "--cohort", "off", "--max-concurrent", "2", names=("--max-concurrent", "at most 1 fit"),
            env=_small_memory(tmp / "memory-study-2.2", 2.2)),
        "a negative seed": distill("seed", "train.seed=-1", names="train.seed"),
        "too few images for precision and recall": distill("prc", "eval.num_images=3", names=("num_images", "got 3")),
        "study: no trial may run at once": study("concurrent", "--max-concurrent", "0", names="--max-concurrent"),
        "a weight that is not a number": distill("weight", "objective.distill_weight=nan", names="objective.distill_weight"),
        "an output folder that cannot be written": Case(
            liftplace("distill", *base, "--out", str(tmp / "a-file" / "out")), ("--out", str(tmp / "a-file" / "out")),
            tmp / "a-file" / "out"),
        "study: a storage folder that cannot be written": Case(
            ablate_k("--preset", "smoke", "--seeds", "1", "--storage", str(tmp / "a-file" / "storage"),
                     "--set", f"teacher.name={tiny_teacher_dir}"), str(tmp / "a-file" / "storage"),
            tmp / "a-file" / "storage"),
        "study: unknown key": study("study-key", "--set", "objective.stepz=1", names="'objective.stepz'"),
        "study: another study in storage": _other_study(tmp / "other", tiny_teacher_dir),
    }
    before = {name: snapshot(case.out) if case.out.exists() else None for name, case in found.items()}
    # 600 s each: a refusal takes ~20 s on an idle 2-core machine, but 180 s were exceeded at
    # load 16-20 (three studies beside the suite); the timeout is there to catch a hang.
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(found, pool.map(
            lambda case: subprocess.run(case.cmd, capture_output=True, text=True, timeout=600, env=env() | case.env,
                                        cwd=ROOT),
            found.values())))
    return {name: (found[name], done[name], before[name]) for name in found} | {"_tmp": tmp}


def _teacher_copy(folder: Path, teacher: Path, *, widen: bool = False, nan: bool = False, drop: bool = False,
                  cut: bool = False) -> Path:
    """A copy of a teacher directory whose config.json no longer fits its weights (a wider
    first block), whose weights hold a NaN, lack a tensor (diffusers would initialise it at
    random and only warn) or are cut short."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(teacher, folder)
    if widen:
        config = json.loads((folder / "config.json").read_text())
        config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
        (folder / "config.json").write_text(json.dumps(config))
    if nan:
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        name = sorted(weights)[0]
        weights[name].view(-1)[0] = float("nan")
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    if drop:
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        del weights[sorted(weights)[0]]
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    if cut:
        data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _images(folder: Path, mode: str, *, truncate: str | None = None) -> Path:
    """A folder of 12 small images of a PIL mode; ``truncate``: that file is cut in half (its
    header still reads, its pixels do not)."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # noise: enough pixel data that half a file still holds the header
        pixels = (rng.random((20, 20, len(mode))) * 255).astype(np.uint8)
        Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(folder / f"img{i:02d}.png")
    if truncate:
        data = (folder / truncate).read_bytes()
        (folder / truncate).write_bytes(data[: len(data) // 2])
    return folder


def _pickle_that_writes(marker: Path) -> bytes:
    """A .pth whose unpickling creates marker: what a malicious weights file could do."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buffer = io.BytesIO()
    torch.save({"fc.weight": Payload()}, buffer)
    return buffer.getvalue()


def _corrupt_run(folder: Path, teacher, base, *, damage: bool = True) -> Case:
    """A run folder as `liftplace distill` leaves it, whose last checkpoint is damaged."""
    from liftplace import distill
    from liftplace.config import resolve

    out = folder / "out"
    config = resolve("smoke", {"teacher.name": str(teacher), "train.steps": 5, "eval.num_images": 32,
                               "eval.sampler_steps": 2})
    checkpoint = out / "run" / "checkpoint_0"
    rows = []

    def report(row, directory):
        if directory is not None:
            import shutil

            shutil.copytree(directory, checkpoint)
        rows.append({**row, "checkpoint_path": str(checkpoint) if directory else None})

    out.mkdir(parents=True)
    distill.run(config, report, log=lambda *_: None)
    config.save(out / "config.json")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if damage:
        (checkpoint / "student.safetensors").write_bytes(b"\0" * 40)
    sets = ["train.steps=5", "eval.num_images=32", "eval.sampler_steps=2"]
    return Case(liftplace("distill", *base, *[a for s in sets for a in ("--set", s)], "--out", str(out), "--resume"),
                ("corrupt checkpoint", str(checkpoint)), out)


def _other_config_run(folder: Path, teacher, base) -> Case:
    """A run folder whose config.json was edited to another learning rate after training: the
    checkpoint's own digest of the config it was trained under refuses the resume."""
    case = _corrupt_run(folder, teacher, base, damage=False)
    saved = json.loads((case.out / "config.json").read_text())
    saved["train"]["lr"] = 0.003
    (case.out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return Case([*case.cmd[:-3], "--set", "train.lr=0.003", *case.cmd[-3:]],
                ("different config", str(case.out / "run" / "checkpoint_0")), case.out)


def _other_study(folder: Path, teacher) -> Case:
    """Storage whose ablate_k folder holds a different ablate_k study (other seeds)."""
    storage = folder / "storage"
    study = storage / "ablate_k"
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"name": "ablate_k", "seeds": 5, "preset": "cpu"}) + "\n")
    (study / "kd-seed0-00000" / "result.json").parent.mkdir()
    (study / "kd-seed0-00000" / "result.json").write_text('{"step": 5}\n')
    return Case(ablate_k("--preset", "smoke", "--seeds", "1", "--storage", str(storage),
                         "--set", f"teacher.name={teacher}"), "different study", storage)


NAMES = [
    "unknown key", "wrong type", "group size", "prune ratio", "missing teacher", "missing data folder",
    "empty data folder", "missing inception weights", "pickled inception weights", "GPUs this machine lacks",
    "corrupt checkpoint", "checkpoint of another config", "study: unknown key", "study: another study in storage",
    "teacher weights that do not fit its config", "teacher weights that are not finite",
    "teacher weights that lack a tensor of its config", "a damaged teacher weights file",
    "colour images for a one-channel teacher", "an image that does not decode",
    "a batch larger than the data", "a negative seed",
    "a weight that is not a number", "an output folder that cannot be written",
    "too few images for precision and recall", "study: no trial may run at once",
    "study: a storage folder that cannot be written", "a batch larger than memory allows",
    "study: more trials at once than memory allows",
]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_refused_with_one_line(cases, name):
    if "GPUs" in name and HAS_GPU:
        pytest.skip("this machine has a GPU")
    case, proc, before = cases[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0] and all(name in lines[0] for name in case.names), lines[0]
    assert not re.search(r"step \d+/\d+", proc.stdout + proc.stderr)  # no training started
    assert "ray: " not in proc.stdout  # nor Ray (ensure_ray says when it starts or joins one)
    # Nothing written: no run or study folder, or the existing one byte for byte.
    after = snapshot(case.out) if case.out.exists() else None
    assert after == before


def test_pickled_weights_were_never_unpickled(cases):
    assert not (cases["_tmp"] / "PWNED").exists()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_gpus_a_joined_cluster_lacks_are_refused_with_one_line(ray_session, tiny_teacher_dir, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "out"
    proc = subprocess.run(liftplace("distill", "--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}",
                                    "--set", "scaling.use_gpu=true", "--out", str(out), "--address", address),
                          capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "the Ray cluster has 0" in lines[0], proc.stderr
    assert f"ray: joined the cluster at {address}" in proc.stdout  # refused after joining, still one line
    assert not out.exists()


def test_a_failure_inside_a_worker_ends_with_one_line_and_resume_finishes_the_run(ray_session, tiny_teacher_dir,
                                                                                  tmp_path, pause_point):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "out"
    cmd = liftplace("distill", "--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}", "--set",
                    "eval.num_images=32", "--set", "eval.sampler_steps=2", "--out", str(out), "--address", address)
    # This test's own choice, forwarded to the job like every RAY_TRAIN_* setting: a joined
    # cluster keeps Ray Train's preemption watcher, whose start logs a core_worker error line.
    quiet = {**env(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    armed = pause_point(5, fail="simulated bug in the training loop")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=quiet, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("liftplace: error: the run failed after step 5 of 20: RuntimeError: simulated bug"), line
    assert str(out / "error.txt") in line and "--resume" in line
    error = (out / "error.txt").read_text()
    assert "Traceback" in error and "simulated bug in the training loop" in error
    # The run folder reads as a study of one: its state from its own files.
    status = subprocess.run(liftplace("status", str(out)), capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)
    assert status.returncode == 0 and "a `liftplace distill` run; 1 runs: 1 errored" in status.stdout, status.stderr
    armed.unlink()
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=quiet, cwd=ROOT)
    assert proc.returncode == 0 and "done: FID" in proc.stdout, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and rows[-1]["fid"] > 0
    from liftplace.results import load_study, summarize

    df = load_study(out)  # as analysis/ reads every study
    assert list(df["step"]) == [5, 10, 15, 20] and list(df["loss"]) == [r["loss"] for r in rows]
    assert set(df["variant"]) == {"place"} and (df["config/train/steps"] == 20).all()
    run = summarize(df).iloc[0]
    # Its last checkpoint is the run folder's own: Ray Train's last one, kept as hard links.
    from liftplace import checkpoints

    assert run["final_fid"] == rows[-1]["fid"] and run["final_checkpoint"] == str(out / "checkpoints" / "step-0000020")
    saved = [r["step"] for r in rows if r.get("checkpoint_path")]
    assert saved == [10, 20] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000020"]
    assert checkpoints.check(run["final_checkpoint"]) == 20
    ray_copy = Path(rows[-1]["checkpoint_path"]) / "student.safetensors"
    assert (Path(run["final_checkpoint"]) / "student.safetensors").stat().st_ino == ray_copy.stat().st_ino


def test_a_failed_trial_ends_its_study_with_one_line_and_no_report(ray_session, tiny_teacher_dir, tmp_path,
                                                                   pause_point):
    address = ray_session.get_runtime_context().gcs_address
    storage = tmp_path / "storage"
    cmd = ablate_k("--preset", "smoke", "--seeds", "1", "--storage", str(storage), "--address", address,
                   "--set", f"teacher.name={tiny_teacher_dir}", "--set", "train.steps=10",
                   "--set", "eval.num_images=32", "--set", "eval.sampler_steps=2")
    pause_point(5, fail="simulated bug in the training loop")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1, proc.stderr
    (trial,) = [p for p in (storage / "ablate_k").iterdir() if (p / "params.json").is_file()]
    assert lines[0].startswith("ablate_k.py: error: 1 of 1 trials failed; the first, ") and "after step 5" in lines[0]
    assert "RuntimeError: simulated bug in the training loop" in lines[0]
    assert str(trial / "error.txt") in lines[0] and lines[0].endswith("--resume")
    assert (trial / "error.txt").is_file()
    # Every run of the failed (cohort) trial has the error in its own folder, and status says so.
    runs = sorted((storage / "ablate_k" / "runs").iterdir())
    assert len(runs) == len(load_study_variants()) and all(
        "simulated bug in the training loop" in (run / "error.txt").read_text() for run in runs)
    from liftplace.results import study_status

    assert set(study_status(storage / "ablate_k")[0]["state"]) == {"errored"}
    # The console said it too (a retry, then the failure), and no report was built.
    assert "retry  " in proc.stdout and f"failed " in proc.stdout
    assert not (storage / "ablate_k" / "analysis").exists()


def test_ctrl_c_or_sigterm_ends_liftplace_distill_with_one_line_and_the_resume_command(ray_session, tiny_teacher_dir,
                                                                                      tmp_path, pause_point):
    """SIGTERM at step 10, then (resumed) Ctrl-C at step 15, then a resume that finishes: each
    stop is one stderr line with the command that continues it, exit 143 / 130; nothing lost,
    even when Ray Train's own record of the checkpoints was left cut short."""
    import signal
    import time

    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "out"
    args = ["distill", "--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}", "--set", "eval.num_images=32",
            "--set", "eval.sampler_steps=2", "--out", str(out), "--address", address]
    quiet = {**env(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

    def stopped_at(step, sig, resume):
        armed = pause_point(step)
        paused = Path(f"{armed}.paused")
        proc = subprocess.Popen([*liftplace(*args), *(["--resume"] if resume else [])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=quiet, cwd=ROOT)
        deadline = time.time() + 240
        while not paused.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert paused.exists(), proc.communicate()
        def last_row():
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
            return json.loads(lines[-1]) if lines else {}

        while last_row().get("step") != step and time.time() < deadline:
            time.sleep(0.05)  # the controller writes the row of the step a moment after the report
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left holding the session cluster's CPUs for the tests after this one
            raise
        armed.unlink()
        return proc.returncode, [line for line in stderr.splitlines() if line.strip()]

    code, lines = stopped_at(10, signal.SIGTERM, resume=False)
    assert code == 143 and len(lines) == 1, lines
    assert lines[0].startswith("liftplace: interrupted after step 10 of 20; continue it from its checkpoint at step 10 "
                               "with: liftplace distill --preset smoke"), lines[0]
    assert lines[0].endswith(f"--address {address} --resume")
    code, lines = stopped_at(15, signal.SIGINT, resume=True)
    assert code == 130 and len(lines) == 1 and "after step 15 of 20" in lines[0], lines
    assert "from its checkpoint at step 10" in lines[0] and lines[0].count("--resume") == 1
    # Ray Train's record of the checkpoints, cut short as a full disk leaves it: the resume goes
    # on from the checkpoint metrics.jsonl names (Ray alone would refuse to start).
    record = out / "run" / "checkpoint_manager_snapshot.json"
    record.write_bytes(record.read_bytes()[:40])
    proc = subprocess.run([*liftplace(*args), "--resume"], capture_output=True, text=True, timeout=300, env=quiet,
                          cwd=ROOT)
    assert proc.returncode == 0 and "done: FID" in proc.stdout, proc.stderr
    assert f"{record} was cut short" in proc.stdout and "checkpoint_" in proc.stdout.split("going on from")[1]
    assert (out / "run" / "checkpoint_manager_snapshot.json.cut-short").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]


@pytest.mark.parametrize("phase,sig,status", [("checks", "SIGINT", 130), ("trainer", "SIGTERM", 143)])
def test_a_stop_before_training_ends_liftplace_distill_with_one_line(ray_session, tiny_teacher_dir, tmp_path,
                                                                    pause_point, phase, sig, status):
    """Ctrl-C while the inputs are checked (torch loaded, Ray not started): one line, exit 130,
    nothing written. SIGTERM once config.json is written, before Ray Train starts: one line with
    the resume command, exit 143, and that command finishes the run."""
    import signal
    import time

    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "out"
    args = ["distill", "--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}", "--set", "eval.num_images=32",
            "--set", "eval.sampler_steps=2", "--out", str(out), "--address", address]
    quiet = {**env(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    armed = pause_point(phase)
    proc = subprocess.Popen(liftplace(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quiet,
                            cwd=ROOT)
    deadline = time.time() + 180
    while not Path(f"{armed}.paused").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert Path(f"{armed}.paused").exists(), proc.communicate()
    proc.send_signal(getattr(signal, sig))
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    armed.unlink()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == status and len(lines) == 1, stderr
    if phase == "checks":
        assert lines[0] == f"liftplace: interrupted before the run started; nothing was written to {out}"
        assert not out.exists()
        return
    assert lines[0].startswith("liftplace: interrupted before training started; continue it with: liftplace distill")
    assert lines[0].endswith(f"--address {address} --resume"), lines[0]
    assert "config.json" in os.listdir(out) and not (out / "metrics.jsonl").exists()
    proc = subprocess.run([*liftplace(*args), "--resume"], capture_output=True, text=True, timeout=300, env=quiet,
                          cwd=ROOT)
    assert proc.returncode == 0 and "done: FID" in proc.stdout, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]


def _fill(disk: Path) -> Path:
    """Write a file on disk until the file system is full; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:  # unbuffered: nothing left to fail at close
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    handle.write(bytes(size))
            except OSError:
                continue
    return filler


def test_a_full_disk_under_out_ends_liftplace_distill_with_one_line_and_resume_finishes(ray_session, tiny_teacher_dir,
                                                                                       tmp_path, pause_point):
    """The disk under --out fills while the run trains (after step 10): one line naming the full
    disk and the resume command, exit 1, though not even error.txt can be written; once space
    is freed the resume finishes the run. On a tiny tmpfs where the test may mount one (root);
    elsewhere a worker's write fails with ENOSPC and error.txt is a folder, so it cannot be
    written either."""
    import time

    address = ray_session.get_runtime_context().gcs_address
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                                                       capture_output=True).returncode == 0
    except (AttributeError, OSError):  # no geteuid (not POSIX), no mount command
        mounted = False
    try:
        out = disk / "out"
        args = ["distill", "--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}", "--set",
                "eval.num_images=32", "--set", "eval.sampler_steps=2", "--out", str(out), "--address", address]
        quiet = {**env(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        armed = pause_point(10)
        proc = subprocess.Popen(liftplace(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=quiet, cwd=ROOT)
        deadline = time.time() + 240
        while not Path(f"{armed}.paused").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert Path(f"{armed}.paused").exists(), proc.communicate()
        if mounted:
            filler = _fill(disk)
            armed.unlink()
        else:
            (out / "error.txt").mkdir()
            pause_point(15, fail="No space left on device", errno=28)
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, stderr
        # The step is the last whose row reached metrics.jsonl: which write meets the full disk
        # first (the controller's record of step 10, a row, a checkpoint) is the machine's to say.
        assert re.match(r"liftplace: error: the run failed after step \d+ of 20: OSError: ", lines[0]), lines[0]
        assert "No space left on device" in lines[0] and f"could not be written to {out / 'error.txt'}" in lines[0]
        assert f"free space under {out}" in lines[0] and lines[0].endswith("--resume")
        if mounted:
            filler.unlink()
        else:
            (out / "error.txt").rmdir()
            armed.unlink()
        proc = subprocess.run([*liftplace(*args), "--resume"], capture_output=True, text=True, timeout=300,
                              env=quiet, cwd=ROOT)
        assert proc.returncode == 0 and "done: FID" in proc.stdout, proc.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [5, 10, 15, 20]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_resuming_a_finished_run_does_nothing(tiny_teacher_dir, tmp_path):
    base = ["--preset", "smoke", "--set", f"teacher.name={tiny_teacher_dir}"]
    case = _corrupt_run(tmp_path / "finished", tiny_teacher_dir, base, damage=False)
    before = snapshot(case.out)
    proc = subprocess.run(case.cmd, capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert "the run finished at step 5; nothing to resume" in proc.stdout and "done: FID" in proc.stdout
    assert "ray: " not in proc.stdout  # no Ray started
    assert snapshot(case.out) == before

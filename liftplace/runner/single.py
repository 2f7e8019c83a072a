"""`liftplace distill`: one run on Ray Train, written to its own folder, resumable, stoppable in one line.

``run_single`` checks the run (``liftplace.preflight``) before Ray starts, trains it with a
``TorchTrainer`` (``runner.train``), writes config.json, metrics.jsonl, checkpoints/ and
samples.png under ``--out``, and says a failure (``RunFailed``) or a Ctrl-C / SIGTERM
(``RunInterrupted``) in one line naming how to continue it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from liftplace import checkpoints, distill, files, results
from liftplace.config import RunConfig, comparable
from liftplace.preflight import check_inputs, check_memory, check_resources
from liftplace.runner.cluster import capacity_now, ensure_ray, node_memory
from liftplace.runner.train import RunFailed, _row_log_callback, failure_cause, make_trainer
from liftplace.trackers import make_tracker, send_runs


def prepare_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty: choose a new --out, or pass --resume to continue that run")
    if resume and not (out / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run (no config.json)")


def run_single(config: RunConfig, out: str | Path, *, address: str | None = None, resume: bool = False,
               max_failures: int = 1, tracker: str | None = None, tracker_uri: str | None = None) -> dict:
    """`liftplace distill`: one run on Ray Train, written to ``out``.

    out/config.json (the resolved config), out/metrics.jsonl (one row per reported step),
    out/checkpoints/step-<k>/ (the run's checkpoints: hard links to Ray Train's own, under
    out/run/checkpoint_*, which --resume starts from), out/samples.png (the final student's
    samples, left four columns, beside the teacher's from the same noise, right four).
    ``tracker``/``tracker_uri``: also log the run to an experiment tracker (``liftplace.trackers``;
    its experiment is named after ``out``).
    """
    from liftplace import storage

    if storage.is_uri(out):
        raise ValueError(f"--out {storage.shown(str(out))}: a local folder (a study's --storage takes a URI)")
    out = Path(out).resolve()
    prepare_out_dir(out, resume)
    start_from, cut_short = None, False
    if resume:
        try:
            saved = json.loads((out / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume: {out / 'config.json'} is not valid JSON ({err})") from None
        if comparable(saved) != comparable(config.to_dict()):
            raise ValueError(f"--resume: the config differs from the one saved in {out / 'config.json'}; "
                             "resume with the same preset and --set values")
        # What Ray Train would resume from (the last checkpoint the rows name): refused now, not
        # in a worker.
        rows = results.read_metrics(out / "metrics.jsonl")
        last = results.last_checkpoint(rows)
        if last is not None:
            from liftplace.teachers import teacher_fingerprint

            checkpoints.check(last, checkpoints.config_digest(config.to_dict()), teacher_fingerprint(config.teacher.name))
        snapshot = out / "run" / "checkpoint_manager_snapshot.json"
        try:
            json.loads(snapshot.read_text()) if snapshot.is_file() else None
        except ValueError:
            # Ray Train rewrites its record of the run's checkpoints in place; a full disk (or a
            # crash while it wrote) leaves it cut short, and Ray refuses to start from it. The rows
            # name the last checkpoint it had registered: the run goes on from that one instead
            # (the record is set aside once the checks below have passed).
            start_from, cut_short = last, True
        if rows and results.is_last_row(rows[-1], config.train.steps):
            print(f"{out}: the run finished at step {rows[-1]['step']}; nothing to resume")
            tracking = make_tracker(tracker, tracker_uri, out.name, out)
            if tracking is not None:  # its rows, to a tracker it was not (wholly) sent to
                send_runs([out], tracking)
                print(f"tracker: {tracking.where()}")
            return rows[-1]
    distill._pause_point("checks")
    check_inputs([config])
    check_resources([config], capacity_now(), address)  # before Ray starts, where that can be known
    check_memory([config], address, node_memory=node_memory())
    files.check_writable(out, "--out")
    tracking = make_tracker(tracker, tracker_uri, out.name, out)
    ensure_ray(address)
    check_resources([config], capacity_now())
    check_memory([config], address, node_memory=node_memory())
    files.make_folder(out, "--out")
    folder = results.RunFolder(out, tracking)  # the run's one writer: config.json, metrics.jsonl, checkpoints, error.txt
    folder.start(config.to_dict())
    if cut_short:
        snapshot = out / "run" / "checkpoint_manager_snapshot.json"
        snapshot.replace(snapshot.with_name(snapshot.name + ".cut-short"))
        print(f"{snapshot} was cut short (a full disk, or a crash while it was written; kept as "
              f"{snapshot.name}.cut-short): going on from {start_from or 'the start'}, the last checkpoint "
              "metrics.jsonl names")
    if tracking is not None:
        print(f"tracker: {tracking.where()}")
    curves = {"root": str(out / results.TENSORBOARD), "name": "run"} if results.tensorboard_available() else None
    trainer = make_trainer(config, storage=str(out), name="run", callbacks=[_row_log_callback(folder)],
                           max_failures=max_failures, curves=curves, start_from=start_from)
    distill._pause_point("trainer")
    error = _fit_interruptibly(trainer, out, config.train.steps)
    if error:
        log_file = out / "error.txt"
        try:
            folder.fail(str(error))  # the workers' tracebacks, in full
            where = f"the full error is in {log_file}"
        except OSError as err:  # the disk the run filled, most likely: say so instead
            where = f"its full error could not be written to {log_file} ({err.strerror or err})"
        rows = results.read_metrics(out / "metrics.jsonl")
        step = rows[-1]["step"] if rows else 0
        cause = failure_cause(error)
        space = "; free space under " + str(out) if "No space left" in cause or "No space left" in where else ""
        raise RunFailed(f"the run failed after step {step} of {config.train.steps}: {cause}; {where}{space}; "
                        "continue it with --resume")
    last = results.read_metrics(out / "metrics.jsonl")[-1]
    if last.get("checkpoint_path") and (Path(last["checkpoint_path"]) / "samples.png").is_file():
        shutil.copy(Path(last["checkpoint_path"]) / "samples.png", out / "samples.png")
    return last


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped `liftplace distill`; the exit status is 128 + the signal."""

    def __init__(self, message: str, sig: int):
        super().__init__(message)
        self.signal = int(sig)


def _fit_interruptibly(trainer, out: Path, steps: int):
    """Run trainer.fit() and return its error (None when it finished). In the main thread,
    Ctrl-C or SIGTERM raises RunInterrupted, naming the last step and checkpoint that --resume
    continues from; Ray's own shutdown at exit ends the run's controller and workers (they
    belong to this driver)."""
    from ray.train import TrainingFailedError

    def fit():
        try:
            return trainer.fit().error
        except TrainingFailedError as err:  # Ray Train 2.60 raises it (older versions returned it)
            return err

    if threading.current_thread() is not threading.main_thread():
        return fit()  # signal handlers belong to the main thread; a caller's thread keeps its own ways
    received: dict = {}

    def on_term(sig, frame):
        received["signal"] = signal.SIGTERM
        raise KeyboardInterrupt

    # SIGINT too, explicitly: a process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Ctrl-C (or `kill -INT`) must still stop it, as it stops a study
    # (Tune installs its own handler). The fit runs in this (main) thread: ray.get there checks
    # for signals, so either raises KeyboardInterrupt out of it. (It ran in a thread of its own
    # before; exiting while that thread still waited inside Ray's core worker crashed the
    # interpreter at shutdown now and then, exit -11 instead of 130.)
    previous = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return fit()
    except KeyboardInterrupt:
        # A second Ctrl-C or SIGTERM while this says where the run stopped is the same stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        controller = getattr(trainer, "controller", None)
        if controller is not None:  # ask the run's controller to stop its workers (not waited for)
            controller.abort.remote()
        rows = results.read_metrics(out / "metrics.jsonl")
        step = rows[-1]["step"] if rows else 0
        saved = [r["step"] for r in rows if r.get("checkpoint_path")]
        resume = shlex.join(["liftplace", *sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])])
        where = f"from its checkpoint at step {saved[-1]}" if saved else "from the start (no checkpoint yet)"
        raise RunInterrupted(f"interrupted after step {step} of {steps}; continue it {where} with: {resume}",
                             received.get("signal", signal.SIGINT)) from None
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])

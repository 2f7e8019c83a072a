"""Ray glue: the one module that builds Ray Train trainers and Ray Tune tuners.

Two ways to run one distillation (``distill.run``) inside Ray:

- ``train``: a Ray Train ``TorchTrainer`` (Train V2): one or many workers, CPU or GPU,
  DistributedDataParallel, worker restarts from the last checkpoint. Inside a Tune study the
  trial is a small driver function that builds the trainer and forwards rank 0's reports to
  Tune (``TuneReportCallback``) -- the pattern Ray 2.60 documents (``Tuner(trainer)`` is gone).
- ``direct``: the Tune trial calls ``distill.run`` itself. Launching a TorchTrainer costs
  ~20 s per trial on a 2-core machine; a direct trial costs ~1 s. ``auto`` picks direct for
  single-worker trials and train otherwise. Every row records which was used (``runner``).

A study (``liftplace.study``: variants x seeds, expanded and validated before Ray starts) runs
as one Tune grid under ``<storage>/<study>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from liftplace import checkpoints, distill, files, results
from liftplace.config import RunConfig, check_inputs, comparable, from_dict, set_value, validate
from liftplace.results import MetricsFile
from liftplace.study import Study, autoscaling_ceiling, plan

# Ray Train's controller polls workers every 2 s by default, which caps reporting at one row
# per 2 s; 0.2 s keeps small CPU runs from waiting on it (set before Ray starts).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def check_reachable(address: str | None) -> None:
    """Refuse, in one line and within seconds, an --address (or RAY_ADDRESS) where nothing
    answers: Ray itself retries a dead address for minutes. "auto" is resolved as Ray resolves
    it; where it finds no cluster, Ray's own error says so."""
    import socket

    if not address:
        return
    target = address
    if "://" not in address:
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) if address == "auto" else address
        except Exception:  # noqa: BLE001 -- several clusters, or none: ray.init says which
            return
    if not target:
        return
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except ValueError:
        raise ValueError(f"--address {address}: not host:port, auto or ray://host:port") from None
    except OSError as err:
        raise ValueError(f"--address {address}: nothing answers at {target} ({err.strerror or err}); is the cluster "
                         "up? (`ray status` on its head node)") from None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, show_dashboard: bool = True):
    """Join a cluster (address, e.g. "auto") or start an embedded local Ray, once. A study says
    the dashboard's address in its own header line (show_dashboard=False)."""
    import ray

    if ray.is_initialized():
        return ray
    check_reachable(address or os.environ.get("RAY_ADDRESS"))
    env = {k: v for k, v in os.environ.items()
           if k == "HF_HUB_OFFLINE" or k.startswith(("LIFTPLACE_", "RAY_TRAIN_"))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Train V2 routes print() through its logger and the console both: every line twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"runtime_env": {"env_vars": env, "worker_process_setup_hook": "liftplace.raylog.setup"},
              "log_to_driver": True}
    # Ray announces the connection on stderr; it is said on stdout instead, so that input refused
    # right after joining (GPUs the cluster lacks) is still one line on stderr.
    announcer = logging.getLogger("ray._private.worker")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    # Ray warns, in a line of log format with a link, that a local Ray has token authentication
    # on (its default, kept here): the fact is said once, in the line below, instead.
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    token_notice = _Swallow("Token authentication is enabled")
    token.addFilter(token_notice)
    # ray.init replaces the SIGTERM handler with its own (sys.exit(15), or a node teardown that
    # exits 1), silently; the caller's own handler (the CLI's: one line and exit 143) is put back
    # once Ray is up. Ray's shutdown at exit still stops the local instance.
    own_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            if address != "auto" and "://" not in address:
                # As for a local instance below: Ray's own actors that look the cluster up with no
                # address must find this one, whatever other Ray runs on the machine.
                kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"] = address
            context = ray.init(address=address, **kwargs)
        else:
            # Some of Ray's own actors (Ray Train's placement-group cleaner) look their cluster
            # up with no address, and fail with "Found multiple active Ray instances" when
            # another Ray runs on the machine. The GCS port is chosen here, so that every
            # worker of this cluster can be told its address (RAY_ADDRESS) from the start.
            from ray._private.services import get_node_ip_address

            port = _free_port()
            kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
            # Nothing preempts a local machine; Ray Train's preemption watcher only logs a
            # core_worker error line ("... constructor arguments in the object store ...") per run.
            kwargs["runtime_env"]["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            previous = os.environ.get("RAY_GCS_SERVER_PORT")
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            try:
                # The dashboard stays on localhost (Ray's default); reach it over an SSH tunnel.
                context = ray.init(num_cpus=num_cpus, object_store_memory=256 * 2**20, **kwargs)
            finally:
                if previous is None:
                    os.environ.pop("RAY_GCS_SERVER_PORT", None)
                else:
                    os.environ["RAY_GCS_SERVER_PORT"] = previous
    except SystemExit as stop:
        if stop.code == signal.SIGTERM and callable(own_term):  # Ray's handler, during ray.init
            own_term(signal.SIGTERM, None)
        raise
    finally:
        announcer.setLevel(level)
        token.removeFilter(token_notice)
        if callable(own_term):
            signal.signal(signal.SIGTERM, own_term)
    RAY_SESSION["dashboard"] = f"http://{context.dashboard_url}" if context.dashboard_url else None
    auth = " (token authentication on)" if token_notice.seen else ""
    dashboard = f"; dashboard {RAY_SESSION['dashboard']}" if RAY_SESSION["dashboard"] and show_dashboard else ""
    print(f"ray: {f'joined the cluster at {address}' if address else 'started a local instance'}{auth}{dashboard}")
    return ray


def _free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


RAY_SESSION: dict = {"dashboard": None}  # what ensure_ray learnt, for a study's header line


class _Swallow(logging.Filter):
    """Drops the log records that start with ``prefix`` (a string or a tuple), remembering that
    one came."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefix):
            self.seen = True
            return False
        return True


def cluster_capacity() -> dict:
    """The CPUs and GPUs the joined Ray cluster has now or, autoscaling, can reach at most
    (``study.autoscaling_ceiling``: GPU workers of a `ray up` cluster start from zero)."""
    import ray

    return autoscaling_ceiling({key: ray.cluster_resources().get(key, 0) for key in ("CPU", "GPU")})


def check_resources(configs: list[RunConfig], address: str | None = None) -> None:
    """Refuse runs the cluster cannot place, instead of leaving them pending forever.

    Called before Ray starts too: without a cluster to join (no address, Ray not running), the
    embedded Ray will have this machine's GPUs, so a GPU request is refused up front.
    """
    import ray

    if ray.is_initialized():
        have, where = cluster_capacity(), "the Ray cluster"
    elif address is None:
        import torch

        have, where = {"GPU": torch.cuda.device_count()}, "this machine"
    else:
        return  # a cluster to join: checked once connected
    for config in configs:
        sc = config.scaling
        need_cpu = sc.num_workers * sc.cpus_per_worker
        need_gpu = sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0
        if need_gpu > have.get("GPU", 0):
            raise ValueError(f"scaling.use_gpu: a run asks for {need_gpu:g} GPUs ({sc.num_workers} workers x "
                             f"{sc.gpus_per_worker:g}); {where} has {have.get('GPU', 0):g}")
        if "CPU" in have and need_cpu > have["CPU"]:
            raise ValueError(f"scaling.num_workers: a run asks for {need_cpu} CPUs ({sc.num_workers} workers x "
                             f"{sc.cpus_per_worker}); {where} has {have['CPU']:g}")


# What a training step needs beyond ``models.step_memory``'s estimate, all measured on this
# project's 2-core machine: a Ray Train worker process with torch, the teacher and the data
# loaded holds ~1.0 GiB resident before its first step; a local Ray's own processes (GCS,
# raylet, dashboard, log monitor) ~0.7 GiB; and real CPU steps held 1.1 to 1.3 times the
# estimate (allocator and kernel workspaces it does not see).
WORKER_BASE_BYTES = 2**30
RAY_BASE_BYTES = 2**30
STEP_MARGIN = 1.5
GIB = 2**30


def _gpu_free_bytes() -> list[int]:
    """Free memory of each GPU this machine's CUDA sees, asked in a short subprocess: the driver
    itself never opens a CUDA context (one holds ~0.3-0.5 GiB of every GPU for the whole run)."""
    import subprocess

    code = "import torch; print([torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


def _memory_budget(configs: list[RunConfig], address: str | None) -> tuple[str, float, str, int] | None:
    """What a run's steps must fit in: (kind, bytes, where, count). kind "cpu": this machine's
    available memory (count 1); "gpu": the least free memory of one of this machine's count GPUs;
    "node": a joined Ray's largest node's "memory" resource, for one worker. None where it
    cannot be known: a cluster not yet joined, or GPU memory on a running Ray (not reported)."""
    import ray

    use_gpu = any(c.scaling.use_gpu for c in configs)
    if ray.is_initialized():
        if use_gpu:
            return None
        have = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        return ("node", have, "the largest node of the Ray cluster has", 1) if have else None
    if address is not None:
        return None  # a cluster to join: checked once connected
    if use_gpu:
        free = _gpu_free_bytes()
        return ("gpu", min(free), "this machine's GPUs have (the least free one)", len(free)) if free else None
    import psutil

    return "cpu", psutil.virtual_memory().available - RAY_BASE_BYTES, "this machine has", 1


_STEPS: dict = {}  # (teacher, shape, student settings or None) -> (step bytes x margin, student weight bytes)


def _step_estimate(config: RunConfig, exact: bool) -> tuple[float, int]:
    """A step's bytes (times STEP_MARGIN) and the student's weight bytes: with the teacher as
    its own student (a bound, nothing built), or, ``exact``, with the config's student."""
    from liftplace import latents, models
    from liftplace.teachers import load_teacher, load_vae, teacher_space

    name, d = config.teacher.name, config.data
    # The key from the teacher's config.json: its weights are read only when not yet estimated
    # (a study asks once per config, a cohort's configs share one estimate).
    space = teacher_space(name)  # the denoiser's input: a latent teacher's is smaller than the images
    size = space.size or d.resolution
    shape = (config.train.batch, space.channels, size, size)
    key = (name, shape, str(config.student) if exact else None)
    if key not in _STEPS:
        teacher = load_teacher(name)[0]
        student = teacher
        if exact:
            # Which channels survive changes no shape: Taylor's student is sized without its data.
            sized = config.student
            if sized.importance in models.NEEDS_DATA:
                sized = dataclasses.replace(sized, importance="magnitude")
            student = models.build_student(teacher, sized, seed=config.train.seed, example_shape=(2, *shape[1:]))
        weights = models.weight_bytes(student)
        step = models.step_memory(teacher, shape, student if exact else None)
        if space.latent:  # the worker also holds the frozen VAE, and encodes and decodes in chunks
            step += latents.vae_memory(load_vae(space), space.image_channels, d.resolution)
        _STEPS[key] = step * STEP_MARGIN, weights
    return _STEPS[key]


def check_memory(configs: list[RunConfig], address: str | None = None, *, wanted: int = 1, members: int = 1,
                 max_concurrent: int | None = None, log=print) -> int | None:
    """Refuse a run whose training step cannot fit in memory, before it starts, and return how
    many of its trials fit at once (None where that is not decided here).

    Without a cluster to join, a trial's steps are held against this machine's available memory
    (its GPUs' free memory for GPU runs); on a running Ray (joined, or started by someone else
    in this process), one worker's against its largest node's Ray "memory" resource (CPU runs;
    Ray does not report GPU memory). The step is ``models.step_memory`` times a margin, first
    with the teacher standing in for each student (nothing built); only where that bound does
    not fit ``wanted`` trials at once are the students pruned for the exact estimate. A cohort
    trial of ``members`` students also holds every other student's weights, gradients, Adam
    moments and EMA (5 copies). ``max_concurrent`` (a study's --max-concurrent) is refused
    when that many trials do not fit; ``wanted`` is what the caller would run at once."""
    budget = _memory_budget(configs, address)
    if budget is None:
        return None
    kind, available, where, gpus = budget
    wanted = max(wanted, max_concurrent or 0)

    def per_trial(config: RunConfig, exact: bool) -> float:
        """Bytes of one trial of config (one worker's, for "node"; one GPU's, for "gpu")."""
        step, weights = _step_estimate(config, exact)
        step += (members - 1) * 5 * weights
        if kind == "gpu":
            return step
        return WORKER_BASE_BYTES + step if kind == "node" else (WORKER_BASE_BYTES + step) * config.scaling.num_workers

    def trials_at_once(need: float, config: RunConfig) -> int:
        if kind != "gpu":
            return int(max(available, 0) // need)
        sc = config.scaling
        per_gpu = int(available // need)  # workers whose steps fit one GPU's memory
        if sc.gpus_per_worker < 1:
            slots = gpus * min(per_gpu, int(1 / sc.gpus_per_worker + 1e-6))
        else:
            slots = gpus // math.ceil(sc.gpus_per_worker) if per_gpu >= 1 else 0
        return slots // sc.num_workers

    try:
        for exact in (False, True):
            worst = max(configs, key=lambda c: per_trial(c, exact))
            need = per_trial(worst, exact)
            fits = trials_at_once(need, worst)
            if fits >= wanted:
                break
    except (ImportError, AttributeError) as err:  # MemTracker is torch's, under a private module
        log(f"memory: not checked: this torch cannot estimate a step ({err})")
        return None
    config, sc = worst, worst.scaling
    what = (f"train.batch: {config.train.batch} needs about {_step_estimate(config, exact)[0] / GIB:.1f} GiB "
            f"{'of GPU memory ' if kind == 'gpu' else ''}per worker for a training step "
            f"(teacher {config.teacher.name}, {config.data.resolution}x{config.data.resolution}, estimated)")
    if fits < 1:
        if kind == "gpu":
            raise ValueError(f"{what}; {where} {available / GIB:.1f} GiB free; lower train.batch")
        if kind == "node":
            raise ValueError(f"{what}; with its worker process that is {need / GIB:.1f} GiB, and {where} "
                             f"{available / GIB:.1f} GiB (its Ray 'memory' resource); lower train.batch")
        ray_too = " and Ray's own"
        if sc.num_workers > 1:
            total = f"{sc.num_workers} workers with their processes{ray_too} need"
            lower = "lower train.batch or scaling.num_workers"
        else:
            total, lower = f"with its worker process{ray_too} that is", "lower train.batch"
        raise ValueError(f"{what}; {total} {(need + RAY_BASE_BYTES) / GIB:.1f} GiB, and {where} "
                         f"{(available + RAY_BASE_BYTES) / GIB:.1f} GiB available; {lower}")
    if kind == "node":
        return None  # how many trials a cluster runs at once is its scheduler's to say
    if max_concurrent is not None and max_concurrent > fits:
        raise ValueError(f"--max-concurrent: {max_concurrent} trials at a time do not fit in the memory "
                         f"{where} ({available / GIB:.1f} GiB for them, about {need / GIB:.1f} GiB each"
                         f"{' per GPU' if kind == 'gpu' else ''}); at most {fits} fit")
    return fits


# --- Ray Train ---------------------------------------------------------------------------


def run_payload(payload: dict, extra: dict, send, checkpoint, *, curves: dict | None = None, log=print) -> None:
    """Train what a trial holds -- one run ({"config"}) or a cohort ({"members"}) -- sending
    each report to Ray as send(metrics, checkpoint_dir). A cohort's report is one Ray row
    {"step", "members": {variant: row}}: every student's row of the schema, with its variant.
    With ``curves`` ({"root", "name"}), rank 0 also writes every row to TensorBoard event files
    (results.Curves): a cohort member under <variant>-seed<k>, a single run under ``name``."""
    writer = results.Curves(curves["root"]) if curves and distill.rank_and_world()[0] == 0 else None
    try:
        if "members" in payload:
            members = {m["variant"]: from_dict(m["config"], check_paths=False) for m in payload["members"]}
            seed = next(iter(members.values())).train.seed

            def report(rows, checkpoint_dir):
                step = next(iter(rows.values()))["step"]
                if writer:
                    for variant, row in rows.items():
                        writer.add(results.run_label(variant, seed), row)
                send({"step": step, "members": {v: {**row, **extra, "variant": v} for v, row in rows.items()}},
                     checkpoint_dir)

            distill.run_cohort(members, report, checkpoint=checkpoint, log=log)
        else:
            config = from_dict(payload["config"], check_paths=False)

            def report(row, checkpoint_dir):
                if writer:
                    writer.add(curves["name"], row)
                send(_tune_row({**row, **extra}), checkpoint_dir)

            distill.run(config, report, checkpoint=checkpoint, log=log)
    finally:
        if writer:
            writer.close()


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker loop: the trial's run or cohort in every worker, resuming from
    Train's checkpoint."""
    import ray.train

    from ray.train.v2._internal.execution import context

    if not loop_config.get("ray_logs"):
        # Ray Train logs every report at INFO, a screenful per row (from a logger named after
        # its source file, outside "ray.train"), and an error's traceback in every worker: the
        # progress lines suffice, and the driver says a failure in one line (the traceback goes
        # to the run's error.txt, or the trial's).
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)

    def send(metrics, checkpoint_dir):
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("start_from"):  # see run_single: Ray's record was cut short
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["start_from"])
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
        run_payload(loop_config["payload"], {"runner": "train", **loop_config.get("extra", {})}, send, directory,
                    curves=loop_config.get("curves"), log=print if loop_config.get("verbose", True) else _quiet)


def _quiet(line: str) -> None:
    """A study's trials keep their per-step progress lines off the console (--verbose shows them)."""


def _row_log_callback(path: Path):
    import ray.train

    class RowLog(ray.train.UserCallback):
        """In the Train controller: write rank 0's row of every report to metrics.jsonl
        (Ray keeps only the rows that came with a checkpoint)."""

        def __init__(self):
            self.file = MetricsFile(path)

        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            row["checkpoint_path"] = checkpoint.path if checkpoint else None
            self.file.append(row)

    return RowLog()


def _trainer_class():
    """TorchTrainer without the Ctrl-C handler Ray Train installs when fit() runs in the main
    thread (it aborts the run and exits with status 0, saying nothing): `liftplace distill`
    handles Ctrl-C and SIGTERM itself (see _fit_interruptibly)."""
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_register_sigint_handler"):
        raise RuntimeError("this Ray Train has no TorchTrainer._register_sigint_handler (Ray 2.60 has it); "
                           "liftplace's Ctrl-C handling needs updating for it")

    class Trainer(TorchTrainer):
        controller = None

        def _register_sigint_handler(self, controller):
            self.controller = controller  # kept, so that an interrupted fit can abort the run

    return Trainer


def make_trainer(config: RunConfig, *, storage: str, name: str, callbacks=(), max_failures: int = 0, extra=None,
                 payload: dict | None = None, curves: dict | None = None, verbose: bool = True,
                 ray_logs: bool = False, start_from: str | None = None):
    """A TorchTrainer for config's scaling that trains payload (default: config's one run);
    curves: where rank 0 writes TensorBoard event files (run_payload); verbose: progress lines;
    ray_logs: Ray Train's own INFO and WARNING lines on the console (every report, resource
    requests, and under a loaded CPU a "safe to ignore" warning with a traceback); without,
    only its errors (its log files keep everything); start_from: a checkpoint folder to begin
    from when Ray Train holds none of its own."""
    import ray.train

    sc = config.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return _trainer_class()(
        train_loop,
        train_loop_config={"payload": payload or {"config": config.to_dict()}, "extra": extra or {}, "curves": curves,
                           "verbose": verbose, "ray_logs": ray_logs, "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       logging_config=ray.train.LoggingConfig(log_level="INFO" if ray_logs else "ERROR")),
    )


class RunFailed(Exception):
    """A run or study that failed inside a worker, said in one line (cause, step, log file)."""


def failure_cause(error: BaseException) -> str:
    """One line for what failed inside Ray: the original exception of the first failed worker
    (Ray wraps it, with its traceback, in its own errors), as "Type: first line"."""
    failures = getattr(error, "worker_failures", None)
    exc = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    exc = getattr(exc, "cause", None) or exc  # ray.exceptions.RayTaskError keeps the original here
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def prepare_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty: choose a new --out, or pass --resume to continue that run")
    if resume and not (out / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run (no config.json)")


def run_single(config: RunConfig, out: str | Path, *, address: str | None = None, resume: bool = False,
               max_failures: int = 1) -> dict:
    """`liftplace distill`: one run on Ray Train, written to ``out``.

    out/config.json (the resolved config), out/metrics.jsonl (one row per reported step),
    out/run/checkpoint_* (Ray Train's checkpoints), out/samples.png (the final student's
    samples, left four columns, beside the teacher's from the same noise, right four).
    """
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
        if rows and rows[-1]["step"] >= config.train.steps and (
                rows[-1].get("diverged") or math.isfinite(rows[-1].get("fid") or math.nan)):
            print(f"{out}: the run finished at step {rows[-1]['step']}; nothing to resume")
            return rows[-1]
    distill._pause_point("checks")
    check_inputs([config])
    check_resources([config], address)  # before Ray starts, where that can be known
    check_memory([config], address)
    files.check_writable(out, "--out")
    ensure_ray(address)
    check_resources([config])
    check_memory([config], address)
    files.make_folder(out, "--out")
    config.save(out / "config.json")
    if cut_short:
        snapshot = out / "run" / "checkpoint_manager_snapshot.json"
        snapshot.replace(snapshot.with_name(snapshot.name + ".cut-short"))
        print(f"{snapshot} was cut short (a full disk, or a crash while it was written; kept as "
              f"{snapshot.name}.cut-short): going on from {start_from or 'the start'}, the last checkpoint "
              "metrics.jsonl names")
    curves = {"root": str(out / results.TENSORBOARD), "name": "run"} if results.tensorboard_available() else None
    trainer = make_trainer(config, storage=str(out), name="run", callbacks=[_row_log_callback(out / "metrics.jsonl")],
                           max_failures=max_failures, curves=curves, start_from=start_from)
    distill._pause_point("trainer")
    error = _fit_interruptibly(trainer, out, config.train.steps)
    if error:
        log_file = out / "error.txt"
        try:
            files.write_text(log_file, f"{error}\n")  # the workers' tracebacks, in full
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


# --- Ray Tune studies --------------------------------------------------------------------


def _trial_payload(params: dict) -> tuple[RunConfig, dict, dict]:
    """(the trial's first config, for its scaling; what it trains; columns every row gets)."""
    run = params["run"]
    if "members" in run:
        return from_dict(run["members"][0]["config"], check_paths=False), {"members": run["members"]}, {}
    chosen = params.get("search", {})  # a search trial: Optuna's choices on top of the base config
    config = from_dict(run["config"], chosen, check_paths=False)
    variant = run["variant"] + "".join(f" {k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f" {k.split('.')[-1]}={v}"
                                       for k, v in sorted(chosen.items()))
    return config, {"config": config.to_dict()}, {"variant": variant}


def _tune_row(row: dict) -> dict:
    """Evaluation metrics are left out of rows that have none, so that a scheduler that
    compares FID (ASHA) acts at evaluations only; analysis reads the missing value as NaN."""
    return {k: v for k, v in row.items() if not (k in results.EVAL_COLUMNS and isinstance(v, float) and math.isnan(v))}


def tune_direct(params: dict) -> None:
    """A Tune trial that trains its run or cohort in-process (one worker)."""
    import ray.tune
    import torch

    config, payload, extra = _trial_payload(params)
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    _quiet_ray_logs(params)

    def send(metrics, checkpoint_dir):
        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as directory:
        run_payload(payload, {**extra, "runner": "direct"}, send, directory, curves=_trial_curves(params),
                    log=print if params["run"].get("verbose", True) else _quiet)


def _quiet_ray_logs(params: dict) -> None:
    """In a trial of a study without --verbose: Ray's INFO line for every checkpoint saved
    ("Checkpoint successfully created at ...") stays in the worker's log file. In every trial:
    when a stopped study's trial is ended by Ray (SIGTERM), Ray's handler raises SystemExit,
    and if that lands in a weakref callback Python prints "Exception ignored in ..." with a
    traceback, which reached the driver's console: that one case is not printed."""
    if not params["run"].get("verbose", True):
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if sys.unraisablehook is not _unraisable:  # once per process: Tune reuses a trial's actor
        _unraisable.previous = sys.unraisablehook
        sys.unraisablehook = _unraisable


def _unraisable(unraisable) -> None:
    if not isinstance(unraisable.exc_value, SystemExit):
        _unraisable.previous(unraisable)


def _trial_curves(params: dict) -> dict | None:
    """Where a trial writes its event files (None: the study writes none), and the name of a
    single run's folder there: the trial's name, <variant>-seed<k>."""
    import ray.tune

    root = params["run"].get("curves")
    return {"root": root, "name": ray.tune.get_context().get_trial_name()} if root else None


def tune_train(params: dict) -> None:
    """A Tune trial that drives a Ray Train run and forwards its rows to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config, payload, extra = _trial_payload(params)
    _quiet_ray_logs(params)
    trial_id = ray.tune.get_context().get_trial_id()
    # Named after the trial: a restarted trial re-opens the same Train run and resumes it.
    trainer = make_trainer(config, storage=params["run"]["train_storage"], name=f"train-{trial_id}",
                           callbacks=[TuneReportCallback()], max_failures=params["run"]["worker_failures"],
                           extra=extra, payload=payload, curves=_trial_curves(params),
                           verbose=params["run"].get("verbose", True), ray_logs=params["run"].get("verbose", True))
    result = trainer.fit()
    if result.error:
        raise result.error


def _check_space(study: Study, base: dict) -> None:
    """Refuse a search dimension whose values a run cannot use, before Ray starts."""
    from ray.tune.search.sample import Categorical

    for key, domain in study.space.items():
        values = domain.categories if isinstance(domain, Categorical) else [domain.lower, domain.upper]
        for value in values:
            config = from_dict(base, check_paths=False)
            set_value(config, key, value)
            validate(config, check_paths=False)


def _trainable(runner: str, config: RunConfig):
    from ray import tune

    if runner == "direct":
        sc = config.scaling
        return tune.with_resources(tune_direct, {"cpu": sc.cpus_per_worker, "gpu": sc.gpus_per_worker if sc.use_gpu else 0})
    # The driver itself needs no CPU: its workers hold the run's resources. (A zero request is
    # refused by Ray, hence the token memory.)
    return tune.with_resources(tune_train, {"cpu": 0, "memory": 64 * 2**20})


def _trials_by_cpus(config: RunConfig, cpus: float) -> int:
    """Trials at once that ``cpus`` CPUs hold: 2 CPUs / 0.6 per trial: 3 at a time."""
    return max(1, int(cpus / (config.scaling.num_workers * config.scaling.cpus_per_worker) + 1e-6))


def run_study(study: Study, *, preset: str = "cpu", overrides=(), seeds: int | None = None,
              storage: str | Path = "results", address: str | None = None, resume: bool = False,
              runner: str = "auto", max_concurrent: int | None = None, max_failures: int = 1,
              cohort: str = "auto", verbose: bool = False, add_seeds: int = 0,
              sequential: dict | None = None, margin: float | None = None, log=print) -> Path:
    """Run (or resume) a study; returns its experiment folder ``<storage>/<study name>``.

    ``add_seeds``: grow a study that exists (finished or interrupted) by this many seeds, as
    new trials in a part of their own (``<folder>/seeds-<first>-<last>``, its own Tune
    experiment), leaving every file of the earlier parts as it is; study.json records the
    addition. ``sequential`` ({"max_seeds", "round", "margin", "alpha"}: ``--seeds auto``):
    after the study's seeds, look at every comparison with kd and add rounds of seeds until
    each is decided or max_seeds is reached (``liftplace.verdicts``: alpha spent look by look).
    A resume (or an addition) first finishes every unfinished part. ``margin``: the verdicts'
    equivalence margin (a fraction of kd's mean final FID), recorded in study.json.
    """
    from ray import tune

    if add_seeds < 0:
        raise ValueError(f"--add-seeds must be >= 1, got {add_seeds}")
    if (add_seeds or sequential) and study.space:
        raise ValueError("a search samples its trials: --add-seeds and --seeds auto are for grid studies")
    p = plan(study, preset=preset, overrides=overrides, seeds=seeds, storage=storage, runner=runner, cohort=cohort)
    trials, configs, chosen, folder = p.trials, p.configs, p.runner, p.folder
    if margin is not None and not 0 < margin < 10:
        raise ValueError(f"--margin must be a fraction of kd's mean FID in (0, 10), e.g. 0.2, got {margin}")
    if sequential:
        from liftplace.verdicts import ALPHA, MARGIN

        sequential = {"margin": margin if margin is not None else MARGIN, "alpha": ALPHA, **sequential}
        _check_sequential(sequential, p.info["seeds"])
    if add_seeds and not (folder / results.STUDY_FILE).is_file():
        raise FileNotFoundError(f"--add-seeds: no study to grow at {folder}; run it first")
    storage = folder.parent
    if study.space:
        _check_space(study, trials[0]["config"])
    distill._pause_point("study checks")
    check_inputs(configs, log=log)
    check_resources(configs, address)
    # As many trials at once as this machine's CPUs allow (the default below), within the memory.
    members = max((len(t["members"]) for t in trials if "members" in t), default=1)
    memory_fits = check_memory(configs, address, members=members, log=log,
                               wanted=min(len(trials), _trials_by_cpus(configs[0], os.cpu_count() or 1)),
                               max_concurrent=None if max_concurrent is None else min(max_concurrent, len(trials)))
    check_reachable(address or os.environ.get("RAY_ADDRESS"))  # before anything is written: a dead cluster is refused in seconds
    had_lock_file = (folder / "driver.lock").exists()
    lock = _driver_lock(folder) if (folder / results.STUDY_FILE).is_file() else None
    try:
        results.claim_study(folder, p.info, resume or bool(add_seeds))
    except BaseException:
        if lock is not None:
            lock.release()
            if not had_lock_file:  # a refused study leaves its folder as it was, byte for byte
                (folder / "driver.lock").unlink(missing_ok=True)
        raise
    lock = lock or _driver_lock(folder)
    try:
        action = "start" if not (resume or add_seeds) else "resume"
        if add_seeds:
            action += f", add {add_seeds} seed{'s' if add_seeds > 1 else ''}"
        if sequential:
            action += f", seeds auto up to {sequential['max_seeds']}"
            results.record(folder, "sequential", sequential)
        if margin is not None:
            results.record(folder, "margin", margin)
        results.record(folder, "history", {"action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "provenance": results.provenance()})
        distill._pause_point("study claimed")
        ray = ensure_ray(address, show_dashboard=False)
        check_resources(configs)
        check_memory(configs, address, members=members, log=log)  # a joined cluster's nodes, now known
        if max_concurrent is None:
            # GPU trials: an autoscaling cluster's ceiling (GPU workers start from zero); CPU
            # trials: the CPUs up now, so that queued CPU trials never make the autoscaler start
            # GPU machines for them.
            cpus = (min(cluster_capacity()["CPU"], 1024) if any(c.scaling.use_gpu for c in configs)
                    else ray.cluster_resources().get("CPU", 1))
            max_concurrent = _trials_by_cpus(configs[0], cpus)
            if memory_fits is not None and memory_fits < min(max_concurrent, len(trials)):
                log(f"memory: {memory_fits} trial{'s' if memory_fits > 1 else ''} at a time fit in memory "
                    f"({max_concurrent} would by CPUs)")
                max_concurrent = memory_fits
        part = dict(study=study, chosen=chosen, configs=configs, folder=folder, max_concurrent=max_concurrent,
                    max_failures=max_failures, verbose=verbose, log=log, tune=tune)
        start = time.time()
        finished = 0

        def grow(count: int) -> None:
            info = results.read_study_info(folder)
            have = results.study_seeds(info)
            new = list(range(max(have) + 1, max(have) + 1 + count))
            name = f"seeds-{new[0]}-{new[-1]}"
            results.record(folder, "additions", {"seeds": new, "folder": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            log(f"study {study.name}: adding seed{'s' if count > 1 else ''} {', '.join(map(str, new))} -> {folder / name}")

        def run_parts() -> None:
            nonlocal finished
            info = results.read_study_info(folder)
            parts = [(None, None)] + [(a["folder"], a["seeds"]) for a in info.get("additions", [])]
            for name, seed_list in parts:
                if name is None:
                    part_trials = trials
                else:
                    part_trials = plan(study, preset=preset, overrides=overrides, seeds=seeds, storage=storage,
                                       runner=runner, cohort=cohort, seed_list=seed_list).trials
                finished += _run_part(part_trials, name, **part)

        if add_seeds:
            run_parts()  # what an earlier driver left unfinished, first
            grow(add_seeds)
        run_parts()
        while sequential:
            info = results.read_study_info(folder)
            if not _look(folder, info, sequential, log):
                break
            grow(min(sequential["round"], sequential["max_seeds"] - len(results.study_seeds(info))))
            run_parts()
        log(f"study {study.name}: {finished} trials finished in {_duration(time.time() - start)}\nresults: {folder}")
        return folder
    finally:
        lock.release()


def _driver_lock(folder: Path):
    """One driver per study folder: an OS lock on ``<folder>/driver.lock``, held while the
    driver runs (the OS releases it when the process dies, so a killed driver's lock is taken
    over by the next). A second driver is refused in one line naming the first (from its
    heartbeat), before it writes anything: two drivers on one study once interleaved their
    trials' rows in result.json and lost the first's."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / "driver.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            beat = json.loads((folder / results.DRIVER_FILE).read_text())
            who = f"pid {beat.get('pid')} on {beat.get('host')}, heartbeat {time.time() - beat.get('updated', 0):.0f} s ago"
        except (OSError, ValueError):
            who = "its heartbeat unreadable"
        raise FileExistsError(f"{folder} is being run by another driver ({who}): wait for it to end, or stop it "
                              "(Ctrl-C) and continue with --resume") from None
    return lock


def _check_sequential(rule: dict, seeds: int) -> None:
    from liftplace.verdicts import MIN_SEEDS

    if rule["max_seeds"] < max(seeds, MIN_SEEDS):
        raise ValueError(f"--max-seeds {rule['max_seeds']}: must be at least the study's first seeds ({seeds}) "
                         f"and {MIN_SEEDS} (the fewest a verdict is drawn from)")
    if seeds < MIN_SEEDS:
        raise ValueError(f"--seeds auto starts from the study's {seeds} seeds; a verdict needs {MIN_SEEDS} a side")
    if rule["round"] < 1:
        raise ValueError(f"--round must be >= 1, got {rule['round']}")


def _look(folder: Path, info: dict, rule: dict, log) -> bool:
    """One look of a --seeds auto study at its finished runs: every comparison with kd at the
    alpha this look spends; recorded in study.json. True: grow another round."""
    import pandas as pd

    from liftplace import verdicts

    seeds = len(results.study_seeds(info))
    looks = info.get("looks", [])
    previous = looks[-1]["seeds"] if looks else 0
    if looks and previous == seeds:  # this many seeds were looked at already (a resumed driver)
        return not looks[-1].get("stop")
    level = verdicts.look_alpha(seeds, previous, rule["max_seeds"], rule["alpha"])
    table = verdicts.table(results.finished_runs(folder), margin=rule["margin"], alpha=level)
    words = dict(zip(table["variant"], table["word"])) if not table.empty else {}
    stop = None
    if words and all(w in verdicts.DECIDED for w in words.values()):
        stop = "every comparison with kd is decided"
    elif seeds >= rule["max_seeds"]:
        stop = f"the most seeds allowed ({rule['max_seeds']}) reached with comparisons undecided"
    elif not words:
        stop = "no comparison with kd to decide"
    results.record(folder, "looks", {"seeds": seeds, "level": level, "verdicts": words, "stop": stop})
    counts = pd.Series(list(words.values()), dtype=object).value_counts().to_dict()
    log(f"look at {seeds} seeds (level {level:.3g}): " + ", ".join(f"{n} {w}" for w, n in counts.items())
        + (f"; stop: {stop}" if stop else "; growing by another round"))
    return stop is None


def _run_part(trials: list[dict], name: str | None, *, study: Study, chosen: str, configs, folder: Path,
              max_concurrent: int, max_failures: int, verbose: bool, log, tune) -> int:
    """Run (or resume) one part of a study as its own Tune experiment: the study's first seeds
    in ``folder`` itself (name None), an addition in ``folder/<name>``. A part whose every run
    ended is skipped. Returns how many trials this call finished."""
    experiment = folder if name is None else folder / name
    table, _ = results.study_status(folder)
    seeds = {t["seed"] for t in trials}
    mine = table[table["seed"].isin(seeds)] if not study.space else table
    if not study.space and len(mine) and mine["state"].isin(["done", "diverged"]).all() and experiment.exists():
        return 0
    curves = results.tensorboard_available()
    for t in trials:
        t["train_storage"] = str(folder / "_train")
        t["worker_failures"] = max_failures
        t["verbose"] = verbose  # the trials' own progress lines, off by default
        if curves:
            t["curves"] = str(folder / results.TENSORBOARD)
    trainable = _trainable(chosen, configs[0])
    runs = f"{len(trials) if study.space else sum(len(t.get('members', [t])) for t in trials)} runs " \
           f"({len(study.variants)} variants x {len(seeds)} seeds" + (f": {', '.join(map(str, sorted(seeds)))}" if name else "") + ")"
    cohorts = sum("members" in t for t in trials)
    if cohorts:
        runs += f" in {len(trials)} trials ({cohorts} cohorts: one teacher forward per step for each)"
    count = f"{study.num_samples} sampled trials" if study.space else runs
    dashboard = f"; dashboard {RAY_SESSION['dashboard']}" if RAY_SESSION["dashboard"] else ""
    log(f"study {study.name}: {count}, runner {chosen}, up to {max_concurrent} at a time -> {experiment}{dashboard}")
    log(f"curves: tensorboard --logdir {folder}" if curves else
        "curves: none (pip install -e '.[watch]' for TensorBoard event files)")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Tune's JSON and CSV rows (result.json is what results.load_study reads); not its own
    # TensorBoard logger, whose flattened cohort rows would sit beside the readable curves above.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    console = [JsonLoggerCallback(), CSVLoggerCallback(), Heartbeat(folder)]
    if not verbose:
        console.append(StudyConsole(study.num_samples if study.space else len(trials), log=log))
    tune_verbose = 1 if verbose else 0
    if not verbose:
        # Tune's newer console prints a configuration box and a TensorBoard path into Ray's
        # temporary session folder even at verbose=0; its classic console is silent at 0. Its INFO
        # lines ("Wrote the latest version of all result files ...") are kept for --verbose.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        # Optuna's own INFO line ("A new study created in memory with name: optuna") too.
        logging.getLogger("optuna").setLevel(logging.WARNING)
        # A failed trial is said by the console (one line, its error file) and, at the end, by
        # the study; Tune's own ERROR record repeats it with the worker's traceback.
        controller = logging.getLogger("ray.tune.execution.tune_controller")
        if _TRIAL_FAILED not in controller.filters:
            controller.addFilter(_TRIAL_FAILED)
    if study.space:
        # A search's rows without FID are expected (FID comes at evaluations only), in a resumed
        # search too (its first row after the restore has none).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        # The restored tuner brings back the console of the first attempt (Tune pickles its
        # RunConfig, callbacks included); this attempt's console and verbosity replace it.
        # Tuner.restore takes no RunConfig in Ray 2.60, hence the private attribute.
        restored = tuner._local_tuner.get_run_config()
        restored.callbacks, restored.verbose = console, tune_verbose
    elif study.space:
        tuner = _search_tuner(study, trials, configs[0], trainable, folder.parent, max_concurrent, max_failures,
                              console, tune_verbose)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=chosen == "direct",
                                        trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent), verbose=tune_verbose,
                                      callbacks=console, failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
    results.write_heartbeat(folder, "running")
    planned = study.num_samples if study.space else len(trials)

    def interrupted(sig) -> StudyInterrupted:
        results.write_heartbeat(folder, "interrupted")
        return StudyInterrupted(results.trials_finished(_part_status(folder, seeds, study)), planned, sig)

    with _sigterm_as_sigint() as received:
        try:
            grid = tuner.fit()  # Ctrl-C (or SIGTERM, made one): Tune saves its state and returns
        except KeyboardInterrupt:  # a second Ctrl-C while Tune was stopping
            raise interrupted(received.get("signal", signal.SIGINT)) from None
    failed = [r for r in grid if r.error]
    results.write_heartbeat(folder, "finished")
    table = _part_status(folder, seeds, study)
    if received:
        raise interrupted(received["signal"])
    if failed:  # one line (the first failure's cause, step and error file); no report
        first = failed[0]
        step = (first.metrics or {}).get("step", 0)
        raise RunFailed(f"{len(failed)} of {len(grid)} trials failed; the first, {Path(first.path).name}, after step "
                        f"{step}: {failure_cause(first.error)}; its error: {Path(first.path) / 'error.txt'}")
    if table["state"].isin(["pending", "interrupted"]).any():  # stopped before the end
        raise interrupted(signal.SIGINT)
    return len(grid)


def _part_status(folder: Path, seeds: set, study: Study):
    """The status table of a part's runs (its seeds; a search's every run)."""
    table, _ = results.study_status(folder)
    return table if study.space else table[table["seed"].isin(seeds)]


class StudyInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a study: how many of its trials had finished, and the signal
    (the exit status is 128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, finished: int, planned: int, sig: int):
        super().__init__(f"interrupted: {finished} of {planned} trials finished")
        self.finished, self.planned, self.signal = finished, planned, int(sig)


@contextmanager
def _sigterm_as_sigint():
    """Within: SIGTERM does what a first Ctrl-C does (Tune stops the trials, saves its state and
    returns), and Tune's own two warnings about it (with a Tuner.restore hint that does not
    apply to a study) are dropped: the study says it in one line. Yields what was received."""
    received: dict = {}

    def on_term(sig, frame):
        received["signal"] = signal.SIGTERM
        signal.raise_signal(signal.SIGINT)

    def on_int(sig, frame):  # only until Tune installs its own handler at the start of fit()
        received["signal"] = signal.SIGINT
        raise KeyboardInterrupt

    notices = _Swallow(("Stop signal received", "Experiment has been interrupted"))
    # (And Tune's "Trials did not complete: [...]": a failed study says which, with the cause.)
    incomplete = _Swallow("Trials did not complete")
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(notices)
    tune_logger.addFilter(incomplete)
    # (And, of a trial stopped before its first row, "Failed to fetch metrics ...: both
    # result.json and progress.csv were not found": the study's own line says what finished.)
    unfetched = _Swallow("Failed to fetch metrics")
    analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_logger.addFilter(unfetched)
    previous = signal.signal(signal.SIGTERM, on_term), signal.getsignal(signal.SIGINT)
    try:
        yield received
    finally:
        if notices.seen:
            received.setdefault("signal", signal.SIGINT)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        tune_logger.removeFilter(notices)
        tune_logger.removeFilter(incomplete)
        analysis_logger.removeFilter(unfetched)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _trial_train(trial) -> dict:
    run = trial.config["run"]
    config = run["members"][0]["config"] if "members" in run else run["config"]
    return config["train"]


def _trial_steps(trial) -> int:
    return int(_trial_train(trial)["steps"])


def _final_fids(result: dict) -> str:
    """'kd FID 12.3 | place K=16 FID 9.8' from a trial's last row (a cohort's, or one run's)."""
    rows = result.get("members") or ({result.get("variant", "run"): result} if result else {})
    parts = []
    for variant, row in rows.items():
        fid = row.get("fid")
        state = "diverged" if row.get("diverged") else f"FID {fid:.2f}" if isinstance(fid, (int, float)) and fid == fid else "no FID"
        parts.append(f"{variant} {state}")
    return " | ".join(parts) or "no rows"


class StudyConsole(Callback):
    """What a study prints while it runs (instead of Ray Tune's tables, which --verbose keeps):
    one line when a trial starts, one when it ends (its runs' final FIDs, its time), and at most
    every ``every`` seconds (less often as the study ages) a progress line: trials
    done/running/pending, training steps done of the study's total, and the time left: the
    steps left over the running trials' summed rate, each trial's rate measured between its own
    first and latest rows (a trial with one row yet counts at the mean of the others'). The
    estimate changes only when a row arrives, not as the wait for the next row grows."""

    def __init__(self, total_trials: int, *, every: float = 30.0, log=print):
        self.total_trials, self.every, self.log = total_trials, every, log
        self.start = time.time()
        self.last_line = self.start
        self.steps: dict[str, int] = {}  # trial id -> last reported step
        # trial id -> [time, step] of its first row (since its last restart) and of its latest
        self.rows: dict[str, list[float]] = {}
        self.started: dict[str, float] = {}

    def _progress(self, trials) -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        pending = max(0, self.total_trials - done - failed - running)
        total = sum(_trial_steps(t) for t in trials) + max(0, self.total_trials - len(trials)) * (
            _trial_steps(trials[0]) if trials else 0)
        finished = self._done(trials)
        elapsed = time.time() - self.start
        rate = self._rate(trials)
        eta = f"ETA {_duration((total - finished) / rate)}" if rate else "ETA after the first rows"
        # A trial past its last row before the final step is sampling its students for the
        # final FIDs, which the steps do not count (minutes for a cohort); say so, or the line
        # looks stuck at 99%.
        evaluating = sum(t.status == "RUNNING" and t.trial_id in self.steps
                         and self.steps[t.trial_id] + int(_trial_train(t)["log_every"]) >= _trial_steps(t)
                         for t in trials)
        return (f"[{_duration(elapsed)}] trials: {done} done, {running} running, {pending} pending"
                + (f", {failed} failed" if failed else "")
                + f"; steps {finished:,}/{total:,} ({100 * finished / max(total, 1):.0f}%); {eta}"
                + (f" + the final evaluation ({evaluating} of {running} running trials in it)" if evaluating else ""))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        run = trial.config["run"]
        runs = ", ".join(m["variant"] for m in run["members"]) if "members" in run else run["variant"]
        self.log(f"start  {trial}: {runs}")

    def __getstate__(self):
        # Tune pickles its RunConfig, callbacks included (tuner.pkl), and the console's log
        # function need not pickle (a test's captured print does not); a restored study gets a
        # new console anyway.
        return {**self.__dict__, "log": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.log = self.log or print

    def _done(self, trials) -> int:
        return sum(_trial_steps(t) if t.status == "TERMINATED" else self.steps.get(t.trial_id, 0) for t in trials)

    def _rate(self, trials) -> float:
        """Steps per second of the study now: its running trials' rates summed (0: unknown)."""
        def own(rows):
            t0, s0, t1, s1 = rows
            return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

        known = [r for r in map(own, self.rows.values()) if r]
        if not known:
            return 0.0
        mean = sum(known) / len(known)
        running = [own(self.rows[t.trial_id]) if t.trial_id in self.rows else None
                   for t in trials if t.status == "RUNNING"]
        return sum(r or mean for r in running) or mean

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result.get("step", 0)), time.time()
        self.steps[trial.trial_id] = step
        rows = self.rows.get(trial.trial_id)
        if rows is None or step < rows[3]:  # its first row, or it restarted from a checkpoint
            self.rows[trial.trial_id] = [now, step, now, step]
        else:
            rows[2:] = [now, step]

    def on_trial_complete(self, iteration, trials, trial, **info):
        took = time.time() - self.started.get(trial.trial_id, self.start)
        self.log(f"done   {trial} in {_duration(took)}: {_final_fids(trial.last_result or {})}")

    def on_trial_error(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        self.log(f"failed {trial} after step {step}; its error: {Path(trial.path or '') / 'error.txt'}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        self.log(f"retry  {trial}: it failed after step {step} and starts again from its last checkpoint, if any")

    def on_step_end(self, iteration, trials, **info):
        # Every 30 s at first, then less often as the study ages (a tenth of its age, at most
        # every 5 min), so that an hour's study prints a screenful, not 120 lines.
        every = max(self.every, min(300.0, (time.time() - self.start) / 10))
        if time.time() - self.last_line >= every and trials:
            self.last_line = time.time()
            self.log(self._progress(trials))


_TRIAL_FAILED = _Swallow("Trial task failed")


class Heartbeat(Callback):
    """The driver's heartbeat in the study folder (results.DRIVER_FILE), which `liftplace
    status` reads to tell a running study from an interrupted one."""

    def __init__(self, folder: Path):
        self.folder, self.last = folder, 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last >= results.HEARTBEAT_S:
            self.last = time.time()
            results.write_heartbeat(self.folder, "running")


class EvalOnlyOptuna(OptunaSearch):
    """Optuna sees the rows that carry the metric (the evaluations), not the rows between."""

    def on_trial_result(self, trial_id, result):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def _search_tuner(study: Study, trials: list[dict], base: RunConfig, trainable, storage, max_concurrent, max_failures,
                  callbacks, verbose: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if len(trials) != 1:
        raise ValueError(f"a search has one base variant and one seed, got {len(trials)} trials")
    evals = max(1, base.train.steps // base.train.eval_every) if base.train.eval_every else 1
    return tune.Tuner(
        trainable,
        param_space={"run": trials[0], "search": study.space},
        tune_config=tune.TuneConfig(
            metric=study.metric, mode=study.mode, num_samples=study.num_samples, max_concurrent_trials=max_concurrent,
            search_alg=EvalOnlyOptuna(seed=0),
            scheduler=ASHAScheduler(time_attr="step", max_t=base.train.steps,
                                    grace_period=base.train.eval_every or base.train.steps,
                                    reduction_factor=2 if evals > 1 else 4),
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name),
        run_config=tune.RunConfig(name=study.name, storage_path=str(storage), verbose=verbose, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


def _trial_name(trial) -> str:
    """What Ray's console and dashboard call a trial: <variant>-seed<k>; a cohort is named after
    its first variant and how many more it trains (kd+5-seed0)."""
    run = trial.config["run"]
    name = f"{run['members'][0]['variant']}+{len(run['members']) - 1}" if "members" in run else run["variant"]
    # Sampled trials of a search share variant and seed: their id tells them apart.
    return results.run_label(name, run["seed"]) + (f"-{trial.trial_id}" if "search" in trial.config else "")


def _trial_dirname(trial) -> str:
    name = _trial_name(trial)
    return (name if trial.trial_id in name else f"{name}-{trial.trial_id}")[:120]

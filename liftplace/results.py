"""Every reader and writer of a run's rows and a study's folder: the one results schema.

A run's rows are one JSON object per reported step: ``step``, ``loss`` and its parts
(``loss_task``, ``loss_distill``, ``loss_coarse``, ``loss_fine``, ``loss_feat``), ``w``, ``beta0``,
``beta1`` (batch means), ``grad_norm``, ``diverged``, ``fid``/``kid``/``precision``/``recall``
(``EVAL_COLUMNS``: NaN between evaluations), ``student_params``, ``teacher_params``,
``compression``, MACs (the denoisers'), ``denoiser_size`` (the side the denoisers see: smaller
than the images for a latent teacher), for a latent teacher ``vae_params`` and ``vae_decode_macs``
(one decode per generated image), ``images_per_s``, ``elapsed_s`` and the FID protocol
(``eval_*``).

A run is a folder, written by one writer (``RunFolder``): ``config.json`` (the run's resolved
config), ``metrics.jsonl`` (its rows), ``checkpoints/step-<k>/`` (each checkpoint of the run,
a cohort member's its own student only: see ``RunFolder.keep_checkpoint``) and, if it failed,
``error.txt``. ``liftplace distill
--out`` is such a folder; a study is ``study.json`` and one such folder per run, a cohort
member's too, that its driver writes from the rows the trials report to Ray Tune::

    <storage>/<study>/study.json                     the study: name, axes, seeds, metric, base config
    <storage>/<study>/runs/<run>/run.json            who the run is: variant, seed, trial, run id
    <storage>/<study>/runs/<run>/config.json         its config; metrics.jsonl: its rows
    <storage>/<study>/runs/<run>/checkpoints/        its checkpoints, step-<k>/ each
    <storage>/<study>/<trial>/                       Ray Tune's trial folder: params.json, result.json
                                                     and Ray's checkpoints (a cohort's, m0/, m1/, ...),
                                                     which a resumed trial starts from

A trial trains one run ({"run": {"variant", "seed", "config"}}) or a cohort of runs that share
one stream of batches ({"run": {"variant", "seed", "members": [{"variant", "config"}]}}), whose
Tune rows are {"step", "members": {variant: the run's row}}; ``trial_rows`` unpacks them into
the runs' rows, once, for the driver. A study begun before run folders (no ``layout`` in its
study.json) is read from its trial folders instead (``_load_trials``), to the same frame.
``load_study(path)`` gives one row per reported step and run, with the run's flattened config as
``config/...`` columns (as Ray writes them), the metrics of the schema, ``variant``,
``trial_dir`` (the trial's folder) and ``run`` (a run's identity: the trial folder, ``/variant``
for a cohort member; a run folder's own name). A step reported twice (a trial resumed from a
checkpoint re-reports the steps after it) keeps its last report, so every run has one row per
step. Analysis reads nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from liftplace import files
from liftplace.dotted import flatten  # noqa: F401 -- results.flatten, as before

STUDY_FILE = "study.json"
RUN_CONFIG, RUN_METRICS = "config.json", "metrics.jsonl"  # a run folder's (``liftplace distill --out``)
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints: checkpoints/step-<step, 7 digits>/
RUNS = "runs"  # a study's run folders: <study>/runs/<run>/
RUN_FILE = "run.json"  # a study's run folder: who the run is ({"variant", "seed", "trial_dir", "folder", "run", "search"})
RUN_IDENTITY = ("trial_dir",)  # what a study's run rows also say: the trial folder that holds their checkpoints
# Evaluation columns: NaN in a row without an evaluation (rows keep one schema).
EVAL_COLUMNS = ("fid", "kid", "precision", "recall")


class NotAStudy(ValueError):
    """The folder is not (or not yet) a finished study; the message says what is missing."""


class DamagedFile(ValueError):
    """A JSON-lines file with a bad line before its last: damage, not a crash mid-write."""


def config_columns(config: dict) -> dict:
    """A run config (nested dict) as the rows' ``config/...`` columns, as Ray Tune names them."""
    return dict(flatten(config, "config/", "/"))


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if there is none). A crash can cut the last line
    short: it is left out. A bad line before it raises DamagedFile."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise DamagedFile(f"{path} line {n} is not JSON: the file is damaged") from None
    return rows


read_metrics = read_jsonl  # a run's metrics.jsonl


class MetricsFile:
    """A run's metrics.jsonl: one JSON row per reported step, in step order.

    A restarted worker resumes from the last checkpoint Ray kept and reports the steps after it
    again (so does ``--resume``): those rows replace the ones the lost attempt wrote, so the file
    keeps one row per step, from the attempt the run went on with. Appends are plain; a rewrite
    (on the first row a process writes, or a step that goes back) is atomic, and drops a last
    line a crash cut short.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.last_step: int | None = None

    def rows(self) -> list[dict]:
        return read_jsonl(self.path)

    def append(self, row: dict) -> None:
        step = row["step"]
        if self.last_step is not None and step > self.last_step:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            files.written(self.path)
        else:
            kept = [r for r in self.rows() if r["step"] < step]
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in [*kept, row]))
        self.last_step = step


# TensorBoard tag of each row column: grouped so that the losses, the fitted line, the
# evaluations and the speed each get their own section.
CURVES = {
    "loss": "loss/total", "loss_task": "loss/task", "loss_distill": "loss/distill", "loss_coarse": "loss/coarse",
    "loss_fine": "loss/fine", "loss_feat": "loss/feat", "w": "line/w", "beta0": "line/beta0", "beta1": "line/beta1",
    "grad_norm": "train/grad_norm", "images_per_s": "train/images_per_s",
    "fid": "eval/fid", "kid": "eval/kid", "precision": "eval/precision", "recall": "eval/recall",
}
TENSORBOARD = "tensorboard"  # the folder of a study's event files: <storage>/<study>/tensorboard/<run>/


def tensorboard_available() -> bool:
    """Whether torch's SummaryWriter can write event files (the optional `watch` extra)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Curves:
    """TensorBoard event files of a trial's runs, one folder per run under ``root`` (named
    ``<variant>-seed<k>``), written as rows are reported, so that ``tensorboard --logdir
    <study folder>`` shows every run's curves while the study runs and after it."""

    def __init__(self, root: str | Path):
        from liftplace import storage

        # A study on a store: the event files are written in a local folder of the worker's,
        # and put into the store whole at each evaluation and at the end (an object store has
        # no append).
        self.store = storage.Store(root) if storage.is_uri(root) else None
        self.root = Path(tempfile.mkdtemp(prefix="liftplace-curves-")) if self.store else Path(root)
        self.writers: dict = {}
        _quiet_event_writer_threads()

    def add(self, name: str, row: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if name not in self.writers:
            self.writers[name] = SummaryWriter(log_dir=str(self.root / name), flush_secs=10)
        writer = self.writers[name]
        for column, tag in CURVES.items():
            value = row.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                writer.add_scalar(tag, value, int(row["step"]))
        if isinstance(row.get("fid"), float) and not math.isnan(row["fid"]):
            writer.flush()  # an evaluation is rare and worth seeing at once
            self._put(name)

    def _put(self, name: str) -> None:
        if self.store is not None:
            for path in (self.root / name).glob("*"):
                self.store.write_bytes(f"{name}/{path.name}", path.read_bytes())

    def close(self) -> None:
        for name, writer in self.writers.items():
            writer.close()
            self._put(name)
        if self.store is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _quiet_event_writer_threads() -> None:
    """TensorBoard writes event files from a thread of its own, and re-raises that thread's
    error (a full disk, say) in the thread that adds or flushes next, where the run fails with
    it and its one-line cause. Python would also print the thread's traceback at once, into the
    console of the study or `liftplace distill`; this drops that copy (only that thread's), once
    per process."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "liftplace_quiet", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, Exception):
            return
        previous(args)

    hook.liftplace_quiet = True
    threading.excepthook = hook


def run_label(variant: str, seed: int) -> str:
    """A run's name wherever a person reads it (trial names, event folders): <variant>-seed<k>,
    with every character other than letters, digits and + made a dash."""
    label = "".join(ch if ch.isalnum() or ch == "+" else "-" for ch in variant).strip("-")
    return f"{label}-seed{seed}"


def last_checkpoint(rows: list[dict], trial: Path | None = None) -> str | None:
    """The last checkpoint folder the rows name: Ray Train's (``checkpoint_path``, absolute) or,
    in a Tune trial folder, Tune's own (``checkpoint_dir_name``, relative to ``trial``)."""
    for row in reversed(rows):
        if row.get("checkpoint_path"):
            return str(row["checkpoint_path"])
        if row.get("checkpoint_dir_name") and trial is not None:
            return str(trial / row["checkpoint_dir_name"])
    return None


# How study.json named a search dimension before it was described stably: str() of the Ray
# Tune domain, which holds its memory address ("<ray.tune.search.sample.Float object at 0x7f..>")
# and so differed in every process.
_ADDRESS_REPR = re.compile(r"<ray\.tune\.search\.sample\.(\w+) object at 0x[0-9a-f]+>")
_DOMAIN_PREFIX = {"Categorical": "choice(", "Float": "Float(", "Integer": "Integer(", "Function": "sample_from("}


def _upgrade_space(existing: dict, info: dict) -> dict:
    """``existing`` with each address-named search dimension replaced by ``info``'s description
    of it, where the domain's kind agrees (all such a file can tell)."""
    space, wanted = existing.get("space"), info.get("space")
    if not isinstance(space, dict) or not isinstance(wanted, dict):
        return existing
    upgraded = {}
    for key, value in space.items():
        match = _ADDRESS_REPR.fullmatch(value) if isinstance(value, str) else None
        new = wanted.get(key)
        if match and isinstance(new, str) and new.startswith(_DOMAIN_PREFIX.get(match.group(1), "\0")):
            value = new
        upgraded[key] = value
    return {**existing, "space": upgraded}


# Fields of study.json that describe a study without defining it: the study file's docstring is
# prose (its measured cost and result are written into it as they come), so editing it does not
# make the study folder another study.
_PROSE = ("description",)
# Fields the drivers add as a study goes, kept on --resume: "history" (one entry per driver:
# what it did, when, and its provenance), "additions" (the seeds grown by --add-seeds or
# --seeds auto, and the folder of each), "looks" (a sequential study's looks and verdicts),
# "sequential" (its rule: the most seeds, the round), "margin" (the verdicts' equivalence
# margin, --margin: a fraction of kd's mean final FID), "layout" ("runs": the study keeps a
# folder per run under runs/; absent in a study begun before, read from its trial folders).
RECORDS = ("history", "additions", "looks", "sequential", "margin", "layout")
_SET = ("sequential", "margin", "layout")  # set, not appended to


def _defining(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in _PROSE + RECORDS}


def study_seeds(info: dict) -> list[int]:
    """Every seed of a grid study: 0..seeds-1 (a run folder's: its own), then those its
    additions grew."""
    seeds = [int(s) for s in info["seed_list"]] if "seed_list" in info else list(range(int(info.get("seeds") or 0)))
    for addition in info.get("additions", []):
        seeds += [int(s) for s in addition["seeds"]]
    return seeds


def provenance() -> dict:
    """What ran a driver: the repository's git commit (None outside a git checkout) and whether
    its tree had changes, the versions that decide the numbers, the CPU and GPUs, the host."""
    import platform
    import subprocess
    from importlib import metadata

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for package in ("liftplace", "torch", "ray", "diffusers", "torch-pruning", "torch-fidelity", "numpy", "scipy",
                    "statsmodels"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    import os

    # What decides CPU results bit for bit besides the code and versions: the kernels torch
    # dispatches to (its ISA level: AVX2, AVX512, ...) and its thread count.
    return {"commit": commit, "dirty": bool(status) if commit else None, "versions": versions,
            "python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "gpus": gpus, "host": platform.node()}


def record(folder: Path, key: str, entry) -> dict:
    """Append ``entry`` to study.json's list ``key`` (a RECORDS field), or set it where ``key``
    is one of _SET; returns the new study.json."""
    if key not in RECORDS:
        raise ValueError(f"study.json records {', '.join(RECORDS)}, not {key!r}")
    info_file = Path(folder) / STUDY_FILE
    info = json.loads(info_file.read_text())
    if key in _SET:
        info[key] = entry
    else:
        info[key] = [*info.get(key, []), entry]
    files.write_text(info_file, json.dumps(info, indent=2) + "\n")
    return info


def claim_study(folder: Path, info: dict, resume: bool) -> None:
    """Write study.json, refusing a folder that holds another study (or this one, without --resume).
    Only the description may differ on --resume; the file then takes the new one. A study on a
    store is claimed in its driver's mirror (liftplace.storage), and named by its URI."""
    from liftplace import storage

    mirror = storage.mirror_for(folder)
    info_file, place = folder / STUDY_FILE, mirror.store.shown if mirror else folder
    if info_file.is_file():
        existing = json.loads(info_file.read_text())
        upgraded = _upgrade_space(existing, info)
        if _defining(upgraded) != _defining(info):
            differ = {k for k in set(_defining(upgraded)) | set(_defining(info)) if upgraded.get(k) != info.get(k)}
            if "seeds" in differ and differ <= {"seeds", "trials", "runs"}:
                raise FileExistsError(f"{place} holds this study with {upgraded.get('seeds')} seeds, a different study "
                                      f"from one with {info.get('seeds')}: to grow it, keep --seeds "
                                      f"{upgraded.get('seeds')} and pass --add-seeds N (or choose another --storage)")
            raise FileExistsError(f"{place} holds a different study (its {STUDY_FILE} differs); "
                                  "choose another --storage")
        if not resume:
            raise FileExistsError(f"{place} already holds this study: pass --resume to continue it, "
                                  "or choose another --storage")
        info = {**info, **{k: existing[k] for k in RECORDS if k in existing}}  # what drivers recorded stays
        if info != existing:
            files.write_text(info_file, json.dumps(info, indent=2) + "\n")
        return
    if mirror is None and folder.exists() and any(folder.iterdir()):  # (a store's was checked before its mirror)
        raise FileExistsError(f"{folder} is not empty and holds no study: choose another --storage")
    if resume:
        raise FileNotFoundError(f"--resume: no study to resume at {place}")
    files.make_folder(folder, "the study folder")
    # A study begun now keeps a folder per run (runs/); one begun before them is read from
    # its trial folders, and stays so when it is resumed (a record, kept from the first claim).
    files.write_text(info_file, json.dumps({**info, "layout": RUNS}, indent=2) + "\n")


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is one run's folder (``liftplace distill --out``): a config.json and no
    study.json."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and not (path / STUDY_FILE).is_file()


def run_folder_info(path: str | Path) -> dict:
    """A run folder read as a study of one: the study.json it would have (one variant, named
    after its objective, and its seed)."""
    path = Path(path)
    try:
        config = json.loads((path / RUN_CONFIG).read_text())
        variant, seed = config["objective"]["name"], int(config["train"]["seed"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotAStudy(f"not a run: {path / RUN_CONFIG} is not a run's config ({err})") from None
    return {"name": path.name, "kind": "run", "description": f"One `liftplace distill` run ({variant}, seed {seed}).",
            "preset": config.get("preset"), "overrides": [], "seeds": 1, "seed_list": [seed], "evals": None,
            "space": {}, "variants": {variant: {}}, "base": {}, "runner": "train", "trials": 1, "cohort": "off"}


def read_study_info(path: str | Path) -> dict:
    """A study's study.json; for a run folder, the study of one it is (``run_folder_info``)."""
    path = Path(path)
    if not path.is_dir():
        raise NotAStudy(f"not a study: {path} is not a directory")
    if is_run_folder(path):
        return run_folder_info(path)
    info_file = path / STUDY_FILE
    if not info_file.is_file():
        raise NotAStudy(f"not a study: {path} has no {STUDY_FILE} (write studies with liftplace.runner)")
    return json.loads(info_file.read_text())


def trial_dirs(path: Path) -> list[list[Path]]:
    """Trial folders, grouped: a restored trial whose folder already existed gets a second
    folder named ``<first>_<4 hex digits>`` from Ray; both hold rows of the same trial."""
    dirs = sorted(p.parent for p in path.glob("*/params.json"))
    try:  # the parts that additions grew (--add-seeds, --seeds auto), each a folder of trials
        additions = json.loads((path / STUDY_FILE).read_text()).get("additions", [])
    except (OSError, ValueError):
        additions = []
    for addition in additions:
        dirs += sorted(p.parent for p in (path / addition["folder"]).glob("*/params.json"))
    groups: dict[tuple, list[Path]] = {}
    for d in dirs:
        twin = re.fullmatch(r"(.+)_[0-9a-f]{4}", d.name)
        base = twin.group(1) if twin and (d.parent / twin.group(1) / "params.json").is_file() else d.name
        groups.setdefault((str(d.parent), base), []).append(d)
    return [sorted(g, key=lambda d: (d.name != base[1], d.stat().st_mtime)) for base, g in sorted(groups.items())]


def load_study(path: str | Path, *, allow_unfinished: bool = False) -> pd.DataFrame:
    """One row per (run, step): metrics, ``run``, ``trial_id``, ``study`` and ``config/...`` columns.

    A study's runs are read from its run folders (``runs/``); a study written before it had
    them, from its trial folders (``_load_trials``): the same frame either way. Raises NotAStudy
    naming what is missing: the folder, study.json, runs, or (unless allow_unfinished) a run
    that never reported.
    """
    path = Path(path)
    info = read_study_info(path)
    if info.get("kind") == "run":
        return _load_run_folder(path, info, allow_unfinished)
    if info.get("layout") != RUNS:
        return _load_trials(path, info, allow_unfinished)
    frames = []
    for folder in run_folders(path):
        try:
            rows = [r for r in read_jsonl(folder / RUN_METRICS) if "step" in r]
        except DamagedFile as err:
            raise NotAStudy(f"half-written study: {err}") from None
        if not rows:
            if allow_unfinished:
                continue
            raise NotAStudy(f"half-written study: run {folder.name} has no reported rows ({folder / RUN_METRICS}); "
                            "resume the study with --resume")
        who = json.loads((folder / RUN_FILE).read_text())
        frames.append(_frame(rows, json.loads((folder / RUN_CONFIG).read_text()), rows[-1].get("variant", who["variant"]),
                             rows[-1]["trial_id"], who["trial_dir"], who["run"],
                             _own_checkpoint(folder, rows, _study_checkpoint(rows, path))))
    if not frames:
        raise NotAStudy(f"half-written study: no run under {path / RUNS} has reported yet")
    return _study_frame(frames, info, path)


def _frame(rows: list[dict], config: dict, variant: str, trial_id: str, trial_dir: str, run: str,
           final_checkpoint: str | None) -> pd.DataFrame:
    """One run's rows as load_study gives them: its columns, its config's, who it is."""
    frame = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict) and k not in RUN_IDENTITY}
                          for r in rows])
    for key, value in config_columns(config).items():
        frame[key] = [value] * len(frame)
    frame["variant"] = variant
    frame["trial_id"] = trial_id
    frame["trial_dir"] = trial_dir
    frame["run"] = run
    frame["final_checkpoint"] = final_checkpoint
    return frame.drop_duplicates("step", keep="last")


def _study_frame(frames: list[pd.DataFrame], info: dict, path: Path) -> pd.DataFrame:
    df = pd.concat(frames, ignore_index=True)
    df["study"] = info.get("name", path.name)
    return df.sort_values(["run", "step"], ignore_index=True)


def _load_trials(path: Path, info: dict, allow_unfinished: bool) -> pd.DataFrame:
    """load_study of a study written before run folders: its rows as Ray Tune wrote them."""
    trials = trial_dirs(path)
    if not trials:
        raise NotAStudy(f"half-written study: {path} has {STUDY_FILE} but no trial folders (*/params.json)")
    frames = []
    for group in trials:
        trial = group[0]
        try:
            rows = [r for d in group for r in read_jsonl(d / "result.json")]
        except DamagedFile as err:
            raise NotAStudy(f"half-written study: {err}") from None
        rows = [r for r in rows if "step" in r]
        result_file = trial / "result.json"
        if not rows:
            if allow_unfinished:
                continue
            raise NotAStudy(f"half-written study: trial {trial.name} has no reported rows ({result_file}); "
                            "resume the study with --resume")
        params = json.loads((trial / "params.json").read_text())
        for run_id, config, run_rows, folder in _runs(trial.name, params.get("run", {}), rows):
            if not run_rows:
                continue
            checkpoint = last_checkpoint(run_rows, group[-1])
            frames.append(_frame(run_rows, with_search(config, params.get("search", {})),
                                 run_rows[-1].get("variant", params.get("run", {}).get("variant", trial.name)),
                                 rows[-1].get("trial_id", trial.name), trial.name, run_id,
                                 str(Path(checkpoint) / folder) if checkpoint and folder else checkpoint))
    if not frames:
        raise NotAStudy(f"half-written study: no trial under {path} has reported yet")
    return _study_frame(frames, info, path)


def with_search(config: dict, search: dict) -> dict:
    """A run config (nested dict) with a search trial's sampled values (dotted keys) in place."""
    config = json.loads(json.dumps(config))
    for key, value in search.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def _load_run_folder(path: Path, info: dict, allow_unfinished: bool) -> pd.DataFrame:
    """load_study of a run folder: its metrics.jsonl rows with the columns a study's rows have
    (the run is the folder; its variant the objective's name)."""
    try:
        rows = [r for r in read_jsonl(path / RUN_METRICS) if "step" in r]
    except DamagedFile as err:
        raise NotAStudy(f"half-written run: {err}") from None
    if not rows:
        raise NotAStudy(f"half-written run: {path / RUN_METRICS} has no rows yet"
                        + ("" if allow_unfinished else "; continue the run with --resume"))
    config = json.loads((path / RUN_CONFIG).read_text())
    frame = _frame(rows, config, next(iter(info["variants"])), path.name, ".", path.name,
                   _own_checkpoint(path, rows, last_checkpoint(rows, path)))
    return _study_frame([frame], info, path)


def run_folders(path: str | Path) -> list[Path]:
    """A study's run folders (``runs/*/`` with a config.json), in name order."""
    return sorted(p.parent for p in (Path(path) / RUNS).glob(f"*/{RUN_CONFIG}"))


def final_checkpoints(study: Path) -> set[tuple[str, str]]:
    """{(run, step-<k>)}: each run folder's last checkpoint, as its rows name it (what a reader
    of a study on a store copies for the figures: liftplace.storage.local_copy)."""
    wanted = set()
    for folder in sorted(Path(study, RUNS).glob("*/")):
        step = _last_checkpoint_step(read_jsonl(folder / RUN_METRICS) if (folder / RUN_METRICS).is_file() else [])
        if step is not None:
            wanted.add((folder.name, checkpoint_name(step)))
    return wanted


def _last_checkpoint_step(rows: list[dict]) -> int | None:
    """The step of the last row that came with a checkpoint (None: none did)."""
    return next((r["step"] for r in reversed(rows) if r.get("checkpoint_path") or r.get("checkpoint_dir_name")), None)


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):07d}"


def _own_checkpoint(folder: Path, rows: list[dict], elsewhere: str | None) -> str | None:
    """A run folder's last checkpoint: its own copy (checkpoints/step-<k>/) of the last one its
    rows name; where Ray keeps it (``elsewhere``) for a folder written before run folders kept
    copies."""
    step = _last_checkpoint_step(rows)
    own = folder / CHECKPOINTS / checkpoint_name(step) if step is not None else None
    return str(own) if own is not None and own.is_dir() else elsewhere


def row_checkpoint(row: dict, study: Path) -> str | None:
    """The checkpoint one of a study run's rows names, where Ray stored it (None: the row came
    without one)."""
    return _study_checkpoint([row], study)


def _study_checkpoint(rows: list[dict], study: Path) -> str | None:
    """A study run's last checkpoint, from its rows: Ray Train's (absolute) or Tune's (in the
    trial folder the row names), with the run's sub-folder for a cohort member."""
    for row in reversed(rows):
        where = row.get("checkpoint_path") or (row.get("checkpoint_dir_name") and str(
            study / row["trial_dir"] / row["checkpoint_dir_name"]))
        if where:
            return str(Path(where) / row["member"]) if row.get("member") else where
    return None


class RunFolder:
    """The one writer of a run's folder: config.json once, then metrics.jsonl row by row
    (MetricsFile: a re-reported step replaces the rows from it on), each checkpoint into
    checkpoints/ (``keep_checkpoint``), and error.txt if the run fails; with a ``tracker``
    (``liftplace.trackers``), the same to an experiment tracker. ``liftplace distill``
    writes its --out folder with it, a study's driver each run's folder under runs/."""

    def __init__(self, path: str | Path, tracker=None):
        self.path = Path(path)
        self.metrics = MetricsFile(self.path / RUN_METRICS)
        self.tracker = tracker  # a liftplace.trackers tracker, sent what this writes
        self.steps: int | None = None  # the run's train.steps, once started

    def start(self, config: dict, who: dict | None = None) -> None:
        """Write config.json and, for a study's run, run.json (``who``: its variant, seed, trial
        and id); a resumed run's stay as they are."""
        if not (self.path / RUN_CONFIG).is_file():
            files.make_folder(self.path, "a run folder")
            if who is not None:
                files.write_text(self.path / RUN_FILE, json.dumps(who, indent=2) + "\n")
            files.write_text(self.path / RUN_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.steps = int(config["train"]["steps"])
        if self.tracker is not None:
            self._track("start", config, who)
            # A run begun without this tracker (or resumed) gives it the rows it has not seen.
            for row in self.metrics.rows():
                self._track("log", row, None, self.finished(row))

    def who(self) -> dict | None:
        """A study's run: its run.json (None for a `liftplace distill` folder)."""
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None

    def append(self, row: dict, checkpoint: str | Path | None = None) -> None:
        """Add a reported row; with ``checkpoint`` (the folder where Ray stored the checkpoint
        the row came with), the checkpoint first (``keep_checkpoint``), so that a row never
        names a checkpoint its folder lacks."""
        from liftplace import storage

        mirror = storage.mirror_for(self.path)
        if checkpoint and row.get("diverged") and not (mirror.holds(checkpoint) if mirror else Path(checkpoint).is_dir()):
            checkpoint = None  # a cohort member that diverged: the cohort's checkpoint holds no folder of it
        kept = self.keep_checkpoint(row["step"], checkpoint) if checkpoint else None
        self.metrics.append(row)
        if mirror is not None and kept is not None:
            mirror.flush()  # on a store: the row is put right after its checkpoint's copy, in that order
        self._track("log", row, kept, self.finished(row))

    def _track(self, method: str, *args) -> None:
        """Send to the tracker. A tracker that fails mid-run (its server gone, its disk full) is
        said in one line and no longer sent to by this writer; the run goes on, its folder keeps
        every row, and a resume with the tracker sends what it missed (``start``)."""
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(self.path, *args)
        except Exception as err:  # noqa: BLE001 -- any tracker error: the run matters more
            text = " ".join(str(err).split())[:200]
            print(f"tracker: {self.tracker.kind} failed for {self.path.name} ({type(err).__name__}: {text}); "
                  "its rows stay in the run folder, and a resume with --tracker sends them", file=sys.stderr)
            self.tracker = None

    def finished(self, row: dict) -> bool:
        return self.steps is not None and is_last_row(row, self.steps)

    def keep_checkpoint(self, step: int, source: str | Path) -> Path:
        """Give the run a checkpoint that Ray has stored (``source``: a run's checkpoint folder,
        a cohort member's sub-folder of its cohort's): checkpoints/step-<step>/ gets its files as
        hard links, so no disk is spent twice (copies where the file system has no hard links),
        complete or not at all (written under a hidden name, then renamed). A step kept again
        (a resumed run re-reaches it) is replaced. Ray's copy stays what a resumed trial starts
        from; this one is what readers of the run use (``final_checkpoint``, load_student)."""
        from liftplace import storage

        source, target = Path(source), self.path / CHECKPOINTS / checkpoint_name(step)
        mirror = storage.mirror_for(self.path)
        if mirror is not None:  # a study on a store: copied there, inside the store (none kept here)
            mirror.keep(str(source), target.relative_to(mirror.local).as_posix())
            return target
        tmp = files.temp_path(target)
        if tmp.exists():
            shutil.rmtree(tmp)  # a kept checkpoint cut short by a crash
        try:
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def fail(self, text: str) -> None:
        files.write_text(self.path / "error.txt", text.rstrip("\n") + "\n")
        self._track("end", "FAILED")

    def close(self) -> None:
        """The run's trial ended: its tracker run ends too, FINISHED if its rows reached the
        end, KILLED if it was stopped before (a search's scheduler stops trials early)."""
        rows = self.metrics.rows() if self.tracker is not None else []
        self._track("end", "FINISHED" if rows and self.finished(rows[-1]) else "KILLED")


def is_last_row(row: dict, steps: int) -> bool:
    """Whether ``row`` ends its run: it diverged, or it reached ``steps`` (train.steps) with
    its final evaluation (a last step reported before its evaluation failed is not)."""
    fid = row.get("fid")
    return bool(row.get("diverged")) or (row["step"] >= steps and isinstance(fid, (int, float)) and math.isfinite(fid))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def trial_members(run: dict) -> list[tuple[str, dict]]:
    """(variant, config) of each run a trial's ``run`` holds: a cohort's members, or its one run."""
    return [(m["variant"], m["config"]) for m in run["members"]] if "members" in run else [(run["variant"], run["config"])]


def trial_runs(trial_dir: str, params: dict, folder: str | None = None) -> list[tuple[str, dict, dict]]:
    """(run folder name, run.json, config) of each run a trial trains: a cohort's members, or
    its one run (a search trial's with its sampled values). ``folder``: the trial's folder
    relative to the study's (``trial_dir`` unless the trial is in an addition's folder)."""
    run, search = params.get("run", {}), "search" in params
    base = {"seed": run.get("seed"), "trial_dir": trial_dir, "folder": folder or trial_dir, "search": search}
    if "members" in run:
        return [(run_label(m["variant"], run["seed"]), {"variant": m["variant"], **base, "run": f"{trial_dir}/{m['variant']}"},
                 m["config"]) for m in run["members"]]
    variant = run.get("variant", trial_dir)
    name = trial_dir if search else run_label(variant, run.get("seed", 0))
    return [(name, {"variant": variant, **base, "run": trial_dir}, with_search(run.get("config", {}), params.get("search", {})))]


def trial_rows(trial_dir: str, params: dict, result: dict, folder: str | None = None) -> list[tuple[str, dict]]:
    """(run folder name, row) of each run in one row a trial reported to Tune: the rows that
    the run folders hold, equal to the rows a study's trial folders give (``_runs``) plus the
    trial's id and RUN_IDENTITY: the folder the trial writes now (``folder``; a restored trial
    may get a second folder, ``<trial_dir>_<4 hex digits>``, see trial_dirs)."""
    if "step" not in result:
        return []
    names = {who["run"]: name for name, who, _ in trial_runs(trial_dir, params)}
    out = []
    for run_id, _, rows, _ in _runs(trial_dir, params.get("run", {}), [result]):
        for row in rows:
            row = {k: v for k, v in row.items() if not isinstance(v, dict)}
            row.setdefault("trial_id", result.get("trial_id", trial_dir))
            out.append((names[run_id], {**row, "trial_dir": folder or trial_dir}))
    return out


def _runs(trial: str, run: dict, rows: list[dict]):
    """(run id, config, rows, checkpoint sub-folder) of each run a trial trained."""
    if "members" not in run:
        yield trial, run.get("config", {}), rows, ""
        return
    for member in run["members"]:
        variant = member["variant"]
        mine = [{**r["members"][variant], **{k: r[k] for k in ("checkpoint_dir_name", "checkpoint_path") if r.get(k)}}
                for r in rows if variant in r.get("members", {})]
        folder = next((r["member"] for r in mine if r.get("member")), "")
        yield f"{trial}/{variant}", member["config"], mine, folder


def finished_runs(folder: str | Path) -> pd.DataFrame:
    """One row per run of a study (``summarize``) that has a final FID or diverged: what a
    verdict is drawn from, while the study runs or after it."""
    summary = summarize(load_study(folder, allow_unfinished=True))
    return summary[summary["final_fid"].notna() | summary["diverged"]].reset_index(drop=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its config, final and best FID, diverged, steps, seed.

    final_* are the run's last row (the end of training, or the step it diverged at).
    """
    config_cols = [c for c in df.columns if c.startswith("config/")]
    out = []
    for run, group in df.groupby("run", sort=True):
        group = group.sort_values("step")
        last = group.iloc[-1]
        fids = group["fid"].dropna() if "fid" in group else pd.Series(dtype=float)
        row = {c: last[c] for c in config_cols}
        row.update(
            run=run,
            trial_dir=last.get("trial_dir", run),
            variant=last.get("variant", run),
            seed=last.get("config/train/seed"),
            steps=int(last["step"]),
            diverged=bool(group["diverged"].any()) if "diverged" in group else False,
            final_fid=float(last["fid"]) if "fid" in last and pd.notna(last["fid"]) else np.nan,
            best_fid=float(fids.min()) if len(fids) else np.nan,
        )
        finals = ("kid", "precision", "recall", "loss", "w", "beta0", "beta1", "text_alignment", "clip_score")
        for col in (*finals, "student_params", "teacher_params",
                    "compression", "student_macs", "teacher_macs", "vae_params", "vae_decode_macs", "denoiser_size", "images_per_s", "teacher_fid", "elapsed_s",
                    "eval_extractor", "eval_num_images", "eval_sampler_steps", "eval_reference_images", "eval_guidance_scale", "eval_clip_weights",
                    "runner", "final_checkpoint"):
            if col in group:
                row[f"final_{col}" if col in finals else col] = last[col]
        out.append(row)
    return pd.DataFrame(out)


def trial_config(path: str | Path, trial_dir: str, variant: str | None = None):
    """A run's validated RunConfig: the trial's, its cohort member ``variant``'s, or a run folder's, with a
    search trial's sampled values in place (a teacher or data path that is not on this
    machine raises FileNotFoundError)."""
    from liftplace.config import from_dict  # torch and friends: only for analysis that runs models

    if is_run_folder(path):  # a run folder: its one config
        return from_dict(json.loads((Path(path) / RUN_CONFIG).read_text()))
    if (Path(path) / STUDY_FILE).is_file() and read_study_info(path).get("layout") == RUNS:  # the run's folder keeps it (a study on a store: Ray's trials are not copied)
        runs = [(json.loads((f / RUN_FILE).read_text()), f) for f in run_folders(path)]
        runs = [(who, f) for who, f in runs if who.get("trial_dir") == trial_dir]
        # a cohort trial's runs: the variant's (a search trial has one run, its variant named with its values)
        mine = [f for who, f in runs if len(runs) == 1 or who.get("variant") == variant]
        if mine:
            return from_dict(json.loads((mine[0] / RUN_CONFIG).read_text()))
    params_file = Path(path) / trial_dir / "params.json"
    if not params_file.is_file():
        raise NotAStudy(f"half-written study: {params_file} is missing")
    params = json.loads(params_file.read_text())
    run = params.get("run", {})
    if "members" in run:
        configs = {m["variant"]: m["config"] for m in run["members"]}
        if variant not in configs:
            raise NotAStudy(f"{params_file}: the cohort has no variant {variant!r} (it has {', '.join(configs)})")
        return from_dict(configs[variant])
    if "config" not in run:
        raise NotAStudy(f"{params_file} holds no run config (not a liftplace study trial)")
    return from_dict(run["config"], params.get("search", {}))


# --- a study's state, from its files alone ------------------------------------------------

# The study driver's heartbeat, a JSON object {"host", "pid", "updated", "state"}. Not named
# *.json: when Tune restores a study it copies every top-level .json and .pkl file of the study
# folder into its staging folder and syncs that copy back over the folder for the rest of the
# run, so a resumed study's "driver.json" (the name until then, still read) was put back to its
# state at the restore every few seconds and read as interrupted after two minutes.
DRIVER_FILE = "driver.heartbeat"
LEGACY_DRIVER_FILE = "driver.json"
HEARTBEAT_S = 15.0  # how often a running driver rewrites it
STALE_S = 120.0  # a "running" heartbeat older than this: the driver is gone (killed, or a copy)
STATES = ("pending", "running", "done", "diverged", "errored", "interrupted", "stopped", "unfinished")


def write_heartbeat(folder: str | Path, state: str) -> None:
    """The driver says it is alive ("running"), or how it ended ("finished", "interrupted")."""
    import os
    import socket
    import time

    from liftplace import storage

    files.write_text(Path(folder) / DRIVER_FILE, json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "updated": time.time(), "state": state}) + "\n")
    storage.sync(folder)  # a study on a store: the heartbeat and the rows since the last one reach it


def driver_state(folder: str | Path, now: float | None = None) -> str:
    """running | finished | interrupted | unknown (no heartbeat: a study from before it existed)."""
    path = Path(folder) / DRIVER_FILE
    if not path.is_file():
        path = Path(folder) / LEGACY_DRIVER_FILE  # a study from before the heartbeat's rename
    try:
        beat = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unknown"
    return beat_state(beat, now)


def beat_state(beat: dict, now: float | None = None) -> str:
    """What a heartbeat says (see driver_state): a "running" one that is stale, or whose driver
    on this machine is gone, says "interrupted"."""
    import socket
    import time

    if beat.get("state") == "running":
        if (now or time.time()) - beat.get("updated", 0) > STALE_S:
            return "interrupted"
        if beat.get("host") == socket.gethostname() and not _alive(beat.get("pid")):
            return "interrupted"  # on this machine, and its process is gone (killed)
    return beat.get("state", "unknown")


def _alive(pid) -> bool:
    import os

    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def study_status(path: str | Path, now: float | None = None) -> tuple[pd.DataFrame, str]:
    """(one row per planned run: variant, seed, state, step, steps, loss, fid, elapsed_s; the
    driver's state) of a study, read from its folder alone: while it runs, after it, or on a copy.

    A run is pending (no rows yet), running, done (its last step reported), diverged, errored
    (its trial wrote error.txt), interrupted (the driver stopped or was killed before the run
    ended), stopped (a search's scheduler ended it early) or unfinished (a study written before
    drivers kept a heartbeat: running or interrupted cannot be told apart).
    """
    path = Path(path)
    info = read_study_info(path)
    driver = driver_state(path, now)
    found: dict[tuple, dict] = {}
    for trial, run, config, run_rows, errored, search in _status_runs(path, info):
        variant = run_rows[-1].get("variant") if run_rows else None
        if variant is None:
            variant = run["variant"]
        if search:
            variant = f"{variant} ({trial.rsplit('-', 1)[-1]})"
        steps = int(config.get("train", {}).get("steps", 0))
        last = run_rows[-1] if run_rows else {}
        fids = [r["fid"] for r in run_rows if isinstance(r.get("fid"), (int, float)) and r["fid"] == r["fid"]]
        if any(r.get("diverged") for r in run_rows):
            state = "diverged"
        elif last and last["step"] >= steps:
            state = "done"
        elif errored:
            state = "errored"
        elif driver == "running":
            state = "running" if run_rows else "pending"
        elif not run_rows:
            state = "pending"
        elif driver == "finished" and search:
            state = "stopped"
        else:  # started, not ended, and no driver at work on it
            state = "unfinished" if driver == "unknown" else "interrupted"
        found[(variant, run.get("seed"))] = {
            "trial": trial, "variant": variant, "seed": run.get("seed"), "state": state, "step": last.get("step", 0), "steps": steps,
            "loss": last.get("loss", float("nan")), "fid": fids[-1] if fids else float("nan"),
            "elapsed_s": last.get("elapsed_s", float("nan"))}
    planned = [] if info.get("space") else [(v, seed) for seed in study_seeds(info) for v in info.get("variants", {})]
    for key in planned:
        found.setdefault(key, {"trial": None, "variant": key[0], "seed": key[1], "state": "pending", "step": 0, "steps": None,
                               "loss": float("nan"), "fid": float("nan"), "elapsed_s": float("nan")})
    order = {v: i for i, v in enumerate(info.get("variants", {}))}
    table = pd.DataFrame(found.values(),
                         columns=["variant", "seed", "state", "step", "steps", "loss", "fid", "elapsed_s", "trial"])
    if not table.empty:
        table = table.sort_values(["variant", "seed"], key=lambda col: col.map(order).fillna(len(order)) if col.name == "variant"
                                  else col, ignore_index=True)
    return table, driver


def _status_runs(path: Path, info: dict):
    """(trial, {"variant", "seed"}, config, rows, errored, search) of every run a study folder
    (or run folder) holds: from its run folders, or its trial folders if it has none."""
    if info.get("kind") == "run":
        try:
            rows = [r for r in read_jsonl(path / RUN_METRICS) if "step" in r]
            config = json.loads((path / RUN_CONFIG).read_text())
        except (OSError, ValueError):
            return
        yield (path.name, {"variant": next(iter(info["variants"])), "seed": info["seed_list"][0]}, config, rows,
               (path / "error.txt").is_file(), False)
        return
    if info.get("layout") == RUNS:
        for folder in run_folders(path):
            try:
                who = json.loads((folder / RUN_FILE).read_text())
                config = json.loads((folder / RUN_CONFIG).read_text())
                rows = [r for r in read_jsonl(folder / RUN_METRICS) if "step" in r]
            except (OSError, ValueError):
                continue  # a run folder the driver is still writing
            trial_folders = {who["folder"], *([rows[-1]["trial_dir"]] if rows else [])}
            errored = any((where / "error.txt").is_file() for where in [folder, *(path / t for t in trial_folders)])
            yield who["trial_dir"], who, config, rows, errored, who.get("search", False)
        return
    for group in trial_dirs(path):
        trial = group[0]
        try:
            params = json.loads((trial / "params.json").read_text())
            rows = [r for d in group for r in read_jsonl(d / "result.json") if "step" in r]
        except (OSError, ValueError):
            continue  # a trial folder Tune is still writing
        run = params.get("run", {})
        errored = (group[-1] / "error.txt").is_file()
        for run_id, config, run_rows, _ in _runs(trial.name, run, rows):
            variant = run_id.split("/", 1)[1] if "/" in run_id else run.get("variant", trial.name)
            yield trial.name, {"variant": variant, "seed": run.get("seed")}, config, run_rows, errored, "search" in params


def trials_finished(table: pd.DataFrame) -> int:
    """How many trials of a status table ended (every run of theirs done, diverged or stopped)."""
    started = table.dropna(subset=["trial"])
    ended = started["state"].isin(["done", "diverged", "stopped"])
    return int(ended.groupby(started["trial"]).all().sum())


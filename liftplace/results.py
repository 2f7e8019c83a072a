"""A study's experiment folder -> pandas DataFrames: the one results schema analysis reads.

Layout (written by ``liftplace.sweep``; Ray Tune writes the trial folders)::

    <storage>/<study>/study.json              the study: name, axes, seeds, metric, base config
    <storage>/<study>/<trial>/params.json     the trial's config (nested dict)
    <storage>/<study>/<trial>/result.json     one JSON object per reported row

``load_study(path)`` gives one row per reported step and trial, with the trial's flattened
config as ``config/...`` columns (as Ray writes them) and the metrics of DESIGN.md's schema.
A step reported twice (a trial resumed from a checkpoint re-reports the steps after it) keeps
its last report, so every trial has one row per step. Analysis reads nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

STUDY_FILE = "study.json"


class NotAStudy(ValueError):
    """The folder is not (or not yet) a finished study; the message says what is missing."""


def _flatten(data: dict, prefix: str = "config/") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_study_info(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise NotAStudy(f"not a study: {path} is not a directory")
    info_file = path / STUDY_FILE
    if not info_file.is_file():
        raise NotAStudy(f"not a study: {path} has no {STUDY_FILE} (write studies with liftplace.sweep)")
    return json.loads(info_file.read_text())


def trial_dirs(path: Path) -> list[list[Path]]:
    """Trial folders, grouped: a restored trial whose folder already existed gets a second
    folder named ``<first>_<4 hex digits>`` from Ray; both hold rows of the same trial."""
    dirs = sorted(p.parent for p in path.glob("*/params.json"))
    groups: dict[str, list[Path]] = {}
    for d in dirs:
        twin = re.fullmatch(r"(.+)_[0-9a-f]{4}", d.name)
        base = twin.group(1) if twin and (path / twin.group(1) / "params.json").is_file() else d.name
        groups.setdefault(base, []).append(d)
    return [sorted(g, key=lambda d: (d.name != base, d.stat().st_mtime)) for base, g in sorted(groups.items())]


def _read_rows(result_file: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(result_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A crash can cut the last line short; anything earlier is damage, not a crash.
            if n != len(result_file.read_text().splitlines()):
                raise NotAStudy(f"half-written study: {result_file} line {n} is not JSON") from None
    return rows


def _last_checkpoint(trial: Path, rows: list[dict]) -> str | None:
    """The trial's last checkpoint folder: Tune's own (direct runner) or Ray Train's."""
    for row in reversed(rows):
        if row.get("checkpoint_path"):
            return str(row["checkpoint_path"])
        if row.get("checkpoint_dir_name"):
            return str(trial / row["checkpoint_dir_name"])
    return None


def load_study(path: str | Path, *, allow_unfinished: bool = False) -> pd.DataFrame:
    """One row per (trial, step): metrics, ``trial_id``, ``study`` and ``config/...`` columns.

    Raises NotAStudy naming what is missing: the folder, study.json, trial folders, or (unless
    allow_unfinished) a trial that never reported.
    """
    path = Path(path)
    info = read_study_info(path)
    trials = trial_dirs(path)
    if not trials:
        raise NotAStudy(f"half-written study: {path} has {STUDY_FILE} but no trial folders (*/params.json)")
    frames = []
    for group in trials:
        trial = group[0]
        rows = [r for d in group if (d / "result.json").is_file() for r in _read_rows(d / "result.json")]
        rows = [r for r in rows if "step" in r]
        result_file = trial / "result.json"
        if not rows:
            if allow_unfinished:
                continue
            raise NotAStudy(f"half-written study: trial {trial.name} has no reported rows ({result_file}); "
                            "resume the study with --resume")
        # A study trial's params are {"run": {"variant", "seed", "config": the full run config}}.
        params = json.loads((trial / "params.json").read_text())
        run = params.get("run", {})
        frame = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
        for key, value in _flatten(run.get("config", {})).items():
            frame[key] = [value] * len(frame)
        for key, value in params.get("search", {}).items():  # a search trial's sampled values
            frame["config/" + key.replace(".", "/")] = value
        frame["variant"] = rows[-1].get("variant", run.get("variant", trial.name))
        frame["trial_id"] = rows[-1].get("trial_id", trial.name)
        frame["trial_dir"] = trial.name
        frame["final_checkpoint"] = _last_checkpoint(group[-1], rows)
        frames.append(frame.drop_duplicates("step", keep="last"))
    if not frames:
        raise NotAStudy(f"half-written study: no trial under {path} has reported yet")
    df = pd.concat(frames, ignore_index=True)
    df["study"] = info.get("name", path.name)
    return df.sort_values(["trial_dir", "step"], ignore_index=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its config, final and best FID, diverged, steps, seed.

    final_* are the trial's last row (the end of training, or the step it diverged at).
    """
    config_cols = [c for c in df.columns if c.startswith("config/")]
    out = []
    for trial, group in df.groupby("trial_dir", sort=True):
        group = group.sort_values("step")
        last = group.iloc[-1]
        fids = group["fid"].dropna() if "fid" in group else pd.Series(dtype=float)
        row = {c: last[c] for c in config_cols}
        row.update(
            trial_dir=trial,
            variant=last.get("variant", trial),
            seed=last.get("config/train/seed"),
            steps=int(last["step"]),
            diverged=bool(group["diverged"].any()) if "diverged" in group else False,
            final_fid=float(last["fid"]) if "fid" in last and pd.notna(last["fid"]) else np.nan,
            best_fid=float(fids.min()) if len(fids) else np.nan,
        )
        for col in ("kid", "precision", "recall", "loss", "w", "beta0", "beta1", "student_params", "teacher_params",
                    "compression", "student_macs", "teacher_macs", "images_per_s", "teacher_fid", "elapsed_s",
                    "eval_extractor", "eval_num_images", "eval_sampler_steps", "runner", "final_checkpoint"):
            if col in group:
                row[f"final_{col}" if col in ("kid", "precision", "recall", "loss", "w", "beta0", "beta1") else col] = last[col]
        out.append(row)
    return pd.DataFrame(out)



def trial_config(path: str | Path, trial_dir: str):
    """A trial's validated RunConfig, with a search trial's sampled values in place (a teacher
    or data path that is not on this machine raises FileNotFoundError)."""
    from liftplace.config import from_dict  # torch and friends: only for analysis that runs models

    params_file = Path(path) / trial_dir / "params.json"
    if not params_file.is_file():
        raise NotAStudy(f"half-written study: {params_file} is missing")
    params = json.loads(params_file.read_text())
    run = params.get("run", {})
    if "config" not in run:
        raise NotAStudy(f"{params_file} holds no run config (not a liftplace study trial)")
    return from_dict(run["config"], params.get("search", {}))

"""The driver's writer of a study's run folders: every run, a cohort member's too, in runs/<run>/.

Each trial's rows reach the driver as Ray Tune results (a cohort's packed as
``{"step", "members": {variant: row}}``); ``RunFolders`` unpacks them there, once, into one
folder per run -- ``run.json`` (who the run is), ``config.json``, ``metrics.jsonl`` and
``checkpoints/`` --
through ``results.RunFolder``, the writer ``liftplace distill`` uses for its --out folder. So
``results.load_study`` reads a study's runs as it reads a single run's folder. A Tune callback:
pickled with the study's Tuner, and replaced by a new one when the study is restored.
"""

from __future__ import annotations

import re
from pathlib import Path

from ray.tune import Callback

from liftplace import results, storage


class RunFolders(Callback):
    def __init__(self, folder: str | Path, tracker=None):
        self.folder = Path(folder)
        self.tracker = tracker  # liftplace.trackers: every run folder's writer feeds it too
        self.writers: dict[str, results.RunFolder] = {}
        self.trials: dict[str, tuple[str, str, list[str]]] = {}  # trial id -> (name, folder, its runs' folders)

    def _trial(self, trial) -> tuple[str, str, list[str]]:
        """(the trial's name in the study, its folder now relative to the study's, its runs'
        folder names), found once per trial: a restored trial may write a second folder,
        <name>_<4 hex digits>, beside its first. Its runs' folders are claimed then."""
        if trial.trial_id in self.trials:
            return self.trials[trial.trial_id]
        path, mirror = Path(trial.path), storage.mirror_for(self.folder)
        if mirror is not None:  # a study on a store: Ray's trial folders are there, not in the driver's mirror
            inside = mirror.store.rel(str(path))
        else:
            try:
                inside = path.resolve().relative_to(self.folder.resolve())
            except ValueError:
                inside = None
        folder = Path(path.name) if inside is None else Path(inside)  # elsewhere: the trial's own name
        sibling = (folder.parent / twin.group(1)).as_posix() if (twin := re.fullmatch(r"(.+)_[0-9a-f]{4}", folder.name)) else None
        name = twin.group(1) if sibling and (mirror.store.is_dir(sibling) if mirror else (self.folder / sibling).is_dir()) \
            else folder.name
        runs = []
        for run, who, config in results.trial_runs(name, trial.config, str(folder.parent / name)):
            writer = self.writers.setdefault(run, results.RunFolder(self.folder / results.RUNS / run, self.tracker))
            writer.start(config, who)
            owner = writer.who() or {}
            if (owner.get("variant"), owner.get("seed")) != (who["variant"], who["seed"]):
                # study.expand refuses variants whose folders collide; a folder from elsewhere may
                raise RuntimeError(f"{writer.path} belongs to another run ({owner or 'no run.json'}), "
                                   f"not {who['variant']!r} seed {who['seed']}")
            runs.append(run)
        self.trials[trial.trial_id] = name, str(folder), runs
        return self.trials[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Each run's row, after its checkpoint if it came with one: Ray has stored that by now
        (a trial's report returns once its checkpoint is in the study's folder), and the run
        folder keeps it as checkpoints/step-<k>/ (hard links to Ray's files)."""
        name, folder, _ = self._trial(trial)
        mirror = storage.mirror_for(self.folder)
        study = Path(mirror.store.root) if mirror else self.folder  # where Ray stored the checkpoints
        for run, row in results.trial_rows(name, trial.config, result, folder):
            self.writers[run].append(row, results.row_checkpoint(row, study))

    def on_trial_complete(self, iteration, trials, trial, **info):
        """A trial that ended (finished, or stopped early by a search's scheduler): its runs'
        tracker runs end with it."""
        for run in self._trial(trial)[2]:
            self.writers[run].close()
        storage.sync(self.folder)

    def on_trial_error(self, iteration, trials, trial, **info):
        """A failed trial's error (Tune's error.txt in its folder) goes into each of its runs'
        folders too, so that runs/ alone tells a failed run."""
        text = _error_text(trial, storage.mirror_for(self.folder))
        for run in self._trial(trial)[2]:
            self.writers[run].fail(text)
        storage.sync(self.folder)


def _error_text(trial, mirror) -> str:
    """A failed trial's error.txt: Tune writes it into the driver's staging copy of the trial's
    folder (``trial.error_file``) and puts it in the trial's folder (on a store too) later, so
    the first is read first."""
    places = [lambda: Path(trial.error_file).read_text(),
              (lambda: (Path(trial.path) / "error.txt").read_text()) if mirror is None else
              (lambda: mirror.store.read_bytes(f"{mirror.store.rel(str(trial.path))}/error.txt").decode())]
    for read in places:
        try:
            return read()
        except (OSError, TypeError, ValueError, AttributeError):
            continue
    return f"trial {Path(trial.path).name} failed (no error.txt)"

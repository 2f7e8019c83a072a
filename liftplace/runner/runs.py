"""The driver's writer of a study's run folders: every run, a cohort member's too, in runs/<run>/.

Each trial's rows reach the driver as Ray Tune results (a cohort's packed as
``{"step", "members": {variant: row}}``); ``RunFolders`` unpacks them there, once, into one
folder per run -- ``run.json`` (who the run is), ``config.json`` and ``metrics.jsonl`` --
through ``results.RunFolder``, the writer ``liftplace distill`` uses for its --out folder. So
``results.load_study`` reads a study's runs as it reads a single run's folder. A Tune callback:
pickled with the study's Tuner, and replaced by a new one when the study is restored.
"""

from __future__ import annotations

import re
from pathlib import Path

from ray.tune import Callback

from liftplace import results


class RunFolders(Callback):
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writers: dict[str, results.RunFolder] = {}

    def _trial(self, trial) -> tuple[str, str]:
        """(the trial's name in the study, its folder now, relative to the study's): a restored
        trial may write a second folder, <name>_<4 hex digits>, beside its first."""
        path = Path(trial.path)
        try:
            folder = path.resolve().relative_to(self.folder.resolve())
        except ValueError:  # not under the study folder as this driver names it: the trial's own name
            folder = Path(path.name)
        twin = re.fullmatch(r"(.+)_[0-9a-f]{4}", folder.name)
        name = twin.group(1) if twin and (self.folder / folder.parent / twin.group(1)).is_dir() else folder.name
        return name, str(folder)

    def _start(self, trial) -> None:
        name, folder = self._trial(trial)
        for run, who, config in results.trial_runs(name, trial.config, str(Path(folder).parent / name)):
            if run not in self.writers:
                writer = results.RunFolder(self.folder / results.RUNS / run)
                writer.start(config, who)
                self.writers[run] = writer
            owner = self.writers[run].who()
            if owner is not None and (owner["variant"], owner["seed"]) != (who["variant"], who["seed"]):
                # study.check_labels refuses such variants before Ray; a folder from elsewhere may not
                raise RuntimeError(f"{self.folder / results.RUNS / run} belongs to {owner['variant']!r} seed "
                                   f"{owner['seed']}, not {who['variant']!r} seed {who['seed']}")

    def on_trial_error(self, iteration, trials, trial, **info):
        """A failed trial's error (Tune's error.txt in its folder) goes into each of its runs'
        folders too, so that runs/ alone tells a failed run."""
        error = Path(trial.path) / "error.txt"
        text = error.read_text() if error.is_file() else f"trial {Path(trial.path).name} failed (no error.txt)"
        self._start(trial)
        name, folder = self._trial(trial)
        for run, _, _ in results.trial_runs(name, trial.config, str(Path(folder).parent / name)):
            self.writers[run].fail(text)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._start(trial)  # a restored trial's runs: their writers are new
        name, folder = self._trial(trial)
        for run, row in results.trial_rows(name, trial.config, result, folder):
            self.writers[run].append(row)

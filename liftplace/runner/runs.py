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
                self.writers[run] = results.RunFolder(self.folder / results.RUNS / run)
                self.writers[run].start(config, who)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._start(trial)  # a restored trial's runs: their writers are new
        name, folder = self._trial(trial)
        for run, row in results.trial_rows(name, trial.config, result, folder):
            self.writers[run].append(row)

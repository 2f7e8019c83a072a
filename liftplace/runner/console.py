"""What a study shows while it runs: one line per trial started and ended, progress with an ETA, its heartbeat.

``StudyConsole`` replaces Ray Tune's tables (``--verbose`` keeps them); ``Heartbeat`` writes
the driver's heartbeat that `liftplace status` reads. Both are Tune callbacks, pickled with a
study's Tuner (a restored study gets new ones).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from liftplace import results
from liftplace.runner.cluster import _Swallow


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _trial_train(trial) -> dict:
    return results.trial_members(trial.config["run"])[0][1]["train"]


def _trial_steps(trial) -> int:
    return int(_trial_train(trial)["steps"])


def _final_fids(result: dict) -> str:
    """'kd FID 12.3 | place K=16 FID 9.8' from a trial's last row (a cohort's, or one run's)."""
    rows = result.get("members") or ({result.get("variant", "run"): result} if result else {})
    parts = []
    for variant, row in rows.items():
        fid = row.get("fid")
        state = "diverged" if row.get("diverged") else f"FID {fid:.2f}" if isinstance(fid, (int, float)) and fid == fid else "no FID"
        aligned = row.get("text_alignment")  # a text-to-image run's: the share read as its caption's digit
        if not row.get("diverged") and isinstance(aligned, (int, float)) and aligned == aligned:
            state += f" (text {aligned:.0%})"
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
        runs = ", ".join(variant for variant, _ in results.trial_members(trial.config["run"]))
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

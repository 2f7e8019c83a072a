"""A study, without Ray: variants x seeds on a base config, and its plan of trials.

A study script declares a ``Study`` (labelled override sets, seeds, optionally a search space)
and calls ``liftplace.cli.study_main``, the command line every study shares. ``plan`` expands
it into full, validated run configs, all before Ray starts, and groups them into cohorts: the
variants of one seed that share the teacher, data and stream of batches (``distill.cohort_key``)
train in one trial, in lock step, on one teacher forward per step (``--cohort off``: one trial
per variant and seed, as a search always has); ``liftplace.runner.study.run_study`` runs the plan as one Ray Tune experiment under
``<storage>/<study>``; the report is built after by the repository's ``analysis/make_all.py``,
the same command a user runs on a finished study.

Importing this module does not import Ray (checked by the tests): a bad command line is
refused in one line without Ray's start-up cost. Nothing here imports the runner, which imports
this module (``liftplace.cli.study_main`` imports the runner once the command line is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liftplace.config import RunConfig
# liftplace.config and liftplace.distill (torch, diffusers: seconds) load inside the functions
# that need them: a study script's first import is light, so that study_main is running, and a
# Ctrl-C ends in its one line, from the first second.

RUNNERS = ("auto", "train", "direct")
MAX_SEEDS = 1000  # seeds per variant: more is a typo (100000 planned for minutes), not a study
COHORTS = ("auto", "off")


@dataclass
class Study:
    """What a study script declares: variants (label -> overrides) x seeds on a base config."""

    name: str
    variants: dict[str, dict] = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # overrides applied to every trial
    seeds: int = 2
    evals: int = 0  # FID evaluations during training, evenly spaced (besides the final one)
    metric: str = "fid"
    mode: str = "min"
    description: str = ""
    # A search instead of a grid: {dotted key: a ray.tune domain}, sampled by Optuna
    # (OptunaSearch) num_samples times, with ASHA stopping trials whose FID lags at an
    # evaluation. The variants then hold one entry: the base of the search.
    space: dict = field(default_factory=dict)
    num_samples: int = 0


@dataclass
class Trial:
    """One Ray Tune trial, typed until it is handed to Ray (``payload``): one run, or a cohort
    of runs of one seed that share teacher, data and one stream of batches."""

    variant: str  # the run's variant, or the cohort's label ("kd, lift, place K=16")
    seed: int
    runs: list[tuple[str, RunConfig]]  # (variant, its resolved and validated config)

    @property
    def cohort(self) -> bool:
        return len(self.runs) > 1

    def payload(self) -> dict:
        """What Ray Tune gets as the trial's ``run`` (and writes to its params.json): {"variant",
        "seed", "config"} for one run, {"variant", "seed", "members": [{"variant", "config"}]}
        for a cohort, the configs as dicts (``RunConfig.to_dict``)."""
        if not self.cohort:
            return {"variant": self.variant, "seed": self.seed, "config": self.runs[0][1].to_dict()}
        return {"variant": self.variant, "seed": self.seed,
                "members": [{"variant": variant, "config": config.to_dict()} for variant, config in self.runs]}


@dataclass
class Plan:
    """A study ready to run: every trial resolved and validated, before Ray starts."""

    study: Study
    preset: str
    trials: list[Trial]  # one per Tune trial
    configs: list[RunConfig]  # every run's, cohort members included
    runner: str  # direct | train
    folder: Path  # <storage>/<study name>; for a study on a store, the local folder its driver writes
    info: dict  # what study.json records
    store: object = None  # liftplace.storage.Store of <storage>/<study name>


def expand(study: Study, preset: str, overrides: list[str], seeds: int, seed_list: list[int] | None = None) -> list[Trial]:
    """Every run as a trial of its own, resolved and validated, before Ray starts. Seeds
    0..seeds-1, or ``seed_list`` (the seeds an addition grows)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if seeds > MAX_SEEDS or len(seed_list or []) > MAX_SEEDS:
        raise ValueError(f"--seeds {seeds}: at most {MAX_SEEDS} seeds per variant (plan with liftplace plan-seeds)")
    from liftplace.config import parse_override, resolve
    from liftplace.results import run_label

    folders: dict[str, str] = {}  # each run's folder is runs/<run_label>: one per variant and seed
    for label in study.variants:
        other = folders.setdefault(run_label(label, 0).lower(), label)
        if other != label:
            raise ValueError(f"study {study.name}: variants {other!r} and {label!r} would share one run folder "
                             f"(runs/{run_label(label, 0)[:-1]}<k>): rename one")
    user = dict(parse_override(o) for o in overrides)
    if "train.seed" in user:  # it would be recorded in study.json, yet every run takes the study's seed
        raise ValueError("--set train.seed: a study's runs take its seeds 0..N-1; use --seeds N (or --add-seeds N)")
    trials = []
    for label, variant in study.variants.items():
        for seed in (range(seeds) if seed_list is None else seed_list):
            settings = {**study.base, **variant, **user, "train.seed": seed}
            try:
                config = resolve(preset, settings)
                if study.evals:
                    settings["train.eval_every"] = max(1, config.train.steps // (study.evals + 1))
                    config = resolve(preset, settings)
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"study {study.name}, variant {label!r}: {err}") from None
            trials.append(Trial(label, seed, [(label, config)]))
    return trials


def group_cohorts(trials: list[Trial]) -> list[Trial]:
    """Trials of one seed whose configs share a cohort key become one cohort trial (in the
    order of the variants); a trial with no partner stays a single run."""
    from liftplace.distill import cohort_key

    groups: dict[tuple, list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.seed, cohort_key(trial.runs[0][1])), []).append(trial)
    out = [group[0] if len(group) == 1 else
           Trial(", ".join(t.variant for t in group), seed, [run for t in group for run in t.runs])
           for (seed, _), group in groups.items()]
    return sorted(out, key=lambda t: t.seed)


def pick_runner(config: RunConfig, runner: str) -> str:
    """direct: the Tune trial runs the loop in-process (~1 s of overhead, one worker); train:
    the trial drives a Ray Train TorchTrainer (~20 s on 2 cores, any number of workers)."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    if runner == "auto":
        return "direct" if config.scaling.num_workers == 1 else "train"
    if runner == "direct" and config.scaling.num_workers != 1:
        raise ValueError("runner direct runs one worker; use runner train for scaling.num_workers > 1")
    return runner


def plan(study: Study, *, preset: str = "cpu", overrides=(), seeds: int | None = None,
         storage: str | Path = "results", runner: str = "auto", cohort: str = "auto",
         seed_list: list[int] | None = None) -> Plan:
    """Expand and validate a study, grouped into cohorts unless cohort="off" (a search runs
    one variant per trial: its scheduler stops trials one by one); nothing is written and no
    Ray is involved. ``seed_list``: the trials of these seeds only (an addition to a study
    of ``seeds`` seeds); the info stays the study's."""
    if cohort not in COHORTS:
        raise ValueError(f"--cohort {cohort!r}: choose one of {', '.join(COHORTS)}")
    seeds = 1 if study.space else (study.seeds if seeds is None else seeds)
    runs = expand(study, preset, list(overrides), seeds, seed_list)
    configs = [t.runs[0][1] for t in runs]
    trials = runs if cohort == "off" or study.space else group_cohorts(runs)
    runners = {pick_runner(c, runner) for c in configs}
    if len(runners) != 1:
        raise ValueError(f"a study runs its trials one way; these variants need {sorted(runners)}: set --runner")
    chosen = runners.pop()
    from liftplace import storage as stores

    store = stores.Store(storage).child(study.name)  # a URI is parsed here, read only after the checks
    folder = Path(store.root) if store.local else stores.driver_mirror(store)
    info = _info(study, preset, overrides, seeds, chosen, len(trials))
    info.update(cohort="off" if study.space else cohort, runs=len(runs))
    return Plan(study, preset, trials, configs, chosen, folder, info, store)


def describe_domain(domain) -> str:
    """A search dimension as text that is the same in every process: ``choice([4, 16])``,
    ``Float(0.0001, 0.003, LogUniform)``, ``Integer(1, 10, Uniform q=2)``. (``str`` of a Ray Tune
    domain or sampler can be its memory address, which made study.json differ on each --resume.)"""
    if hasattr(domain, "categories"):
        return f"choice({list(domain.categories)!r})"
    if not hasattr(domain, "get_sampler"):
        return repr(domain)
    if callable(getattr(domain, "func", None)):  # tune.sample_from: the function's name
        return f"sample_from({getattr(domain.func, '__module__', '?')}.{getattr(domain.func, '__qualname__', '?')})"

    def sampler_text(sampler) -> str:
        if type(sampler).__name__ == "Quantized":
            return f"{sampler_text(sampler.sampler)} q={sampler.q!r}"
        return str(sampler) + "".join(f" {k}={v!r}" for k, v in sorted(vars(sampler).items()))

    text = sampler_text(domain.get_sampler())
    if hasattr(domain, "lower"):
        return f"{type(domain).__name__}({domain.lower!r}, {domain.upper!r}, {text})"
    return f"{type(domain).__name__}({text})"


def _info(study: Study, preset, overrides, seeds, runner, count) -> dict:
    """study.json: what makes two runs of a study the same study (compared on --resume)."""
    return {"name": study.name, "description": study.description, "preset": preset, "overrides": list(overrides),
            "seeds": seeds, "evals": study.evals, "space": {k: describe_domain(v) for k, v in study.space.items()},
            "num_samples": study.num_samples, "variants": study.variants, "base": study.base, "metric": study.metric,
            "mode": study.mode, "runner": runner, "trials": count}

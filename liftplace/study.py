"""A study, without Ray: variants x seeds on a base config, its plan, and the shared command line.

A study script declares a ``Study`` (labelled override sets, seeds, optionally a search space)
and calls ``study_main``. ``plan`` expands it into full, validated run configs, all before Ray
starts, and groups them into cohorts: the variants of one seed that share the teacher, data
and stream of batches (``distill.cohort_key``) train in one trial, in lock step, on one teacher
forward per step (``--cohort off``: one trial per variant and seed, as a search always has);
``liftplace.runner.study.run_study`` runs the plan as one Ray Tune experiment under
``<storage>/<study>``; the report is built after by the repository's ``analysis/make_all.py``,
the same command a user runs on a finished study.

Importing this module does not import Ray (checked by the tests): a bad command line is
refused in one line without Ray's start-up cost. ``study_main`` imports ``liftplace.runner``
inside, once the command line is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
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
# The analysis scripts live beside the package in the repository (they are not installed).
MAKE_ALL = Path(__file__).resolve().parents[1] / "analysis" / "make_all.py"


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
    folder: Path  # <storage>/<study name>
    info: dict  # what study.json records


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
    if "://" in str(storage):
        # study.json, --resume and the analysis read the study folder with local file I/O.
        raise ValueError(f"--storage {storage}: URIs are not supported; give a folder (on a multi-node "
                         "cluster, a shared file system mounted at the same path on every node, e.g. EFS)")
    folder = Path(storage).expanduser().resolve() / study.name
    info = _info(study, preset, overrides, seeds, chosen, len(trials))
    info.update(cohort="off" if study.space else cohort, runs=len(runs))
    return Plan(study, preset, trials, configs, chosen, folder, info)


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


def build_report(folder: Path) -> Path | None:
    """Run ``analysis/make_all.py`` on a finished study, as its own process (the library imports
    nothing from analysis/); returns REPORT.md, or None when the analysis scripts are absent."""
    if not MAKE_ALL.is_file():
        print(f"analysis: {MAKE_ALL} not found (the package was installed without its repository); "
              f"the study's results are in {folder}")
        return None
    subprocess.run([sys.executable, str(MAKE_ALL), str(folder)], check=True,
                   env={**os.environ, "LIFTPLACE_REPORT_OF_STUDY": "1"})  # a Ctrl-C is said once, by the study
    return Path(folder) / "analysis" / "REPORT.md"


def resume_command(argv=None) -> str:
    """The command that continues this study: the same one, with --resume."""
    args = list(sys.argv[1:] if argv is None else argv)
    # An interrupted addition is recorded in study.json: --resume finishes it; --add-seeds again
    # would add another.
    kept = []
    for i, word in enumerate(args):
        if word == "--add-seeds" or word.startswith("--add-seeds="):
            continue
        if i and args[i - 1] == "--add-seeds":
            continue
        kept.append(word)
    args = kept
    script = sys.argv[0] if Path(sys.argv[0]).suffix == ".py" else "<study script>"
    words = ["python", script, *args, *([] if "--resume" in args else ["--resume"])]
    return " ".join(shlex.quote(w) for w in words)


def study_main(study: Study, argv=None, *, report: bool = True) -> Path:
    """The command line every study script shares: run (or resume) the study, then its report.
    Ctrl-C or SIGTERM before the trials start (while torch and Ray load, during the checks) or
    while the report is built ends with one line that says what is left and how to go on; once
    the trials run, the study's own handling says it (``StudyInterrupted``)."""
    from liftplace import stops

    stage: dict = {}
    with stops.stoppable():
        try:
            return _study_main(study, argv, report=report, stage=stage)
        except (KeyboardInterrupt, stops.Stopped) as stop:
            stops.quiet()
            print(f"{Path(sys.argv[0]).name}: {_where_stopped(stage, argv)}", file=sys.stderr)
            raise SystemExit(stops.status(stop)) from None


def _where_stopped(stage: dict, argv) -> str:
    folder = stage.get("folder")
    if folder is None:
        return "interrupted before the study started; nothing was written"
    if stage.get("report"):
        return (f"interrupted while its report was built (the study is finished); build it with: "
                f"python {MAKE_ALL.relative_to(Path.cwd()) if MAKE_ALL.is_relative_to(Path.cwd()) else MAKE_ALL} {folder}")
    from liftplace.results import STUDY_FILE

    if (folder / STUDY_FILE).is_file():
        return f"interrupted before its trials started; continue it with: {resume_command(argv)}"
    return f"interrupted before the study started; nothing was written to {folder}"


def _study_main(study: Study, argv, *, report: bool, stage: dict) -> Path:
    parser = argparse.ArgumentParser(description=study.description.strip().split("\n")[0] if study.description else study.name)
    parser.add_argument("--preset", default="cpu", help="smoke | cpu | cpu-50 | paper (default cpu)")
    parser.add_argument("--seeds", default=str(study.seeds),
                        help=f"seeds per variant (default {study.seeds}), or auto: start from {max(study.seeds, 3)} and "
                             "add rounds of seeds until every comparison with kd is decided (see --max-seeds)")
    if not study.space:
        parser.add_argument("--max-seeds", type=int, default=12, help="--seeds auto: the most seeds per variant (default 12)")
        parser.add_argument("--round", type=int, default=2, help="--seeds auto: seeds added per round (default 2)")
        parser.add_argument("--add-seeds", type=int, default=0, metavar="N",
                            help="grow this study (finished or interrupted) by N seeds; earlier files stay as they are")
    parser.add_argument("--margin", type=float, default=None,
                        help="equivalence margin of the verdicts, a fraction of kd's mean final FID (default 0.2)")
    parser.add_argument("--storage", default="results", help="results folder; the study goes to STORAGE/<name>")
    parser.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study")
    parser.add_argument("--runner", default="auto", choices=RUNNERS)
    parser.add_argument("--max-concurrent", type=int, default=None)
    if not study.space:
        parser.add_argument("--cohort", default="auto", choices=COHORTS,
                            help="auto (default): the variants of a seed that share the teacher and the stream of "
                                 "batches train in one trial, on one teacher forward per step; off: one trial each")
    if study.space:
        parser.add_argument("--samples", type=int, default=study.num_samples, help="trials Optuna samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray Tune's status tables and every trial's per-step progress lines")
    args = parser.parse_args(argv)
    sequential = None
    if args.seeds == "auto" and not study.space:
        args.seeds = max(study.seeds, 3)
        sequential = {"max_seeds": args.max_seeds, "round": args.round}
    else:
        try:
            args.seeds = int(args.seeds)
        except ValueError:
            parser.exit(2, f"{Path(sys.argv[0]).name}: error: --seeds must be a number or auto, got {args.seeds!r}\n")
    for flag, value in (("--add-seeds", getattr(args, "add_seeds", 0)),):
        if value < 0:
            parser.exit(2, f"{Path(sys.argv[0]).name}: error: {flag} must be >= 1, got {value}\n")
    if sequential and getattr(args, "add_seeds", 0):
        parser.exit(2, f"{Path(sys.argv[0]).name}: error: --seeds auto grows the study itself; drop --add-seeds\n")
    for flag, value in (("--max-concurrent", args.max_concurrent), ("--samples", getattr(args, "samples", 1))):
        if value is not None and value < 1:
            parser.exit(2, f"{Path(sys.argv[0]).name}: error: {flag} must be >= 1, got {value}\n")
    if study.space:
        study = dataclasses.replace(study, num_samples=args.samples)
    stage["folder"] = Path(args.storage).expanduser().resolve() / study.name
    # Ray's import (~1 s) after the command line is read: a bad one is refused without it.
    from liftplace.runner.study import StudyInterrupted, run_study
    from liftplace.runner.train import RunFailed

    try:
        folder = run_study(study, preset=args.preset, overrides=args.set, seeds=args.seeds, storage=args.storage,
                           address=args.address, resume=args.resume, runner=args.runner,
                           max_concurrent=args.max_concurrent, cohort=getattr(args, "cohort", "auto"),
                           verbose=args.verbose, add_seeds=getattr(args, "add_seeds", 0), sequential=sequential,
                           margin=args.margin)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except StudyInterrupted as stop:  # no report on a partial study
        print(f"{Path(sys.argv[0]).name}: {stop}; continue it with: {resume_command(argv)}", file=sys.stderr)
        raise SystemExit(128 + stop.signal) from None
    except RunFailed as err:  # a trial failed inside a worker: no report either
        print(f"{Path(sys.argv[0]).name}: error: {err}; continue it with: {resume_command(argv)}", file=sys.stderr)
        raise SystemExit(1) from None
    if report:
        stage["report"] = True
        path = build_report(folder)
        if path is not None:
            print(f"analysis: {Path(folder) / 'analysis'} (open {path})")
    return folder


"""The command lines: `liftplace` and every study script's (``study_main``); bad input ends in one line, status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from liftplace import __version__
from liftplace.study import COHORTS, RUNNERS, Study  # the standard library only, as this module

# Nothing heavier than the standard library is imported before main() runs: torch and Ray load
# inside the commands, where a Ctrl-C or SIGTERM while they load ends in one line (main's).


# The analysis scripts live beside the package in the repository (they are not installed).
MAKE_ALL = Path(__file__).resolve().parents[1] / "analysis" / "make_all.py"


def cmd_objectives(args) -> None:
    from liftplace.objectives import COARSE_FORMS, GROUP_BY, PLACE_GROUP_SIZE, REDUCTIONS, WEIGHTINGS, objective_names

    print("objectives:", ", ".join(objective_names()))
    print("options (lift/place):")
    print("  coarse     ", " | ".join(COARSE_FORMS))
    print("  group_by   ", " | ".join(GROUP_BY))
    print("  reduction  ", " | ".join(REDUCTIONS))
    print("  weighting  ", " | ".join(WEIGHTINGS), "(with w0, warmup)")
    print(f"  group_size | num_groups (place; default group_size {PLACE_GROUP_SIZE}), eps, task_weight, distill_weight")
    print("options (feat, kd+feat, place+feat; none: the objective's own default):")
    print("  feat_weight      1.0 (feat, kd+feat) | 1e-6 (place+feat, the authors')")
    print("  feat_reduction   mean | sum (place+feat's default: sum over the tapped blocks)")
    print("  feat_bias        true | false (place+feat's default: false)")
    print("  feat_init        default | uniform (place+feat's default: uniform in +-feat_init_scale, 0.005)")


def cmd_teacher_train(args) -> None:
    from liftplace.metrics import Protocol
    from liftplace.recipes import train_teacher

    protocol = Protocol(num_images=args.eval_images, sampler_steps=args.eval_steps)
    card = train_teacher(
        args.out, arch=args.arch, size=args.size, data=args.data, resolution=args.resolution,
        prediction=args.prediction, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        protocol=protocol, command="liftplace " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line,
        vae=args.vae, guidance=args.guidance,
    )
    print(f"saved {args.out}: {card['params']:,} params, FID {card['fid']:.2f} ({card['eval_extractor']}, "
          f"{card['eval_num_images']} images, {card['eval_sampler_steps']} steps), {card['train_wall_time_s']:.0f} s")


def cmd_teacher_vae(args) -> None:
    from liftplace.recipes import train_vae
    from liftplace.metrics import Protocol

    card = train_vae(args.out, data=args.data, resolution=args.resolution, steps=args.steps, batch=args.batch,
                     lr=args.lr, kl_weight=args.kl_weight, seed=args.seed, protocol=Protocol(num_images=args.eval_images),
                     command="liftplace " + " ".join(sys.argv[1:]))
    print(f"saved {args.out}: {card['params']:,} params, latents {tuple(card['latent_shape'])}, validation "
          f"reconstruction MSE {card['val_recon_mse']:.4f}, FID of reconstructions {card['recon_fid']:.2f} "
          f"({card['eval_extractor']}, {card['eval_num_images']} images), {card['train_wall_time_s']:.0f} s")


def cmd_extractor_train(args) -> None:
    from liftplace.recipes import train_extractor

    result = train_extractor(args.data, args.resolution, epochs=args.epochs, seed=args.seed, out=args.out)
    print(f"saved {args.out}: validation accuracy {result['accuracy']:.4f}")


def cmd_config(args) -> None:
    from liftplace.config import resolve

    print(json.dumps(resolve(args.preset, args.set).to_dict(), indent=2))


def cmd_distill(args) -> None:
    from liftplace.config import resolve

    config = resolve(args.preset, args.set)
    # Ray's import (~1 s) after the config is checked
    from liftplace.runner.single import RunFailed, RunInterrupted, prepare_out_dir, run_single

    prepare_out_dir(Path(args.out), args.resume)  # before Ray starts
    try:
        last = run_single(config, args.out, address=args.address, resume=args.resume, tracker=args.tracker,
                          tracker_uri=args.tracker_uri)
    except RunFailed as err:
        print(f"liftplace: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except RunInterrupted as stop:
        print(f"liftplace: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signal) from None
    verdict = "DIVERGED at step %d" % last["step"] if last.get("diverged") else f"FID {last['fid']:.2f}"
    reference = last.get("eval_reference_images", last["eval_num_images"])
    vs = "" if reference in (None, last["eval_num_images"]) else f" vs {reference} real"
    print(f"done: {verdict} ({last['eval_extractor']}, {last['eval_num_images']} images{vs}, "
          f"{last['eval_sampler_steps']} sampler steps); student {last['student_params']:,} params "
          f"({last['compression']:.2%} of the teacher); run directory {Path(args.out).resolve()}")


def status_text(folder: str) -> str:
    """The table `liftplace status` prints: a summary line, then one line per run."""
    from liftplace import storage
    from liftplace.results import read_study_info, study_status

    where = storage.shown(folder) if storage.is_uri(folder) else Path(folder).resolve()
    folder = storage.local_copy(folder)  # a study on a store: its rows, copied here
    table, driver = study_status(folder)
    who = "a `liftplace distill` run" if read_study_info(folder).get("kind") == "run" else f"driver {driver}"
    counts = ", ".join(f"{n} {state}" for state, n in table["state"].value_counts().items())
    rows = [("variant", "seed", "state", "step", "loss", "FID", "elapsed")]
    for r in table.itertuples():
        steps = f"/{int(r.steps)}" if r.steps == r.steps and r.steps else ""
        rows.append((str(r.variant), str(r.seed), r.state, f"{int(r.step)}{steps}",
                     "" if r.loss != r.loss else f"{r.loss:.4f}", "" if r.fid != r.fid else f"{r.fid:.2f}",
                     "" if r.elapsed_s != r.elapsed_s else f"{int(r.elapsed_s) // 60}m{int(r.elapsed_s) % 60:02d}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 2) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return f"{where}: {who}; {len(table)} runs: {counts}\n" + "\n".join(lines)


def cmd_status(args) -> None:
    import time

    if args.watch is None:
        print(status_text(args.folder))
        return
    try:
        while True:
            text = status_text(args.folder)
            print("\033[2J\033[H" + text + f"\n(every {args.watch:g} s; Ctrl-C to stop)", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        print()


def plan_seeds_text(folder: str, effect: float | None = None, ratio: float = 0.2, power: float = 0.8) -> str:
    """What `liftplace plan-seeds` prints: one line of method, a table, one sentence per comparison."""
    from liftplace.results import finished_runs, read_study_info
    from liftplace.verdicts import ALPHA, REFERENCE, plan_seeds

    if effect is not None and not effect > 0:
        raise ValueError(f"--effect must be a positive FID difference, got {effect}")
    if not 0 < ratio < 10:
        raise ValueError(f"--ratio must be a fraction of kd's mean FID in (0, 10), e.g. 0.2, got {ratio}")
    if not 0 < power < 1:
        raise ValueError(f"--power must be in (0, 1), got {power}")
    from liftplace import storage

    folder = storage.local_copy(folder)  # a study on a store: its rows, copied here
    read_study_info(folder)  # NotAStudy (a ValueError) names what is missing
    summary = finished_runs(folder)
    table = plan_seeds(summary, effect=effect, ratio=ratio, power=power)
    if table.empty or table[f"{REFERENCE}_seeds"].max() < 2:
        raise ValueError(f"{folder}: no comparison with {REFERENCE} to plan from (a pilot needs a {REFERENCE} variant "
                         f"and another, each with at least 2 finished seeds)")
    asked = f"{effect:g} FID" if effect is not None else f"{ratio:.0%} of {REFERENCE}'s mean final FID"
    lines = [f"{Path(folder).resolve()}: seeds per variant for power {power:g} to detect a difference of {asked} "
             f"against {REFERENCE}, with Welch's test and Holm's correction over {len(table)} comparisons "
             f"(planned at its strictest level, {ALPHA:g}/{len(table)} = {table['level'].iloc[0]:.3g}); "
             f"seed spreads from this study as a pilot", ""]
    rows = [("variant", "against", "seeds", "FID mean ± std", f"{REFERENCE} mean ± std", "effect", "power now", "seeds needed")]
    for r in table.itertuples():
        needed = "more than 1000" if r.seeds_needed is None or r.seeds_needed != r.seeds_needed else str(int(r.seeds_needed))
        rows.append((r.variant, str(r.reference), f"{r.seeds}/{getattr(r, REFERENCE + '_seeds')}",
                     f"{r.fid_mean:.2f} ± {r.fid_std:.2f}", f"{getattr(r, REFERENCE + '_mean'):.2f} ± {getattr(r, REFERENCE + '_std'):.2f}",
                     f"{r.effect:.2f}", "n/a" if r.power_now != r.power_now else f"{r.power_now:.2f}", needed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append("")
    for r in table.itertuples():
        if r.power_now != r.power_now:
            lines.append(f"{r.variant}: fewer than 2 finished seeds on a side: no spread to plan from.")
            continue
        needed = (f"{int(r.seeds_needed)} seeds a variant would have power {power:g}" if r.seeds_needed == r.seeds_needed
                  and r.seeds_needed is not None else f"more than 1000 seeds a variant would be needed for power {power:g}")
        lines.append(f"{r.variant}: this study's {r.seeds} seeds had power {r.power_now:.2f} to detect {r.effect:.2f} FID; "
                     f"{needed}.")
    return "\n".join(lines)


def cmd_plan_seeds(args) -> None:
    print(plan_seeds_text(args.study, args.effect, args.ratio, args.power))


def export_study(folder: str, fmt: str, out: str | None = None) -> list[Path]:
    """Write a study's rows (one per run and reported step) and runs (one per run: final FID,
    seed, config) as CSV or Parquet; returns the two paths. A study on a store (a URI) is read
    from a local copy of its rows; without ``out`` the two files go back to the store, under
    <study>/export (the paths returned are then their URIs)."""
    from liftplace import files, storage
    from liftplace.results import load_study, read_study_info, summarize

    if fmt not in ("csv", "parquet"):
        raise ValueError(f"--format {fmt!r}: choose csv or parquet")
    if out is not None and storage.is_uri(out):
        raise ValueError(f"--out {storage.shown(out)}: a local folder (without --out, a study on a store is "
                         "exported into it, under <study>/export)")
    uri, folder = (folder if storage.is_uri(folder) else None), storage.local_copy(folder)
    read_study_info(folder)
    df = load_study(folder, allow_unfinished=True)
    target = Path(out) if out else Path(folder) / "export"
    files.make_folder(target, "the export folder")
    paths = []
    for name, frame in (("rows", df), ("runs", summarize(df))):
        path = target / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        paths.append(path)
    if uri is not None and out is None:
        store = storage.Store(uri)
        storage.put_tree(target, store, "export")
        return [storage.shown(store.uri_of(f"export/{p.name}")) for p in paths]
    return paths


def cmd_export(args) -> None:
    for path in export_study(args.study, args.format, args.out):
        print(f"wrote {path}")


def _tracker_arguments(parser: argparse.ArgumentParser, default_place: str) -> None:
    parser.add_argument("--tracker", default=None, metavar="mlflow|wandb",
                        help="also log every run to an experiment tracker (pip install -e '.[mlflow]' or '.[wandb]'); "
                             f"W&B writes offline under {default_place} unless WANDB_MODE=online")
    parser.add_argument("--tracker-uri", default=None, metavar="URI",
                        help=f"MLflow's store (default MLFLOW_TRACKING_URI, else sqlite:///<{default_place}>/mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liftplace", description="LIFT and PLACE distillation for tiny diffusion models.")
    parser.add_argument("--version", action="version", version=f"liftplace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("objectives", help="list the objectives and their options").set_defaults(func=cmd_objectives)

    for name, func, text in (("config", cmd_config, "print the resolved config and exit"),
                             ("distill", cmd_distill, "run one distillation on Ray Train")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", default="cpu", help="smoke | cpu | cpu-50 | paper (default cpu)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. objective.name=place (repeatable)")
        if name == "distill":
            p.add_argument("--out", required=True, help="the run directory (new, or an earlier run with --resume)")
            p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
            p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto)")
            _tracker_arguments(p, "the run's folder")
        p.set_defaults(func=func)

    status = sub.add_parser("status", help="the state of every run of a study, from its folder (running or not)")
    status.add_argument("folder", help="a study's folder, <storage>/<study>, or a `liftplace distill --out` folder")
    status.add_argument("--watch", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until Ctrl-C")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan-seeds", help="seeds per variant a question needs, from a finished study as a pilot")
    plan.add_argument("study", help="a study's folder, <storage>/<study>")
    size = plan.add_mutually_exclusive_group()
    size.add_argument("--effect", type=float, default=None, metavar="FID", help="the difference to detect, in FID")
    size.add_argument("--ratio", type=float, default=0.2, metavar="R",
                      help="the difference to detect as a fraction of kd's mean final FID (default 0.2)")
    plan.add_argument("--power", type=float, default=0.8, help="the power wanted (default 0.8)")
    plan.set_defaults(func=cmd_plan_seeds)
    export = sub.add_parser("export", help="a study's rows and runs as CSV or Parquet, to load elsewhere")
    export.add_argument("study", help="a study's folder, <storage>/<study>, or a `liftplace distill --out` folder")
    export.add_argument("--format", default="csv", choices=["csv", "parquet"])
    export.add_argument("--out", default=None, help="a folder (default <study>/export)")
    export.set_defaults(func=cmd_export)

    teacher = sub.add_parser("teacher", help="train teachers").add_subparsers(dest="action", required=True)
    train = teacher.add_parser("train", help="train a teacher and save it as a diffusers directory with a card")
    train.add_argument("--preset", choices=["cpu"], default="cpu", help="the built-in MNIST recipe")
    train.add_argument("--arch", choices=["unet", "dit", "sd"], default="unet",
                       help="sd: text-to-image (a StableDiffusionPipeline; needs --vae and captioned --data, e.g. "
                            "mnist-captions)")
    train.add_argument("--size", default="m", help="a named size (models.UNET_SIZES / DIT_SIZES / SD_SIZES)")
    train.add_argument("--out", required=True, help="a new directory")
    train.add_argument("--data", default="mnist")
    train.add_argument("--resolution", type=int, default=16)
    train.add_argument("--prediction", default="epsilon", choices=["epsilon", "v", "flow"])
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--batch", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-images", type=int, default=1000)
    train.add_argument("--eval-steps", type=int, default=50)
    train.add_argument("--vae", default=None, help="a saved AutoencoderKL directory: train a latent DiT on its "
                                                    "latents, saved as a DiTPipeline directory")
    train.add_argument("--guidance", type=float, default=1.0, help="--arch sd: the classifier-free guidance scale "
                                                                    "its card's FID is measured at")
    train.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=cmd_teacher_train)
    vae = teacher.add_parser("vae", help="train a small AutoencoderKL for latent teachers (with a card)")
    vae.add_argument("--out", required=True, help="a new directory")
    vae.add_argument("--data", default="mnist")
    vae.add_argument("--resolution", type=int, default=16)
    vae.add_argument("--steps", type=int, default=2000)
    vae.add_argument("--batch", type=int, default=64)
    vae.add_argument("--lr", type=float, default=1e-3)
    vae.add_argument("--kl-weight", type=float, default=1e-4)
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--eval-images", type=int, default=1000)
    vae.set_defaults(func=cmd_teacher_vae)

    extractor = sub.add_parser("extractor", help="the FID feature extractor").add_subparsers(dest="action", required=True)
    etrain = extractor.add_parser("train", help="train the digits-cnn feature extractor on a labelled dataset")
    etrain.add_argument("--data", default="mnist")
    etrain.add_argument("--resolution", type=int, default=16)
    etrain.add_argument("--epochs", type=int, default=20)
    etrain.add_argument("--seed", type=int, default=0)
    etrain.add_argument("--out", required=True, help="a .safetensors path")
    etrain.set_defaults(func=cmd_extractor_train)
    return parser


def _interrupted_before_training(args) -> str:
    """What a Ctrl-C or SIGTERM before a run's training loop started leaves, in one line."""
    out = getattr(args, "out", None)
    if args.func is not cmd_distill or out is None:
        return "interrupted"
    out = Path(out).resolve()
    if args.resume or (out / "config.json").is_file():
        resume = shlex.join(["liftplace", *sys.argv[1:], *([] if args.resume else ["--resume"])])
        return f"interrupted before training started; continue it with: {resume}"
    return f"interrupted before the run started; nothing was written to {out}"


def main(argv=None) -> int:
    """Bad input: one line, exit 2. A file that cannot be written (a full disk, no permission):
    one line, exit 1. Ctrl-C or SIGTERM before a command's own handling takes over (while
    torch and Ray load, during the checks, while Ray starts): one line, exit 130 or 143."""
    from liftplace import stops

    with stops.stoppable():
        args = build_parser().parse_args(argv)
        try:
            args.func(args)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"liftplace: error: {err}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader went away (`liftplace status | head`): nothing to say
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit
            return 141
        except OSError as err:
            print(f"liftplace: error: {err}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, stops.Stopped) as stop:
            stops.quiet()
            print(f"liftplace: {_interrupted_before_training(args)}", file=sys.stderr)
            return stops.status(stop)
        return 0


# The command line every study script shares (studies/*.py call study_main).


def build_report(where: str | Path) -> Path | None:
    """Run ``analysis/make_all.py`` on a finished study (its folder, or its URI on a store), as
    its own process (the library imports nothing from analysis/); returns REPORT.md (for a
    study on a store, in the local copy that make_all read), or None when the analysis scripts
    are absent."""
    from liftplace import storage

    if not MAKE_ALL.is_file():
        print(f"analysis: {MAKE_ALL} not found (the package was installed without its repository); "
              f"the study's results are in {storage.shown(str(where))}")
        return None
    subprocess.run([sys.executable, str(MAKE_ALL), str(where)], check=True,
                   env={**os.environ, "LIFTPLACE_REPORT_OF_STUDY": "1"})  # a Ctrl-C is said once, by the study
    return (storage.reader_copy(where, "analysis") if storage.is_uri(where) else Path(where)) / "analysis" / "REPORT.md"


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
    from liftplace.storage import shown

    words = ["python", script, *map(shown, args), *([] if "--resume" in args else ["--resume"])]  # no secret of a URI
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
    from liftplace import storage

    folder = stage.get("folder")
    if folder is None:
        return "interrupted before the study started; nothing was written"
    on_store = isinstance(folder, storage.Store)
    if stage.get("report"):
        return (f"interrupted while its report was built (the study is finished); build it with: "
                f"python {MAKE_ALL.relative_to(Path.cwd()) if MAKE_ALL.is_relative_to(Path.cwd()) else MAKE_ALL} "
                + (shlex.quote(folder.shown) if on_store else str(folder)))
    from liftplace.results import STUDY_FILE

    try:
        claimed = folder.exists(STUDY_FILE) if on_store else (folder / STUDY_FILE).is_file()
    except (OSError, ValueError):
        claimed = on_store  # a store it could not read: say what would continue it
    if claimed:
        return f"interrupted before its trials started; continue it with: {resume_command(argv)}"
    return f"interrupted before the study started; nothing was written to {folder.shown if on_store else folder}"


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
    _tracker_arguments(parser, "the study's folder")
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
    from liftplace import storage

    store = storage.Store(args.storage).child(study.name)  # read nothing yet (a URI is opened by the study)
    stage["folder"] = Path(store.root) if store.local else store
    # Ray's import (~1 s) after the command line is read: a bad one is refused without it.
    from liftplace.runner.study import StudyInterrupted, run_study
    from liftplace.runner.train import RunFailed

    try:
        folder = run_study(study, preset=args.preset, overrides=args.set, seeds=args.seeds, storage=args.storage,
                           address=args.address, resume=args.resume, runner=args.runner,
                           max_concurrent=args.max_concurrent, cohort=getattr(args, "cohort", "auto"),
                           verbose=args.verbose, add_seeds=getattr(args, "add_seeds", 0), sequential=sequential,
                           tracker=args.tracker, tracker_uri=args.tracker_uri,
                           margin=args.margin)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except StudyInterrupted as stop:  # no report on a partial study
        print(f"{Path(sys.argv[0]).name}: {stop}; continue it with: {resume_command(argv)}", file=sys.stderr)
        raise SystemExit(128 + stop.signal) from None
    except storage.StoreError as err:  # the store stopped taking the study's files: no report
        print(f"{Path(sys.argv[0]).name}: error: storage: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except RunFailed as err:  # a trial failed inside a worker: no report either
        print(f"{Path(sys.argv[0]).name}: error: {err}; continue it with: {resume_command(argv)}", file=sys.stderr)
        raise SystemExit(1) from None
    if report:
        stage["report"] = True
        path = build_report(folder if store.local else store.uri)  # a store: from a reader's copy
        if path is not None:
            print(f"analysis: {path.parent} (open {path})")
    return folder


if __name__ == "__main__":
    sys.exit(main())

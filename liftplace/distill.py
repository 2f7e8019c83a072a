"""One distillation run: a frozen teacher, students, their objectives, a budget.

``run(config, report, checkpoint=None)`` trains one student; ``run_cohort(members, report,
checkpoint=None)`` trains a cohort: several students (variants) that share the teacher, the
data and the stream of batches, timesteps and noise, in lock step, on one teacher forward per
step. Both are plain functions: Ray Train calls them in every worker (``liftplace.runner``),
tests call them in-process. They import nothing from Ray.

``report(row, checkpoint_dir)`` (a cohort: ``report({variant: row}, checkpoint_dir)``) receives
the rows of the schema ``liftplace.results`` documents every ``train.log_every`` steps, at
every evaluation and at the end, and a checkpoint directory every ``train.checkpoint_every``
steps and at the end (None otherwise). Only rank 0's rows carry evaluation numbers; every rank
calls report with the same step (Ray's contract).

A run is a short loop over four parts: ``build`` (teacher, data stream, students, objectives,
optimizers), ``train_step`` (one student), ``report_row`` and ``finish_report`` (evaluate,
checkpoint, report). Inside a cohort every student keeps its own optimizer, EMA, objective,
global RNG stream (DiT label dropout, adapter init), checkpoint, divergence state and rows, so
each student's rows are those it would have alone (bitwise on CPU; tests/test_cohort.py). A
student that diverges stops; the others go on. Checkpoints are ``liftplace.checkpoints``'
format: resuming from one continues the same run or cohort exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image

from liftplace import checkpoints, latents, models
from liftplace.config import RunConfig
from liftplace.diffusion import NoiseProcess
from liftplace.dotted import flatten
from liftplace.evaluate import evaluate, generate
from liftplace.metrics import protocol_record
from liftplace.objectives import Objective, make_objective, objective_class
from liftplace.results import EVAL_COLUMNS
from liftplace.teachers import load_teacher, load_vae, teacher_fingerprint, teacher_process, teacher_space

Report = Callable[[dict, "Path | None"], None]
# The settings the students of one cohort may differ in; everything else (teacher, data, seed,
# batch, steps, noise process, schedule of reports, evaluation protocol, scaling) decides the
# stream of batches and the teacher's output, or when rows are written, and must be shared.
PER_STUDENT = ("student.", "objective.", "train.lr", "train.ema_decay", "train.ema_warmup", "train.grad_clip",
               "train.loss_bound")
# ... but for these: the stage outputs the teacher's feature taps collect follow a BK-SDM
# student's blocks, and a cohort has one set of teacher taps.
SHARED_STUDENT = ("student.blocks",)


def shared_settings(config: RunConfig) -> dict:
    """The settings a cohort's students must share (dotted key -> value)."""
    return {k: v for k, v in flatten(config.to_dict()) if not k.startswith(PER_STUDENT) or k in SHARED_STUDENT}


def cohort_key(config: RunConfig) -> str:
    """Configs with equal keys can train as one cohort."""
    return json.dumps(shared_settings(config), sort_keys=True)


FINAL_ROWS = "final_rows.json"  # in the final checkpoint: its rows before their evaluation


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Batch:
    """One step's inputs, the same for every student: noised images x_t at ``timesteps``, the
    true ``target`` (noise, velocity or flow) and class ``labels`` (or None)."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None


@dataclass
class Stream:
    """The stream of batches, timesteps and noise, drawn from its own generator (one per rank,
    so workers see different batches), which is checkpointed: a resumed run continues the same
    stream, and nothing a student or an objective draws can change what the others see.

    Each step draws, in this order: the batch's indices; with ``flip``, which images it
    mirrors left-right (each with probability 0.5; in latent space the latents are mirrored);
    the timesteps (with ``antithetic``, ceil(batch/2) of them and their mirrors,
    ``NoiseProcess.training_pair``); the noise. With both options off (the defaults) it draws
    exactly what it drew before they existed."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    process: NoiseProcess
    batch: int
    device: torch.device
    generator: torch.Generator
    antithetic: bool = False  # train.antithetic
    flip: bool = False  # data.flip
    captions: object = None  # a text-to-image split's text.Captions: the batch's conditions
    caption_dropout: float = 0.0  # data.caption_dropout

    def next(self) -> Batch:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.generator)
        x0 = self.images[idx]
        if self.flip:
            flipped = torch.rand(self.batch, generator=self.generator, device=self.generator.device) < 0.5
            flipped = flipped.to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
            x0 = torch.where(flipped, x0.flip(-1), x0)
        x_t, timesteps, target = self.process.training_pair(x0, generator=self.generator, antithetic=self.antithetic)
        labels = self.labels[idx].to(self.device) if self.num_classes else None
        if self.captions is not None:
            # The captions' embeddings [B, L, D] in place of labels; after the noise, the captions
            # dropped to the empty one (so a stream without captions draws what it drew before).
            context = self.captions.embeddings(idx)
            if self.caption_dropout:
                dropped = torch.rand(self.batch, generator=self.generator, device=self.generator.device) < self.caption_dropout
                context = torch.where(dropped.view(-1, 1, 1).to(context.device), self.captions.null, context)
            labels = context.to(self.device)
        return Batch(x_t.to(self.device), timesteps.to(self.device), target.to(self.device), labels)


@dataclass
class Trainee:
    """One student and everything that trains it: its config, optimizer, EMA, objective (with
    its own parameters), feature taps, and its own stream of torch's global RNG."""

    variant: str | None
    folder: str  # its sub-folder of a cohort checkpoint ("" for a run of one student)
    config: RunConfig
    student: torch.nn.Module
    net: torch.nn.Module  # the student, wrapped in DistributedDataParallel with several workers
    objective: Objective
    opt: torch.optim.Optimizer
    ema: EMAModel
    params: list[torch.nn.Parameter]
    taps: models.FeatureTaps | None
    rng: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)  # the row's per-run columns (sizes, protocol)
    diverged_at: int | None = None

    @contextmanager
    def own_rng(self):
        """Torch's global RNG (and CUDA's) as this student left it: its draws do not depend on
        the students trained beside it."""
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"])
        try:
            yield
        finally:
            self.rng = _global_rng()


def _global_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@dataclass
class Outcome:
    """What one step of one student produced, for its report row."""

    parts: object  # objectives.LossParts
    grad_norm: float
    diverged: bool


@dataclass
class Run:
    """Everything ``build`` makes: the shared teacher and stream, and the students."""

    config: RunConfig  # the first student's; the shared settings are the same in all
    rank: int
    world: int
    device: torch.device
    teacher: torch.nn.Module
    teacher_taps: models.FeatureTaps | None
    stream: Stream
    trainees: list[Trainee]
    autocast: Callable
    vae: torch.nn.Module | None  # a latent teacher's frozen VAE: decodes samples for metrics and grids
    teacher_key: str  # teachers.teacher_fingerprint: kept in checkpoints, checked on resume
    text: Path | None = None  # a text-to-image teacher's pipeline: its validation captions' embeddings
    teacher_samples: torch.Tensor | None = None  # for samples.png, drawn once


def check_cohort(members: dict[str | None, RunConfig]) -> None:
    """Refuse students that cannot share one stream, naming the first differing setting."""
    if not members:
        raise ValueError("a cohort needs at least one student")
    (first, base), *rest = members.items()
    shared = shared_settings(base)
    for variant, config in rest:
        other = shared_settings(config)
        for key in shared:
            if other[key] != shared[key]:
                raise ValueError(f"variants {first!r} and {variant!r} cannot train as one cohort: {key} differs "
                                 f"({shared[key]!r} vs {other[key]!r}); only {', '.join(PER_STUDENT)} may differ")


def build(members: dict[str | None, RunConfig]) -> Run:
    """Teacher, data stream and every student with its objective and optimizer. Each student is
    built right after seeding torch from its train.seed, as it would be alone."""
    check_cohort(members)
    config = next(iter(members.values()))
    rank, world = rank_and_world()
    tr = config.train
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    np.random.seed(tr.seed)
    random.seed(tr.seed)
    teacher, card = load_teacher(config.teacher.name, device)
    space = teacher_space(config.teacher.name)
    vae = load_vae(space, device)
    train_set = latents.load_split(config, "train", space, vae)  # a latent teacher's: encoded once, cached
    images, labels = train_set.x0, train_set.labels
    process = teacher_process(config.teacher.name, config.teacher.prediction)
    stream = Stream(images, labels, train_set.num_classes, process, tr.batch, device,
                    torch.Generator().manual_seed(tr.seed * 1000 + rank), antithetic=tr.antithetic,
                    flip=config.data.flip, captions=train_set.captions,
                    caption_dropout=config.data.caption_dropout if train_set.captions is not None else 0.0)
    needs_features = any(objective_class(c.objective.name).needs_features for c in members.values())
    # The stage outputs a feature objective matches: a BK-SDM student has fewer (student.blocks is
    # shared by a cohort's students, so one set of teacher taps serves them all).
    teacher_names, _ = models.block_tap_names(teacher, config.student.blocks) if needs_features else (None, None)
    teacher_taps = models.FeatureTaps(teacher, teacher_names) if needs_features else None
    example_shape = (2, *images.shape[1:])
    # MACs are counted with a whole caption's context (the tokenizer's length), as sampling runs
    context = train_set.captions.table[:1].to(device) if train_set.captions is not None else None
    static = {
        "teacher_params": models.count_params(teacher),
        "teacher_macs": models.count_macs(teacher, example_shape, context),
        "world_size": world,
        # the card's FID, where it was sampled as the students are (a text-to-image card names the
        # guidance scale it was measured at: another scale gives another FID)
        "teacher_fid": (card.get("fid", float("nan")) if float(card.get("eval_guidance_scale", 1.0))
                        == float(config.eval.guidance_scale) else float("nan")),
        "denoiser_size": int(images.shape[-1]),  # the side the denoisers see: a latent teacher's is smaller
        **protocol_record(config.eval.protocol(config.data.spec)),
    }
    if vae is not None:  # the VAE's cost, apart from the denoisers' (its decoder runs once per sample)
        static.update(vae_params=models.count_params(vae), vae_decode_macs=models.count_decode_macs(vae, example_shape))
    # what Taylor importance prunes by (on the CPU, as the students are pruned; unused otherwise)
    calibration = models.Calibration.of(train_set, process)
    trainees = []
    for i, (variant, member) in enumerate(members.items()):
        torch.manual_seed(member.train.seed)
        student = models.build_student(teacher.cpu(), member.student, seed=member.train.seed,
                                       example_shape=example_shape, calibration=calibration)
        student = student.to(device).train().requires_grad_(True)
        teacher.to(device)
        folder = "" if len(members) == 1 else f"m{i}"
        trainee = _trainee(variant, folder, member, student, teacher_taps, tuple(images.shape[1:]), device, world)
        trainee.static = {"student_params": models.count_params(student),
                          "student_macs": models.count_macs(student, example_shape, context), **static}
        trainee.static["compression"] = trainee.static["student_params"] / trainee.static["teacher_params"]
        trainee.rng = _global_rng()
        trainees.append(trainee)
    bf16 = device.type == "cuda" and tr.bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    return Run(config, rank, world, device, teacher, teacher_taps, stream, trainees, autocast, vae,
               teacher_fingerprint(config.teacher.name), space.text)


def _trainee(variant, folder, config: RunConfig, student, teacher_taps, shape, device, world) -> Trainee:
    options = config.objective_options()
    taps = None
    if objective_class(config.objective.name).needs_features:
        taps = models.FeatureTaps(student, models.block_tap_names(teacher_taps.model, config.student.blocks)[1])
        options.update(student_channels=taps.channels(), teacher_channels=teacher_taps.channels())
    objective = make_objective(config.objective.name, **options, shape=shape).to(device)
    net = student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    params = [*student.parameters(), *objective.parameters()]
    # The fused and foreach updates do one pass over all parameters instead of a Python loop
    # over ~180 small tensors: on CPU, Adam's step took 8 ms with the loop and 1 ms fused for
    # the cpu preset's student (benchmarks/cohort.py measures whole steps).
    opt = torch.optim.Adam(params, lr=config.train.lr, fused=True)
    ema = make_ema(student.parameters(), config.train)
    return Trainee(variant, folder, config, student, net, objective, opt, ema, params, taps)


class ConstantDecayEMA(EMAModel):
    """diffusers' EMAModel at one decay from its first update on (shadow <- d * shadow + (1 - d) *
    weights, the shadow starting at the initial weights), as the authors' DDPM EMA; EMAModel's
    own decay is 0 at its first update (a copy) and min(d, (1 + n) / (10 + n)) at the update after
    n others. Checkpoints hold the same state for both (shadow weights, update count)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


def make_ema(parameters, train) -> EMAModel:
    """The EMA of a student's parameters for ``train`` (a TrainConfig): warmed up (diffusers'
    ramp, train.ema_warmup, the default) or at a constant train.ema_decay from step one."""
    kind = EMAModel if train.ema_warmup else ConstantDecayEMA
    return kind(parameters, decay=train.ema_decay, foreach=True)


def teacher_forward(run: Run, batch: Batch) -> tuple[torch.Tensor, list | None]:
    """The teacher's prediction (float32, no graph) and, when taps are on, its block features."""
    with torch.no_grad(), run.autocast():
        teacher_out = models.predict(run.teacher, batch.x_t, batch.timesteps, batch.labels).float()
    return teacher_out, (list(run.teacher_taps.features) if run.teacher_taps else None)


def train_step(run: Run, trainee: Trainee, batch: Batch, teacher_out, teacher_features, step: int, *,
               diagnostics: bool) -> Outcome:
    """One optimizer step of one student. A non-finite loss or gradient, or a loss over
    train.loss_bound, marks it diverged and skips the update (on every rank together)."""
    tr = trainee.config.train
    with run.autocast():
        student_out = models.predict(trainee.net, batch.x_t, batch.timesteps, batch.labels).float()
    features = (list(trainee.taps.features), teacher_features) if trainee.taps else None
    parts = trainee.objective(student_out, teacher_out, step=step, target=batch.target, features=features,
                              diagnostics=diagnostics)
    loss = parts.loss
    diverged = not torch.isfinite(loss).item() or loss.item() > tr.loss_bound
    if run.world > 1:
        # Every rank must skip the backward together, or the others hang in its all-reduce.
        flag = torch.tensor(float(diverged), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        diverged = bool(flag.item())
    grad_norm = float("nan")
    if not diverged:
        trainee.opt.zero_grad(set_to_none=True)
        loss.backward()
        # Gradients are all-reduced by now, so every rank sees the same norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainee.params, tr.grad_clip).item()
        diverged = not math.isfinite(grad_norm)
    if not diverged:
        trainee.opt.step()
        trainee.ema.step(trainee.student.parameters())
    return Outcome(parts, grad_norm, diverged)


def report_row(trainee: Trainee, outcome: Outcome, step: int, images_per_s: float, elapsed_s: float) -> dict:
    """The results schema's row for one student at one step (evaluation columns NaN)."""
    parts = outcome.parts
    row = {
        "step": step,
        "loss": parts.loss.item(),
        "loss_task": parts.task.item(),
        "loss_distill": parts.distill.item(),
        "loss_coarse": parts.coarse.item(),
        "loss_fine": parts.fine.item(),
        "loss_feat": parts.feat.item(),
        "w": parts.w.item(),
        "beta0": parts.beta0.item(),
        "beta1": parts.beta1.item(),
        "grad_norm": outcome.grad_norm,
        "diverged": outcome.diverged,
        "images_per_s": images_per_s,
        "elapsed_s": elapsed_s,
        **{k: float("nan") for k in EVAL_COLUMNS},
        **trainee.static,
    }
    if trainee.variant is not None:
        row.update(variant=trainee.variant, member=trainee.folder)
    return row


def finish_report(run: Run, rows: dict, report: Callable, *, evaluate: bool, save: bool, final: bool) -> None:
    """Evaluate each student that has a row and has not diverged (rank 0), checkpoint every
    student still training (and, at the end, its sample grid and the rows), then report the
    rows. The checkpoint follows the evaluation, so that it keeps the RNG state training goes on
    with (torch-fidelity's data loader draws from torch's global RNG). An evaluation that fails
    (out of memory, a broken extractor) still writes and reports the checkpoint, with the rows
    (metrics NaN), before the error goes on: a resume evaluates again instead of training again."""
    by_variant = {t.variant: t for t in run.trainees}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) if save and any(t.diverged_at is None for t in run.trainees) else None

        def checkpoint(reported: dict) -> None:
            if ckpt_dir is None:
                return
            save_checkpoint(run, ckpt_dir, next(iter(rows.values()))["step"])
            if run.rank == 0 and final:
                for trainee in run.trainees:
                    if trainee.diverged_at is None:
                        save_samples(run, trainee, ckpt_dir / trainee.folder)
                # What a resume from here reports once it has evaluated.
                (ckpt_dir / FINAL_ROWS).write_text(json.dumps([[v, r] for v, r in reported.items()]))

        try:
            for variant, row in rows.items():
                trainee = by_variant[variant]
                if run.rank == 0 and evaluate and not row["diverged"]:
                    with trainee.own_rng():
                        row.update(evaluate_student(trainee.student, trainee.ema, run.stream.process, trainee.config,
                                                    run.stream.num_classes, run.device, vae=run.vae, text=run.text))
        except Exception:
            unevaluated = {v: {**r, **{k: float("nan") for k in EVAL_COLUMNS}} for v, r in rows.items()}
            if ckpt_dir is not None:
                checkpoint(unevaluated)
                report(unevaluated, ckpt_dir)
            raise
        checkpoint(rows)
        report(rows, ckpt_dir)


def save_checkpoint(run: Run, directory: Path, step: int) -> None:
    """Every student still training, each in its folder; a cohort's manifest last."""
    for trainee in run.trainees:
        if trainee.diverged_at is None:
            with trainee.own_rng():
                checkpoints.save(directory / trainee.folder, step, trainee.student, trainee.ema, trainee.opt,
                                 trainee.objective, run.stream.generator, run.rank, run.world,
                                 checkpoints.config_digest(trainee.config.to_dict()), run.teacher_key)
    if len(run.trainees) > 1 and run.rank == 0:
        checkpoints.save_manifest(directory, step, [(t.variant, t.folder, t.diverged_at) for t in run.trainees])


def restore_checkpoint(run: Run, directory: Path) -> int:
    """Load every student's state from a checkpoint of this run or cohort; returns its step."""
    directory = Path(directory)
    if len(run.trainees) == 1:
        trainee = run.trainees[0]
        with trainee.own_rng():
            return checkpoints.restore(directory, trainee.student, trainee.ema, trainee.opt, trainee.objective,
                                       run.stream.generator, run.rank, checkpoints.config_digest(trainee.config.to_dict()),
                                       run.teacher_key)
    manifest = checkpoints.read_manifest(directory)
    saved = [(m["variant"], m["folder"]) for m in manifest["members"]]
    if saved != [(t.variant, t.folder) for t in run.trainees]:
        raise ValueError(f"checkpoint {directory} holds the cohort {[v for v, _ in saved]}, "
                         f"not {[t.variant for t in run.trainees]}")
    for trainee, member in zip(run.trainees, manifest["members"]):
        trainee.diverged_at = member["diverged_at"]
        if trainee.diverged_at is None:
            with trainee.own_rng():
                checkpoints.restore(directory / trainee.folder, trainee.student, trainee.ema, trainee.opt,
                                    trainee.objective, run.stream.generator, run.rank,
                                    checkpoints.config_digest(trainee.config.to_dict()), run.teacher_key)
    return int(manifest["step"])


def run(config: RunConfig, report: Report, checkpoint: str | Path | None = None, *, log=print) -> dict:
    """Train one student; returns the last reported row."""
    last = _train({None: config}, lambda rows, ckpt: report(rows[None], ckpt), checkpoint, log)
    return last.get(None, {})


def run_cohort(members: dict[str, RunConfig], report: Callable[[dict, Path | None], None],
               checkpoint: str | Path | None = None, *, log=print) -> dict[str, dict]:
    """Train a cohort (variant -> config) in lock step; returns each variant's last row."""
    if None in members:
        raise ValueError("every student of a cohort needs a variant label")
    return _train(members, report, checkpoint, log)


def _train(members: dict, report: Callable, checkpoint, log) -> dict:
    r = build(members)
    tr = r.config.train
    start = 0
    last: dict = {}
    if checkpoint is not None:
        start = restore_checkpoint(r, Path(checkpoint))
        log(f"[rank {r.rank}] resumed from {checkpoint} at step {start}")
        saved = Path(checkpoint) / FINAL_ROWS
        if start >= tr.steps and saved.is_file():
            # Training ended here and the final evaluation failed or was cut short: evaluate
            # again (the checkpoint and sample grids are written again, identical).
            rows = {v: row for v, row in json.loads(saved.read_text())}
            finish_report(r, rows, report, evaluate=True, save=True, final=True)
            return rows
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    try:
        for step in range(start + 1, tr.steps + 1):
            training = [t for t in r.trainees if t.diverged_at is None]
            if not training:
                break
            final = step == tr.steps
            evaluate = final or (tr.eval_every > 0 and step % tr.eval_every == 0)
            save = final or step % tr.checkpoint_every == 0
            due = evaluate or save or step % tr.log_every == 0
            batch = r.stream.next()
            teacher_out, teacher_features = teacher_forward(r, batch)
            outcomes = {}
            for trainee in training:
                with trainee.own_rng():
                    outcomes[trainee.variant] = train_step(r, trainee, batch, teacher_out, teacher_features, step,
                                                           diagnostics=due)
            window_images += tr.batch * r.world
            diverged = [t for t in training if outcomes[t.variant].diverged]
            if not (due or diverged):
                continue
            for trainee in diverged:
                trainee.diverged_at = step
            now = time.perf_counter()
            rate = window_images / max(now - window_start, 1e-9)
            # A student is reported on the schedule, and once more at the step it diverges.
            rows = {t.variant: report_row(t, outcomes[t.variant], step, rate, now - run_start)
                    for t in training if due or t in diverged}
            finish_report(r, rows, report, evaluate=evaluate, save=save, final=final)
            if r.rank == 0:
                log(progress_line(rows, tr.steps, run_start, start))
                for trainee in diverged:
                    log(divergence_line(trainee, rows[trainee.variant], alone=len(r.trainees) == 1))
            window_start, window_images = time.perf_counter(), 0
            last.update(rows)
            if PAUSE_FILE:
                _pause_point(step)
    finally:
        for tap in [r.teacher_taps, *(t.taps for t in r.trainees)]:
            if tap is not None:
                tap.remove()
    return last


# A test hook, set only by this project's fault tests: when the environment names a file
# (LIFTPLACE_PAUSE_FILE) and that file exists holding {"step": N}, the training loop stops
# right after reporting step N, writes "<file>.paused" with its process id, and waits until
# the file is deleted: a kill lands at a known step, not in a timing window. With
# {"step": N, "fail": MESSAGE} it raises RuntimeError(MESSAGE) there instead, as a bug would
# (with "errno": E, OSError(E, MESSAGE), as a full disk would). Writing other content into the
# file while paused releases the pause and arms that instead. `liftplace distill` has named
# points before training too ({"step": "checks"}, before the checks of its inputs; "trainer",
# after config.json is written and before Ray Train starts), and a study before its trials
# ("study checks", before its checks; "study claimed", once study.json is written).
PAUSE_FILE = os.environ.get("LIFTPLACE_PAUSE_FILE")


def _pause_point(step: int | str) -> None:
    if not PAUSE_FILE:
        return
    path = Path(PAUSE_FILE)
    try:
        armed = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if armed.get("step") != step:
        return
    if "fail" in armed:
        raise OSError(armed["errno"], armed["fail"]) if "errno" in armed else RuntimeError(armed["fail"])
    Path(f"{path}.paused").write_text(str(os.getpid()))
    while True:
        try:
            if json.loads(path.read_text()) != armed:
                return  # re-armed
        except FileNotFoundError:
            return
        except ValueError:
            pass  # being rewritten
        time.sleep(0.05)


def divergence_line(trainee: Trainee, row: dict, *, alone: bool) -> str:
    name = "" if trainee.variant is None else f"{trainee.variant}: "
    return (f"{name}diverged at step {row['step']} (loss {row['loss']:.4g}, grad norm {row['grad_norm']:.4g}): "
            f"stopping{'' if alone else ' it; the others go on'}")


def progress_line(rows: dict, steps: int, run_start: float, start: int) -> str:
    """One line per report: step, ETA, and each student's loss (w, FID when there are)."""
    step = next(iter(rows.values()))["step"]
    rate = (step - start) / max(time.perf_counter() - run_start, 1e-9)
    eta = (steps - step) / max(rate, 1e-9)
    parts = []
    for variant, row in rows.items():
        fid = f" FID {row['fid']:.2f}" if not math.isnan(row["fid"]) else ""
        if not math.isnan(row.get("text_alignment", math.nan)):  # a text-to-image run's
            fid += f" (text {row['text_alignment']:.0%})"
        w = f" w {row['w']:.3f}" if not math.isnan(row["w"]) else ""
        parts.append(f"{'' if variant is None else variant + ': '}loss {row['loss']:.4f}{w}{fid}")
    images = next(iter(rows.values()))["images_per_s"]
    return f"step {step}/{steps}  {' | '.join(parts)}  {images:.0f} img/s  ETA {eta:.0f}s"


@contextmanager
def ema_weights(student, ema: EMAModel):
    """The student with its EMA weights, in eval mode; the live weights come back after."""
    ema.store(student.parameters())
    ema.copy_to(student.parameters())
    student.eval()
    try:
        yield student
    finally:
        student.train()
        ema.restore(student.parameters())


def evaluate_student(student, ema: EMAModel, process, config: RunConfig, num_classes: int, device, *, vae=None,
                     text=None) -> dict:
    """FID/KID/precision/recall of the EMA student (``evaluate.evaluate``: a latent student's
    samples are decoded by ``vae`` first, the metrics compare images; a text-to-image student,
    ``text`` its teacher's pipeline, samples the validation captions at the guidance scale)."""
    with ema_weights(student, ema):
        return evaluate(student, process, config.data.spec, config.data.resolution, config.eval.protocol(config.data.spec),
                        num_classes=num_classes, device=device, vae=vae, text=text)


def save_samples(run: Run, trainee: Trainee, directory: Path) -> None:
    """samples.png: 32 EMA-student samples (left) beside the teacher's from the same noise."""
    steps, seed = run.config.eval.sampler_steps, run.config.eval.seed
    kwargs = dict(steps=steps, seed=seed, num_classes=run.stream.num_classes, device=run.device,
                  captions=run.stream.captions, guidance=run.config.eval.guidance_scale)
    with ema_weights(trainee.student, trainee.ema):
        s = generate(trainee.student, run.stream.process, 32, **kwargs)
    if run.teacher_samples is None:
        run.teacher_samples = generate(run.teacher, run.stream.process, 32, **kwargs)
        if run.vae is not None:
            run.teacher_samples = latents.decode(run.vae, run.teacher_samples)
    if run.vae is not None:
        s = latents.decode(run.vae, s)
    t = run.teacher_samples
    grid = torch.cat([torch.cat([s[i:i + 4], t[i:i + 4]]) for i in range(0, 32, 4)])
    # Small images are blown up (nearest neighbour) so that the grid can be read on a screen.
    grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 64 // grid.shape[-1]), mode="nearest")
    save_image((grid + 1) / 2, str(directory / "samples.png"), nrow=8, padding=2, pad_value=1.0)

"""One distillation run: a frozen teacher, a student, an objective, a budget.

``run(config, report, checkpoint=None)`` is a plain function: Ray Train calls it in every
worker (``liftplace.sweep``), tests call it in-process. It imports nothing from Ray.
``report(metrics, checkpoint_dir)`` receives a metrics row (the schema ``liftplace.results`` documents)
every ``train.log_every`` steps, at every evaluation and at the end, and a checkpoint
directory every ``train.checkpoint_every`` steps and at the end (None otherwise). Only rank 0's
rows carry evaluation numbers; every rank calls report with the same step (Ray's contract).

A run is a short loop over four parts: ``build`` (teacher, data stream, student, objective,
optimizer), ``train_step``, ``report_row`` and ``finish_report`` (evaluate, checkpoint,
report). Checkpoints are ``liftplace.checkpoints``' format: resuming from one continues the
same run (on CPU, the same losses as an uninterrupted run).
"""

from __future__ import annotations

import math
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

from liftplace import checkpoints, models
from liftplace.config import RunConfig
from liftplace.data import load_dataset
from liftplace.diffusion import NoiseProcess, make_process
from liftplace.metrics import compute_metrics, protocol_record, real_images, stack_dataset
from liftplace.objectives import Objective, make_objective, objective_class
from liftplace.results import EVAL_COLUMNS
from liftplace.teachers import generate, load_teacher

Report = Callable[[dict, "Path | None"], None]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Batch:
    """One step's inputs, the same for every student of the run: noised images x_t at
    ``timesteps``, the true ``target`` (noise, velocity or flow) and class ``labels`` (or None)."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None


@dataclass
class Stream:
    """The run's stream of batches, timesteps and noise, drawn from its own generator (one per
    rank, so workers see different batches), which is checkpointed: a resumed run continues
    the same stream, and nothing a student or an objective draws can change it."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    process: NoiseProcess
    batch: int
    device: torch.device
    generator: torch.Generator

    def next(self) -> Batch:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.generator)
        x_t, timesteps, target = self.process.training_pair(self.images[idx], generator=self.generator)
        labels = self.labels[idx].to(self.device) if self.num_classes else None
        return Batch(x_t.to(self.device), timesteps.to(self.device), target.to(self.device), labels)


@dataclass
class Trainee:
    """One student and everything that trains it: optimizer, EMA, objective (with its own
    parameters) and, for feature objectives, the taps on both networks."""

    student: torch.nn.Module
    net: torch.nn.Module  # the student, wrapped in DistributedDataParallel with several workers
    objective: Objective
    opt: torch.optim.Optimizer
    ema: EMAModel
    params: list[torch.nn.Parameter]
    taps: tuple[models.FeatureTaps, models.FeatureTaps] | None
    static: dict = field(default_factory=dict)  # the row's per-run columns (sizes, protocol)


@dataclass
class Outcome:
    """What one step of one student produced, for its report row."""

    parts: object  # objectives.LossParts
    grad_norm: float
    diverged: bool


@dataclass
class Run:
    """Everything ``build`` makes for a run."""

    config: RunConfig
    rank: int
    world: int
    device: torch.device
    teacher: torch.nn.Module
    stream: Stream
    trainee: Trainee
    autocast: object  # a context manager factory

    def forward_context(self):
        return self.autocast()


def build(config: RunConfig) -> Run:
    """Teacher, data stream, student, objective and optimizer, seeded from train.seed."""
    rank, world = rank_and_world()
    tr = config.train
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(tr.seed)
    np.random.seed(tr.seed)
    random.seed(tr.seed)
    teacher, card = load_teacher(config.teacher.name, device)
    train_set = load_dataset(config.data.spec, config.data.resolution, "train")
    images, labels = stack_dataset(train_set)
    stream = Stream(images, labels, train_set.num_classes, make_process(config.teacher.prediction), tr.batch, device,
                    torch.Generator().manual_seed(tr.seed * 1000 + rank))
    example_shape = (2, *images.shape[1:])
    student = models.build_student(teacher.cpu(), config.student, seed=tr.seed, example_shape=example_shape)
    student = student.to(device).train().requires_grad_(True)
    teacher.to(device)
    trainee = _trainee(config, student, teacher, tuple(images.shape[1:]), device, world)
    trainee.static = {
        "student_params": models.count_params(student),
        "teacher_params": models.count_params(teacher),
        "student_macs": models.count_macs(student, example_shape),
        "teacher_macs": models.count_macs(teacher, example_shape),
        "world_size": world,
        "teacher_fid": card.get("fid", float("nan")),
        **protocol_record(config.eval.protocol()),
    }
    trainee.static["compression"] = trainee.static["student_params"] / trainee.static["teacher_params"]
    bf16 = device.type == "cuda" and tr.bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    return Run(config, rank, world, device, teacher, stream, trainee, autocast)


def _trainee(config: RunConfig, student, teacher, shape, device, world) -> Trainee:
    options = config.objective_options()
    taps = None
    if objective_class(config.objective.name).needs_features:
        taps = (models.FeatureTaps(student), models.FeatureTaps(teacher))
        options.update(student_channels=taps[0].channels(), teacher_channels=taps[1].channels())
    objective = make_objective(config.objective.name, **options, shape=shape).to(device)
    net = student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    params = [*student.parameters(), *objective.parameters()]
    opt = torch.optim.Adam(params, lr=config.train.lr)
    ema = EMAModel(student.parameters(), decay=config.train.ema_decay)
    return Trainee(student, net, objective, opt, ema, params, taps)


def teacher_forward(run: Run, batch: Batch) -> tuple[torch.Tensor, list | None]:
    """The teacher's prediction (float32, no graph) and, when taps are on, its block features."""
    with torch.no_grad(), run.forward_context():
        teacher_out = models.predict(run.teacher, batch.x_t, batch.timesteps, batch.labels).float()
    taps = run.trainee.taps
    return teacher_out, (list(taps[1].features) if taps else None)


def train_step(run: Run, trainee: Trainee, batch: Batch, teacher_out, teacher_features, step: int, *,
               diagnostics: bool) -> Outcome:
    """One optimizer step of one student. A non-finite loss or gradient, or a loss over
    train.loss_bound, marks it diverged and skips the update (on every rank together)."""
    tr = run.config.train
    with run.forward_context():
        student_out = models.predict(trainee.net, batch.x_t, batch.timesteps, batch.labels).float()
    features = (list(trainee.taps[0].features), teacher_features) if trainee.taps else None
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
    return {
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


def finish_report(run: Run, trainee: Trainee, row: dict, report: Report, *, evaluate: bool, save: bool,
                  final: bool) -> None:
    """Evaluate (rank 0), checkpoint (and, at the end, the sample grid), then report the row."""
    config = run.config
    if run.rank == 0 and evaluate:
        row.update(evaluate_student(trainee.student, trainee.ema, run.stream.process, config, run.stream.num_classes,
                                    run.device))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = None
        if save:
            ckpt_dir = Path(tmp)
            checkpoints.save(ckpt_dir, row["step"], trainee.student, trainee.ema, trainee.opt, trainee.objective,
                             run.stream.generator, run.rank, run.world)
            if run.rank == 0 and final:
                save_samples(ckpt_dir, trainee.student, trainee.ema, run.teacher, run.stream.process, config,
                             run.stream.num_classes, run.device)
        report(row, ckpt_dir)


def run(config: RunConfig, report: Report, checkpoint: str | Path | None = None, *, log=print) -> dict:
    """Train the student; returns the last reported row."""
    r = build(config)
    tr, trainee = config.train, r.trainee
    start = 0
    if checkpoint is not None:
        start = checkpoints.restore(Path(checkpoint), trainee.student, trainee.ema, trainee.opt, trainee.objective,
                                    r.stream.generator, r.rank)
        log(f"[rank {r.rank}] resumed from {checkpoint} at step {start}")
    last: dict = {}
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    try:
        for step in range(start + 1, tr.steps + 1):
            final = step == tr.steps
            evaluate = final or (tr.eval_every > 0 and step % tr.eval_every == 0)
            save = final or step % tr.checkpoint_every == 0
            due = evaluate or save or step % tr.log_every == 0
            batch = r.stream.next()
            teacher_out, teacher_features = teacher_forward(r, batch)
            outcome = train_step(r, trainee, batch, teacher_out, teacher_features, step, diagnostics=due)
            window_images += tr.batch * r.world
            if not (due or outcome.diverged):
                continue
            now = time.perf_counter()
            row = report_row(trainee, outcome, step, window_images / max(now - window_start, 1e-9), now - run_start)
            # A diverged student is recorded as diverged, not evaluated or checkpointed.
            finish_report(r, trainee, row, report, evaluate=evaluate and not outcome.diverged,
                          save=save and not outcome.diverged, final=final)
            if r.rank == 0:
                log(progress_line(row, tr.steps, run_start, start))
            window_start, window_images = time.perf_counter(), 0
            last = row
            if outcome.diverged:
                log(f"[rank {r.rank}] diverged at step {step} (loss {row['loss']:.4g}, grad norm "
                    f"{outcome.grad_norm:.4g}): stopping")
                break
    finally:
        for tap in trainee.taps or ():
            tap.remove()
    return last


def progress_line(row: dict, steps: int, run_start: float, start: int) -> str:
    done = row["step"] - start
    rate = done / max(time.perf_counter() - run_start, 1e-9)
    eta = (steps - row["step"]) / max(rate, 1e-9)
    fid = f"  FID {row['fid']:.2f}" if not math.isnan(row["fid"]) else ""
    return (f"step {row['step']}/{steps}  loss {row['loss']:.4f}  w {row['w']:.3f}  "
            f"{row['images_per_s']:.0f} img/s{fid}  ETA {eta:.0f}s")


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


def evaluate_student(student, ema: EMAModel, process, config: RunConfig, num_classes: int, device) -> dict:
    """FID/KID/precision/recall of the EMA student."""
    protocol = config.eval.protocol()
    val = load_dataset(config.data.spec, config.data.resolution, "val")
    with ema_weights(student, ema):
        fake = generate(student, process, protocol.num_images, steps=protocol.sampler_steps, seed=protocol.seed,
                        num_classes=num_classes, device=device)
    return compute_metrics(fake, real_images(val, protocol.num_images), protocol, real_cache_key=val.name)


def save_samples(directory: Path, student, ema, teacher, process, config, num_classes, device) -> None:
    """samples.png: 32 EMA-student samples (left) beside the teacher's from the same noise."""
    steps, seed = config.eval.sampler_steps, config.eval.seed
    with ema_weights(student, ema):
        s = generate(student, process, 32, steps=steps, seed=seed, num_classes=num_classes, device=device)
    t = generate(teacher, process, 32, steps=steps, seed=seed, num_classes=num_classes, device=device)
    rows = [torch.cat([s[i:i + 4], t[i:i + 4]]) for i in range(0, 32, 4)]
    grid = torch.cat(rows)
    # Small images are blown up (nearest neighbour) so that the grid can be read on a screen.
    grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 64 // grid.shape[-1]), mode="nearest")
    save_image((grid + 1) / 2, str(directory / "samples.png"), nrow=8, padding=2, pad_value=1.0)

"""One distillation run: a frozen teacher, a student, an objective, a budget.

``run(config, report, checkpoint=None)`` is a plain function: Ray Train calls it in every
worker (``liftplace.sweep``), tests call it in-process. It imports nothing from Ray.
``report(metrics, checkpoint_dir)`` receives a metrics row (the results schema of DESIGN.md)
every ``train.log_every`` steps, at every evaluation and at the end, and a checkpoint
directory every ``train.checkpoint_every`` steps and at the end (None otherwise). Only rank 0's
rows carry evaluation numbers; every rank calls report with the same step (Ray's contract).

A checkpoint holds the student, its EMA, the optimizer, the objective's parameters (adapters,
a learnable weight), the step and every RNG state, as safetensors and weights-only torch
files: resuming from it continues the same run (on CPU, the same losses as an uninterrupted
run). A pruned student is rebuilt by pruning the teacher again -- pruning is deterministic --
and then loaded, so a checkpoint needs no pickled module.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

from liftplace import files, models
from liftplace.config import RunConfig
from liftplace.data import load_dataset
from liftplace.diffusion import make_process
from liftplace.metrics import compute_metrics, protocol_record, real_images, stack_dataset
from liftplace.objectives import make_objective
from liftplace.teachers import generate, load_teacher

Report = Callable[[dict, "Path | None"], None]
SCHEMA_NAN = ("fid", "kid", "precision", "recall")


def build_student(teacher, config: RunConfig, example_shape):
    s = config.student
    if s.prune_ratio is not None:
        return models.prune_student(teacher, s.prune_ratio, example_shape=example_shape, importance=s.importance)
    torch.manual_seed(config.train.seed)  # a fresh student's init is part of the run's seed
    return models.fresh_student(teacher, s.param_ratio)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run(config: RunConfig, report: Report, checkpoint: str | Path | None = None, *, log=print) -> dict:
    """Train the student; returns the last reported row."""
    rank, world = rank_and_world()
    tr = config.train
    device = torch.device("cuda", torch.cuda.current_device()) if config.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(tr.seed)
    np.random.seed(tr.seed)
    random.seed(tr.seed)

    teacher, card = load_teacher(config.teacher.name, device)
    train_set = load_dataset(config.data.spec, config.data.resolution, "train")
    images, labels = stack_dataset(train_set)
    example_shape = (2, *images.shape[1:])
    student = build_student(teacher.cpu(), config, example_shape).to(device).train()
    teacher.to(device)
    student.requires_grad_(True)
    process = make_process(config.teacher.prediction)

    objective_opts = config.objective_options()
    taps = None
    if config.objective.name in ("feat", "kd+feat"):
        taps = (models.FeatureTaps(student), models.FeatureTaps(teacher))
        objective_opts.update(student_channels=taps[0].channels(), teacher_channels=taps[1].channels())
    objective = make_objective(config.objective.name, **objective_opts, shape=tuple(images.shape[1:])).to(device)

    net = student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in student.parameters()] + list(objective.parameters())
    opt = torch.optim.Adam(params, lr=tr.lr)
    ema = EMAModel(student.parameters(), decay=tr.ema_decay)
    # Data and noise come from one generator per rank, so workers see different batches and
    # the stream can be checkpointed and resumed exactly.
    gen = torch.Generator().manual_seed(tr.seed * 1000 + rank)

    start = 0
    if checkpoint is not None:
        start = load_checkpoint(Path(checkpoint), student, ema, opt, objective, gen, rank)
        log(f"[rank {rank}] resumed from {checkpoint} at step {start}")

    static = {
        "student_params": models.count_params(student),
        "teacher_params": models.count_params(teacher),
        "student_macs": models.count_macs(student, example_shape),
        "teacher_macs": models.count_macs(teacher, example_shape),
        "world_size": world,
        "teacher_fid": card.get("fid", float("nan")),
        **protocol_record(config.eval.protocol()),
    }
    static["compression"] = static["student_params"] / static["teacher_params"]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tr.bf16 else nullcontext())

    last: dict = {}
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    for step in range(start + 1, tr.steps + 1):
        idx = torch.randint(0, len(images), (tr.batch,), generator=gen)
        x0 = images[idx]
        y = labels[idx].to(device) if train_set.num_classes else None
        x_t, t, target = process.training_pair(x0, generator=gen)
        x_t, t, target = x_t.to(device), t.to(device), target.to(device)
        with torch.no_grad(), autocast:
            t_out = models.predict(teacher, x_t, t, y).float()
        t_feats = list(taps[1].features) if taps else None
        with autocast:
            s_out = models.predict(net, x_t, t, y).float()
        features = (list(taps[0].features), t_feats) if taps else None
        parts = objective(s_out, t_out, step=step, target=target, features=features)
        loss = parts.loss
        diverged = not torch.isfinite(loss).item() or loss.item() > tr.loss_bound
        if world > 1:
            # Every rank must skip the backward together, or the others hang in its all-reduce.
            flag = torch.tensor(float(diverged), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            diverged = bool(flag.item())
        grad_norm = float("nan")
        if not diverged:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Gradients are all-reduced by now, so every rank sees the same norm.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tr.grad_clip).item()
            diverged = not math.isfinite(grad_norm)
        if not diverged:
            opt.step()
            ema.step(student.parameters())
        window_images += tr.batch * world
        final = step == tr.steps or diverged
        evaluate = not diverged and (final or (tr.eval_every > 0 and step % tr.eval_every == 0))
        save = not diverged and (final or step % tr.checkpoint_every == 0)
        if not (final or evaluate or save or step % tr.log_every == 0):
            continue
        elapsed = time.perf_counter() - window_start
        row = {
            "step": step,
            "loss": loss.item(),
            "loss_task": parts.task.item(),
            "loss_distill": parts.distill.item(),
            "loss_coarse": parts.coarse.item(),
            "loss_fine": parts.fine.item(),
            "loss_feat": parts.feat.item(),
            "w": parts.w.item(),
            "beta0": parts.beta0.item(),
            "beta1": parts.beta1.item(),
            "grad_norm": grad_norm,
            "diverged": diverged,
            "images_per_s": window_images / max(elapsed, 1e-9),
            "elapsed_s": time.perf_counter() - run_start,
            **{k: float("nan") for k in SCHEMA_NAN},
            **static,
        }
        if rank == 0 and evaluate:
            row.update(evaluate_student(student, ema, process, config, train_set.num_classes, device))
        ckpt_dir = None
        with tempfile.TemporaryDirectory() as tmp:
            if save:
                ckpt_dir = Path(tmp)
                save_checkpoint(ckpt_dir, step, student, ema, opt, objective, gen, rank, world)
                if rank == 0 and final:
                    save_samples(ckpt_dir, student, ema, teacher, process, config, train_set.num_classes, device)
            if rank == 0:
                log(progress_line(row, tr.steps, run_start, start))
            report(row, ckpt_dir)
        window_start, window_images = time.perf_counter(), 0
        last = row
        if diverged:
            log(f"[rank {rank}] diverged at step {step} (loss {row['loss']:.4g}, grad norm {grad_norm:.4g}): stopping")
            break
    if taps:
        for tap in taps:
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


# --- checkpoints -------------------------------------------------------------------------


def _rng_state(gen: torch.Generator) -> dict:
    """The run's RNG streams: data/noise (gen), torch's global one (DiT label dropout), CUDA's."""
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(directory: Path, step, student, ema, opt, objective, gen, rank, world) -> None:
    """Write one checkpoint into directory. Every file is written to a temporary name first and
    renamed into place only once all of them are written: a write that fails (a full disk, an
    error) leaves a checkpoint already in directory whole, and no temporary files behind. (A
    rename failing half way could still mix files; runs write each checkpoint to a fresh
    folder, so none is overwritten in place.)"""
    directory.mkdir(parents=True, exist_ok=True)
    writers = {}
    if rank == 0:
        writers["student.safetensors"] = lambda p: save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(p))
        writers["ema.safetensors"] = lambda p: save_file({f"p{i}": v.contiguous() for i, v in enumerate(ema.shadow_params)}, str(p))
        writers["objective.safetensors"] = lambda p: save_file({k: v.contiguous() for k, v in objective.state_dict().items()} or {"_empty": torch.zeros(1)}, str(p))
        writers["optimizer.pt"] = lambda p: torch.save(opt.state_dict(), p)
    # Every rank's data/noise stream is its own: each rank saves its RNG state.
    writers[f"rng_rank{rank}.pt"] = lambda p: torch.save(_rng_state(gen), p)
    if rank == 0:  # last: the step it names is only there once the rest is
        writers["state.json"] = lambda p: p.write_text(json.dumps({"step": step, "world_size": world, "ema_optimization_step": ema.optimization_step}))
    staged = []
    try:
        for name, write in writers.items():
            staged.append((files.stage(directory / name, write), directory / name))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for i, (tmp, path) in enumerate(staged):
        try:
            tmp.replace(path)
        except BaseException:
            for left, _ in staged[i:]:
                left.unlink(missing_ok=True)
            raise


def check_checkpoint(directory: Path) -> int:
    """Read every file of a checkpoint without a model (safetensors, weights-only torch files);
    returns its step. Refuses a missing or corrupt checkpoint with one line, before a run starts."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise FileNotFoundError(f"not a liftplace checkpoint (no state.json): {directory}")
    try:
        step = int(json.loads((directory / "state.json").read_text())["step"])
        for name in ("student.safetensors", "ema.safetensors", "objective.safetensors"):
            load_file(str(directory / name))
        for path in [directory / "optimizer.pt", *sorted(directory.glob("rng_rank*.pt"))]:
            torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"corrupt checkpoint {directory}: {type(err).__name__}: {_one_line(err)}") from err
    return step


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def load_student(directory: str | Path, config: RunConfig, *, ema: bool = True, device="cpu"):
    """A finished run's student, in eval mode, from one of its checkpoints.

    Returns (student, teacher, process): the student rebuilt as the run built it (pruning is
    deterministic) with the checkpoint's EMA weights (ema=True, what evaluations sample from)
    or its live weights; the frozen teacher; the run's noise process. Weights load through
    safetensors only.
    """
    directory = Path(directory)
    if not (directory / "student.safetensors").is_file():
        raise FileNotFoundError(f"not a liftplace checkpoint (no student.safetensors): {directory}")
    teacher, _ = load_teacher(config.teacher.name, "cpu")
    shape = (2, teacher.config.in_channels, config.data.resolution, config.data.resolution)
    student = build_student(teacher, config, shape)
    try:
        student.load_state_dict(load_file(str(directory / "student.safetensors")))
        if ema:
            shadow = load_file(str(directory / "ema.safetensors"))
            with torch.no_grad():
                for i, p in enumerate(student.parameters()):
                    p.copy_(shadow[f"p{i}"])
    except Exception as err:
        raise ValueError(f"corrupt checkpoint {directory}: {type(err).__name__}: {_one_line(err)}") from err
    for net in (student, teacher):
        net.requires_grad_(False).eval().to(device)
    return student, teacher, make_process(config.teacher.prediction)


def load_checkpoint(directory: Path, student, ema, opt, objective, gen, rank) -> int:
    """Restore a run's state; returns the step the checkpoint was taken at."""
    state_file = directory / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"not a liftplace checkpoint (no state.json): {directory}")
    try:
        state = json.loads(state_file.read_text())
        student.load_state_dict(load_file(str(directory / "student.safetensors")))
        shadow = load_file(str(directory / "ema.safetensors"))
        ema.shadow_params = [shadow[f"p{i}"].to(p.device) for i, p in enumerate(student.parameters())]
        ema.optimization_step = state["ema_optimization_step"]
        obj_state = load_file(str(directory / "objective.safetensors"))
        obj_state.pop("_empty", None)
        objective.load_state_dict(obj_state)
        opt.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        rng_file = directory / f"rng_rank{rank}.pt"
        if not rng_file.is_file():
            rng_file = directory / "rng_rank0.pt"
        rng = torch.load(rng_file, weights_only=True)
    except Exception as err:  # a truncated or foreign file: one clear line, not a stack of library errors
        raise ValueError(f"corrupt checkpoint {directory}: {type(err).__name__}: {_one_line(err)}") from err
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])

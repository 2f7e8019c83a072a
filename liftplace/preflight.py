"""Every check before Ray starts, without Ray: inputs, resources and memory, refused in one line.

``check_inputs`` loads what ``config.validate`` cannot see (the teacher's weights, the data);
``check_resources`` holds a run's CPUs and GPUs against this machine or against the capacity a
running Ray cluster reports; ``check_memory`` holds a training step's estimated bytes
(``step_memory``) against this machine's memory or GPUs, or a Ray node's "memory" resource.
Whatever Ray knows (a cluster's capacity, its largest node's memory) is asked by
``liftplace.runner.cluster`` and passed in: this module never imports Ray, so a bad run is
refused before Ray's start-up cost (checked by the tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from liftplace.config import RunConfig, _refuse

if TYPE_CHECKING:
    from torch import nn


def check_inputs(configs: list[RunConfig], *, log=print) -> None:
    """What ``validate`` cannot see without loading, checked once per distinct teacher and data
    before Ray starts: the teacher's weights (they fit its config.json and are finite), its
    channels against the data's, every image of a data folder (decoded), and the split sizes
    (the validation split holds eval.num_images images, the training split a batch). Raises
    ValueError or FileNotFoundError naming the key."""
    from liftplace.data import check_images, load_dataset
    from liftplace.teachers import load_teacher

    from diffusers import DiTTransformer2DModel

    from liftplace import files
    from liftplace.metrics import cache_root

    try:  # the FID statistics' cache: a file in its place fails only after training, at the first FID
        files.check_writable(cache_root(), "the metrics cache (LIFTPLACE_CACHE)")
    except ValueError as err:
        _refuse("LIFTPLACE_CACHE", str(err))
    checked_teachers: dict[str, int] = {}
    classes: dict[str, int | None] = {}
    checked_data: dict[tuple, tuple[int, int, int]] = {}
    said: set = set()
    for config in configs:
        name, d = config.teacher.name, config.data
        if name not in checked_teachers:
            try:
                teacher, _ = load_teacher(name)  # its weights read and checked, on this machine's CPU
            except (ValueError, FileNotFoundError) as err:
                _refuse("teacher.name", str(err), type(err))
            from liftplace.teachers import load_vae, teacher_space

            space = teacher_space(name)
            try:
                load_vae(space)  # a latent teacher's VAE: its weights read and checked too
            except (ValueError, FileNotFoundError) as err:
                _refuse("teacher.name", str(err), type(err))
            # the channels its data is read with, and a DiT's label table (its classes)
            checked_teachers[name] = space.image_channels
            classes[name] = teacher.config.num_embeds_ada_norm if isinstance(teacher, DiTTransformer2DModel) else None
            del teacher
        channels = checked_teachers[name]
        key = (d.spec, d.resolution, channels)
        if key not in checked_data:
            if d.spec.startswith("folder:") and not any(k[0] == d.spec for k in checked_data):
                root = d.spec.partition(":")[2]
                try:
                    check_images(root, progress=lambda done, total: log(f"data: decoded {done:,} of {total:,} images"))
                except ValueError as err:
                    _refuse("data.spec", str(err))
            try:
                splits = [load_dataset(d.spec, d.resolution, split, channels) for split in ("train", "val")]
            except ValueError as err:
                _refuse("data.spec", f"{err} (teacher {name})")
            checked_data[key] = (len(splits[0]), len(splits[1]), splits[0].num_classes)
        train_size, val_size, num_classes = checked_data[key]
        if classes[name] is not None and num_classes > classes[name]:
            _refuse("data.spec", f"{d.spec} has {num_classes} classes, more than the {classes[name]} that teacher "
                                 f"{name} embeds (num_embeds_ada_norm)")
        if config.eval.num_images > val_size and (key, config.eval.num_images) not in said:
            said.add((key, config.eval.num_images))
            log(f"eval: {d.spec} has {val_size:,} validation images, fewer than eval.num_images="
                f"{config.eval.num_images:,}: FID, KID, precision and recall compare {config.eval.num_images:,} "
                f"generated images with those {val_size:,} (rows: eval_reference_images)")
        if config.train.batch > train_size:
            _refuse("train.batch", f"{config.train.batch} is more than the {train_size} training images of {d.spec}")


def check_resources(configs: list[RunConfig], capacity: dict | None, address: str | None = None) -> None:
    """Refuse runs the cluster cannot place, instead of leaving them pending forever.

    ``capacity``: what the Ray cluster this process runs on can give ({"CPU", "GPU"}: its
    resources now or, autoscaling, its ceiling: ``runner.cluster.cluster_capacity``), None while
    no Ray runs here. Called before Ray starts too: without a cluster to join (no address), the
    embedded Ray will have this machine's GPUs, so a GPU request is refused up front.
    """
    if capacity is not None:
        have, where = capacity, "the Ray cluster"
    elif address is None:
        import torch

        have, where = {"GPU": torch.cuda.device_count()}, "this machine"
    else:
        return  # a cluster to join: checked once connected
    for config in configs:
        sc = config.scaling
        need_cpu = sc.num_workers * sc.cpus_per_worker
        need_gpu = sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0
        if need_gpu > have.get("GPU", 0):
            raise ValueError(f"scaling.use_gpu: a run asks for {need_gpu:g} GPUs ({sc.num_workers} workers x "
                             f"{sc.gpus_per_worker:g}); {where} has {have.get('GPU', 0):g}")
        if "CPU" in have and need_cpu > have["CPU"]:
            raise ValueError(f"scaling.num_workers: a run asks for {need_cpu} CPUs ({sc.num_workers} workers x "
                             f"{sc.cpus_per_worker}); {where} has {have['CPU']:g}")


# What a training step needs beyond ``step_memory``'s estimate, all measured on this
# project's 2-core machine: a Ray Train worker process with torch, the teacher and the data
# loaded holds ~1.0 GiB resident before its first step; a local Ray's own processes (GCS,
# raylet, dashboard, log monitor) ~0.7 GiB; and real CPU steps held 1.1 to 1.3 times the
# estimate (allocator and kernel workspaces it does not see).
WORKER_BASE_BYTES = 2**30
RAY_BASE_BYTES = 2**30
STEP_MARGIN = 1.5
GIB = 2**30


def _gpu_free_bytes() -> list[int]:
    """Free memory of each GPU this machine's CUDA sees, asked in a short subprocess: the driver
    itself never opens a CUDA context (one holds ~0.3-0.5 GiB of every GPU for the whole run)."""
    import subprocess

    code = "import torch; print([torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


def _memory_budget(configs: list[RunConfig], address: str | None,
                   node_memory: float | None) -> tuple[str, float, str, int] | None:
    """What a run's steps must fit in: (kind, bytes, where, count). kind "cpu": this machine's
    available memory (count 1); "gpu": the least free memory of one of this machine's count GPUs;
    "node": a running Ray's largest node's "memory" resource (``node_memory``; None while no
    Ray runs here), for one worker. None where it cannot be known: a cluster not yet joined, or
    GPU memory on a running Ray (not reported)."""
    use_gpu = any(c.scaling.use_gpu for c in configs)
    if node_memory is not None:
        if use_gpu:
            return None
        have = node_memory
        return ("node", have, "the largest node of the Ray cluster has", 1) if have else None
    if address is not None:
        return None  # a cluster to join: checked once connected
    if use_gpu:
        free = _gpu_free_bytes()
        return ("gpu", min(free), "this machine's GPUs have (the least free one)", len(free)) if free else None
    import psutil

    return "cpu", psutil.virtual_memory().available - RAY_BASE_BYTES, "this machine has", 1


_STEPS: dict = {}  # (teacher, shape, student settings or None) -> (step bytes x margin, student weight bytes)


def _step_estimate(config: RunConfig, exact: bool) -> tuple[float, int]:
    """A step's bytes (times STEP_MARGIN) and the student's weight bytes: with the teacher as
    its own student (a bound, nothing built), or, ``exact``, with the config's student."""
    from liftplace import latents, models, text
    from liftplace.teachers import load_teacher, load_vae, teacher_space

    name, d = config.teacher.name, config.data
    # The key from the teacher's config.json: its weights are read only when not yet estimated
    # (a study asks once per config, a cohort's configs share one estimate).
    space = teacher_space(name)  # the denoiser's input: a latent teacher's is smaller than the images
    size = space.size or d.resolution
    shape = (config.train.batch, space.channels, size, size)
    key = (name, shape, str(config.student) if exact else None)
    if key not in _STEPS:
        teacher = load_teacher(name)[0]
        student = teacher
        if exact:
            # Which channels survive changes no shape: Taylor's student is sized without its data.
            sized = config.student
            if sized.importance in models.NEEDS_DATA:
                sized = dataclasses.replace(sized, importance="magnitude")
            student = models.build_student(teacher, sized, seed=config.train.seed, example_shape=(2, *shape[1:]))
        weights = models.weight_bytes(student)
        tokens = text.context_length(space.text) if space.text is not None else None  # checked: not None
        step = step_memory(teacher, shape, student if exact else None, context_tokens=tokens)
        if space.latent:  # the worker also holds the frozen VAE, and encodes and decodes in chunks
            step += latents.vae_memory(load_vae(space), space.image_channels, d.resolution)
        _STEPS[key] = step * STEP_MARGIN, weights
    return _STEPS[key]


def check_memory(configs: list[RunConfig], address: str | None = None, *, node_memory: float | None = None,
                 wanted: int = 1, members: int = 1, max_concurrent: int | None = None, log=print) -> int | None:
    """Refuse a run whose training step cannot fit in memory, before it starts, and return how
    many of its trials fit at once (None where that is not decided here).

    Without a cluster to join, a trial's steps are held against this machine's available memory
    (its GPUs' free memory for GPU runs); on a running Ray (joined, or started by someone else
    in this process), one worker's against its largest node's Ray "memory" resource, which the
    caller passes as ``node_memory`` (``runner.cluster.node_memory``; CPU runs: Ray does not
    report GPU memory). The step is ``step_memory`` times a margin, first
    with the teacher standing in for each student (nothing built); only where that bound does
    not fit ``wanted`` trials at once are the students pruned for the exact estimate. A cohort
    trial of ``members`` students also holds every other student's weights, gradients, Adam
    moments and EMA (5 copies). ``max_concurrent`` (a study's --max-concurrent) is refused
    when that many trials do not fit; ``wanted`` is what the caller would run at once."""
    budget = _memory_budget(configs, address, node_memory)
    if budget is None:
        return None
    kind, available, where, gpus = budget
    wanted = max(wanted, max_concurrent or 0)

    def per_trial(config: RunConfig, exact: bool) -> float:
        """Bytes of one trial of config (one worker's, for "node"; one GPU's, for "gpu")."""
        step, weights = _step_estimate(config, exact)
        step += (members - 1) * 5 * weights
        if kind == "gpu":
            return step
        return WORKER_BASE_BYTES + step if kind == "node" else (WORKER_BASE_BYTES + step) * config.scaling.num_workers

    def trials_at_once(need: float, config: RunConfig) -> int:
        if kind != "gpu":
            return int(max(available, 0) // need)
        sc = config.scaling
        per_gpu = int(available // need)  # workers whose steps fit one GPU's memory
        if sc.gpus_per_worker < 1:
            slots = gpus * min(per_gpu, int(1 / sc.gpus_per_worker + 1e-6))
        else:
            slots = gpus // math.ceil(sc.gpus_per_worker) if per_gpu >= 1 else 0
        return slots // sc.num_workers

    try:
        for exact in (False, True):
            worst = max(configs, key=lambda c: per_trial(c, exact))
            need = per_trial(worst, exact)
            fits = trials_at_once(need, worst)
            if fits >= wanted:
                break
    except (ImportError, AttributeError) as err:  # MemTracker is torch's, under a private module
        log(f"memory: not checked: this torch cannot estimate a step ({err})")
        return None
    config, sc = worst, worst.scaling
    what = (f"train.batch: {config.train.batch} needs about {_step_estimate(config, exact)[0] / GIB:.1f} GiB "
            f"{'of GPU memory ' if kind == 'gpu' else ''}per worker for a training step "
            f"(teacher {config.teacher.name}, {config.data.resolution}x{config.data.resolution}, estimated)")
    if fits < 1:
        if kind == "gpu":
            raise ValueError(f"{what}; {where} {available / GIB:.1f} GiB free; lower train.batch")
        if kind == "node":
            raise ValueError(f"{what}; with its worker process that is {need / GIB:.1f} GiB, and {where} "
                             f"{available / GIB:.1f} GiB (its Ray 'memory' resource); lower train.batch")
        ray_too = " and Ray's own"
        if sc.num_workers > 1:
            total = f"{sc.num_workers} workers with their processes{ray_too} need"
            lower = "lower train.batch or scaling.num_workers"
        else:
            total, lower = f"with its worker process{ray_too} that is", "lower train.batch"
        raise ValueError(f"{what}; {total} {(need + RAY_BASE_BYTES) / GIB:.1f} GiB, and {where} "
                         f"{(available + RAY_BASE_BYTES) / GIB:.1f} GiB available; {lower}")
    if kind == "node":
        return None  # how many trials a cluster runs at once is its scheduler's to say
    if max_concurrent is not None and max_concurrent > fits:
        raise ValueError(f"--max-concurrent: {max_concurrent} trials at a time do not fit in the memory "
                         f"{where} ({available / GIB:.1f} GiB for them, about {need / GIB:.1f} GiB each"
                         f"{' per GPU' if kind == 'gpu' else ''}); at most {fits} fit")
    return fits


def step_memory(teacher: nn.Module, example_shape: Sequence[int], student: nn.Module | None = None, *,
                context_tokens: int | None = None) -> int:
    """Bytes one training step distilling ``teacher`` into ``student`` holds at its peak, for a
    batch of shape ``example_shape`` [B, C, H, W]: the teacher's forward without a graph, the
    student's forward with the activations autograd keeps for the backward, its gradients, and
    three copies of its weights (Adam's two moments and the EMA).

    Without a student, the teacher stands in for it: an upper bound for any student pruned from
    it or narrower than it, found without building (pruning) one, but a loose one for a tiny
    student (at 16x16, batch 4,000: 3.6 GiB for unet-xs as its own student against 0.8 GiB with
    its 90%-pruned student).

    Estimated without computing anything: the forward and backward run on "meta" copies (shapes
    only) under torch's MemTracker, which follows every tensor's allocation and release (Adam's
    step is counted, not run: on meta tensors it alone took seconds). Measured here against the
    resident memory a real CPU step adds (unet-m, its 90% student, 28x28): 84 MiB estimated vs
    110 MiB at batch 64, 1,279 vs 1,401 MiB at batch 1,024; the caller adds a margin. The
    distillation loss itself (a few tensors the size of the output) is left out. A text-to-image
    U-Net attends to ``context_tokens`` caption tokens (the tokenizer's length) in every
    cross-attention layer."""
    import copy

    import torch

    from liftplace.models import _unwrap, meta_peak, predict, weight_bytes

    if len(example_shape) != 4:
        raise ValueError(f"example_shape must be [B, C, H, W], got {tuple(example_shape)}")
    # MemTracker hooks every parameter's gradient, so both copies must ask for one; the teacher
    # still runs under no_grad below, as in training.
    teacher = copy.deepcopy(_unwrap(teacher)).to("meta").requires_grad_(True)
    student = copy.deepcopy(_unwrap(student) if student is not None else teacher).to("meta").requires_grad_(True)
    x = torch.empty(tuple(example_shape), device="meta")
    t = torch.zeros(example_shape[0], dtype=torch.long, device="meta")
    context = None
    if context_tokens is not None:
        width = teacher.config.get("cross_attention_dim") or teacher.config.get("joint_attention_dim")  # U-Net or SD3
        context = torch.empty(example_shape[0], context_tokens, width, device="meta")

    def step():
        with torch.no_grad():
            target = predict(teacher, x, t, context).float()
        ((predict(student, x, t, context).float() - target) ** 2).mean().backward()

    return meta_peak(step, teacher, student) + 3 * weight_bytes(student)

"""One config per distillation run: typed, commented dataclasses, presets and validation.

``resolve(preset, overrides)`` is the one way to get a config: it starts from a preset,
applies dotted ``key=value`` overrides (parsed to each field's type) and validates the result.
Every bad value is refused here, with a message naming the key, before Ray starts.

Presets:
- ``smoke``: seconds; tests and CI. The smallest shipped teacher, 20 steps, 64 eval images.
- ``cpu`` (the default): the built-in MNIST at 16x16, the shipped ``unet-m`` teacher (1.1M
  parameters, FID 2.98), a 90%-pruned student (10,801 parameters: 0.97% of the teacher, the
  paper's is 1.6%) trained 2,000 steps at batch 64. Chosen by measured FID-vs-step curves
  (docs/teachers-and-fid.md, "Choosing the cpu preset"). It is not the paper's regime: the
  student trained alone is about as good as with kd, so the premise gate fails (the numbers:
  README, "What the default study shows"; the gate: docs/premise.md).
- ``cpu-50``: the earlier default, a 50%-pruned student of ``unet-xs`` (a quarter of its
  weights) trained 1,500 steps. Its students do not converge (FID 300-800); it shows how fast
  each objective leaves noise, where PLACE led KD by 2.5x.
- ``paper``: the authors' DDPM recipe (their CelebA-64 fork, 90%-pruned student) on the user's
  own teacher directory and data folder, on GPUs: their "ours" (``place+feat``: task + PLACE
  K=16 + 1e-6 x the summed feature term) on their student (Diff-Pruning's: the teacher's
  GroupNorm groups kept, Taylor importance, dropout 0.1), Adam 2e-4, batch 96, gradient clip
  1.0, EMA 0.9999 at a constant decay from step one (``train.ema_warmup=false``), 500k
  iterations, antithetic timesteps (t and T-1-t), random horizontal flips of the training
  images, FID on 50k images sampled with 100 DDIM steps (evaluated every 50k steps,
  checkpointed every 10k). What still differs from their code is listed, with reasons, in
  docs/authors-recipe.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from liftplace import files
from liftplace.data import check_dataset_spec
from liftplace.diffusion import PREDICTIONS
from liftplace.dotted import flatten
from liftplace.metrics import Protocol
from liftplace.models import BLOCK_REMOVALS, GROUPINGS, IMPORTANCES
from liftplace.objectives import (FEAT_INITS, REDUCTIONS, make_objective, objective_class, objective_defaults,
                                  objective_names, objective_options)


@dataclass
class TeacherConfig:
    name: str = "unet-xs"  # a shipped teacher (liftplace.teachers.shipped_teachers()), a diffusers model directory or a DDPM/DDIM pipeline directory
    prediction: str = "epsilon"  # what the teacher predicts: epsilon | v | flow (a pipeline's scheduler must agree)


@dataclass
class DataConfig:
    spec: str = "mnist"  # mnist | digits | glyphs | folder:PATH | cifar10:PATH
    resolution: int = 16  # must equal the teacher's sample size
    # mirror each training image left-right with probability 0.5, drawn each step from the
    # stream's generator (the authors' CelebA recipe; it changes the distribution of asymmetric
    # data such as digits). FID's reference images are never flipped. A latent teacher's
    # stream mirrors the latents (close to, not exactly, the mirrored images' latents).
    flip: bool = False
    # a text-to-image teacher: the share of each batch whose captions are replaced by the empty
    # caption (drawn from the stream's generator), so that students learn the unconditional
    # prediction that classifier-free guidance needs, as text-to-image training drops captions
    caption_dropout: float = 0.1


@dataclass
class StudentConfig:
    prune_ratio: float | None = 0.9  # structured channel pruning of the teacher, in [0, 1)
    param_ratio: float | None = None  # or: a fresh, narrower model with this share of the teacher's params
    # pruning importance: magnitude | l1 | random | taylor (|w * dL/dw|, the gradients of the diffusion
    # loss on student.taylor_batches batches of the training split: Diff-Pruning's, the authors')
    importance: str = "magnitude"
    # pruning: the fewest channels a GroupNorm group keeps (1: as many groups as divide, as every
    # measured preset's student; 3 lets the 90% students of unet-xs and unet-s learn); groups=gcd only
    min_group_channels: int = 1
    # a DiT or SD3 teacher: the transformer blocks the student keeps (None: all), evenly spaced from the
    # first to the last, with their weights (depth pruning, as TinyFusion and BK-SDM remove blocks)
    depth: int | None = None
    # pruning a UNet, its GroupNorms: gcd (prune channels freely, regroup to gcd(channels, teacher's
    # groups), every measured preset's student) | teacher (keep the teacher's group count and prune
    # evenly inside each group, at least one channel per group: Diff-Pruning's, the authors' students)
    groups: str = "gcd"
    # importance=taylor: batches of 64 training images (fixed: seed 0, whatever train.seed) whose
    # diffusion loss accumulates the gradients
    taylor_batches: int = 4
    dropout: float = 0.0  # a UNet student's ResNet blocks' dropout, in [0, 1) (the authors' students: 0.1)
    # a text-to-image teacher's U-Net: BK-SDM's block removal, keeping the teacher's weights in the
    # blocks left: bk-base (one ResNet/attention block fewer per stage) | bk-small (also no mid
    # block) | bk-tiny (also no innermost stage) | none; then channel pruning at student.prune_ratio
    # (0 keeps every channel)
    blocks: str | None = None


@dataclass
class ObjectiveConfig:
    name: str = "place"  # task | kd | feat | kd+feat | lift | place | place+feat (the authors' "ours": place + features)
    # lift / place options, place+feat's too (ignored by the other objectives, so a grid can hold kd beside them)
    coarse: str = "l1"  # l1 | l2 | moments
    group_size: int | None = None  # place: elements per group (None: place's default, the authors' K); lift: must stay None
    num_groups: int | None = None  # place: groups per domain instead of group_size
    group_by: str = "channel"  # channel | sample
    eps: float = 1e-4
    reduction: str = "mean"  # mean | sum (the authors' pixel fork)
    weighting: str = "adaptive"  # adaptive | constant | linear | cosine | step | learnable
    w0: float = 1.0  # constant weight / learnable start
    warmup: int = 1000  # steps of the linear / cosine / step schedules
    task_weight: float = 1.0  # weight of MSE(student, true target)
    distill_weight: float = 1.0  # weight of the distillation term (the authors' lambda_kd)
    # Feature-term options of feat, kd+feat and place+feat. None: the objective's own default (its
    # constructor's): feat and kd+feat keep this project's, place+feat takes the authors' "ours".
    feat_weight: float | None = None  # weight of the feature term (none: 1.0 for feat / kd+feat, 1e-6 for place+feat)
    feat_reduction: str | None = None  # over the tapped blocks: mean | sum (none: mean for feat / kd+feat, sum for place+feat)
    feat_bias: bool | None = None  # the 1x1 adapters have a bias (none: true for feat / kd+feat, false for place+feat)
    feat_init: str | None = None  # adapter init: default (torch's Conv2d) | uniform (none: default for feat / kd+feat, uniform for place+feat)
    feat_init_scale: float = 0.005  # feat_init uniform: weights (and bias) drawn in [-feat_init_scale, feat_init_scale]


@dataclass
class TrainConfig:
    steps: int = 600
    batch: int = 64  # per worker
    lr: float = 1e-3  # Adam
    ema_decay: float = 0.999
    # True: diffusers' warmed-up EMA, the update after n others at decay min(ema_decay, (1 + n) /
    # (10 + n)), the first at 0 (a copy); False: ema_decay at every update from the first on
    # (the authors' DDPM EMA)
    ema_warmup: bool = True
    # pair the batch's timesteps: the first ceil(batch/2) drawn, the rest T-1-t of the first
    # (flow: 1-sigma), as the authors' DDPM training; an odd batch's middle sample is unpaired
    antithetic: bool = False
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25  # report a metrics row every this many steps
    eval_every: int = 0  # evaluate FID every this many steps (0: only at the end)
    checkpoint_every: int = 200  # and at the end
    loss_bound: float = 1e4  # a loss above this (or non-finite) marks the run diverged
    bf16: bool = True  # bf16 autocast for the forward passes, on GPU only


@dataclass
class EvalConfig:
    num_images: int = 1000
    sampler_steps: int = 50
    seed: int = 0
    extractor: str = "digits-cnn"  # or inception-v3-compat with extractor_weights
    extractor_weights: str | None = None
    prc: bool = True
    # a text-to-image teacher's samples: classifier-free guidance scale, the empty caption as the
    # unconditional input, the same for teacher and students (1: unguided)
    guidance_scale: float = 1.0
    # a text-to-image teacher's samples: also their CLIP score against their captions, by this local
    # CLIPModel directory (transformers' save_pretrained with its processor files; none: not measured)
    clip_weights: str | None = None

    def protocol(self, data: str = "mnist") -> Protocol:
        """The metrics protocol for images of the data set ``data`` (a data.spec): it picks the
        shipped feature extractor where that data set has its own."""
        return Protocol(**dataclasses.asdict(self), data=data)


@dataclass
class ScalingConfig:
    num_workers: int = 1  # Ray Train workers (DistributedDataParallel when > 1)
    use_gpu: bool = False
    # CPUs Ray reserves per worker; torch uses int(cpus) threads (at least one). A fraction lets
    # trials share cores (0.6: three trials on two cores), but measured at the `cpu` preset three
    # time-sliced trials did ~25% less work per CPU-second than two: it pays only to fill a round.
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    preset: str = "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        files.write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def objective_options(self) -> dict:
        """The keyword arguments of make_objective for this config (shape not included): the
        options the objective's constructor takes, chosen by the objective itself."""
        settings = {k: v for k, v in dataclasses.asdict(self.objective).items() if k != "name"}
        return objective_options(self.objective.name, settings)


PRESETS: dict[str, dict[str, object]] = {
    "smoke": {
        "teacher.name": "unet-xs", "train.steps": 20, "train.batch": 16, "train.log_every": 5,
        "train.checkpoint_every": 10, "eval.num_images": 64, "eval.sampler_steps": 5,
    },
    "cpu": {"teacher.name": "unet-m", "student.prune_ratio": 0.9, "train.steps": 2000},
    "cpu-50": {"student.prune_ratio": 0.5, "train.steps": 1500},
    "paper": {
        "teacher.name": "", "data.spec": "", "data.resolution": 64, "data.flip": True,
        "train.steps": 500_000, "train.batch": 96, "train.lr": 2e-4, "train.grad_clip": 1.0,
        "train.ema_decay": 0.9999, "train.ema_warmup": False, "train.antithetic": True,
        "train.log_every": 500, "train.eval_every": 50_000, "train.checkpoint_every": 10_000,
        "eval.num_images": 50_000, "eval.sampler_steps": 100, "eval.extractor": "inception-v3-compat",
        "scaling.use_gpu": True,
        # their "ours" (task + PLACE K=16 + 1e-6 x the summed feature term) on their student
        "objective.name": "place+feat", "student.groups": "teacher", "student.importance": "taylor",
        "student.dropout": 0.1,
    },
}


def resolve(preset: str = "cpu", overrides: list[str] | dict | None = None, *, check_paths: bool = True) -> RunConfig:
    """A validated RunConfig: the preset, then the overrides ("key=value" strings or a dict)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = RunConfig(preset=preset)
    for key, value in PRESETS[preset].items():
        set_value(config, key, value)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(text) for text in overrides or []]
    for key, value in items:
        set_value(config, key, value)
    _absolute_paths(config)
    validate(config, check_paths=check_paths)
    return config


def _absolute_paths(config: RunConfig) -> None:
    """Make the local paths among a config's values absolute, taken from where the command
    runs: Ray Train's workers and Tune's trials run in folders of their own, where a relative
    path names nothing. Only paths that exist here change (anything else is refused by
    validate, in the words the user gave)."""
    import os

    from liftplace.teachers import shipped_teachers

    def absolute(path: str) -> str:
        full = os.path.expanduser(path)
        return os.path.abspath(full) if os.path.exists(full) else path

    if config.teacher.name and config.teacher.name not in shipped_teachers():
        config.teacher.name = absolute(config.teacher.name)
    kind, sep, path = config.data.spec.partition(":") if isinstance(config.data.spec, str) else ("", "", "")
    if sep and kind in ("folder", "cifar10") and path:
        config.data.spec = f"{kind}:{absolute(path)}"
    if config.eval.extractor_weights:
        config.eval.extractor_weights = absolute(config.eval.extractor_weights)
    if config.eval.clip_weights:
        config.eval.clip_weights = absolute(config.eval.clip_weights)


# Keys added after configs were first saved, with the value that reproduces what a config
# saved without them ran: a run folder's config.json and a checkpoint's digest from before a key
# existed still match a config that leaves it at this value (``comparable``).
ADDED_KEYS = {("student", "min_group_channels"): 1, ("student", "depth"): None,
              ("student", "groups"): "gcd", ("student", "taylor_batches"): 4, ("student", "dropout"): 0.0,
              ("train", "ema_warmup"): True, ("train", "antithetic"): False, ("data", "flip"): False,
              ("objective", "feat_reduction"): None, ("objective", "feat_bias"): None,
              ("objective", "feat_init"): None, ("objective", "feat_init_scale"): 0.005,
              ("student", "blocks"): None, ("data", "caption_dropout"): 0.1, ("eval", "guidance_scale"): 1.0,
              ("eval", "clip_weights"): None}
# Objective keys whose default became None ("the objective's own default") after configs were
# saved holding a value, with that value. ``comparable`` reads a None as the old value wherever
# the two run alike (the objective's own default is that value, or it ignores the key), so a
# config.json or checkpoint digest from before still matches a fresh config of the same run, while
# place+feat's None (1e-6) still differs from an explicit 1.0.
DEFAULTED_OBJECTIVE_KEYS = {"feat_weight": 1.0}


def comparable(config: dict) -> dict:
    """A saved or resolved config (RunConfig.to_dict()) without the ADDED_KEYS left at their
    old-behaviour values and with the DEFAULTED_OBJECTIVE_KEYS' None written as the old value
    where it runs alike: what resume checks and checkpoint digests compare."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    objective = out.get("objective")
    if isinstance(objective, dict) and objective.get("name") in objective_names():
        own = objective_defaults(objective["name"])
        for key, old in DEFAULTED_OBJECTIVE_KEYS.items():
            if key in objective and objective[key] is None and own.get(key, old) == old:
                objective[key] = old
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(out.get(section), dict) and out[section].get(key, value) == value:
            out[section].pop(key, None)
    return out


def from_dict(data: dict, overrides: dict | None = None, *, check_paths: bool = True) -> RunConfig:
    """Rebuild a config saved with RunConfig.to_dict (e.g. from a run directory's config.json),
    with dotted-key overrides on top (a search trial's sampled values)."""
    flat = dict(flatten(data))
    preset = flat.pop("preset", "cpu")
    # A config saved before a key existed ran with that key's old behaviour, whatever the preset
    # now sets (the paper preset turned antithetic timesteps and flips on after configs were saved).
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            flat.setdefault(f"{section}.{key}", value)
    return resolve(preset, {**flat, **(overrides or {})}, check_paths=check_paths)


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. objective.name=place)")
    return key.strip(), value.strip()


def set_value(config: RunConfig, key: str, value) -> None:
    """Set a dotted key, parsing strings to the field's type; unknown keys and bad types raise."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or (part == "preset" and depth == 0):
            where = ".".join(parts[:depth]) or "the config"
            choices = ", ".join(f for f in fields if f != "preset")
            raise ValueError(f"unknown config key {key!r}: {where} has {choices}")
        if depth == len(parts) - 1:
            hint = typing.get_type_hints(type(node))[part]
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ValueError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(getattr(node, part))[0].name}")
            setattr(node, part, _coerce(key, value, hint))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ValueError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} is not a section")


def _coerce(key: str, value, hint):
    """Parse value (a string from the command line, or a Python value) as type hint."""
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"config field {key} has an unsupported type {hint}")
    name = getattr(base, "__name__", str(base)) + (" or none" if optional else "")
    raise ValueError(f"config key {key!r} expects {name}, got {value!r}")


def _refuse(key: str, message: str, exc=ValueError):
    raise exc(f"{key}: {message}")


def teacher_config(config: RunConfig) -> dict:
    """The teacher directory's diffusers config.json (no weights are read)."""
    from liftplace.teachers import teacher_path

    try:
        path = teacher_path(config.teacher.name)
    except (FileNotFoundError, ValueError) as err:
        _refuse("teacher.name", str(err), type(err))
    return json.loads((path / "config.json").read_text())


def validate(config: RunConfig, *, check_paths: bool = True) -> None:
    """Refuse every value a run cannot use, naming its key. check_paths=False skips the file
    system (teacher, data, weights), for configs validated on one machine and run on another."""
    teacher, d, s, o, tr, e, sc = (config.teacher, config.data, config.student, config.objective, config.train,
                                   config.eval, config.scaling)
    if teacher.prediction not in PREDICTIONS:
        _refuse("teacher.prediction", f"unknown prediction {teacher.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if (s.prune_ratio is None) == (s.param_ratio is None):
        _refuse("student", "set exactly one of student.prune_ratio and student.param_ratio")
    if isinstance(s.min_group_channels, bool) or not isinstance(s.min_group_channels, int) or s.min_group_channels < 1:
        _refuse("student.min_group_channels", f"must be an integer >= 1, got {s.min_group_channels!r}")
    if s.depth is not None and (isinstance(s.depth, bool) or not isinstance(s.depth, int) or s.depth < 1):
        _refuse("student.depth", f"must be an integer >= 1 (transformer blocks kept) or none, got {s.depth!r}")
    if s.prune_ratio is not None and not 0.0 <= s.prune_ratio < 1.0:
        _refuse("student.prune_ratio", f"must be in [0, 1), got {s.prune_ratio}")
    if s.param_ratio is not None and not 0.0 < s.param_ratio <= 1.0:
        _refuse("student.param_ratio", f"must be in (0, 1], got {s.param_ratio}")
    if s.importance not in IMPORTANCES:
        _refuse("student.importance", f"unknown importance {s.importance!r}; choose one of {', '.join(IMPORTANCES)}")
    if s.groups not in GROUPINGS:
        _refuse("student.groups", f"unknown grouping {s.groups!r}; choose one of {', '.join(GROUPINGS)}")
    if s.groups == "teacher" and s.min_group_channels != 1:
        _refuse("student.min_group_channels", f"applies to student.groups=gcd; groups=teacher keeps the teacher's "
                                              f"group count (leave it at 1), got {s.min_group_channels!r}")
    if isinstance(s.taylor_batches, bool) or not isinstance(s.taylor_batches, int) or s.taylor_batches < 1:
        _refuse("student.taylor_batches", f"must be an integer >= 1, got {s.taylor_batches!r}")
    if not 0.0 <= s.dropout < 1.0:
        _refuse("student.dropout", f"must be in [0, 1), got {s.dropout}")
    if s.blocks is not None and s.blocks not in BLOCK_REMOVALS:
        _refuse("student.blocks", f"unknown block removal {s.blocks!r}; choose one of {', '.join(BLOCK_REMOVALS)} or none")
    if s.blocks is not None and s.prune_ratio is None:
        _refuse("student.blocks", "block removal keeps the teacher's weights: use it with student.prune_ratio (0 keeps "
                                  "every channel), not param_ratio")
    if isinstance(e.guidance_scale, bool) or not isinstance(e.guidance_scale, (int, float)) or not (
            math.isfinite(e.guidance_scale) and e.guidance_scale >= 0):
        _refuse("eval.guidance_scale", f"must be a finite number >= 0 (1: unguided), got {e.guidance_scale!r}")
    if not 0.0 <= d.caption_dropout < 1.0:
        _refuse("data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}")
    if o.name not in objective_names():
        _refuse("objective.name", f"unknown objective {o.name!r}; choose one of {', '.join(objective_names())}")
    for key, value, low in (("train.steps", tr.steps, 1), ("train.batch", tr.batch, 1), ("train.log_every", tr.log_every, 1),
                            ("train.eval_every", tr.eval_every, 0), ("train.checkpoint_every", tr.checkpoint_every, 1),
                            ("data.resolution", d.resolution, 4), ("eval.sampler_steps", e.sampler_steps, 1),
                            ("scaling.num_workers", sc.num_workers, 1)):
        if value < low:
            _refuse(key, f"must be >= {low}, got {value}")
    for key, value in (("train.lr", tr.lr), ("train.grad_clip", tr.grad_clip), ("train.loss_bound", tr.loss_bound),
                       ("scaling.cpus_per_worker", sc.cpus_per_worker)):
        if not (value > 0 and math.isfinite(value)):
            _refuse(key, f"must be a finite number > 0, got {value}")
    for key, value in (("train.seed", tr.seed), ("eval.seed", e.seed)):
        if not 0 <= value < 2**32:  # numpy's generators take seeds in [0, 2**32)
            _refuse(key, f"must be in [0, 2**32), got {value}")
    for key, value in (("objective.task_weight", o.task_weight), ("objective.distill_weight", o.distill_weight),
                       ("objective.w0", o.w0)):
        if not (value >= 0 and math.isfinite(value)):
            _refuse(key, f"must be a finite number >= 0, got {value}")
    if o.feat_weight is not None and not (o.feat_weight >= 0 and math.isfinite(o.feat_weight)):
        _refuse("objective.feat_weight", f"must be a finite number >= 0 or none (the objective's default), got {o.feat_weight}")
    for key, value, choices in (("objective.feat_reduction", o.feat_reduction, REDUCTIONS),
                                ("objective.feat_init", o.feat_init, FEAT_INITS)):
        if value is not None and value not in choices:
            _refuse(key, f"unknown value {value!r}; choose one of {', '.join(choices)} or none (the objective's default)")
    if o.feat_bias is not None and not isinstance(o.feat_bias, bool):
        _refuse("objective.feat_bias", f"must be true, false or none (the objective's default), got {o.feat_bias!r}")
    if not (o.feat_init_scale > 0 and math.isfinite(o.feat_init_scale)):
        _refuse("objective.feat_init_scale", f"must be a finite number > 0, got {o.feat_init_scale}")
    if not (o.eps >= 0 and math.isfinite(o.eps)):
        _refuse("objective.eps", f"must be a finite number >= 0, got {o.eps}")
    if o.warmup < 0:
        _refuse("objective.warmup", f"must be >= 0, got {o.warmup}")
    if not 0.0 <= tr.ema_decay < 1.0:
        _refuse("train.ema_decay", f"must be in [0, 1), got {tr.ema_decay}")
    for key, value in (("train.ema_warmup", tr.ema_warmup), ("train.antithetic", tr.antithetic), ("data.flip", d.flip)):
        if not isinstance(value, bool):
            _refuse(key, f"must be true or false, got {value!r}")
    if sc.use_gpu and not (sc.gpus_per_worker > 0 and math.isfinite(sc.gpus_per_worker)):
        _refuse("scaling.gpus_per_worker", f"must be > 0 when scaling.use_gpu, got {sc.gpus_per_worker}")
    if config.preset == "paper" and check_paths:
        if not teacher.name:
            _refuse("teacher.name", "the paper preset needs your teacher: --set teacher.name=DIR (a diffusers UNet2DModel or DDPM pipeline directory)")
        if not d.spec:
            _refuse("data.spec", "the paper preset needs your data: --set data.spec=folder:PATH (e.g. CelebA images)")
    channels, size = 1, d.resolution  # the denoiser's input: pixels unless the teacher is latent
    if check_paths:
        try:
            check_dataset_spec(d.spec)
        except (ValueError, FileNotFoundError) as err:
            _refuse("data.spec", str(err), type(err))
        net = teacher_config(config)
        from liftplace.teachers import PredictionMismatch, teacher_process

        try:  # a pipeline's scheduler config: its class, prediction type and schedule
            process = teacher_process(teacher.name, teacher.prediction)
        except PredictionMismatch as err:
            _refuse("teacher.prediction", str(err))
        except (ValueError, FileNotFoundError) as err:
            _refuse("teacher.name", str(err), type(err))
        if e.sampler_steps > process.num_train_timesteps:
            _refuse("eval.sampler_steps", f"{e.sampler_steps} is more than the teacher's {process.num_train_timesteps} "
                                          "training timesteps")
        from liftplace.teachers import teacher_space

        try:
            space = teacher_space(teacher.name)
        except (ValueError, FileNotFoundError) as err:
            _refuse("teacher.name", str(err), type(err))
        channels = space.channels
        if net.get("_class_name") == "UNet2DModel" and net.get("out_channels", channels) != channels:
            _refuse("teacher.name", f"{teacher.name}: its UNet predicts {net['out_channels']} channels from "
                                    f"{channels} (a learned variance?); a teacher must predict as many channels as it reads")
        if space.latent and space.resolution() != d.resolution:
            _refuse("data.resolution", f"{d.resolution} does not match the latent teacher's images: its sample size "
                                       f"{space.size} is {space.factor}x smaller per side than the images its VAE "
                                       f"encodes ({space.vae}); set data.resolution={space.resolution()}")
        if net.get("sample_size") not in (None, d.resolution) and not space.latent:
            _refuse("data.resolution", f"{d.resolution} does not match the teacher's sample size {net['sample_size']}")
        if space.latent:
            size = space.size
        if net.get("_class_name") != "UNet2DModel":
            for key, value, default, what in (("student.groups", s.groups, "gcd", "keeps a UNet's GroupNorm groups"),
                                              ("student.dropout", s.dropout, 0.0, "sets a UNet's ResNet blocks' dropout")):
                if value != default:
                    _refuse(key, f"{what}; {teacher.name} is a {net.get('_class_name')} (leave it at {default})")
        if s.depth is not None:
            layers = net.get("num_layers")
            if net.get("_class_name") not in ("DiTTransformer2DModel", "SD3Transformer2DModel"):
                _refuse("student.depth", f"depth pruning needs a DiT or SD3 teacher (transformer blocks), {teacher.name} is a "
                                         f"{net.get('_class_name')}")
            if s.depth > layers:
                _refuse("student.depth", f"{s.depth} is more than the teacher's {layers} transformer blocks")
            if s.prune_ratio is None:
                _refuse("student.depth", "depth pruning keeps the teacher's weights: use it with student.prune_ratio "
                                         "(0 keeps every head and MLP unit), not param_ratio")
            if objective_class(o.name).needs_features:
                _refuse("student.depth", f"objective {o.name} matches the student's blocks with the teacher's one by "
                                         "one, and a depth-pruned student has fewer: use kd, lift or place")
        text_teacher = space.text is not None
        if net.get("_class_name") == "SD3Transformer2DModel" and net.get("dual_attention_layers"):
            _refuse("teacher.name", f"{teacher.name}: an SD3.5 transformer with dual-attention blocks "
                                    f"(dual_attention_layers {net['dual_attention_layers']}) is not supported yet")
        if s.blocks is not None and net.get("_class_name") != "UNet2DConditionModel":
            _refuse("student.blocks", f"BK-SDM block removal needs a text-to-image U-Net teacher (a "
                                      f"StableDiffusionPipeline), {teacher.name} is a {net.get('_class_name')}"
                                      + (" (its students: student.depth and student.prune_ratio)"
                                         if net.get("_class_name") == "SD3Transformer2DModel" else ""))
        if s.blocks is not None:
            from liftplace.models import block_plan

            try:
                block_plan(net, s.blocks)
            except ValueError as err:
                _refuse("student.blocks", str(err))
        if text_teacher and s.param_ratio is not None:
            _refuse("student.param_ratio", f"{teacher.name} is a text-to-image {net.get('_class_name')}: its students "
                                           "are pruned (student.prune_ratio) and have blocks removed (student.blocks, "
                                           "or student.depth for SD3), not built fresh")
        if e.clip_weights is not None and not text_teacher:
            _refuse("eval.clip_weights", f"a CLIP score compares samples with their captions; {teacher.name} is not a "
                                         "text-to-image teacher")
        if e.guidance_scale != 1.0 and not text_teacher:
            _refuse("eval.guidance_scale", f"classifier-free guidance needs a text-to-image teacher; {teacher.name} "
                                           "is not one (leave it at 1)")
        if text_teacher:
            from liftplace.data import load_dataset

            try:  # a folder's metadata.jsonl is read whole: a missing column or image is said here
                captions = [getattr(load_dataset(d.spec, d.resolution, split, space.image_channels), "captions", None)
                            for split in ("train", "val")]
            except (ValueError, FileNotFoundError) as err:
                _refuse("data.spec", str(err), type(err))
            if None in captions:
                _refuse("data.spec", f"{d.spec} has no captions; a text-to-image teacher needs them (mnist-captions, "
                                     "or folder:PATH with a metadata.jsonl of file_name and text per image)")
        if s.prune_ratio is not None and net.get("_class_name") not in ("UNet2DModel", "DiTTransformer2DModel",
                                                                        "UNet2DConditionModel", "SD3Transformer2DModel"):
            _refuse("student.prune_ratio", f"pruning needs a UNet2DModel or DiT teacher, {teacher.name} is a {net.get('_class_name')}; "
                                           "use student.param_ratio")
    try:
        if check_paths:  # the protocol checks that a weights file exists
            e.protocol(d.spec)
    except (ValueError, FileNotFoundError) as err:
        _refuse("eval", str(err), type(err))
    # Every option, and a grouping against the prediction's shape, checked by building the objective.
    # A feature objective's widths come with the built networks: one placeholder tap of equal
    # widths (an identity adapter, so no random draw) stands in for them here.
    widths = {"student_channels": [1], "teacher_channels": [1]} if objective_class(o.name).needs_features else {}
    try:
        make_objective(o.name, **config.objective_options(), **widths, shape=(channels, size, size))
    except ValueError as err:
        _refuse("objective", str(err))

"""Train, save and load teachers: diffusers directories (safetensors) plus a model card.

A teacher directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
(``save_pretrained``), ``card.json`` (data, resolution, steps, wall time, parameters, MACs,
FID/KID with their protocol, the exact command) and ``samples.png`` (a grid to look at).
The `cpu` preset's teachers ship inside the package under ``liftplace/assets/teachers``;
``load_teacher`` takes one of their names, any local diffusers UNet2DModel /
DiTTransformer2DModel directory (a user's own DDPM for CIFAR-10 or CelebA works the same way),
or a diffusers pipeline directory, whose scheduler config then sets the noise process
(``teacher_process``): pixel space (``DDPMPipeline`` / ``DDIMPipeline``: ``model_index.json``,
``unet/``, ``scheduler/``) or latent space (``DiTPipeline``: ``transformer/``, ``vae/``,
``scheduler/``; its frozen ``AutoencoderKL`` encodes the data and decodes samples, see
``teacher_space`` and ``liftplace.latents``). Other pipelines are refused, naming the file.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image
from tqdm import tqdm

from liftplace import files, latents, models
from liftplace.data import load_dataset
from liftplace.diffusion import SCHEDULE_FIELDS, NoiseProcess, make_process
from liftplace.metrics import Protocol, compute_metrics, protocol_record, real_images, stack_dataset

TEACHERS_DIR = Path(__file__).parent / "assets" / "teachers"
MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
# Pipelines (model_index.json's _class_name) whose denoiser works on pixels: the component
# that holds it. Their scheduler config decides the noise process.
PIXEL_PIPELINES = {"DDPMPipeline": "unet", "DDIMPipeline": "unet"}
# Pipelines whose denoiser works on a VAE's latents: (the denoiser's component, the VAE's).
LATENT_PIPELINES = {"DiTPipeline": ("transformer", "vae")}
NOT_YET = {"LDMPipeline": "a latent pipeline with a VQ autoencoder (vqvae/), which is not supported yet"}
VAE_CLASSES = ("AutoencoderKL",)
DDPM_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # rectified flow: the model predicts noise - x0
# FlowMatchEulerDiscreteScheduler settings that move its sigmas in ways the sampler does not
# follow (a fixed ``shift`` it does follow): refused when set.
FLOW_UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                    "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}  # a scheduler's prediction_type -> teacher.prediction


class PredictionMismatch(ValueError):
    """teacher.prediction differs from what the teacher pipeline's scheduler says it predicts."""


def shipped_teachers() -> list[str]:
    """Names of the teachers shipped with the package (e.g. "unet-m", "dit-s"): model
    directories and pipeline directories (a latent teacher with its VAE)."""
    if not TEACHERS_DIR.is_dir():
        return []
    return sorted(p.name for p in TEACHERS_DIR.iterdir()
                  if (p / "config.json").is_file() or (p / "model_index.json").is_file())


def teacher_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped name or a local directory; refuse anything else before it reaches
    diffusers (which would take a missing path for a hub id and try the network)."""
    name = str(name_or_path)
    path = TEACHERS_DIR / name if name in shipped_teachers() else Path(name).expanduser()
    if not path.is_dir():
        shipped = ", ".join(shipped_teachers()) or "none"
        raise FileNotFoundError(f"teacher not found: {name} is neither a directory nor a shipped teacher ({shipped})")
    found = _pipeline(path)
    if found is not None:
        pipeline, component = found
        path = pipeline / component
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher {pipeline / 'model_index.json'}: its component {component!r} has no "
                                    f"{component}/config.json")
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {path} has no config.json (save it with save_pretrained)")
    return path


def pipeline_dir(name_or_path: str | Path) -> Path | None:
    """The pipeline directory a teacher name points at (it holds model_index.json), or None
    for a model directory (shipped or not). A pipeline of a layout that cannot be
    distilled is refused here (ValueError naming the file and its _class_name)."""
    found = _pipeline(name_or_path)
    return found[0] if found is not None else None


def _pipeline(name_or_path: str | Path) -> tuple[Path, str] | None:
    """(pipeline directory, the component that holds its denoiser), or None: see pipeline_dir."""
    name = str(name_or_path)
    path = TEACHERS_DIR / name if name in shipped_teachers() else Path(name).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        return None
    kind = _read_json(index).get("_class_name")
    if kind in LATENT_PIPELINES:
        return path, LATENT_PIPELINES[kind][0]
    if kind not in PIXEL_PIPELINES:
        what = NOT_YET.get(kind, "not a pipeline liftplace can distill")
        raise ValueError(f"teacher {index}: _class_name {kind!r} is {what}; supported pipelines: "
                         f"{', '.join(PIXEL_PIPELINES)} (pixel space), {', '.join(LATENT_PIPELINES)} (latent space), "
                         "or a UNet2DModel / DiTTransformer2DModel directory")
    return path, PIXEL_PIPELINES[kind]


def teacher_fingerprint(name_or_path: str | Path) -> str:
    """SHA-256 of what a teacher is: its config and weight files and, for a pipeline, every
    component's (scheduler config, VAE) too; not its card or samples. A checkpoint keeps it, so
    that resuming after the teacher's files changed (retrained in place, an edited
    scheduler_config.json) is refused."""
    found = _pipeline(name_or_path)
    root = found[0] if found is not None else teacher_path(name_or_path)
    deep = "**/" if found is not None else ""  # a model directory: its own files, not its subfolders'
    paths = [p for pattern in (f"{deep}*.json", f"{deep}*.safetensors") for p in root.glob(pattern)
             if p.is_file() and p.name != "card.json"]
    return files.digest_files(root, paths)


@dataclass(frozen=True)
class Space:
    """Where a teacher's denoiser works, read from config files only (no weights).

    ``channels`` x ``size`` x ``size`` is the denoiser's input (and prediction); the data is
    loaded as ``image_channels`` x ``size * factor`` pixels. In pixel space ``factor`` is 1,
    ``image_channels == channels`` and ``vae`` is None; a latent teacher names its VAE's
    directory, which maps images to latents ``factor`` times smaller per side.
    """

    channels: int
    size: int | None  # None: a model directory without sample_size (any data.resolution)
    image_channels: int
    factor: int = 1
    vae: Path | None = None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def resolution(self) -> int | None:
        """The image resolution the denoiser's sample size stands for (None: any)."""
        return None if self.size is None else self.size * self.factor


def teacher_space(name_or_path: str | Path) -> Space:
    """The ``Space`` of a teacher: its denoiser's config.json and, for a latent pipeline, its
    VAE's. A VAE that cannot serve the denoiser (another class, latent channels that differ
    from the denoiser's input) is refused in one line naming the file."""
    net = _read_json(teacher_path(name_or_path) / "config.json")
    channels, size = int(net.get("in_channels", 1)), net.get("sample_size")
    size = int(size) if isinstance(size, int) else None
    found = _pipeline(name_or_path)
    if found is None:
        return Space(channels, size, channels)
    pipeline = found[0]
    kind = _read_json(pipeline / "model_index.json").get("_class_name")
    if kind not in LATENT_PIPELINES:
        return Space(channels, size, channels)
    vae_dir = pipeline / LATENT_PIPELINES[kind][1]
    file = vae_dir / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"teacher {pipeline / 'model_index.json'}: a {kind} needs its VAE in "
                                f"{vae_dir.name}/config.json, which is missing")
    vae = _read_json(file)
    if vae.get("_class_name") not in VAE_CLASSES:
        raise ValueError(f"teacher {file}: _class_name {vae.get('_class_name')!r} is not supported; supported VAEs: "
                         f"{', '.join(VAE_CLASSES)}")
    latent = int(vae.get("latent_channels", 4))
    if latent != channels:
        raise ValueError(f"teacher {file}: latent_channels {latent} differs from the denoiser's in_channels {channels}")
    return Space(channels, size, int(vae.get("in_channels", 3)), latents.vae_factor(vae), vae_dir)


def load_vae(space: Space, device: str | torch.device = "cpu"):
    """A latent teacher's frozen VAE (eval mode, no gradients), or None in pixel space.
    Refused like a teacher when its weights do not load or do not fit its config."""
    return load_vae_dir(space.vae, device) if space.latent else None


def load_vae_dir(path: str | Path, device: str | torch.device = "cpu"):
    """A saved AutoencoderKL directory, checked as a teacher's weights are (``_load_checked``)."""
    path = Path(path)
    return _load_checked(AutoencoderKL, path, f"teacher VAE {path}").to(device).eval().requires_grad_(False)


def teacher_process(name_or_path: str | Path, prediction: str) -> NoiseProcess:
    """The noise process to distill a teacher under. A pipeline's scheduler config decides it
    (T, the beta schedule and the prediction type, which must equal ``prediction``: a
    PredictionMismatch says which value to set); shipped teachers and model directories use
    ``prediction`` with the default schedule (linear betas 1e-4 .. 0.02 over 1,000 steps).
    Sampling is DDIM (eta = 0) in both cases, clipping as the scheduler config says
    (``clip_sample``, ``clip_sample_range``; shipped teachers clip to [-1, 1]). A pipeline with
    a FlowMatchEulerDiscreteScheduler is rectified flow (``prediction`` must be "flow"),
    sampled with Euler on the scheduler's sigmas."""
    pipeline = pipeline_dir(name_or_path)
    if pipeline is None:
        # A model directory's card (shipped teachers have one) says what it was trained to predict.
        card_file = teacher_path(name_or_path) / "card.json"
        said = _read_json(card_file).get("prediction") if card_file.is_file() else None
        if said is not None and said != prediction:
            raise PredictionMismatch(f"{prediction!r}, but the teacher's {card_file} says it predicts {said!r}: "
                                     f"set teacher.prediction={said}")
        return make_process(prediction)
    file = pipeline / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"teacher {pipeline}: no scheduler/scheduler_config.json (a DDPM/DDIM pipeline has one)")
    config = _read_json(file)
    kind = config.get("_class_name")
    if kind in FLOW_SCHEDULERS:
        return _flow_process(file, config, prediction, teacher_space(name_or_path))
    if kind not in DDPM_SCHEDULERS:
        raise ValueError(f"teacher {file}: _class_name {kind!r} is not supported; supported: "
                         f"{', '.join(DDPM_SCHEDULERS + FLOW_SCHEDULERS)}")
    said = config.get("prediction_type", "epsilon")
    if said not in PREDICTION_TYPES:
        raise ValueError(f"teacher {file}: prediction_type {said!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
    if PREDICTION_TYPES[said] != prediction:
        raise PredictionMismatch(f"{prediction!r}, but the teacher's {file} says prediction_type {said!r}: "
                                 f"set teacher.prediction={PREDICTION_TYPES[said]}")
    if config.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"teacher {file}: variance_type {config['variance_type']!r} (a learned variance) is not "
                         "supported; supported: fixed_small, fixed_large")
    schedule = {key: config[key] for key in SCHEDULE_FIELDS if config.get(key) is not None}
    # Sampling clips as the pipeline's own scheduler would: DDPM and DDIM schedulers clip the
    # clean estimate unless clip_sample is false (as it should be for latents, which are not
    # bounded by 1).
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    try:
        return make_process(prediction, config.get("num_train_timesteps", 1000), schedule, clip=clip)
    except (ValueError, NotImplementedError) as err:  # diffusers: NotImplementedError for an unknown beta_schedule
        raise ValueError(f"teacher {file}: {err}") from None


def _flow_process(file: Path, config: dict, prediction: str, space: Space) -> NoiseProcess:
    """A FlowMatchEulerDiscreteScheduler's process: rectified flow, x_t = (1 - sigma) x0 +
    sigma noise, the model fed sigma * T and predicting noise - x0 (teacher.prediction flow);
    its fixed ``shift`` moves the sampler's sigmas as diffusers moves them."""
    if prediction != "flow":
        raise PredictionMismatch(f"{prediction!r}, but the teacher's {file} is a {config['_class_name']} "
                                 "(rectified flow, velocity prediction): set teacher.prediction=flow")
    for key in FLOW_UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"teacher {file}: {key} {config[key]!r} is not supported; sampling follows a fixed shift only")
    try:  # flow samples are not clipped in latent space, as no flow scheduler clips
        return make_process("flow", config.get("num_train_timesteps", 1000), clip=None if space.latent else 1.0,
                            shift=config.get("shift", 1.0))
    except ValueError as err:
        raise ValueError(f"teacher {file}: {err}") from None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"teacher {file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"teacher {file}: not a JSON object")
    return data


def load_teacher(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """(model, card) for a shipped name or a local diffusers directory; model in eval mode.

    Weights load from safetensors only: a directory with only a pickled checkpoint is refused.
    A directory whose weights do not fit its config.json, or hold NaN or infinite values, is
    refused too (ValueError naming the directory and the first offending tensor): diffusers
    itself would initialise the missing tensors at random and only warn. What fits is decided
    by diffusers' own loader (its loading info: missing, unexpected and mismatched keys, after
    its renaming of older checkpoints' keys, shards included).
    """
    path = teacher_path(name_or_path)
    config = json.loads((path / "config.json").read_text())
    cls = MODEL_CLASSES.get(config.get("_class_name"))
    if cls is None:
        raise ValueError(f"teacher {path}: unsupported model class {config.get('_class_name')!r}; "
                         f"supported: {', '.join(MODEL_CLASSES)}")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"teacher {path} has no .safetensors weights (pickled weights are not loaded)")
    model = _load_checked(cls, path, f"teacher {path}")
    pipeline = pipeline_dir(name_or_path)  # a pipeline's card sits beside its model_index.json (or in its model's folder)
    cards = [file for file in ([pipeline / "card.json"] if pipeline else []) + [path / "card.json"] if file.is_file()]
    card = json.loads(cards[0].read_text()) if cards else {}
    return model.to(device).eval().requires_grad_(False), card


def _load_checked(cls, path: Path, what: str):
    """``cls.from_pretrained(path)`` from safetensors, refused with one ValueError starting with
    ``what`` when the weights do not load, do not fit config.json (diffusers' own loading info:
    missing, unexpected and mismatched keys, after its renaming of older keys) or hold NaN or
    infinite values."""
    from safetensors import SafetensorError

    # Its warning about weights "newly initialized" would be a second line: the check says it.
    loader = logging.getLogger("diffusers.models.modeling_utils")
    level = loader.level
    loader.setLevel(logging.ERROR)
    try:
        model, info = cls.from_pretrained(str(path), use_safetensors=True, local_files_only=True,
                                          low_cpu_mem_usage=False, output_loading_info=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        # A size mismatch, a damaged or missing file: diffusers' own message, on one line (torch's
        # "Error(s) in loading state_dict" says what differs on its second line).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise ValueError(f"{what}: its weights do not load: {' '.join(lines[:2])}") from None
    finally:
        loader.setLevel(level)
    problems = [f"{len(info[key])} {kind} (e.g. {_key_name(info[key][0])})"
                for key, kind in (("mismatched_keys", "tensors differ in shape"),
                                  ("missing_keys", "tensors of config.json missing from the weights"),
                                  ("unexpected_keys", "weights not in config.json")) if info.get(key)]
    if problems:
        raise ValueError(f"{what}: config.json does not match its weights: {'; '.join(problems)}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what}: its weights hold {bad} NaN or infinite values in {name}")
    return model


def _key_name(entry) -> str:
    """A loading-info entry's tensor name (mismatched keys come as (name, shapes...) tuples)."""
    return str(entry[0] if isinstance(entry, (tuple, list)) else entry)


def build_teacher(arch: str, size: str, *, channels: int, resolution: int, num_classes: int):
    if arch == "unet":
        return models.build_unet(size, in_channels=channels, resolution=resolution)
    if arch == "dit":
        return models.build_dit(size, in_channels=channels, resolution=resolution, num_classes=max(1, num_classes))
    raise ValueError(f"unknown teacher architecture {arch!r}; choose unet or dit")


def generate(model, process, n: int, *, steps: int, seed: int, num_classes: int = 0, batch: int = 250,
             device: str | torch.device = "cpu", predict_fn=None) -> torch.Tensor:
    """n samples [n, C, H, W] in [-1, 1]; chunk i uses seed + i, so a seed fixes the set.

    A class-conditional model gets labels cycling through its classes. predict_fn(x_t, t,
    *labels), when given, replaces the model's own prediction (e.g. a corrected student);
    model then only fixes the sample shape.
    """
    net = models._unwrap(model)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    fn = predict_fn or (lambda x, t, *y: models.predict(model, x, t, *y))
    out = []
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        labels = None
        if isinstance(net, DiTTransformer2DModel):
            labels = torch.arange(start, start + b, device=device) % max(1, num_classes)
        out.append(process.sample(fn, (b, *shape), steps=steps, seed=seed + i, device=device, labels=labels).cpu())
    return torch.cat(out)


def evaluate(model, process, data: str, resolution: int, protocol: Protocol, *, num_classes: int = 0,
             device="cpu", vae=None) -> dict:
    """FID/KID/precision/recall of a model's samples against the validation split (a latent
    model's samples decoded by ``vae`` first)."""
    channels = vae.config.in_channels if vae is not None else models.in_channels(model)
    val = load_dataset(data, resolution, "val", channels)
    real = real_images(val, protocol.num_images)
    fake = generate(model, process, protocol.num_images, steps=protocol.sampler_steps, seed=protocol.seed,
                    num_classes=num_classes, device=device)
    if vae is not None:
        fake = latents.decode(vae, fake)
    return compute_metrics(fake, real, protocol, real_cache_key=val.name)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of teachers and VAEs trained here: a linear warm-up over min(200,
    steps / 10) steps, then a cosine decay to 0 at ``steps``."""
    warmup = min(200, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))


def train_teacher(
    out: str | Path,
    *,
    arch: str = "unet",
    size: str = "m",
    data: str = "mnist",
    resolution: int = 16,
    prediction: str = "epsilon",
    steps: int = 3000,
    batch: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    seed: int = 0,
    protocol: Protocol | None = None,
    command: str | None = None,
    progress: bool = True,
    vae: str | Path | None = None,
) -> dict:
    """Train a teacher from scratch, save it (EMA weights) with its card and sample grid.

    Returns the card. AdamW with a 200-step linear warm-up then cosine decay, gradient
    clipping, EMA; timesteps and noise from the noise process.

    With ``vae`` (a saved AutoencoderKL directory, e.g. from ``latents.train_vae``) the teacher
    is latent: a DiT trained on the VAE's latents of the data, saved as a ``DiTPipeline``
    directory (``transformer/``, ``vae/``, ``scheduler/`` with ``clip_sample`` false; a flow
    teacher gets a ``FlowMatchEulerDiscreteScheduler``) with card.json and decoded samples.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (teachers are never overwritten)")
    if vae is not None and arch != "dit":
        raise ValueError(f"a latent teacher is a DiT (a DiTPipeline), not {arch!r}: use --arch dit")
    protocol = dataclasses.replace(protocol or Protocol(), data=data)  # the data's own extractor, where one ships
    torch.manual_seed(seed)
    autoencoder = None
    if vae is not None:
        autoencoder = load_vae_dir(vae)
    train = load_dataset(data, resolution, "train", autoencoder.config.in_channels if autoencoder is not None else None)
    images, labels = stack_dataset(train)
    if autoencoder is not None:
        images = latents.encode(autoencoder, images)
    model = build_teacher(arch, size, channels=images.shape[1], resolution=images.shape[-1], num_classes=train.num_classes)
    process = make_process(prediction, clip=None if autoencoder is not None else 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    ema = EMAModel(model.parameters(), decay=ema_decay)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(range(steps), desc=f"teacher {arch}-{size}", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in bar:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x_t, t, target = process.training_pair(images[idx], generator=gen)
        y = labels[idx] if arch == "dit" else None
        loss = F.mse_loss(models.predict(model, x_t, t, y), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    train_time = time.time() - start
    ema.copy_to(model.parameters())
    model.eval()
    # Weights first: an evaluation that fails must not cost the training.
    out.mkdir(parents=True, exist_ok=True)
    if autoencoder is None:
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        _save_latent_pipeline(out, model, autoencoder, prediction, Path(vae))
    metrics = evaluate(model, process, data, resolution, protocol, num_classes=train.num_classes, vae=autoencoder)
    example = (1, *images.shape[1:])
    card = {
        "name": out.name,
        "arch": arch,
        "size": size,
        "data": data,
        "resolution": resolution,
        "channels": autoencoder.config.in_channels if autoencoder is not None else images.shape[1],  # the images'
        "num_classes": train.num_classes,
        "prediction": prediction,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "ema_decay": ema_decay,
        "grad_clip": grad_clip,
        "seed": seed,
        "train_wall_time_s": round(train_time, 1),
        "final_loss": round(loss.item(), 5),
        "params": models.count_params(model),
        "macs": models.count_macs(model, example),
        **({} if autoencoder is None else {
            "vae": Path(vae).name, "latent_shape": list(images.shape[1:]), "vae_params": models.count_params(autoencoder),
            "vae_decode_macs": models.count_decode_macs(autoencoder, example)}),
        **metrics,
        **protocol_record(protocol),
        "command": command or shlex.join(sys.argv),
        "torch": torch.__version__,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    grid = generate(model, process, 64, steps=protocol.sampler_steps, seed=protocol.seed, num_classes=train.num_classes)
    if autoencoder is not None:
        grid = latents.decode(autoencoder, grid)
    save_image((grid + 1) / 2, str(out / "samples.png"), nrow=8, padding=1)
    return card


def _save_latent_pipeline(out: Path, model, vae, prediction: str, vae_dir: Path) -> None:
    """A latent teacher as diffusers saves a DiTPipeline, with the scheduler it was trained
    under (the default linear schedule, or rectified flow) and the VAE's card beside it."""
    import shutil

    from diffusers import DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler

    if prediction == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  prediction_type={v: k for k, v in PREDICTION_TYPES.items()}[prediction],
                                  clip_sample=False)
    DiTPipeline(transformer=model, vae=vae, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    if (vae_dir / "card.json").is_file():
        shutil.copy(vae_dir / "card.json", out / "vae" / "card.json")

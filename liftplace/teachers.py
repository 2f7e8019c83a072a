"""Load and check teachers: shipped or local diffusers directories, their space and noise process.

A teacher directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
(``save_pretrained``), ``card.json`` (data, resolution, steps, wall time, parameters, MACs,
FID/KID with their protocol, the exact command) and ``samples.png`` (a grid to look at); the
shipped ones were trained by ``liftplace.recipes``.
The `cpu` preset's teachers ship inside the package under ``liftplace/assets/teachers``;
``load_teacher`` takes one of their names, any local diffusers UNet2DModel /
DiTTransformer2DModel directory (a user's own DDPM for CIFAR-10 or CelebA works the same way),
or a diffusers pipeline directory, whose scheduler config then sets the noise process
(``teacher_process``): pixel space (``DDPMPipeline`` / ``DDIMPipeline``: ``model_index.json``,
``unet/``, ``scheduler/``) or latent space (``DiTPipeline``: ``transformer/``, ``vae/``,
``scheduler/``; its frozen ``AutoencoderKL`` encodes the data and decodes samples, see
``teacher_space`` and ``liftplace.latents``), or text-to-image (``StableDiffusionPipeline``:
``unet/`` a UNet2DConditionModel, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``;
captions embedded once by its frozen text encoder, ``liftplace.text``). Other pipelines are
refused, naming the file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

from liftplace import files, latents
from liftplace.diffusion import SCHEDULE_FIELDS, NoiseProcess, make_process

TEACHERS_DIR = Path(__file__).parent / "assets" / "teachers"
MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel,
                 "UNet2DConditionModel": UNet2DConditionModel, "SD3Transformer2DModel": SD3Transformer2DModel}
# Pipelines (model_index.json's _class_name) whose denoiser works on pixels: the component
# that holds it. Their scheduler config decides the noise process.
PIXEL_PIPELINES = {"DDPMPipeline": "unet", "DDIMPipeline": "unet"}
# Pipelines whose denoiser works on a VAE's latents: (the denoiser's component, the VAE's).
LATENT_PIPELINES = {"DiTPipeline": ("transformer", "vae"), "StableDiffusionPipeline": ("unet", "vae"),
                    "StableDiffusion3Pipeline": ("transformer", "vae")}
# Latent pipelines whose denoiser is conditioned on captions, through the pipeline's frozen text
# encoder (text_encoder/, tokenizer/: liftplace.text).
TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
NOT_YET = {"LDMPipeline": "a latent pipeline with a VQ autoencoder (vqvae/), which is not supported yet"}
VAE_CLASSES = ("AutoencoderKL",)
# Schedulers that define a DDPM noise process by their betas (the sampler is DDIM whatever the
# pipeline's own scheduler: Stable Diffusion pipelines ship PNDM, Euler or DPM-Solver configs).
DDPM_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler")
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


def _local(name: str) -> Path:
    """Where a teacher's files are on this machine: a shipped teacher's folder, a local
    directory, or for a URI on a store (s3://..., gs://...), this machine's copy of it
    (liftplace.storage.input_copy: fetched once, shared by every trial here)."""
    from liftplace import storage

    if name in shipped_teachers():
        return TEACHERS_DIR / name
    return storage.input_copy(name, "teacher") if storage.is_uri(name) else Path(name).expanduser()


def teacher_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped name, a local directory or a URI; refuse anything else before it
    reaches diffusers (which would take a missing path for a hub id and try the network)."""
    name = str(name_or_path)
    path = _local(name)
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
    path = _local(str(name_or_path))
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
    patterns = (f"{deep}*.json", f"{deep}*.safetensors") + (("tokenizer*/*.txt",) if found is not None else ())  # merges.txt
    paths = [p for pattern in patterns for p in root.glob(pattern)
             if p.is_file() and p.name != "card.json"]
    return files.digest_files(root, paths)


@dataclass(frozen=True)
class Space:
    """Where a teacher's denoiser works, read from config files only (no weights).

    ``channels`` x ``size`` x ``size`` is the denoiser's input (and prediction); the data is
    loaded as ``image_channels`` x ``size * factor`` pixels. In pixel space ``factor`` is 1,
    ``image_channels == channels`` and ``vae`` is None; a latent teacher names its VAE's
    directory, which maps images to latents ``factor`` times smaller per side. A
    text-to-image teacher names its pipeline directory in ``text`` (its captions are embedded
    by the pipeline's text encoder, ``liftplace.text``).
    """

    channels: int
    size: int | None  # None: a model directory without sample_size (any data.resolution)
    image_channels: int
    factor: int = 1
    vae: Path | None = None
    text: Path | None = None

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
        if net.get("_class_name") in ("UNet2DConditionModel", "SD3Transformer2DModel"):
            raise ValueError(f"teacher {teacher_path(name_or_path)}: a {net['_class_name']} is conditioned on text "
                             "encoders' embeddings; give its StableDiffusionPipeline (or StableDiffusion3Pipeline) "
                             "directory, with its text encoders, tokenizers, VAE and scheduler")
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
    text = None
    if kind in TEXT_PIPELINES:
        from liftplace import text as captions

        captions.check_encoder(pipeline, net)
        text = pipeline
    return Space(channels, size, int(vae.get("in_channels", 3)), latents.vae_factor(vae), vae_dir, text)


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
    # bounded by 1); the other classes sample without clipping, so they clip only where their
    # config says clip_sample.
    clips = config.get("clip_sample", kind in ("DDPMScheduler", "DDIMScheduler"))
    clip = float(config.get("clip_sample_range", 1.0)) if clips else None
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
    return files.read_json_object(file, "teacher")


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

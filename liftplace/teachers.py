"""Train, save and load teachers: diffusers directories (safetensors) plus a model card.

A teacher directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
(``save_pretrained``), ``card.json`` (data, resolution, steps, wall time, parameters, MACs,
FID/KID with their protocol, the exact command) and ``samples.png`` (a grid to look at).
The `cpu` preset's teachers ship inside the package under ``liftplace/assets/teachers``;
``load_teacher`` takes one of their names or any local diffusers UNet2DModel /
DiTTransformer2DModel directory (a user's own DDPM for CIFAR-10 or CelebA works the same way).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image
from tqdm import tqdm

from liftplace import models
from liftplace.data import load_dataset
from liftplace.diffusion import make_process
from liftplace.metrics import Protocol, compute_metrics, protocol_record, real_images, stack_dataset

TEACHERS_DIR = Path(__file__).parent / "assets" / "teachers"
MODEL_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}


def shipped_teachers() -> list[str]:
    """Names of the teachers shipped with the package (e.g. "unet-m", "dit-s")."""
    if not TEACHERS_DIR.is_dir():
        return []
    return sorted(p.name for p in TEACHERS_DIR.iterdir() if (p / "config.json").is_file())


def teacher_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped name or a local directory; refuse anything else before it reaches
    diffusers (which would take a missing path for a hub id and try the network)."""
    name = str(name_or_path)
    if name in shipped_teachers():
        return TEACHERS_DIR / name
    path = Path(name).expanduser()
    if not path.is_dir():
        shipped = ", ".join(shipped_teachers()) or "none"
        raise FileNotFoundError(f"teacher not found: {name} is neither a directory nor a shipped teacher ({shipped})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {path} has no config.json (save it with save_pretrained)")
    return path


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
        raise ValueError(f"teacher {path}: its weights do not load: {' '.join(lines[:2])}") from None
    finally:
        loader.setLevel(level)
    problems = [f"{len(info[key])} {what} (e.g. {_key_name(info[key][0])})"
                for key, what in (("mismatched_keys", "tensors differ in shape"),
                                  ("missing_keys", "tensors of config.json missing from the weights"),
                                  ("unexpected_keys", "weights not in config.json")) if info.get(key)]
    if problems:
        raise ValueError(f"teacher {path}: config.json does not match its weights: {'; '.join(problems)}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"teacher {path}: its weights hold {bad} NaN or infinite values in {name}")
    card_file = path / "card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    return model.to(device).eval().requires_grad_(False), card


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
             device="cpu") -> dict:
    """FID/KID/precision/recall of a model's samples against the validation split."""
    val = load_dataset(data, resolution, "val", models.in_channels(model))
    real = real_images(val, protocol.num_images)
    fake = generate(model, process, protocol.num_images, steps=protocol.sampler_steps, seed=protocol.seed,
                    num_classes=num_classes, device=device)
    return compute_metrics(fake, real, protocol, real_cache_key=val.name)


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
) -> dict:
    """Train a teacher from scratch, save it (EMA weights) with its card and sample grid.

    Returns the card. AdamW with a 200-step linear warm-up then cosine decay, gradient
    clipping, EMA; timesteps and noise from the noise process.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (teachers are never overwritten)")
    protocol = protocol or Protocol()
    torch.manual_seed(seed)
    train = load_dataset(data, resolution, "train")
    images, labels = stack_dataset(train)
    model = build_teacher(arch, size, channels=images.shape[1], resolution=resolution, num_classes=train.num_classes)
    process = make_process(prediction)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
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
    model.save_pretrained(str(out), safe_serialization=True)
    metrics = evaluate(model, process, data, resolution, protocol, num_classes=train.num_classes)
    example = (1, images.shape[1], resolution, resolution)
    card = {
        "name": out.name,
        "arch": arch,
        "size": size,
        "data": data,
        "resolution": resolution,
        "channels": images.shape[1],
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
        **metrics,
        **protocol_record(protocol),
        "command": command or shlex.join(sys.argv),
        "torch": torch.__version__,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    grid = generate(model, process, 64, steps=protocol.sampler_steps, seed=protocol.seed, num_classes=train.num_classes)
    save_image((grid + 1) / 2, str(out / "samples.png"), nrow=8, padding=1)
    return card

"""Train the shipped teachers, VAEs and the FID extractor.

The recipes behind ``liftplace teacher train``, ``liftplace teacher vae`` and ``liftplace
extractor train``. ``train_teacher`` writes a teacher directory as ``liftplace.teachers``
loads it: ``config.json`` and ``diffusion_pytorch_model.safetensors`` (``save_pretrained``),
``card.json`` (data, resolution, steps, wall time, parameters, MACs, FID/KID with their
protocol, the exact command) and ``samples.png`` (a grid to look at); given a VAE from
``train_vae`` it writes a latent ``DiTPipeline`` directory instead. ``train_extractor`` trains
the ``digits-cnn`` feature extractor that ``liftplace.metrics`` measures FID with. Teachers and
VAEs are evaluated, as students are, by ``liftplace.evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from torch import Tensor
from torchvision.utils import save_image
from tqdm import tqdm

from liftplace import latents, models
from liftplace.data import load_dataset
from liftplace.diffusion import make_process
from liftplace.evaluate import evaluate, generate
from liftplace.metrics import (DEFAULT_EXTRACTOR_WEIGHTS, DigitsCNN, Protocol, compute_metrics, protocol_record,
                               real_images, save_extractor, stack_dataset)
from liftplace.teachers import PREDICTION_TYPES, load_vae_dir


# --- teachers -------------------------------------------------------------------------------

def build_teacher(arch: str, size: str, *, channels: int, resolution: int, num_classes: int):
    """An untrained teacher network: a UNet or a class-conditional DiT of a ``models`` size."""
    if arch == "unet":
        return models.build_unet(size, in_channels=channels, resolution=resolution)
    if arch == "dit":
        return models.build_dit(size, in_channels=channels, resolution=resolution, num_classes=max(1, num_classes))
    if arch == "sd":
        return models.build_sd_unet(size, in_channels=channels, resolution=resolution, cross_attention_dim=TEXT_HIDDEN)
    raise ValueError(f"unknown teacher architecture {arch!r}; choose unet, dit or sd")


# A text-to-image teacher's text side (arch "sd"): a character-level tokenizer of this many tokens
# per caption and a randomly initialised, frozen CLIPTextModel of this width (no pretrained CLIP
# is at hand offline: its embeddings tell captions apart, and the U-Net learns what they mean).
TEXT_TOKENS = 32
TEXT_HIDDEN = 32
CAPTION_DROPOUT = 0.1  # captions dropped to the empty one while training, for classifier-free guidance


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
    guidance: float = 1.0,
) -> dict:
    """Train a teacher from scratch, save it (EMA weights) with its card and sample grid.

    Returns the card. AdamW with a 200-step linear warm-up then cosine decay, gradient
    clipping, EMA; timesteps and noise from the noise process.

    With ``vae`` (a saved AutoencoderKL directory, e.g. from ``train_vae``) the teacher
    is latent: a DiT trained on the VAE's latents of the data, saved as a ``DiTPipeline``
    directory (``transformer/``, ``vae/``, ``scheduler/`` with ``clip_sample`` false; a flow
    teacher gets a ``FlowMatchEulerDiscreteScheduler``) with card.json and decoded samples.
    With ``arch="sd"`` (and ``vae``, and captioned ``data`` such as "mnist-captions") it is a
    text-to-image U-Net (``models.SD_SIZES``) trained on the captions' embeddings by a frozen
    text encoder (``TEXT_HIDDEN`` wide, randomly initialised: nothing pretrained is at hand
    offline), ``CAPTION_DROPOUT`` of them dropped to the empty caption, saved as a
    ``StableDiffusionPipeline`` directory and measured with classifier-free guidance at
    ``guidance`` (its card also has ``text_alignment``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (teachers are never overwritten)")
    if vae is not None and arch not in ("dit", "sd"):
        raise ValueError(f"a latent teacher is a DiT (a DiTPipeline) or text-to-image (sd), not {arch!r}: use --arch dit")
    if arch == "sd" and vae is None:
        raise ValueError("a text-to-image teacher (--arch sd) is latent: give --vae DIR")
    if arch == "sd" and size not in models.SD_SIZES:
        raise ValueError(f"unknown text-to-image U-Net size {size!r}; choose one of {sorted(models.SD_SIZES)}")
    if arch == "sd" and prediction not in PREDICTION_TYPES.values():
        raise ValueError(f"a text-to-image teacher is saved with a DDIM scheduler: --prediction epsilon or v, not "
                         f"{prediction!r}")
    if guidance != 1.0 and arch != "sd":
        raise ValueError("--guidance is classifier-free guidance of a text-to-image teacher (--arch sd)")
    protocol = dataclasses.replace(protocol or Protocol(), data=data, guidance_scale=guidance)  # the data's own extractor, where one ships
    torch.manual_seed(seed)
    autoencoder = None
    if vae is not None:
        autoencoder = load_vae_dir(vae)
    train = load_dataset(data, resolution, "train", autoencoder.config.in_channels if autoencoder is not None else None)
    images, labels = stack_dataset(train)
    if autoencoder is not None:
        images = latents.encode(autoencoder, images)
    context = null = tokens = None
    if arch == "sd":
        import tempfile

        from liftplace import text

        if getattr(train, "captions", None) is None:
            raise ValueError(f"data {data} has no captions; a text-to-image teacher needs them (mnist-captions, or "
                             "folder:PATH with a metadata.jsonl)")
        tokens = Path(tempfile.mkdtemp(prefix="liftplace-tokenizer-"))
        tokenizer = text.build_tokenizer(tokens, max_length=TEXT_TOKENS)
        encoder = text.build_encoder(tokenizer, hidden=TEXT_HIDDEN, seed=seed)
        distinct = sorted(set(train.captions) | {text.EMPTY})
        table = text.encode(tokenizer, encoder, distinct)
        row = {c: i for i, c in enumerate(distinct)}
        context = table[torch.tensor([row[c] for c in train.captions])]
        null = table[row[text.EMPTY]]
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
        if context is not None:
            dropped = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
            y = torch.where(dropped.view(-1, 1, 1), null, context[idx])
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
    if arch == "sd":
        save_text_pipeline(out, model, vae, tokenizer_dir=tokens, encoder=encoder, prediction=prediction)
        shutil.rmtree(tokens, ignore_errors=True)
    elif autoencoder is None:
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        _save_latent_pipeline(out, model, autoencoder, prediction, Path(vae))
    metrics = evaluate(model, process, data, resolution, protocol, num_classes=train.num_classes, vae=autoencoder,
                       text=out if arch == "sd" else None)
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
        "macs": models.count_macs(model, example, None if context is None else context[:1]),
        **({} if context is None else {"text_encoder_params": models.count_params(encoder), "caption_tokens": TEXT_TOKENS,
                                       "caption_dropout": CAPTION_DROPOUT}),
        **({} if autoencoder is None else {
            "vae": Path(vae).name, "latent_shape": list(images.shape[1:]), "vae_params": models.count_params(autoencoder),
            "vae_decode_macs": models.count_decode_macs(autoencoder, example)}),
        **metrics,
        **protocol_record(protocol),
        "command": command or shlex.join(sys.argv),
        "torch": torch.__version__,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    captions = None
    if arch == "sd":  # a row per digit: "a handwritten zero" ... "a handwritten nine", 8 samples each
        from liftplace import text
        from liftplace.data import DIGIT_WORDS

        captions = text.captions_of(out, [f"a handwritten {word}" for word in DIGIT_WORDS for _ in range(8)])
    grid = generate(model, process, 80 if captions is not None else 64, steps=protocol.sampler_steps, seed=protocol.seed,
                    num_classes=train.num_classes, captions=captions, guidance=guidance)
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


def save_text_pipeline(out: str | Path, unet, vae_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                       encoder=None, prediction: str = "epsilon", max_length: int = 32, hidden: int | None = None,
                       seed: int = 0) -> Path:
    """A text-to-image teacher saved as diffusers saves a ``StableDiffusionPipeline``: ``unet``,
    the VAE of ``vae_dir``, a tokenizer (``tokenizer_dir``'s, or a character-level one,
    ``text.build_tokenizer``), a text encoder (``encoder``, or a small randomly initialised
    ``CLIPTextModel`` of the U-Net's cross-attention width: no pretrained CLIP is at hand
    offline) and a DDIM scheduler of the default linear schedule (``clip_sample`` false)."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from liftplace import text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = text.build_tokenizer(out / "tokenizer", max_length=max_length)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if isinstance(unet, models.SD3Transformer2DModel):
        return _save_sd3_pipeline(out, unet, vae_dir, tokenizer, seed, shift=3.0)
    if encoder is None:
        encoder = text.build_encoder(tokenizer, hidden=hidden or unet.config.cross_attention_dim, seed=seed)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type={v: k for k, v in PREDICTION_TYPES.items()}[prediction], clip_sample=False,
                              steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=load_vae_dir(vae_dir), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    if (Path(vae_dir) / "card.json").is_file():
        shutil.copy(Path(vae_dir) / "card.json", out / "vae" / "card.json")
    return out


def _save_sd3_pipeline(out: Path, transformer, vae_dir, tokenizer, seed: int, shift: float) -> Path:
    """An SD3 transformer saved as a ``StableDiffusion3Pipeline``: two small CLIP encoders with
    projections (widths splitting the transformer's pooled_projection_dim 2:3), no third (T5)
    encoder, as diffusers allows, and a rectified-flow scheduler of a fixed ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from liftplace import text

    pooled = transformer.config.pooled_projection_dim
    first = 2 * pooled // 5
    encoders = [text.build_encoder(tokenizer, hidden=width, projection=width, seed=seed + i)
                for i, width in enumerate((first, pooled - first))]
    pipeline = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                        vae=load_vae_dir(vae_dir), text_encoder=encoders[0], tokenizer=tokenizer,
                                        text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
                                        tokenizer_3=None)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    return out


# --- VAEs -----------------------------------------------------------------------------------

# The shipped VAE's shape: 1-channel 16x16 digits -> 4 x 8 x 8 latents (two blocks: one halving).
VAE_SPEC = {"block_out_channels": (16, 32), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}


def train_vae(out: str | Path, *, data: str = "mnist", resolution: int = 16, steps: int = 2000, batch: int = 64,
              lr: float = 1e-3, kl_weight: float = 1e-4, seed: int = 0, protocol=None, command: str | None = None,
              progress: bool = True) -> dict:
    """Train a small AutoencoderKL on a data set, save it (``save_pretrained``) with card.json
    and samples.png (validation images above their reconstructions); returns the card.

    Loss: the mean squared reconstruction error of a posterior sample plus ``kl_weight`` times
    the KL divergence to N(0, 1) per latent element (a light KL: the latents stay informative).
    After training, ``scaling_factor`` is set to 1 / the standard deviation of the training
    latents (posterior means), as latent diffusion does, so that a denoiser sees unit variance.
    The card states the reconstruction error and the FID of the reconstructed validation images:
    the best FID a latent teacher on this VAE can reach under the protocol.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (models are never overwritten)")
    protocol = dataclasses.replace(protocol or Protocol(), data=data)  # the data's own extractor, where one ships
    torch.manual_seed(seed)
    images, _ = stack_dataset(load_dataset(data, resolution, "train"))
    blocks = len(VAE_SPEC["block_out_channels"])
    vae = AutoencoderKL(in_channels=images.shape[1], out_channels=images.shape[1], sample_size=resolution,
                        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        **VAE_SPEC)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)  # as teachers are trained
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    vae.train()
    bar = tqdm(range(steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    train_time = time.time() - start
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0)
    scale = 1.0 / float(latents.encode(vae, images).std())
    vae.register_to_config(scaling_factor=scale)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(out), safe_serialization=True)
    val = load_dataset(data, resolution, "val", images.shape[1])
    real = real_images(val, protocol.num_images)
    recon = latents.decode(vae, latents.encode(vae, real))
    metrics = compute_metrics(recon, real, protocol, real_cache_key=val.name)
    card = {"name": out.name, "kind": "AutoencoderKL", "data": data, "resolution": resolution,
            "channels": images.shape[1], "latent_shape": list(latents.encode(vae, images[:1]).shape[1:]),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in VAE_SPEC.items()},
            "steps": steps, "batch": batch, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "scaling_factor": scale, "train_wall_time_s": round(train_time, 1),
            "val_recon_mse": float(torch.nn.functional.mse_loss(recon, real)),
            "params": models.count_params(vae),
            **{f"recon_{k}": v for k, v in metrics.items()}, **protocol_record(protocol),
            "command": command or shlex.join(sys.argv), "torch": torch.__version__}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    grid = torch.cat([torch.cat([real[i:i + 8], recon[i:i + 8]]) for i in range(0, 32, 8)])
    grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 64 // resolution), mode="nearest")
    save_image((grid + 1) / 2, str(out / "samples.png"), nrow=8, padding=2, pad_value=1.0)
    return card


# --- the FID extractor ----------------------------------------------------------------------

def classifier_accuracy(model: DigitsCNN, images: Tensor, labels: Tensor) -> float:
    """The share of ``images`` an extractor classifies as ``labels`` say (its validation accuracy)."""
    with torch.no_grad():
        pred = torch.cat([model(x)[1].argmax(1) for x in images.split(500)])
    return (pred == labels).float().mean().item()


def train_extractor(data: str = "mnist", resolution: int = 16, *, epochs: int = 20, seed: int = 0,
                    out: str | Path = DEFAULT_EXTRACTOR_WEIGHTS, log=print) -> dict:
    """Train the digits-cnn feature extractor on a labelled dataset's train split and save it.

    Small shifts (a random 0-2 pixel translation) keep the features stable under the small
    misalignments that generated digits have. Returns the validation accuracy.
    """
    torch.manual_seed(seed)
    train_x, train_y = stack_dataset(load_dataset(data, resolution, "train"))
    val_x, val_y = stack_dataset(load_dataset(data, resolution, "val"))
    if train_x.shape[1] != 1 or int(train_y.min()) < 0:
        raise ValueError(f"the digits-cnn extractor needs a labelled 1-channel dataset; {data!r} is not")
    model = DigitsCNN(int(train_y.max()) + 1, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    steps = epochs * (len(train_x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    pad = max(1, resolution // 8)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_x)).split(64)[: len(train_x) // 64]:
            x = F.pad(train_x[idx], (pad,) * 4, value=-1.0)
            dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[..., dy:dy + resolution, dx:dx + resolution]
            loss = F.cross_entropy(model(x)[1], train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        log(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  val accuracy {classifier_accuracy(model, val_x, val_y):.4f}")
    accuracy = classifier_accuracy(model, val_x, val_y)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_extractor(model, out)
    card = {"accuracy": round(accuracy, 4), "data": data, "resolution": resolution, "epochs": epochs, "seed": seed,
            "val_images": len(val_x), "command": shlex.join(["liftplace", *sys.argv[1:]])}
    Path(out).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card
